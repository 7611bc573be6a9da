"""Input integrity (issue 10): unreadable images, high-bit-depth PNGs, error messages, prepare_data.py, and resuming
the training stream over a changed example set."""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import struct
import zlib

import numpy as np
import PIL.Image
import pytest

from configs.default import get_config
from ffsd_jax import data
from ffsd_jax import errors
from ffsd_jax.data import sources
from test_data import load_prepare_script



def _config(tmp_path, **overrides):
  config = get_config()
  config.data_cache_dir = str(tmp_path / 'cache')  # Never the user's cache.
  for key, value in overrides.items():
    config[key] = value
  return config


def _folder_config(tmp_path, root, image_size, **overrides):
  return _config(tmp_path, dataset='image_folder', image_folder=str(root), num_classes=2, image_size=image_size,
                 **overrides)


def _write_image(path: pathlib.Path, rng, size: int, fmt: str | None = None) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, format=fmt)


def _write_truncated_jpeg(path: pathlib.Path, rng, size: int) -> None:
  """A real JPEG cut halfway through its pixel data: PIL opens it (the header is whole), fails only on decoding."""
  buffer = io.BytesIO()
  PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format='JPEG')
  encoded = buffer.getvalue()
  start_of_scan = encoded.index(b'\xff\xda')
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(encoded[:(start_of_scan + len(encoded)) // 2])


def _image_folder(root: pathlib.Path, size: int, per_class: int = 3, seed: int = 0) -> pathlib.Path:
  """train/ and test/ with classes a and b, `per_class` random-pixel images each (PNG and JPEG)."""
  rng = np.random.default_rng(seed)
  for split in ('train', 'test'):
    for name in ('a', 'b'):
      for i in range(per_class):
        _write_image(root / split / name / f'{i}.{"png" if i % 2 else "jpg"}', rng, size)
  return root


def _with_bad_files(root: pathlib.Path, size: int) -> tuple[str, str]:
  """Adds random bytes named .jpg to train/a and a truncated JPEG to test/b; returns their paths."""
  corrupt = root / 'train' / 'a' / 'corrupt.jpg'
  corrupt.write_bytes(np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes())
  truncated = root / 'test' / 'b' / 'truncated.jpg'
  _write_truncated_jpeg(truncated, np.random.default_rng(2), size)
  return str(corrupt), str(truncated)


@pytest.fixture(autouse=True)
def _fresh_plans():
  # The data plan is cached per config; tests change files under the same config.
  data._plan_cached.cache_clear()  # pylint: disable=protected-access
  yield
  data._plan_cached.cache_clear()  # pylint: disable=protected-access


# ------------------------------------------------------------------------------------------------------------------
# (a), (b): the start-up check of image folders.


@pytest.mark.parametrize('size', [32, 72])
def test_truncated_jpeg_opens_but_does_not_decode(tmp_path, size):
  # The premise of the tail check: the header alone does not find a truncated JPEG.
  path = tmp_path / 'cut.jpg'
  _write_truncated_jpeg(path, np.random.default_rng(0), size)
  with PIL.Image.open(path) as image:
    assert image.size == (size, size)
    with pytest.raises(OSError, match='truncated'):
      image.load()
  assert 'truncated' in sources.check_image_file(str(path))
  good = tmp_path / 'good.jpg'
  _write_image(good, np.random.default_rng(0), size)
  assert sources.check_image_file(str(good)) is None


@pytest.mark.parametrize('image_size', [32, 72])
def test_plan_fails_listing_every_bad_file(tmp_path, image_size):
  root = _image_folder(tmp_path / 'images', image_size)
  corrupt, truncated = _with_bad_files(root, image_size)
  with pytest.raises(errors.DataError) as error:
    data.get_dataset_info(_folder_config(tmp_path, root, image_size))
  # One line: the folder once, each bad file relative to it with a short reason, then the fix.
  assert str(error.value) == (f'2 of 14 image files of image folder {root} cannot be read: train/a/corrupt.jpg (not '
                              'an image PIL can read), test/b/truncated.jpg (truncated). Replace or remove these '
                              'files, or rerun with --config.skip_bad_images=True to leave every unreadable file out '
                              'of the run (each is then logged).')
  assert str(error.value).endswith(sources.BAD_IMAGE_FOLDER_FIX)


def test_bad_file_list_is_capped(tmp_path):
  bad = [(f'/data/{i}.jpg', 'OSError: broken') for i in range(25)]
  message = sources.bad_images_message('image folder /data', bad, 1000, 'FIX.', root='/data')
  assert message == ('25 of 1,000 image files of image folder /data cannot be read: '
                     + ', '.join(f'{i}.jpg (OSError: broken)' for i in range(10)) + ', and 15 more. FIX.')


@pytest.mark.parametrize('image_size', [32, 72])
def test_skip_bad_images_leaves_them_out(tmp_path, image_size, caplog):
  root = _image_folder(tmp_path / 'images', image_size)
  corrupt, truncated = _with_bad_files(root, image_size)
  config = _folder_config(tmp_path, root, image_size, skip_bad_images=True)
  with caplog.at_level(logging.WARNING):
    info = data.get_dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples) == (6, 6)
  assert info.skipped_files == (corrupt, truncated)
  assert corrupt in caplog.text and truncated in caplog.text
  # One global batch of 6 is the whole training set: every example decodes, with labels 0, 0, 0, 1, 1, 1.
  iterator = data.create_train_iterator(config, global_batch_size=6, process_index=0, process_count=1, seed=0)
  batch = next(iterator)
  iterator.close()
  assert batch['image'].shape == (6, image_size, image_size, 3)
  assert sorted(batch['label'].tolist()) == [0, 0, 0, 1, 1, 1]
  assert sum(int(b['mask'].sum()) for b in data.create_eval_batches(
      config, global_batch_size=4, process_index=0, process_count=1)) == 6
  # Without the flag the same folder fails (a separate plan: the flag is part of the plan's cache key).
  with pytest.raises(ValueError, match='2 of 14 image files'):
    data.get_dataset_info(_folder_config(tmp_path, root, image_size))


def test_check_result_is_cached_per_listing(tmp_path, monkeypatch):
  root = _image_folder(tmp_path / 'images', 8, per_class=1)
  corrupt, _ = _with_bad_files(root, 8)
  paths = [str(p) for p in sorted(root.rglob('*.*'))]
  cache = tmp_path / 'cache'
  expected = sources.find_bad_images(paths, cache)
  assert [path for path, _ in expected] == sorted([corrupt, str(root / 'test' / 'b' / 'truncated.jpg')])
  assert len(list(cache.glob('image-check-*.json'))) == 1

  def fail(path):
    raise AssertionError(f'{path} was checked again')

  monkeypatch.setattr(sources, 'image_file_report', fail)
  assert sources.find_bad_images(paths, cache) == expected  # Read from the cache.
  # A changed file (size, mtime) is another listing: checked again.
  pathlib.Path(corrupt).write_bytes(b'still not an image, but longer')
  with pytest.raises(AssertionError, match='checked again'):
    sources.find_bad_images(paths, cache)


# ------------------------------------------------------------------------------------------------------------------
# (c): high-bit-depth images.


def _write_png16_rgb(path: pathlib.Path, array: np.ndarray) -> None:
  """A 16-bit RGB PNG written with NumPy and zlib (PIL cannot write one)."""
  height, width, _ = array.shape
  raw = b''.join(b'\x00' + array[y].astype('>u2').tobytes() for y in range(height))

  def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack('>I', len(payload)) + kind + payload + struct.pack('>I', zlib.crc32(kind + payload))

  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 16, 2, 0, 0, 0))
                   + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


def test_16bit_png_decodes_to_its_high_byte(tmp_path):
  rng = np.random.default_rng(0)
  grey = rng.integers(0, 65536, (9, 7), dtype=np.uint16)
  grey[0, :4] = (0, 255, 256, 65535)
  grey_path = tmp_path / 'grey16.png'
  PIL.Image.fromarray(grey).save(grey_path)
  assert grey_path.read_bytes()[24] == 16  # IHDR bit depth: a real 16-bit PNG.
  with PIL.Image.open(grey_path) as image:
    assert image.mode == 'I;16'
  decoded = np.asarray(sources.decode_image(str(grey_path), 'grey16.png'))
  np.testing.assert_array_equal(decoded, np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=-1))
  assert decoded[0, :4, 0].tolist() == [0, 0, 1, 255]

  rgb = rng.integers(0, 65536, (5, 6, 3), dtype=np.uint16)
  rgb_path = tmp_path / 'rgb16.png'
  _write_png16_rgb(rgb_path, rgb)
  np.testing.assert_array_equal(np.asarray(sources.decode_image(str(rgb_path), 'rgb16.png')),
                                (rgb >> 8).astype(np.uint8))


def test_32bit_int_and_float_images_scale_not_clip(tmp_path):
  values = np.array([[0, 255, 256, 40_000, 65_535, 70_000]], np.int32)
  int_path = tmp_path / 'int32.tif'
  PIL.Image.fromarray(values).save(int_path)
  with PIL.Image.open(int_path) as image:
    assert image.mode == 'I'
  np.testing.assert_array_equal(np.asarray(sources.decode_image(str(int_path), 'int32.tif'))[..., 0],
                                [[0, 0, 1, 156, 255, 255]])
  floats = np.array([[-0.5, 0.0, 0.5, 1.0, 2.0]], np.float32)
  float_path = tmp_path / 'float.tif'
  PIL.Image.fromarray(floats).save(float_path)
  np.testing.assert_array_equal(np.asarray(sources.decode_image(str(float_path), 'float.tif'))[..., 0],
                                [[0, 0, 128, 255, 255]])


def test_16bit_pngs_through_the_cifar_style_pipeline(tmp_path):
  rng = np.random.default_rng(3)
  expected = {}
  for split in ('train', 'test'):
    for label, name in enumerate(('a', 'b')):
      path = tmp_path / 'images' / split / name / '0.png'
      path.parent.mkdir(parents=True)
      grey = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
      PIL.Image.fromarray(grey).save(path)
      if split == 'test':
        expected[label] = np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=-1)
  config = _folder_config(tmp_path, tmp_path / 'images', 32)
  (batch,) = data.create_eval_batches(config, global_batch_size=2, process_index=0, process_count=1)
  for image, label in zip(batch['image'], batch['label']):
    np.testing.assert_array_equal(image, expected[int(label)])


# ------------------------------------------------------------------------------------------------------------------
# (d): broken symbolic links are unreadable images.


def test_broken_symlink_is_a_bad_image(tmp_path, caplog):
  root = _image_folder(tmp_path / 'images', 8)
  link = root / 'train' / 'b' / 'gone.jpg'
  link.symlink_to(tmp_path / 'nowhere.jpg')
  with pytest.raises(errors.DataError) as error:
    data.get_dataset_info(_folder_config(tmp_path, root, 8))
  assert str(error.value).startswith(f'1 of 13 image files of image folder {root} cannot be read: train/b/gone.jpg '
                                     f'(broken symbolic link to {tmp_path / "nowhere.jpg"}). Replace')
  with caplog.at_level(logging.WARNING):
    info = data.get_dataset_info(_folder_config(tmp_path, root, 8, skip_bad_images=True))
  assert info.skipped_files == (str(link),) and info.num_train_examples == 6
  assert f'left out {link} (broken symbolic link' in caplog.text


# ------------------------------------------------------------------------------------------------------------------
# (e) and item 4: errors name the file (or the record, split and dataset) and the fix.


def test_shape_error_names_the_file(tmp_path):
  root = _image_folder(tmp_path / 'images', 32)
  odd = root / 'train' / 'b' / 'small.png'
  _write_image(odd, np.random.default_rng(5), 16)
  config = _folder_config(tmp_path, root, 32)
  # Found from the headers by the start-up check (get_dataset_info), not mid-decode after the run started.
  with pytest.raises(errors.DataError) as error:
    data.get_dataset_info(config)
  assert str(error.value) == (f'1 of 13 images of image folder {root} are not 32x32: 16x16 (1 file: train/b/small.png).'
                              ' With --config.image_size=32 (at most 64) every image is decoded once into one array, '
                              'so all must be 32x32: resize them to 32x32, or set --config.image_size above 64 (e.g. '
                              '96 or 224) for the ImageNet-style pipeline, which resizes and crops every image.')


def test_decode_failure_mid_run_names_the_file_and_the_way_forward(tmp_path):
  root = _image_folder(tmp_path / 'images', 72, per_class=2)
  config = _folder_config(tmp_path, root, 72)
  assert data.get_dataset_info(config).num_train_examples == 4  # The start-up check passes.
  damaged = root / 'train' / 'a' / '0.jpg'
  _write_truncated_jpeg(damaged, np.random.default_rng(7), 72)  # Damaged after the check.
  iterator = data.create_train_iterator(config, global_batch_size=4, process_index=0, process_count=1, seed=0)
  with pytest.raises(ValueError) as error:
    next(iterator)  # One batch is the whole epoch: it reads the damaged file.
  iterator.close()
  message = str(error.value)
  assert message.startswith(f'Cannot decode image {damaged}: OSError: image file is truncated')
  assert message.endswith(sources.MID_RUN_FOLDER_FIX)
  assert '--config.allow_config_change=True' in message


def test_tfds_record_errors_name_record_split_and_dataset(tmp_path):
  reader = sources.TfdsReader(_config(tmp_path, dataset='image_folder', tfds_name='my_images',
                                      data_dir=str(tmp_path / 'tfds')), 'train')
  assert reader.describe(192) == f"record #192 of split 'train' of TFDS dataset 'my_images' in {tmp_path / 'tfds'}"
  with pytest.raises(ValueError) as error:
    sources.decode_image(b'not a png', lambda: reader.describe(192), reader.fix)
  assert str(error.value).startswith(f'Cannot decode image {reader.describe(192)}: UnidentifiedImageError')
  assert str(error.value).endswith(f'--name my_images --data_dir {tmp_path / "tfds"}`.')


# ------------------------------------------------------------------------------------------------------------------
# (f): scripts/prepare_data.py.


def test_prepare_rejects_an_invalid_name_before_writing(tmp_path, capsys):
  prepare_data = load_prepare_script()
  root = _image_folder(tmp_path / 'images', 8, per_class=1)
  data_dir = tmp_path / 'tfds'
  with pytest.raises(SystemExit) as exit_info:
    prepare_data.main(['--image_folder', str(root), '--name', 'Good-Caps', '--data_dir', str(data_dir)])
  assert exit_info.value.code == 2
  assert ("--name 'Good-Caps' is not a valid TFDS dataset name: TFDS names are lower snake case"
          in capsys.readouterr().err)
  with pytest.raises(ValueError, match='Use e.g. --name good_caps.'):
    prepare_data.prepare_image_folder(root, 'Good-Caps', data_dir)
  assert not data_dir.exists()
  assert [prepare_data.suggest_dataset_name(n) for n in ('Good-Caps', 'GoodCaps', 'my images 2', '10classes')] == [
      'good_caps', 'good_caps', 'my_images_2', 'dataset_10classes']
  for valid in ('good_caps', 'cifar10_jpeg'):
    prepare_data.check_dataset_name(valid)


def test_prepare_lists_bad_files_skips_them_and_is_not_blocked(tmp_path, monkeypatch):
  prepare_data = load_prepare_script()
  root = _image_folder(tmp_path / 'images', 8, per_class=2)
  corrupt, truncated = _with_bad_files(root, 8)
  data_dir = tmp_path / 'tfds'
  # The start-up check finds both, before anything is written.
  with pytest.raises(ValueError) as error:
    prepare_data.prepare_image_folder(root, 'checked', data_dir)
  assert str(error.value).startswith(f'2 of 10 image files of image folder {root} cannot be read: train/a/corrupt.jpg '
                                     '(not an image PIL can read), test/b/truncated.jpg (truncated).')
  assert '--skip_bad_images' in str(error.value)
  assert not data_dir.exists()
  # Files that pass the check but fail to decode while writing are listed together too, and nothing is left behind.
  monkeypatch.setattr(sources, 'image_file_report', lambda path: (None, (8, 8)))
  with pytest.raises(ValueError) as error:
    prepare_data.prepare_image_folder(root, 'checked', data_dir)
  assert str(error.value).startswith(f'2 of 10 image files of image folder {root} cannot be read:')
  assert corrupt in str(error.value) and truncated in str(error.value)
  assert list((data_dir / 'checked').iterdir()) == []
  monkeypatch.undo()
  # A preparation killed mid-way leaves only a hidden staging folder, which blocks nothing.
  (data_dir / 'checked' / '.checked-1.0.0.preparing-killed' / 'checked').mkdir(parents=True)
  builder = prepare_data.prepare_image_folder(root, 'checked', data_dir, skip_bad_images=True)
  assert (builder.info.splits['train'].num_examples, builder.info.splits['test'].num_examples) == (4, 4)
  assert builder.data_dir == str(data_dir / 'checked' / '1.0.0')
  assert (data_dir / 'checked' / '1.0.0' / 'dataset_info.json').exists()
  with pytest.raises(FileExistsError, match='already prepared'):
    prepare_data.prepare_image_folder(root, 'checked', data_dir, skip_bad_images=True)
  info = data.get_dataset_info(_config(tmp_path, dataset='image_folder', tfds_name='checked', data_dir=str(data_dir),
                                       num_classes=2, image_size=8))
  assert (info.num_train_examples, info.num_eval_examples) == (4, 4)


def test_prepared_dataset_shape_error_names_record_split_and_dataset(tmp_path):
  prepare_data = load_prepare_script()
  root = _image_folder(tmp_path / 'images', 32, per_class=1)
  _write_image(root / 'train' / 'b' / 'tiny.png', np.random.default_rng(4), 1)  # The 3rd train record.
  data_dir = tmp_path / 'tfds'
  prepare_data.prepare_image_folder(root, 'mixed_sizes', data_dir)
  config = _config(tmp_path, dataset='image_folder', tfds_name='mixed_sizes', data_dir=str(data_dir), num_classes=2,
                   image_size=32)
  with pytest.raises(ValueError) as error:
    data.create_train_iterator(config, global_batch_size=2, process_index=0, process_count=1, seed=0)
  assert str(error.value).startswith(f"Image record #2 of split 'train' of TFDS dataset 'mixed_sizes' in {data_dir} "
                                     'has shape (1, 1, 3)')


# ------------------------------------------------------------------------------------------------------------------
# (g): resuming the training stream over a changed example count.


def _synthetic(tmp_path, n, **overrides):
  return _config(tmp_path, dataset='synthetic', synthetic_num_train_examples=n, synthetic_num_eval_examples=8,
                 **overrides)


def _iterator(config, seed=0):
  return data.create_train_iterator(config, global_batch_size=32, process_index=0, process_count=1, seed=seed)


def _take(iterator, n):
  batches = [next(iterator) for _ in range(n)]
  iterator.close()
  return batches


def _saved_state(tmp_path, n, next_batch):
  iterator = _iterator(_synthetic(tmp_path, n))
  _take(iterator, next_batch)
  return json.loads(json.dumps(iterator.get_state()))


def test_changed_example_count_is_refused_by_default(tmp_path):
  state = _saved_state(tmp_path, 200, 8)
  assert (state['num_train_examples'], state['next_batch']) == (200, 8)
  with pytest.raises(ValueError) as error:
    _iterator(_synthetic(tmp_path, 199)).set_state(state)
  message = str(error.value)
  assert message.startswith('Input-iterator state was saved with num_train_examples=200 but this run has 199. ')
  assert 'restore the training set to its 200 examples' in message
  assert 'pass --config.allow_config_change=True to resume at the same step over the 199 examples' in message


@pytest.mark.parametrize('new_count,expected_epoch_step', [(199, (1, 2)), (150, (2, 0))])
def test_allow_config_change_resumes_at_the_same_batch_index(tmp_path, caplog, new_count, expected_epoch_step):
  state = _saved_state(tmp_path, 200, 8)  # 6 steps per epoch: batch 8 is epoch 1, step 2.
  config = _synthetic(tmp_path, new_count, allow_config_change=True)
  resumed = _iterator(config)
  with caplog.at_level(logging.WARNING):
    resumed.set_state(state)
  got = _take(resumed, 2)
  # Batch k over the new set is what an uninterrupted run over the new set yields as its k-th batch.
  expected = _take(_iterator(config), 10)[8:]
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert resumed.get_state()['next_batch'] == 10 and resumed.get_state()['num_train_examples'] == new_count
  epoch, step = expected_epoch_step
  assert (f'Resuming the training input at batch 8 (epoch {epoch}, step {step} of {new_count // 32}) with '
          f'num_train_examples=200 but this run has {new_count} (allow_config_change)') in caplog.text
  # The 200-example stream at batch 8 is other data: the order differs from an uninterrupted run, as logged.
  assert not np.array_equal(_take(_iterator(_synthetic(tmp_path, 200)), 9)[8]['label'], got[0]['label'])


def test_allow_config_change_still_refuses_other_changes(tmp_path):
  state = _saved_state(tmp_path, 200, 3)
  with pytest.raises(ValueError, match='saved with seed=0 but this run has 5'):
    _iterator(_synthetic(tmp_path, 199, allow_config_change=True), seed=5).set_state(state)
  with pytest.raises(ValueError, match='saved with global_batch_size=32 but this run has 16. Exact resume needs '
                     'the same global batch: rerun with --config.batch_size=32'):
    data.create_train_iterator(_synthetic(tmp_path, 200), global_batch_size=16,
                               process_index=0, process_count=1, seed=0).set_state(state)


def test_allow_config_change_continues_with_a_new_global_batch(tmp_path):
  """A new global batch (e.g. for another device count) resumes at the same batch index over the new layout."""
  state = _saved_state(tmp_path, 200, 3)
  config = _synthetic(tmp_path, 200, allow_config_change=True)
  make = lambda: data.create_train_iterator(config, global_batch_size=16, process_index=0, process_count=1, seed=0)
  resumed = make()
  resumed.set_state(state)
  expected = _take(make(), 5)[3:]
  for a, b in zip(expected, _take(resumed, 2)):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert resumed.get_state()['next_batch'] == 5 and resumed.get_state()['global_batch_size'] == 16


def test_image_folder_resume_after_removing_a_file(tmp_path):
  """The issue's case on the per-example (ImageNet-style) path: a file removed between the crash and the resume."""
  root = _image_folder(tmp_path / 'images', 72, per_class=5)  # 10 training files, 2 steps of 4 per epoch.
  config = _folder_config(tmp_path, root, 72)
  first = data.create_train_iterator(config, global_batch_size=4, process_index=0, process_count=1, seed=0)
  _take(first, 3)
  state = json.loads(json.dumps(first.get_state()))
  os.remove(root / 'train' / 'b' / '4.jpg')
  data._plan_cached.cache_clear()  # pylint: disable=protected-access  (a resume is a new process)
  resumed = data.create_train_iterator(config, global_batch_size=4, process_index=0, process_count=1, seed=0)
  with pytest.raises(ValueError, match='saved with num_train_examples=10 but this run has 9'):
    resumed.set_state(state)
  allowed = _folder_config(tmp_path, root, 72, allow_config_change=True)
  resumed = data.create_train_iterator(allowed, global_batch_size=4, process_index=0, process_count=1, seed=0)
  resumed.set_state(state)
  (got,) = _take(resumed, 1)
  fresh = data.create_train_iterator(allowed, global_batch_size=4, process_index=0, process_count=1, seed=0)
  expected = _take(fresh, 4)[3]
  np.testing.assert_array_equal(got['image'], expected['image'])
  np.testing.assert_array_equal(got['label'], expected['label'])
