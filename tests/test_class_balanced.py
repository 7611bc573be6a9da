"""Class-balanced batches (config.batch_images_per_class, MCL's MPerClassSampler): the rule, both pipelines, resume."""

from __future__ import annotations

import numpy as np
import pytest

from ffsd_jax import data
from ffsd_jax import errors
from ffsd_jax.data import pipeline
from test_data import _config  # The default config without a decoded-image cache, with overrides.
from test_validation_split import _image_folder

# 30 classes of uneven size; class 29 has a single example (drawn with replacement when chosen).
LABELS = np.random.default_rng(3).permutation(np.concatenate(
    [np.full(n, c) for c, n in enumerate(np.random.default_rng(4).integers(2, 12, 29))] + [np.array([29])]))
GLOBAL, PER_CLASS = 24, 2


def _groups(indices: np.ndarray, per_class: int) -> np.ndarray:
  return np.asarray(indices).reshape(-1, per_class)


def test_every_batch_holds_distinct_classes_in_groups_of_m_drawn_within_the_class():
  order = pipeline.ClassBalancedOrder(LABELS, PER_CLASS, GLOBAL, seed=0)
  counts = np.zeros(30)
  for epoch in range(2):
    for step in range(100):
      groups = _groups(order.indices(epoch, np.arange(step * GLOBAL, (step + 1) * GLOBAL)), PER_CLASS)
      group_labels = LABELS[groups]
      assert (group_labels == group_labels[:, :1]).all()  # Each group is one class...
      assert len(set(group_labels[:, 0])) == GLOBAL // PER_CLASS  # ...and no class has two groups.
      for group, label in zip(groups, group_labels[:, 0]):
        # Without replacement within the class, unless it has fewer than m examples.
        assert len(set(group)) == PER_CLASS or (LABELS == label).sum() < PER_CLASS
      counts[group_labels[:, 0]] += 1
  # Classes are drawn uniformly: each is in 12 of 30 batches on average (80 of 200 here), whatever its size.
  assert counts.sum() == 200 * 12 and counts.min() > 50 and counts.max() < 115
  assert counts[29] > 50  # Even the one-example class.


def test_the_order_is_a_pure_function_of_seed_epoch_and_step():
  order = pipeline.ClassBalancedOrder(LABELS, PER_CLASS, GLOBAL, seed=0)
  first = order.indices(0, np.arange(3 * GLOBAL))
  again = pipeline.ClassBalancedOrder(LABELS, PER_CLASS, GLOBAL, seed=0)
  np.testing.assert_array_equal(again.indices(0, np.arange(2 * GLOBAL, 3 * GLOBAL)), first[2 * GLOBAL:])  # Any order.
  np.testing.assert_array_equal(again.indices(0, np.arange(3 * GLOBAL)), first)
  assert not np.array_equal(first[:GLOBAL], first[GLOBAL:2 * GLOBAL])  # Steps differ,
  assert not np.array_equal(order.indices(1, np.arange(GLOBAL)), first[:GLOBAL])  # epochs differ,
  assert not np.array_equal(pipeline.ClassBalancedOrder(LABELS, PER_CLASS, GLOBAL, seed=1).indices(
      0, np.arange(GLOBAL)), first[:GLOBAL])  # and seeds differ.


def test_array_pipeline_batches_are_class_balanced_process_invariant_and_resume_exactly():
  images = np.random.default_rng(0).integers(0, 256, (len(LABELS), 32, 32, 3), dtype=np.uint8)
  kwargs = dict(global_batch_size=GLOBAL, seed=5, info={}, batch_images_per_class=PER_CLASS)
  whole = pipeline.array_train_iterator(images, LABELS, process_index=0, process_count=1, **kwargs)
  halves = [pipeline.array_train_iterator(images, LABELS, process_index=p, process_count=2, **kwargs) for p in (0, 1)]
  order = pipeline.ClassBalancedOrder(LABELS, PER_CLASS, GLOBAL, seed=5)
  steps = whole.steps_per_epoch
  for k in range(steps + 2):  # Into the second epoch.
    batch = next(whole)
    epoch, step = divmod(k, steps)
    np.testing.assert_array_equal(batch['label'], LABELS[order.batch(epoch, step)])
    parts = [next(h) for h in halves]
    for key in ('image', 'label'):  # Two processes' halves make the one-process batch.
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
  state = whole.get_state()
  expected = next(whole)
  resumed = pipeline.array_train_iterator(images, LABELS, process_index=0, process_count=1, **kwargs)
  resumed.set_state(state)
  again = next(resumed)
  for key in ('image', 'label'):
    np.testing.assert_array_equal(again[key], expected[key])
  for iterator in (whole, resumed, *halves):
    iterator.close()


def test_grain_pipeline_trains_class_balanced_batches_of_the_training_split_only(tmp_path, monkeypatch):
  """Image folder (grain path) with a validation split: batches of 2 classes × 2 files, never a held-out file."""
  files = _image_folder(tmp_path / 'folder')
  readers = {}
  original = pipeline.grain_train_iterator

  def spy(reader, num_examples, **kwargs):
    readers['train'] = reader
    return original(reader, num_examples, **kwargs)

  monkeypatch.setattr(pipeline, 'grain_train_iterator', spy)
  config = _config(dataset='image_folder', image_folder=str(tmp_path / 'folder'), num_classes=3, image_size=72,
                   num_data_workers=0, data_cache_dir=str(tmp_path / 'cache'), validation_examples_per_class=2,
                   batch_size=4, batch_images_per_class=2)
  iterator = data.create_train_iterator(config, global_batch_size=4, process_index=0, process_count=1, seed=0)
  class_of = {path: name for name, paths in files.items() for path in paths}
  names = sorted(files)
  for _ in range(6):
    batch = next(iterator)
    groups = _groups(batch['label'], 2)
    assert (groups == groups[:, :1]).all() and groups[0, 0] != groups[1, 0]
  iterator.close()
  reader = readers['train']
  trained = [reader.describe(i) for i in range(len(reader))]
  assert len(trained) == 9  # 3 of each class's 5 files: the 2 held out are not in the reader the batches come from.
  assert [names.index(class_of[path]) for path in trained] == [reader.read(i)[1] for i in range(len(reader))]


@pytest.mark.parametrize('per_class, batch_size, message', [
    (2, 32, 'config.batch_images_per_class=2: a batch of 32 must split into whole groups of 2 images of one class, '
            'at most one group per class (10 classes in the training set); set --config.batch_images_per_class to '
            'one of 4, 8, 16, 32 (0: shuffled epochs).'),
    (3, 16, 'config.batch_images_per_class=3: a batch of 16 must split into whole groups of 3 images of one class, '
            'at most one group per class (10 classes in the training set); set --config.batch_images_per_class to '
            'one of 2, 4, 8, 16 (0: shuffled epochs).'),
])
def test_a_batch_that_cannot_be_class_balanced_is_one_line_before_training(per_class, batch_size, message):
  config = _config(dataset='synthetic', num_classes=10, synthetic_num_train_examples=64, batch_size=batch_size,
                   batch_images_per_class=per_class)
  with pytest.raises(errors.DataError) as refused:
    data.get_dataset_info(config)
  assert str(refused.value) == message
