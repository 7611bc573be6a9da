"""The validation split (config.validation_examples_per_class): held-out indices, pipelines, best selection on it."""

from __future__ import annotations

import json
import re

import numpy as np
import PIL.Image
import pytest

from ffsd_jax import config_checks
from ffsd_jax import data
from ffsd_jax import errors
from ffsd_jax import evaluation
from ffsd_jax import train_loop
from ffsd_jax.data import pipeline
from ffsd_jax.data import sources
from test_data import _config  # The default config without a decoded-image cache, with overrides.
from test_sharding import fast_compilation, tiny_config  # pylint: disable=unused-import


# ----------------------------------------------------------------------------------------------------------------------
# The choice of indices.


def test_hold_out_is_class_balanced_disjoint_seeded_and_follows_the_documented_rule():
  labels = np.random.default_rng(7).permutation(np.repeat(np.arange(4), [5, 6, 7, 8]))  # 26 examples, 4 classes.
  train, validation = sources.hold_out(labels, 3, 4, seed=0)
  assert np.bincount(labels[validation], minlength=4).tolist() == [3, 3, 3, 3]
  assert np.bincount(labels[train], minlength=4).tolist() == [2, 3, 4, 5]
  assert not set(train.tolist()) & set(validation.tolist())
  assert sorted(train.tolist() + validation.tolist()) == list(range(26))
  assert (np.diff(validation) > 0).all() and (np.diff(train) > 0).all()
  # The rule in the docstring, computed here on its own: class c's first 3 of default_rng([seed, 2, c]).permutation.
  expected = sorted(int(i) for c in range(4)
                    for i in np.random.default_rng([0, 2, c]).permutation(np.flatnonzero(labels == c))[:3])
  assert validation.tolist() == expected
  assert np.array_equal(sources.hold_out(labels, 3, 4, seed=0)[1], validation)  # Deterministic per seed ...
  assert not np.array_equal(sources.hold_out(labels, 3, 4, seed=1)[1], validation)  # ... and another for another.


def test_hold_out_of_a_class_with_too_few_examples_is_one_line():
  labels = np.repeat(np.arange(3), [4, 2, 5])
  with pytest.raises(errors.DataError) as raised:
    sources.hold_out(labels, 2, 3, seed=0)
  assert str(raised.value) == ('config.validation_examples_per_class=2 but class 1 has only 2 training examples; set '
                               '--config.validation_examples_per_class to at most 1.')


def test_validation_examples_per_class_is_validated_with_one_line():
  with pytest.raises(config_checks.ConfigError) as raised:
    config_checks.validate_config(tiny_config(validation_examples_per_class=-1))
  assert str(raised.value) == ('config.validation_examples_per_class=-1: must be an integer >= 0; set '
                               '--config.validation_examples_per_class=0 (no validation split)')
  config_checks.validate_config(tiny_config(validation_examples_per_class=2))
  assert 'validation_examples_per_class' in config_checks.OPTIMISATION_KEYS  # A resume refuses a change.


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic data (the decoded-array pipeline).


def _synthetic(**overrides):
  values = dict(dataset='synthetic', num_classes=4, image_size=8, synthetic_num_train_examples=40,
                synthetic_num_eval_examples=8, validation_examples_per_class=3)
  return _config(**{**values, **overrides})


def _spy_array_train_iterator(monkeypatch) -> dict:
  seen = {}
  original = pipeline.array_train_iterator

  def spy(images, labels, **kwargs):
    seen.update(images=images, labels=labels)
    return original(images, labels, **kwargs)

  monkeypatch.setattr(pipeline, 'array_train_iterator', spy)
  return seen


def _validation_examples(config, global_batch_size=8) -> tuple[np.ndarray, np.ndarray]:
  batches = list(data.create_validation_batches(config, global_batch_size=global_batch_size, process_index=0,
                                                process_count=1))
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  assert all(b['image'].shape[0] == global_batch_size for b in batches)  # Padded to full batches.
  return images, labels


def test_synthetic_validation_is_held_out_of_the_training_sampler(monkeypatch):
  config = _synthetic(seed=0)
  # The synthetic training split, generated here on its own (data._synthetic_arrays_cached's rule).
  rng = np.random.default_rng([0, 0])
  all_images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
  all_labels = rng.integers(0, 4, 40).astype(np.int32)
  info = data.get_dataset_info(config)
  assert (info.num_train_examples, info.num_validation_examples) == (28, 12)
  seen = _spy_array_train_iterator(monkeypatch)
  iterator = data.create_train_iterator(config, global_batch_size=8, process_index=0, process_count=1, seed=0)
  assert iterator.steps_per_epoch == 28 // 8
  val_images, val_labels = _validation_examples(config)
  assert np.bincount(val_labels, minlength=4).tolist() == [3, 3, 3, 3]
  # The held-out examples are raw (no augmentation) training examples, and none of them is in the sampler's set.
  full_rows = {row.tobytes(): i for i, row in enumerate(all_images)}
  val_indices = sorted(full_rows[row.tobytes()] for row in val_images)
  train_indices = sorted(full_rows[row.tobytes()] for row in seen['images'])
  assert len(val_indices) == 12 and len(train_indices) == 28
  assert not set(val_indices) & set(train_indices) and sorted(val_indices + train_indices) == list(range(40))
  assert np.array_equal(all_labels[val_indices], val_labels)
  assert np.array_equal(all_labels[train_indices], seen['labels'])
  # Deterministic per seed; another seed holds out other examples (of its own synthetic split, the same size).
  assert np.array_equal(_validation_examples(_synthetic(seed=0))[0], val_images)
  other = _synthetic(seed=1)
  assert data.get_dataset_info(other).num_validation_examples == 12
  assert not np.array_equal(_validation_examples(other)[0], val_images)


def test_no_validation_split_keeps_the_training_set_and_refuses_validation_batches():
  config = _synthetic(validation_examples_per_class=0)
  info = data.get_dataset_info(config)
  assert (info.num_train_examples, info.num_validation_examples) == (40, 0)
  with pytest.raises(ValueError, match='no validation split'):
    data.create_validation_batches(config, global_batch_size=8, process_index=0, process_count=1)


def test_holding_out_the_whole_training_set_is_one_line():
  with pytest.raises(errors.DataError, match=re.escape(
      'config.validation_examples_per_class=10 holds out 40 of the 40 training examples (4 classes); set '
      '--config.validation_examples_per_class to at most 9.')):
    data.get_dataset_info(_synthetic(validation_examples_per_class=10))


# ----------------------------------------------------------------------------------------------------------------------
# An image folder read per example (the grain pipeline).


def _image_folder(root, size=72) -> dict[str, list[str]]:
  rng = np.random.default_rng(0)
  files = {}
  for split, count in (('train', 5), ('test', 1)):
    for name in ('ant', 'bee', 'cow'):
      for i in range(count):
        path = root / split / name / f'{i}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        if split == 'train':
          files.setdefault(name, []).append(str(path.resolve()))
  return files


def test_image_folder_validation_files_are_class_balanced_and_never_trained_on(tmp_path, monkeypatch):
  files = _image_folder(tmp_path / 'folder')
  readers = {}
  original_train, original_eval = pipeline.grain_train_iterator, pipeline.GrainEvalBatches

  def spy_train(reader, num_examples, **kwargs):
    readers['train'] = reader
    return original_train(reader, num_examples, **kwargs)

  def spy_eval(reader, *args):
    readers['validation'] = reader
    return original_eval(reader, *args)

  monkeypatch.setattr(pipeline, 'grain_train_iterator', spy_train)
  monkeypatch.setattr(pipeline, 'GrainEvalBatches', spy_eval)

  def validation_files(seed):
    config = _config(dataset='image_folder', image_folder=str(tmp_path / 'folder'), num_classes=3, image_size=72,
                     num_data_workers=0, data_cache_dir=str(tmp_path / 'cache'), validation_examples_per_class=2,
                     seed=seed)
    info = data.get_dataset_info(config)
    assert (info.num_train_examples, info.num_validation_examples) == (9, 6)
    iterator = data.create_train_iterator(config, global_batch_size=3, process_index=0, process_count=1, seed=seed)
    assert iterator.steps_per_epoch == 3
    batch = next(iterator)
    iterator.close()
    assert batch['image'].shape == (3, 72, 72, 3)
    batches = list(data.create_validation_batches(config, global_batch_size=4, process_index=0, process_count=1))
    assert [int(b['mask'].sum()) for b in batches] == [4, 2]
    assert np.bincount(np.concatenate([b['label'][b['mask']] for b in batches]), minlength=3).tolist() == [2, 2, 2]
    trained = {readers['train'].describe(i) for i in range(len(readers['train']))}
    held_out = {readers['validation'].describe(i) for i in range(len(readers['validation']))}
    return trained, held_out

  trained, held_out = validation_files(seed=0)
  every_file = {path for paths in files.values() for path in paths}
  assert len(trained) == 9 and len(held_out) == 6
  assert not trained & held_out and trained | held_out == every_file
  assert all(len(held_out & set(paths)) == 2 for paths in files.values())  # Two of every class folder.
  assert validation_files(seed=0)[1] == held_out
  assert validation_files(seed=1)[1] != held_out


# ----------------------------------------------------------------------------------------------------------------------
# The loop: best selected on validation top-1, the summary, an exact resume.

# Scripted top-1 (%) of the leader at the 3 evaluations (steps 4, 8, 12): the best test epoch is the 3rd (50), the
# best validation epoch the 2nd (70), whose test top-1 is 40. Test: 40 examples, validation: 10 classes x 2 = 20.
TEST_TOP1 = (30.0, 40.0, 50.0)
VAL_TOP1 = (60.0, 70.0, 65.0)


def test_best_checkpoint_is_selected_on_validation_and_survives_a_resume(tmp_path, monkeypatch, caplog):
  real_run_eval = evaluation.run_eval
  test_calls = []

  def scripted(eval_fn, variables, setup, split='test'):
    sums = dict(real_run_eval(eval_fn, variables, setup, split=split))
    if split == 'test':
      test_calls.append(sums['count'])
    top1 = (TEST_TOP1 if split == 'test' else VAL_TOP1)[len(test_calls) - 1]
    sums['correct/leader'] = top1 / 100 * sums['count']
    return sums

  monkeypatch.setattr(evaluation, 'run_eval', scripted)
  workdir = str(tmp_path / 'run')
  # 84 synthetic examples, 20 held out: 64 to train on, 4 steps per epoch at batch 16.
  overrides = dict(synthetic_num_train_examples=84, validation_examples_per_class=2)
  first = train_loop.train_and_evaluate(tiny_config(max_steps=8, **overrides), workdir)
  assert (first['best_val_top1'], first['test_top1_at_best_val'], first['best_checkpoint_step']) == (70.0, 40.0, 8)
  # Extended from the step-8 checkpoint: the 3rd evaluation (val 65) must not beat the restored best (70).
  with caplog.at_level('INFO'):
    summary = train_loop.train_and_evaluate(tiny_config(max_steps=12, **overrides), workdir)
  assert test_calls == [40, 40, 40]
  # The console's last word leads with the figure selected on validation and names the test-selected one as such.
  assert f'Finished at step 12: leader top-1 test at best val 40.00 (val 70.00), best test epoch 50.00, last 50.00 (' \
      f'{workdir}/summary.json).' in [r.getMessage() for r in caplog.records]
  (validation_line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith('validation (')][-1:]
  assert validation_line.startswith('validation (20 held-out training images): top1/ensemble ')
  assert validation_line.endswith(' | leader best val top1 70.00 (test top1 there 40.00)')
  assert 'top1/leader 65.00' in validation_line and 'loss/' not in validation_line  # Top-1 only, as the test line.
  assert summary['step'] == 12 and summary['validation_examples'] == 20
  assert summary['best_val_top1'] == 70.0 and summary['test_top1_at_best_val'] == 40.0
  assert summary['best_leader_top1'] == 50.0 and summary['last_test_top1'] == summary['last_leader_top1'] == 50.0
  assert (summary['best_checkpoint_step'], summary['best_checkpoint_top1']) == (8, 40.0)
  assert summary['best_checkpoint_selected_on'] == 'val/top1'
  assert summary['last_eval']['val/top1/leader'] == 65.0 and 'val/loss/leader' in summary['last_eval']
  with open(f'{workdir}/summary.json') as f:
    assert json.load(f) == summary
  records = [json.loads(line) for line in open(f'{workdir}/metrics.jsonl') if 'val/top1/leader' in line]
  assert [(r['step'], r['val/top1/leader'], r['val/best_top1/leader']) for r in records] == [
      (4, 60.0, 60.0), (8, 70.0, 70.0), (12, 65.0, 70.0)]


def test_tfds_labels_are_read_without_decoding_and_cached(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(sources, 'SKIP_TFDS_IMAGE_DECODING', False)  # mock_data serves decoded arrays only.
  folder = tmp_path / 'cifar100' / '3.0.2'
  folder.mkdir(parents=True)
  (folder / 'dataset_info.json').write_text('{}')
  config = _config(dataset='cifar100', data_dir=str(tmp_path), data_cache_dir=str(tmp_path / 'cache'))
  with tfds.testing.mock_data(num_examples=40):
    reader = sources.TfdsReader(config, 'train')
    expected = np.asarray([label for _, label in reader.iter_all()], np.int32)
    labels = sources.load_labels(config, reader, {'name': 'cifar100', 'split': 'train'})
  assert np.array_equal(labels, expected) and labels.dtype == np.int32
  (cached,) = (tmp_path / 'cache').glob('cifar100-train-*.labels-only.npy')
  assert np.array_equal(np.load(cached), expected)
