"""Data edge cases (issue 20): one-line DataErrors raised by get_dataset_info, progress logs, describe_dataset, the
decoded-image cache location, num_classes=0 and grain's shared memory at exit.

Every failure is caused for real: missing folders, truncated JPEG bytes, empty class folders, images of another size.
"""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from configs.default import get_config
from ffsd_jax import data
from ffsd_jax import errors
from ffsd_jax.data import sources
from test_data import _fake_prepared  # pylint: disable=g-bad-import-order
from test_data_integrity import _config, _write_image, _write_truncated_jpeg  # pylint: disable=g-bad-import-order

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
EXTENSIONS = '.png, .jpg, .jpeg, .bmp, .gif, .tif, .tiff, .webp, .ppm'
SKIP_FIX = ('Replace or remove these files, or rerun with --config.skip_bad_images=True to leave every unreadable '
            'file out of the run (each is then logged).')


@pytest.fixture(autouse=True)
def _fresh_plans():
  # The data plan is cached per config; tests change files under the same config.
  data._plan_cached.cache_clear()  # pylint: disable=protected-access
  yield
  data._plan_cached.cache_clear()  # pylint: disable=protected-access


def _folder_config(tmp_path, root, image_size=8, **overrides):
  overrides.setdefault('num_classes', 2)
  return _config(tmp_path, dataset='image_folder', image_folder=str(root), image_size=image_size, **overrides)


def _image_folder(root: pathlib.Path, size: int = 8, per_class: int = 2, classes=('a', 'b')) -> pathlib.Path:
  """train/ and test/ with `classes`, `per_class` random-pixel PNGs each."""
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for name in classes:
      for i in range(per_class):
        _write_image(root / split / name / f'{i}.png', rng, size)
  return root


def _reported(config, capsys) -> str:
  """What an entry point prints for get_dataset_info(config): exactly one line on stderr (checked here)."""
  with pytest.raises(SystemExit) as exit_info:
    with errors.report_errors(verbose=False):
      data.get_dataset_info(config)
  assert exit_info.value.code == errors.EXIT_FAILURE
  stderr = capsys.readouterr().err
  assert stderr.count('\n') == 1 and stderr.endswith('\n'), stderr
  assert stderr.startswith('DataError: ')
  return stderr[len('DataError: '):-1]


# ------------------------------------------------------------------------------------------------------------------
# 1. One-line DataErrors from get_dataset_info.


def test_missing_data_dir_names_the_prepare_command(tmp_path, capsys):
  data_dir = tmp_path / 'not_there'
  expected = (f"The data_dir {data_dir} does not exist, so TFDS dataset 'cifar100' cannot be read from it; prepare it "
              f'once with `python scripts/prepare_data.py --dataset cifar100 --data_dir {data_dir}`, or point '
              '--config.data_dir at the folder that holds it.')
  assert _reported(_config(tmp_path, dataset='cifar100', data_dir=str(data_dir)), capsys) == expected
  assert not data_dir.exists()  # Nothing was created, nothing downloaded.


def test_data_dir_that_is_a_file(tmp_path, capsys):
  data_dir = tmp_path / 'a_file'
  data_dir.write_text('not a folder')
  message = _reported(_config(tmp_path, dataset='cifar10', data_dir=str(data_dir)), capsys)
  assert message.startswith(f"The data_dir {data_dir} is not a folder, so TFDS dataset 'cifar10' cannot be read")
  assert f'`python scripts/prepare_data.py --dataset cifar10 --data_dir {data_dir}`' in message


def test_unprepared_image_folder_dataset_names_its_prepare_command(tmp_path, capsys):
  data_dir = tmp_path / 'tfds'
  (data_dir / 'my_images').mkdir(parents=True)  # A folder, but no prepared version inside.
  message = _reported(_config(tmp_path, dataset='image_folder', tfds_name='my_images', data_dir=str(data_dir)),
                      capsys)
  assert message == (f"TFDS dataset 'my_images' is not prepared in data_dir {data_dir} (no {data_dir}/my_images/"
                     '<version>/dataset_info.json); prepare it once with `python scripts/prepare_data.py '
                     f'--image_folder /path/to/root --name my_images --data_dir {data_dir}`, or point --config.data_dir'
                     ' at the folder that holds it.')


def test_image_folder_unset_or_missing(tmp_path, capsys):
  assert _reported(_folder_config(tmp_path, ''), capsys) == (
      "dataset='image_folder' needs --config.image_folder=<root> (with <root>/train/<class>/* and "
      '<root>/test|val/<class>/*), or --config.tfds_name=<name> with --config.data_dir for a folder prepared by '
      '`python scripts/prepare_data.py --image_folder <root> --name <name> --data_dir <dir>`.')
  missing = tmp_path / 'no_such_folder'
  assert _reported(_folder_config(tmp_path, missing), capsys) == (
      f'Image folder {missing} does not exist; set --config.image_folder to a folder holding '
      '<root>/train/<class>/* and <root>/test/<class>/* (or val/, validation/).')


def test_many_truncated_jpegs_are_one_line(tmp_path, capsys):
  root = _image_folder(tmp_path / 'images', per_class=1)
  rng = np.random.default_rng(3)
  for i in range(13):
    _write_truncated_jpeg(root / 'train' / 'a' / f'cut{i:02d}.jpg', rng, 8)
  listed = ', '.join(f'train/a/cut{i:02d}.jpg (truncated)' for i in range(10))
  assert _reported(_folder_config(tmp_path, root), capsys) == (
      f'13 of 17 image files of image folder {root} cannot be read: {listed}, and 3 more. {SKIP_FIX}')


def test_empty_class_folders_are_listed_together(tmp_path, capsys):
  root = _image_folder(tmp_path / 'images')
  (root / 'train' / 'c').mkdir()
  (root / 'test' / 'c').mkdir()
  (root / 'test' / 'c' / 'notes.txt').write_text('not an image')
  assert _reported(_folder_config(tmp_path, root, num_classes=3), capsys) == (
      f'2 class folders of {root} hold no images ({EXTENSIONS}): train/c, test/c; add images, or remove the class from '
      'every split.')


def test_class_mismatch_and_an_empty_class_on_one_line(tmp_path, capsys):
  root = _image_folder(tmp_path / 'images')
  (root / 'train' / 'c').mkdir()  # Empty, and missing from test/.
  _write_image(root / 'test' / 'd' / '0.png', np.random.default_rng(1), 8)  # Only in test/.
  assert _reported(_folder_config(tmp_path, root, num_classes=3), capsys) == (
      f'Image folder {root}: the class folders of train/ and test/ differ (only in train/: c; only in test/: d); add '
      'the missing class folders or remove the extra ones, so that both splits hold the same classes and labels '
      f'agree. 1 class folder of {root} holds no images ({EXTENSIONS}): train/c; add images, or remove the class from '
      'every split.')


def test_wrong_num_classes_joined_with_bad_images(tmp_path, capsys):
  root = _image_folder(tmp_path / 'images')
  _write_truncated_jpeg(root / 'test' / 'b' / 'cut.jpg', np.random.default_rng(2), 8)
  assert _reported(_folder_config(tmp_path, root, num_classes=5), capsys) == (
      f"config.num_classes=5 but image folder {root} has 2 classes; set --config.num_classes=2 (or 0 to take the "
      f"dataset's count). 1 of 9 image files of image folder {root} cannot be read: test/b/cut.jpg (truncated). "
      f'{SKIP_FIX}')


def test_images_of_one_other_size_suggest_that_image_size(tmp_path, capsys):
  root = _image_folder(tmp_path / 'images', size=28, per_class=1)
  config = _folder_config(tmp_path, root, image_size=32)
  assert _reported(config, capsys) == (
      f'4 of 4 images of image folder {root} are not 32x32: 28x28 (4 files, e.g. train/a/0.png, train/b/0.png, '
      'test/a/0.png). With --config.image_size=32 (at most 64) every image is decoded once into one array, so all '
      'must be 32x32: set --config.image_size=28, the size of every image.')
  assert not list((tmp_path / 'cache').glob('*.npy'))  # Found from the headers: nothing was decoded.
  assert data.get_dataset_info(_folder_config(tmp_path, root, image_size=28)).image_size == 28


def test_wrong_size_and_unreadable_files_on_one_line(tmp_path, capsys):
  root = _image_folder(tmp_path / 'images', size=16)
  rng = np.random.default_rng(4)
  PIL.Image.fromarray(rng.integers(1, 256, (16, 24, 3), dtype=np.uint8)).save(root / 'train' / 'a' / 'wide.png')
  _write_image(root / 'test' / 'b' / 'big.jpg', rng, 20)
  (root / 'train' / 'b' / 'junk.png').write_bytes(b'\x89PNG but nothing else')
  assert _reported(_folder_config(tmp_path, root, image_size=16), capsys) == (
      f'1 of 11 image files of image folder {root} cannot be read: train/b/junk.png (not an image PIL can read). '
      f'{SKIP_FIX} 2 of 10 images of image folder {root} are not 16x16: 24x16 (1 file: train/a/wide.png), 20x20 '
      '(1 file: test/b/big.jpg). With --config.image_size=16 (at most 64) every image is decoded once into one array, '
      'so all must be 16x16: resize them to 16x16, or set --config.image_size above 64 (e.g. 96 or 224) for the '
      'ImageNet-style pipeline, which resizes and crops every image.')


def test_imagenet_style_folders_take_any_size(tmp_path):
  root = _image_folder(tmp_path / 'images', size=70)
  _write_image(root / 'train' / 'a' / 'other.png', np.random.default_rng(5), 90)
  assert data.get_dataset_info(_folder_config(tmp_path, root, image_size=72)).num_train_examples == 5


def test_wrong_size_cached_check_still_reports(tmp_path, monkeypatch):
  root = _image_folder(tmp_path / 'images', size=8, per_class=1)
  _write_image(root / 'train' / 'b' / 'odd.png', np.random.default_rng(6), 12)
  config = _folder_config(tmp_path, root)
  with pytest.raises(errors.DataError) as first:
    data.get_dataset_info(config)
  data._plan_cached.cache_clear()  # pylint: disable=protected-access
  monkeypatch.setattr(sources, 'image_file_report', lambda path: pytest.fail(f'{path} was checked again'))
  with pytest.raises(errors.DataError) as second:  # The sizes come from the cached check result.
    data.get_dataset_info(config)
  assert str(second.value) == str(first.value)
  assert '12x12 (1 file: train/b/odd.png)' in str(first.value)


def test_refused_iterator_state_is_a_one_line_usage_error(tmp_path, capsys):
  config = _config(tmp_path, dataset='synthetic', num_classes=10, synthetic_num_train_examples=64,
                   synthetic_num_eval_examples=8)

  def make(seed):
    return data.create_train_iterator(config, global_batch_size=32, process_index=0, process_count=1, seed=seed)

  saved = make(0).get_state()
  with pytest.raises(SystemExit) as exit_info:
    with errors.report_errors(verbose=False):
      make(5).set_state(saved)
  assert exit_info.value.code == errors.EXIT_USAGE  # A refused resume, like a refused config change.
  assert capsys.readouterr().err == ('IteratorStateError: Input-iterator state was saved with seed=0 but this run has '
                                     '5; exact resume needs the same dataset, batch size, seed and process layout.\n')


# ------------------------------------------------------------------------------------------------------------------
# 2. With skip_bad_images=True nothing suggests setting it.


def test_skip_bad_images_messages_do_not_suggest_it(tmp_path, caplog):
  root = _image_folder(tmp_path / 'images', per_class=1)
  cut = root / 'test' / 'a' / 'cut.jpg'
  _write_truncated_jpeg(cut, np.random.default_rng(7), 8)
  config = _folder_config(tmp_path, root, skip_bad_images=True)
  with caplog.at_level(logging.WARNING):
    info = data.get_dataset_info(config)
  assert info.skipped_files == (str(cut),)
  assert 'skip_bad_images=True' not in caplog.text and f'left out {cut} (truncated)' in caplog.text
  reader = data._plan(config).eval_reader  # pylint: disable=protected-access
  assert reader.fix() == sources.MID_RUN_FOLDER_FIX_SKIPPING and 'skip_bad_images' not in reader.fix()
  # Every training image unreadable: the error says so, without suggesting the flag already set.
  for path in (root / 'train').rglob('*.png'):
    path.write_bytes(b'broken')
  data._plan_cached.cache_clear()  # pylint: disable=protected-access
  with pytest.raises(errors.DataError) as error:
    data.get_dataset_info(config)
  assert str(error.value) == (
      f'Every image of the train split of {root} is unreadable, so nothing is left to read: 3 of 5 image files of '
      f'image folder {root} cannot be read: train/a/0.png (not an image PIL can read), train/b/0.png (not an image PIL '
      'can read), test/a/cut.jpg (truncated).')


# ------------------------------------------------------------------------------------------------------------------
# 3. Progress while scanning, checking and decoding.


def _absl_info(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.name == 'absl' and r.levelno == logging.INFO]


def test_scan_and_check_log_a_handful_of_lines(tmp_path, caplog):
  root = _image_folder(tmp_path / 'images', per_class=5)
  with caplog.at_level(logging.INFO):
    data.get_dataset_info(_folder_config(tmp_path, root))
  lines = _absl_info(caplog)
  assert len(lines) == 4, lines
  assert lines[0] == f'Scanning image folder {root} ...'
  assert lines[1].startswith(f'Found 20 image files in 2 classes in {root} (train/ 10, test/ 10) in ')
  assert lines[2] == f'Checking 20 image files of image folder {root} ...'
  assert lines[3].startswith(f'Checked 20 image files of image folder {root} in ') and lines[3].endswith(
      ' s: 0 unreadable.')


def test_progress_lines_every_tenth_when_slow(tmp_path, caplog, monkeypatch):
  root = _image_folder(tmp_path / 'images', per_class=5)
  monkeypatch.setattr(sources, 'PROGRESS_INTERVAL_S', 0.0)  # As if each step took longer than the interval.
  monkeypatch.setattr(sources, '_CHECK_CHUNK_FILES', 2)
  config = _folder_config(tmp_path, root)
  with caplog.at_level(logging.INFO):
    data.get_dataset_info(config)
    iterator = data.create_train_iterator(config, global_batch_size=10, process_index=0, process_count=1, seed=0)
  iterator.close()
  lines = _absl_info(caplog)
  checking = [line for line in lines if line.startswith(f'Checking 20 image files of image folder {root}: ')]
  assert [line.split(': ')[1].split(' in ')[0] for line in checking] == [
      f'{2 * k} of 20 ({10 * k}%)' for k in range(1, 10)]
  decoding = [line for line in lines if line.startswith('Decoding 10 images of the train split of images')]
  assert decoding[0] == 'Decoding 10 images of the train split of images ...'
  assert [line.split(': ')[1].split(' in ')[0] for line in decoding[1:]] == [f'{k} of 10 ({10 * k}%)' for k in
                                                                            range(1, 10)]
  assert any(line.startswith('Decoded 10 images of the train split of images in ') for line in lines)


# ------------------------------------------------------------------------------------------------------------------
# 4. describe_dataset.


def test_describe_image_folder_with_skipped_files(tmp_path):
  root = _image_folder(tmp_path / 'images', size=32, per_class=3)
  _write_truncated_jpeg(root / 'train' / 'b' / 'cut.jpg', np.random.default_rng(8), 32)
  config = _folder_config(tmp_path, root, image_size=32, num_classes=0, skip_bad_images=True)
  info = data.get_dataset_info(config)
  assert data.describe_dataset(info, config) == (
      f'Dataset image_folder:images (image folder {root}): 6 train / 6 test images, 2 classes, 32x32, train pipeline: '
      'reflect-pad 4 + crop 32 + flip, eval: the image as stored, normalisation mean (0.5071, 0.4865, 0.4409) std '
      f'(0.2673, 0.2564, 0.2762), decoded-image cache: {tmp_path / "cache"}, 1 unreadable images left out '
      '(skip_bad_images)')


def test_describe_imagenet_style_folder(tmp_path):
  root = _image_folder(tmp_path / 'images', size=80, per_class=1)
  (root / 'test').rename(root / 'val')
  config = _folder_config(tmp_path, root, image_size=72, num_data_workers=3, eval_resize_size=None)
  line = data.describe_dataset(data.get_dataset_info(config), config)
  assert line == (
      f'Dataset image_folder:images (image folder {root}): 2 train / 2 val images, 2 classes, 72x72, train pipeline: '
      'random-resized-crop 72 (scale 0.08-1, ratio 3/4-4/3) + flip, eval: resize 82 + centre-crop 72, decoded per '
      'example in 3 worker processes, normalisation mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225), '
      'decoded-image cache: none')


def test_describe_synthetic(tmp_path):
  config = _config(tmp_path, dataset='synthetic', num_classes=10, image_size=32, synthetic_num_train_examples=1200,
                   synthetic_num_eval_examples=300, seed=4)
  assert data.describe_dataset(data.get_dataset_info(config), config) == (
      'Dataset synthetic (random pixels and labels from seed 4, for smoke runs and throughput only): 1,200 train / 300 '
      'test images, 10 classes, 32x32, train pipeline: reflect-pad 4 + crop 32 + flip, eval: the image as stored, '
      'normalisation mean (0.5071, 0.4865, 0.4409) std (0.2673, 0.2564, 0.2762), decoded-image cache: none')


def test_tfds_num_classes_zero_and_describe(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(sources, 'SKIP_TFDS_IMAGE_DECODING', False)  # mock_data serves decoded arrays only.
  _fake_prepared(tmp_path / 'tfds', 'cifar100', '3.0.2')
  data_dir = tmp_path / 'tfds'
  config = _config(tmp_path, dataset='cifar100', data_dir=str(data_dir), num_classes=0, data_cache_dir=None)
  with tfds.testing.mock_data(num_examples=12):
    info = data.get_dataset_info(config)
    assert info.num_classes == 100
    assert data.describe_dataset(info, config) == (
        f'Dataset cifar100 (TFDS ArrayRecord in {data_dir}): 12 train / 12 test images, 100 classes, 32x32, train '
        'pipeline: reflect-pad 4 + crop 32 + flip, eval: the image as stored, normalisation mean (0.5071, 0.4865, '
        f'0.4409) std (0.2673, 0.2564, 0.2762), decoded-image cache: {data_dir / "ffsd_decoded_cache"}')
    with pytest.raises(errors.DataError) as error:
      data.get_dataset_info(_config(tmp_path, dataset='cifar100', data_dir=str(data_dir), num_classes=10,
                                    image_size=64))
  assert str(error.value) == (
      "config.num_classes=10 but TFDS dataset 'cifar100' has 100 classes; set --config.num_classes=100 (or 0 to take "
      "the dataset's count). cifar100 images are 32x32; set --config.image_size=32 (got 64).")


# ------------------------------------------------------------------------------------------------------------------
# 6. The decoded-image cache follows XDG_CACHE_HOME.


def test_cache_defaults_to_xdg_cache_home(tmp_path, monkeypatch):
  root = _image_folder(tmp_path / 'images')
  config = _folder_config(tmp_path, root, data_cache_dir=None)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  expected = tmp_path / 'xdg' / 'ffsd_jax' / 'decoded'
  assert sources.cache_dir(config) == expected
  data.get_dataset_info(config)
  data.create_train_iterator(config, global_batch_size=4, process_index=0, process_count=1, seed=0).close()
  assert len(list(expected.glob('image-check-*.json'))) == 1 and len(list(expected.glob('*.images.npy'))) == 1
  monkeypatch.delenv('XDG_CACHE_HOME')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert sources.cache_dir(config) == tmp_path / 'home' / '.cache' / 'ffsd_jax' / 'decoded'
  config.data_cache_dir = str(tmp_path / 'mine')  # An explicit folder still wins.
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert sources.cache_dir(config) == tmp_path / 'mine'


# ------------------------------------------------------------------------------------------------------------------
# 7. num_classes = 0: the dataset's count.


def test_num_classes_zero_takes_the_folder_count(tmp_path, caplog):
  root = _image_folder(tmp_path / 'images', classes=('ant', 'bee', 'cat'), per_class=1)
  config = _folder_config(tmp_path, root, num_classes=0)
  with caplog.at_level(logging.INFO):
    info = data.get_dataset_info(config)
    assert info.num_classes == 3
    config.num_classes = info.num_classes  # What the entry point does with the resolved count.
    iterator = data.create_train_iterator(config, global_batch_size=3, process_index=0, process_count=1, seed=0)
  assert sorted(next(iterator)['label'].tolist()) == [0, 1, 2]
  iterator.close()
  assert sum(line.startswith('Scanning image folder') for line in _absl_info(caplog)) == 1  # Not planned again.
  with pytest.raises(errors.DataError) as error:  # A wrong count is refused also when the plan is cached.
    data.get_dataset_info(_folder_config(tmp_path, root, num_classes=4))
  assert str(error.value) == (f'config.num_classes=4 but image folder {root} has 3 classes; set '
                              "--config.num_classes=3 (or 0 to take the dataset's count).")


def test_synthetic_needs_a_class_count(tmp_path, capsys):
  assert _reported(_config(tmp_path, dataset='synthetic', num_classes=0), capsys) == (
      "dataset='synthetic' needs --config.num_classes (e.g. 100): synthetic data has no classes of its own, so 0 (take "
      "the dataset's count) does not apply.")


# ------------------------------------------------------------------------------------------------------------------
# 5. grain worker processes leave no shared memory behind.


def test_grain_workers_leak_no_shared_memory(tmp_path):
  root = _image_folder(tmp_path / 'images', size=72, per_class=4)
  # Batches are held (not closed, not deleted) at exit, and the eval workers stay alive: the cases that leaked.
  code = f'''
import sys
sys.path.insert(0, {str(REPO_ROOT)!r})
from configs.default import get_config
from ffsd_jax import data
config = get_config()
config.update(dict(dataset='image_folder', image_folder={str(root)!r}, num_classes=2, image_size=72,
                   num_data_workers=1, data_cache_dir={str(tmp_path / 'cache')!r}))
iterator = data.create_train_iterator(config, global_batch_size=4, process_index=0, process_count=1, seed=0)
held = [next(iterator) for _ in range(3)]
assert held[2]['image'].shape == (4, 72, 72, 3) and held[2]['image'].any()
evaluated = list(data.create_eval_batches(config, global_batch_size=4, process_index=0, process_count=1))
assert sum(int(b['mask'].sum()) for b in evaluated) == 8
print('done')
'''
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                          env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin', 'HOME': str(tmp_path)})
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'done' in result.stdout
  assert 'leaked shared_memory' not in result.stderr, result.stderr[-3000:]


def test_num_data_workers_minus_one_is_the_spare_cores(monkeypatch):
  """-1 (the default) is every core this process may use but one; a set count is kept."""
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(11)), raising=False)
  config = get_config()
  assert config.num_data_workers == -1 and data.num_workers(config) == 10
  config.num_data_workers = 3
  assert data.num_workers(config) == 3
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0}, raising=False)
  config.num_data_workers = -1
  assert data.num_workers(config) == 0  # One core: decode in the main process.
