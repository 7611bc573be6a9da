"""Tests of the input pipelines (ffsd_jax/data) and of scripts/prepare_data.py's image-folder path."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest

import conftest
from configs.default import get_config
from ffsd_jax import data
from ffsd_jax import errors
from ffsd_jax.data import augment
from ffsd_jax.data import normalization
from ffsd_jax.data import pipeline
from ffsd_jax.data import sources

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(__file__).parents[1].parent / 'shared' / 'data'
CIFAR100_SAMPLES = SHARED_DATA / 'cifar100-test-samples'
IMAGENET_SAMPLES = SHARED_DATA / 'imagenet-samples'


def _config(**overrides):
  config = get_config()
  config.data_cache_dir = None
  for key, value in overrides.items():
    config[key] = value
  return config


def load_prepare_script():
  return conftest.load_script('prepare_data')


# ------------------------------------------------------------------------------------------------------------------
# Augmentation.


def _reference_cifar_augment(image, top, left, flip, pad=4):
  """torchvision order: Pad(4, reflect) -> RandomHorizontalFlip -> RandomCrop(32), with np.pad as the padding."""
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode='reflect')
  if flip:
    padded = padded[:, ::-1]
  return padded[top:top + image.shape[0], left:left + image.shape[1]]


def test_numpy_reflect_is_torchvision_reflect():
  # torchvision 'reflect' mirrors without repeating the edge: [a b c d] padded by 2 -> [c b | a b c d | c b].
  row = np.array([10, 20, 30, 40])
  np.testing.assert_array_equal(np.pad(row, 2, mode='reflect'), [30, 20, 10, 20, 30, 40, 30, 20])


def test_cifar_augment_matches_pad_flip_crop():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
  tops, lefts, flips = augment.cifar_augment_params(rng, 64, 32)
  out = augment.cifar_augment(images, tops, lefts, flips)
  assert out.dtype == np.uint8 and out.shape == images.shape
  for b in range(64):
    np.testing.assert_array_equal(out[b], _reference_cifar_augment(images[b], tops[b], lefts[b], flips[b]))


def test_cifar_augment_params_cover_the_range():
  tops, lefts, flips = augment.cifar_augment_params(np.random.default_rng(0), 20_000, 32)
  assert set(np.unique(tops)) == set(range(9)) and set(np.unique(lefts)) == set(range(9))
  assert 0.45 < flips.mean() < 0.55


def test_random_resized_crop_params_follow_torchvision():
  rng = np.random.default_rng(0)
  for height, width in ((375, 500), (500, 333), (64, 64)):
    for _ in range(300):
      top, left, h, w = augment.random_resized_crop_params(rng, height, width)
      assert 0 < h <= height and 0 < w <= width and 0 <= top <= height - h and 0 <= left <= width - w
      assert 0.08 * height * width * 0.9 <= h * w <= height * width
  # An extreme aspect ratio never passes the 10 tries: the fallback clamps the ratio to 4/3 and centres the crop.
  assert augment.random_resized_crop_params(rng, 10, 1000) == (0, (1000 - 13) // 2, 10, 13)


def _pil_eval_reference(path, size=224, resize=256):
  """Independent Resize(256) + CenterCrop(224) from torchvision's formulas, in PIL/NumPy."""
  with PIL.Image.open(path) as image:
    image = image.convert('RGB')
  w, h = image.size
  scale = resize / min(w, h)
  new_w, new_h = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
  assert abs(new_w - w * scale) < 1 and abs(new_h - h * scale) < 1
  resized = np.asarray(image.resize((new_w, new_h), PIL.Image.BILINEAR))
  top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
  return resized[top:top + size, left:left + size]


# ------------------------------------------------------------------------------------------------------------------
# Training iterator: determinism, reshuffling, process sharding, exact resume.


def _synthetic(n=200, **kw):
  return _config(dataset='synthetic', synthetic_num_train_examples=n, synthetic_num_eval_examples=37, **kw)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_iterator_determinism_epochs_and_resume():
  config = _synthetic()
  make = lambda seed, p=0, count=1: data.create_train_iterator(  # noqa: E731
      config, global_batch_size=32, process_index=p, process_count=count, seed=seed)
  first = make(0)
  assert first.steps_per_epoch == 200 // 32  # Drops the last partial batch.
  batches = _take(first, 14)  # Two epochs of 6 steps and two more.
  again = _take(make(0), 14)
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert batches[0]['image'].dtype == np.uint8 and batches[0]['label'].dtype == np.int32
  assert batches[0]['image'].shape == (32, 32, 32, 3)
  other_seed = next(make(1))
  assert not np.array_equal(other_seed['image'], batches[0]['image'])

  # Each epoch is a fresh permutation: constant images whose value is the example index survive augmentation.
  ids_images = np.broadcast_to(np.arange(200, dtype=np.uint8)[:, None, None, None], (200, 32, 32, 3)).copy()
  ids_iterator = pipeline.array_train_iterator(ids_images, np.arange(200, dtype=np.int32), global_batch_size=32,
                                               process_index=0, process_count=1, seed=0, info={})
  id_batches = _take(ids_iterator, 12)
  for batch in id_batches:
    np.testing.assert_array_equal(batch['image'][:, 0, 0, 0], batch['label'])
  epoch0 = np.concatenate([b['label'] for b in id_batches[:6]])
  epoch1 = np.concatenate([b['label'] for b in id_batches[6:]])
  assert len(set(epoch0.tolist())) == 192 and len(set(epoch1.tolist())) == 192
  assert not np.array_equal(epoch0, epoch1)
  # The public iterator uses the same order: its labels are the labels of that permutation.
  _, labels = data._synthetic_arrays(data._plan(config).train_reader)  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches[:12]]),
                                labels[np.concatenate([epoch0, epoch1])])

  # Exact resume, including across the epoch boundary; the state is JSON.
  resumed_from = make(0)
  _take(resumed_from, 5)
  state = json.loads(json.dumps(resumed_from.get_state()))
  restored = make(0)
  restored.set_state(state)
  for expected, got in zip(batches[5:14], _take(restored, 9)):
    np.testing.assert_array_equal(expected['image'], got['image'])
    np.testing.assert_array_equal(expected['label'], got['label'])
  with pytest.raises(ValueError, match='seed'):
    make(3).set_state(state)

  # Two processes: local batches of 16 that concatenate to the single-process global batch.
  p0, p1 = make(0, 0, 2), make(0, 1, 2)
  for expected in batches[:8]:
    b0, b1 = next(p0), next(p1)
    assert b0['image'].shape[0] == 16
    np.testing.assert_array_equal(np.concatenate([b0['image'], b1['image']]), expected['image'])
    np.testing.assert_array_equal(np.concatenate([b0['label'], b1['label']]), expected['label'])


@pytest.mark.parametrize('num_examples,global_batch', [(37, 8), (10_001, 256)])
def test_eval_sees_every_example_once_over_two_processes(num_examples, global_batch):
  seen = np.zeros(num_examples, int)
  counts = []
  for process in range(2):
    layout = pipeline.EvalLayout(num_examples, global_batch, process, 2)
    counts.append(layout.num_batches)
    for b in range(layout.num_batches):
      positions, mask = layout.positions(b)
      assert len(positions) == global_batch // 2
      np.add.at(seen, positions[mask], 1)
  assert counts[0] == counts[1] == -(-num_examples // global_batch)
  np.testing.assert_array_equal(seen, 1)


def test_eval_batches_pad_and_mask_synthetic():
  config = _synthetic()
  images, labels = data._synthetic_arrays(data._plan(config).eval_reader)  # pylint: disable=protected-access
  got_images, got_labels = [], []
  lengths = []
  for process in range(2):
    batches = data.create_eval_batches(config, global_batch_size=8, process_index=process, process_count=2)
    lengths.append(len(list(batches)))
    for batch in batches:  # Re-iterable.
      assert batch['image'].shape == (4, 32, 32, 3) and batch['mask'].dtype == np.bool_
      got_images.append(batch['image'][batch['mask']])
      got_labels.append(batch['label'][batch['mask']])
  assert lengths == [5, 5]
  got_images, got_labels = np.concatenate(got_images), np.concatenate(got_labels)
  assert len(got_labels) == 37
  order = np.lexsort(got_images.reshape(37, -1).T[:8])
  expected_order = np.lexsort(images.reshape(37, -1).T[:8])
  np.testing.assert_array_equal(got_images[order], images[expected_order])
  np.testing.assert_array_equal(got_labels[order], labels[expected_order])


# ------------------------------------------------------------------------------------------------------------------
# Bad input.


def test_missing_tfds_dataset_fails_fast_with_prepare_command(tmp_path):
  start = time.time()
  with pytest.raises(errors.DataError) as error:
    data.get_dataset_info(_config(dataset='cifar100', data_dir=str(tmp_path)))
  assert time.time() - start < 10
  assert str(error.value) == (
      f"TFDS dataset 'cifar100' is not prepared in data_dir {tmp_path} (no {tmp_path}/cifar100/<version>/"
      f'dataset_info.json); prepare it once with `python scripts/prepare_data.py --dataset cifar100 --data_dir '
      f'{tmp_path}`, or point --config.data_dir at the folder that holds it.')


def _write_png(path, rng, size=8):
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def test_class_folder_missing_from_a_split_is_reported(tmp_path):
  rng = np.random.default_rng(0)
  for split, classes in (('train', ('cat', 'dog', 'emu')), ('test', ('cat', 'emu'))):
    for name in classes:
      _write_png(tmp_path / split / name / '0.png', rng)
  with pytest.raises(errors.DataError, match=r'only in train/: dog; only in test/: none\)'):
    data.get_dataset_info(_config(dataset='image_folder', image_folder=str(tmp_path), num_classes=3, image_size=8))


@pytest.mark.parametrize('image_size', [8, 96])
def test_unreadable_image_names_the_file(tmp_path, image_size):
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for name in ('a', 'b'):
      for i in range(2):
        _write_png(tmp_path / split / name / f'{i}.png', rng, image_size)
  broken = tmp_path / 'train' / 'b' / '1.png'
  broken.write_bytes(b'not an image')
  config = _config(dataset='image_folder', image_folder=str(tmp_path), num_classes=2, image_size=image_size,
                   data_cache_dir=str(tmp_path / 'cache'))
  # Found by the start-up check (before any iterator exists), named relative to the folder it names.
  with pytest.raises(errors.DataError, match=re.escape(f'image folder {tmp_path} cannot be read: train/b/1.png (')):
    data.get_dataset_info(config)


# ------------------------------------------------------------------------------------------------------------------
# TFDS: mock data (no TensorFlow, no download) and a real ArrayRecord dataset built from the CIFAR-100 samples.


def _fake_prepared(data_dir, name, version):
  folder = pathlib.Path(data_dir) / name / version
  folder.mkdir(parents=True)
  (folder / 'dataset_info.json').write_text('{}')


def test_mock_data_cifar100(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  # mock_data can only serve TFDS-decoded arrays without TensorFlow (see sources.SKIP_TFDS_IMAGE_DECODING).
  monkeypatch.setattr(sources, 'SKIP_TFDS_IMAGE_DECODING', False)
  _fake_prepared(tmp_path, 'cifar100', '3.0.2')
  config = _config(dataset='cifar100', data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=40):
    info = data.get_dataset_info(config)
    assert (info.num_classes, info.image_size, info.num_train_examples, info.num_eval_examples) == (100, 32, 40, 40)
    assert info.mean_std == normalization.CIFAR100_MEAN_STD
    batch = next(data.create_train_iterator(config, global_batch_size=16, process_index=0, process_count=1, seed=0))
    eval_batches = list(data.create_eval_batches(config, global_batch_size=16, process_index=0, process_count=1))
  assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32 and ((0 <= batch['label']) & (batch['label'] < 100)).all()
  assert len(eval_batches) == 3 and sum(int(b['mask'].sum()) for b in eval_batches) == 40
  assert 'tensorflow' not in sys.modules


def test_mock_data_imagenet2012(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(sources, 'SKIP_TFDS_IMAGE_DECODING', False)
  _fake_prepared(tmp_path, 'imagenet2012', '5.1.0')
  config = _config(dataset='imagenet2012', data_dir=str(tmp_path), num_classes=1000, image_size=224,
                  num_data_workers=0)  # Worker processes would not see the in-process mock.
  with tfds.testing.mock_data(num_examples=6):
    info = data.get_dataset_info(config)
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (1000, 6, 6)
    assert info.mean_std == normalization.IMAGENET_MEAN_STD
    batch = next(data.create_train_iterator(config, global_batch_size=4, process_index=0, process_count=1, seed=0))
    eval_batches = list(data.create_eval_batches(config, global_batch_size=4, process_index=0, process_count=1))
  assert batch['image'].shape == (4, 224, 224, 3) and batch['image'].dtype == np.uint8
  assert [int(b['mask'].sum()) for b in eval_batches] == [4, 2]
  assert all(b['image'].shape == (4, 224, 224, 3) for b in eval_batches)
  assert 'tensorflow' not in sys.modules


def _cifar100_sample_folder(root):
  """train/ and test/ folders with the 20 PNGs, class folders named by official index, classes.txt listing all 100."""
  files = sorted(CIFAR100_SAMPLES.glob('cifar100_*_*.png'))
  assert len(files) == 20
  for split in ('train', 'test'):
    for path in files:
      label = int(path.stem.split('_')[2])
      target = root / split / f'class_{label:03d}' / path.name
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(path, target)
  (root / 'classes.txt').write_text(''.join(f'class_{i:03d}\n' for i in range(100)))
  return files


@pytest.fixture(scope='module')
def cifar100_sample_tfds(tmp_path_factory):
  if not CIFAR100_SAMPLES.is_dir():
    pytest.skip(f'{CIFAR100_SAMPLES} not found (the shared real-data folder beside the repository)')
  root = tmp_path_factory.mktemp('cifar100_samples')
  files = _cifar100_sample_folder(root / 'folder')
  data_dir = root / 'tfds'
  load_prepare_script().prepare_image_folder(root / 'folder', 'cifar100_samples', data_dir)
  return data_dir, files


def test_cifar100_real_samples_through_prepared_tfds(cifar100_sample_tfds):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  data_dir, files = cifar100_sample_tfds
  config = _config(dataset='cifar100', tfds_name='cifar100_samples', data_dir=str(data_dir),
                   data_cache_dir=str(data_dir / 'cache'))
  info = data.get_dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (20, 20, 100)
  pngs = {path: np.asarray(PIL.Image.open(path).convert('RGB')) for path in files}
  batches = list(data.create_eval_batches(config, global_batch_size=8, process_index=0, process_count=1))
  assert len(batches) == 3
  mean, std = np.array(normalization.CIFAR100_MEAN_STD, np.float64)
  seen = set()
  for batch in batches:
    normalised = np.asarray(normalization.normalize_images(jnp.asarray(batch['image']), info.mean_std))
    for image, label, valid, on_device in zip(batch['image'], batch['label'], batch['mask'], normalised):
      if not valid:
        continue
      (path,) = [p for p, pixels in pngs.items() if np.array_equal(pixels, image)]  # Lossless: exact pixels.
      assert label == int(path.stem.split('_')[2])  # The official fine-label index.
      expected = (pngs[path].astype(np.float64) / 255.0 - mean) / std
      np.testing.assert_allclose(on_device, expected, rtol=0, atol=1e-5)
      seen.add(path)
  assert len(seen) == 20
  # The decoded array is cached for the next run.
  assert list((data_dir / 'cache').glob('*.images.npy'))


def test_reading_never_imports_tensorflow(cifar100_sample_tfds):
  data_dir, _ = cifar100_sample_tfds
  code = f'''
import sys
sys.path.insert(0, {str(REPO_ROOT)!r})
from configs.default import get_config
from ffsd_jax import data
config = get_config()
config.update(dict(dataset='cifar100', tfds_name='cifar100_samples', data_dir={str(data_dir)!r}))
config.data_cache_dir = {str(data_dir / 'cache_subprocess')!r}
info = data.get_dataset_info(config)
batch = next(data.create_train_iterator(config, global_batch_size=4, process_index=0, process_count=1, seed=0))
assert batch['image'].shape == (4, 32, 32, 3)
assert sum(int(b['mask'].sum()) for b in data.create_eval_batches(
    config, global_batch_size=8, process_index=0, process_count=1)) == 20
print('tensorflow imported:', 'tensorflow' in sys.modules)
'''
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                          env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'})
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'tensorflow imported: False' in result.stdout


# ------------------------------------------------------------------------------------------------------------------
# ImageNet-style pipeline on real JPEGs (image folder with classes.txt = the 1,000 sorted wnids).


def test_imagenet_real_samples_eval_and_train(tmp_path):
  if not IMAGENET_SAMPLES.is_dir():
    pytest.skip(f'{IMAGENET_SAMPLES} not found (the shared real-data folder beside the repository)')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  wnids_file = pathlib.Path(tfds.__file__).parent / 'datasets' / 'imagenet2012' / 'labels.txt'
  wnids = wnids_file.read_text().split()
  assert len(wnids) == 1000 and wnids == sorted(wnids) and wnids[0] == 'n01440764'
  files = sorted(IMAGENET_SAMPLES.glob('*.JPEG'))[::10]  # 10 of the 100 keep the test fast.
  for split in ('train', 'val'):
    for path in files:
      target = tmp_path / split / path.name.split('_')[0] / path.name
      target.parent.mkdir(parents=True, exist_ok=True)
      target.symlink_to(path)
  (tmp_path / 'classes.txt').write_text('\n'.join(wnids))
  config = _config(dataset='image_folder', image_folder=str(tmp_path), num_classes=1000, image_size=224)
  info = data.get_dataset_info(config)
  assert info.mean_std == normalization.IMAGENET_MEAN_STD and info.num_eval_examples == 10
  by_label = {wnids.index(p.name.split('_')[0]): p for p in files}
  # Every 10th class in sorted-wnid order: the sample of class k*10 is n-th file -> label is its wnid's position.
  assert sorted(by_label) == sorted(wnids.index(p.name.split('_')[0]) for p in files)
  count = 0
  for batch in data.create_eval_batches(config, global_batch_size=4, process_index=0, process_count=1):
    assert batch['image'].shape == (4, 224, 224, 3)
    for image, label, valid in zip(batch['image'], batch['label'], batch['mask']):
      if valid:
        np.testing.assert_array_equal(image, _pil_eval_reference(by_label[int(label)]))
        count += 1
  assert count == 10
  batch = next(data.create_train_iterator(config, global_batch_size=4, process_index=0, process_count=1, seed=0))
  assert batch['image'].shape == (4, 224, 224, 3) and set(batch['label'].tolist()) <= set(by_label)


# Runs last: importing grain (as this test does) before test_mock_data_imagenet2012 breaks its tfds mock.
def test_imagenet_style_stream_is_in_order_and_resumes():
  """Batch k of the per-example (grain) path is examples [k*B, (k+1)*B) of the stream, whatever the thread count."""
  config = _synthetic(n=40, image_size=72, num_classes=10)
  reader = data._plan(config).train_reader  # pylint: disable=protected-access
  layout = pipeline._Layout(40, 8, 0, 1)  # pylint: disable=protected-access
  element_fn = pipeline._ImageNetTrainExample(reader, layout, pipeline.EpochOrder(40, 0), 0, 72)  # pylint: disable=protected-access
  expected = [element_fn(p) for p in range(8, 8 * 7)]  # Batches 1..6, across the epoch boundary (5 steps).
  for threads in (1, 3):
    stream = pipeline._grain_stream(element_fn, 8, 2**62, 8, num_workers=0, num_threads=threads)  # pylint: disable=protected-access
    for k in range(6):
      batch = next(stream)
      np.testing.assert_array_equal(batch['image'], np.stack([e['image'] for e in expected[8 * k:8 * k + 8]]))
      np.testing.assert_array_equal(batch['label'], [e['label'] for e in expected[8 * k:8 * k + 8]])
  make = lambda: data.create_train_iterator(config, global_batch_size=8, process_index=0, process_count=1, seed=0)  # noqa: E731
  full = _take(make(), 7)
  resumed = make()
  resumed.set_state(json.loads(json.dumps(dict(full_state := make().get_state(), next_batch=4))))
  assert full_state['next_batch'] == 0
  for a, b in zip(full[4:], _take(resumed, 3)):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  np.testing.assert_array_equal(full[1]['image'], np.stack([e['image'] for e in expected[:8]]))
