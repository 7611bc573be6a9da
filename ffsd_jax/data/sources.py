"""Example sources: prepared TFDS datasets (ArrayRecord), image folders and a synthetic source.

A source gives, per split, either all images decoded into one uint8 array (CIFAR-size data, decoded once and cached)
or a picklable reader that decodes one example at a time (ImageNet-size data, decoded in grain workers). Images are
always decoded with PIL, so that every path sees the same pixels. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import pathlib
from concurrent import futures
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np
import PIL.Image

TFDS_DATASETS = ('cifar100', 'cifar10', 'imagenet2012')
ALL_DATASETS = TFDS_DATASETS + ('image_folder', 'synthetic')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm')
# Image folders with images at most this size use the CIFAR-style pipeline (decode once, pad-and-crop).
SMALL_IMAGE_MAX_SIZE = 64
_CACHE_FORMAT_VERSION = 1


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
  """An 8-bit RGB copy of `image`; high-bit-depth greyscale is scaled to 8 bits, where PIL's convert would clip.

  PIL's `convert('RGB')` maps 16-bit ('I;16*') and 32-bit ('I') greyscale by clipping at 255, so nearly every pixel of
  a 16-bit PNG turns white. Here 16-bit values keep their high byte (v >> 8: 0..65535 -> 0..255, as PIL already does
  for 16-bit RGB PNGs), 'I' images are read as 16-bit (values outside 0..65535 clip) and float ('F') images as 0..1.
  """
  if image.mode.startswith('I;16'):
    grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
  elif image.mode == 'I':
    grey = (np.clip(np.asarray(image), 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
  elif image.mode == 'F':
    grey = np.round(np.clip(np.nan_to_num(np.asarray(image, np.float64)), 0.0, 1.0) * 255).astype(np.uint8)
  else:
    return image.convert('RGB')
  return PIL.Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))


def decode_image(data: bytes | str | os.PathLike | np.ndarray, what: str | Callable[[], str],
                 fix: str | Callable[[], str] = '') -> PIL.Image.Image:
  """Decodes encoded bytes or a file path into an 8-bit RGB PIL image.

  Errors name `what` (the file, or the record with its split and dataset) and end with `fix` (what to do about it);
  either may be a function, called only on error.
  """
  if isinstance(data, np.ndarray):  # Already decoded (TFDS decoding, see SKIP_TFDS_IMAGE_DECODING).
    array = np.asarray(data)
    array = (array >> 8).astype(np.uint8) if array.dtype == np.uint16 else np.asarray(array, np.uint8)
    return PIL.Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array).convert('RGB')
  try:
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with PIL.Image.open(source) as image:
      return to_rgb(image)
  except Exception as error:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError, ...).
    what, fix = (what() if callable(what) else what), (fix() if callable(fix) else fix)
    raise ValueError(f'Cannot decode image {what}: {type(error).__name__}: {error}' + (f'\n{fix}' if fix else '')
                     ) from error


def tfds_data_dir(config) -> str:
  """The TFDS data_dir the config points at (the TFDS default when config.data_dir is None)."""
  if config.get('data_dir'):
    return os.path.expanduser(str(config.data_dir))
  from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top
  return os.path.expanduser(constants.DATA_DIR)


def tfds_name(config) -> str:
  """The TFDS dataset to read: config.tfds_name (a dataset prepared from an image folder) or config.dataset."""
  return config.get('tfds_name') or config.dataset


def prepare_command(config) -> str:
  """The exact command that prepares the dataset the config asks for."""
  name = tfds_name(config)
  data_dir = tfds_data_dir(config)
  if name in TFDS_DATASETS:
    extra = ' --manual_dir /path/to/imagenet_tars' if name == 'imagenet2012' else ''
    return f'python scripts/prepare_data.py --dataset {name} --data_dir {data_dir}{extra}'
  return f'python scripts/prepare_data.py --image_folder /path/to/root --name {name} --data_dir {data_dir}'


def _check_tfds_prepared(config) -> None:
  """Fails fast (before TFDS can start a download) when the dataset is not prepared under data_dir."""
  name, data_dir = tfds_name(config), tfds_data_dir(config)
  folder = pathlib.Path(data_dir) / name
  prepared = folder.is_dir() and (any(folder.glob('*/dataset_info.json')) or any(folder.glob('*/*/dataset_info.json')))
  if not prepared:
    raise FileNotFoundError(
        f'TFDS dataset {name!r} is not prepared in data_dir={data_dir!r} (no {folder}/<version>/dataset_info.json). '
        f'Prepare it once with:\n  {prepare_command(config)}\n'
        'or point --config.data_dir at the folder that holds it.')


# Images are read undecoded and decoded here with PIL (TFDS would pick OpenCV when installed: another decoder, other
# pixels). tfds.testing.mock_data cannot serve undecoded images without TensorFlow, so mock tests turn this off and
# get TFDS-decoded arrays.
SKIP_TFDS_IMAGE_DECODING = True


def open_tfds_split(config, split: str):
  """Opens a prepared TFDS split as an ArrayRecord data source with undecoded images (never downloads)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, data_dir = tfds_name(config), tfds_data_dir(config)
  decoders = {'image': tfds.decode.SkipDecoding()} if SKIP_TFDS_IMAGE_DECODING else None
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False, decoders=decoders)
  except Exception as error:
    raise FileNotFoundError(
        f'Cannot open TFDS dataset {name!r} split {split!r} in data_dir={data_dir!r}: {error}\n'
        f'Prepare it with:\n  {prepare_command(config)}') from error


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """What is known about one split without decoding it."""
  num_examples: int
  num_classes: int


_OFFICIAL_EVAL_SPLITS = {'cifar100': 'test', 'cifar10': 'test', 'imagenet2012': 'validation'}


def _tfds_eval_split(name: str, splits: Sequence[str]) -> str:
  if name in _OFFICIAL_EVAL_SPLITS:
    return _OFFICIAL_EVAL_SPLITS[name]
  for candidate in ('test', 'validation', 'val'):
    if candidate in splits:
      return candidate
  raise ValueError(f'The dataset has no test/validation split; splits: {sorted(splits)}.')


def tfds_splits(config) -> tuple[str, str, int, int, int]:
  """(train split, eval split, num_train, num_eval, num_classes) of a prepared TFDS dataset."""
  _check_tfds_prepared(config)
  train = open_tfds_split(config, 'train')
  info = train.dataset_info
  eval_split = _tfds_eval_split(tfds_name(config), list(info.splits.keys()))
  num_classes = info.features['label'].num_classes
  return 'train', eval_split, len(train), len(open_tfds_split(config, eval_split)), num_classes


# ----------------------------------------------------------------------------------------------------------------
# Image folders.


@dataclasses.dataclass(frozen=True)
class FolderSplit:
  """One split of an image folder: file paths and their labels."""
  paths: tuple[str, ...]
  labels: np.ndarray  # int32
  class_names: tuple[str, ...]


def _list_classes(split_dir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith('.'))


def image_folder_class_names(root: pathlib.Path) -> tuple[str, ...]:
  """Class names in label order: `<root>/classes.txt` (one per line) if present, else the sorted train folders.

  A `classes.txt` lets a folder hold a subset of a larger label space (e.g. 100 of the 1,000 ImageNet classes) and
  keep the official indices.
  """
  classes_file = root / 'classes.txt'
  if classes_file.exists():
    names = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
    if len(set(names)) != len(names):
      raise ValueError(f'{classes_file} lists a class more than once.')
    return tuple(names)
  return tuple(_list_classes(root / 'train'))


def image_folder_eval_dir(root: pathlib.Path) -> pathlib.Path:
  for candidate in ('test', 'val', 'validation'):
    if (root / candidate).is_dir():
      return root / candidate
  raise FileNotFoundError(f'Image folder {root} has no test/, val/ or validation/ folder (expected '
                          '<root>/train/<class>/* and <root>/test|val/<class>/*).')


def scan_image_folder(root: str | os.PathLike) -> dict[str, FolderSplit]:
  """Lists `<root>/train/<class>/*` and `<root>/test|val/<class>/*`; classes in sorted order (or classes.txt).

  Files are listed by extension only; broken symbolic links are listed too, so that `find_bad_images` reports them
  as unreadable images (a link that points nowhere is a missing image, not a file to pass over in silence).

  Raises:
    FileNotFoundError: the root, train/ or the evaluation folder is missing, or a class folder is empty.
    ValueError: a class folder exists in one split but not in the other, or is not listed in classes.txt.
  """
  root = pathlib.Path(root).expanduser()
  if not (root / 'train').is_dir():
    raise FileNotFoundError(f'Image folder {root} has no train/ folder (expected <root>/train/<class>/* and '
                            '<root>/test|val/<class>/*); set --config.image_folder to such a root.')
  train_dir, eval_dir = root / 'train', image_folder_eval_dir(root)
  train_classes, eval_classes = _list_classes(train_dir), _list_classes(eval_dir)
  # A class missing from one split would silently shift every later label there if each split were indexed alone.
  only_train = sorted(set(train_classes) - set(eval_classes))
  only_eval = sorted(set(eval_classes) - set(train_classes))
  if only_train or only_eval:
    raise ValueError(
        f'Image folder {root}: the class folders of {train_dir.name}/ and {eval_dir.name}/ differ. '
        f'Only in {train_dir.name}/: {only_train[:10]}{"..." if len(only_train) > 10 else ""}; '
        f'only in {eval_dir.name}/: {only_eval[:10]}{"..." if len(only_eval) > 10 else ""}. '
        'Both splits need the same class folders so that labels agree.')
  class_names = image_folder_class_names(root)
  index = {name: i for i, name in enumerate(class_names)}
  unlisted = sorted(set(train_classes) - set(index))
  if unlisted:
    raise ValueError(f'Class folders {unlisted[:10]} of {root} are not listed in {root / "classes.txt"}.')
  splits = {}
  for split_name, split_dir, classes in (('train', train_dir, train_classes), ('test', eval_dir, eval_classes)):
    paths, labels = [], []
    for name in classes:
      files = sorted(str(p) for p in (split_dir / name).iterdir()
                     if (p.is_file() or p.is_symlink()) and p.suffix.lower() in IMAGE_EXTENSIONS)
      if not files:
        raise FileNotFoundError(f'Class folder {split_dir / name} holds no images ({", ".join(IMAGE_EXTENSIONS)}).')
      paths.extend(files)
      labels.extend([index[name]] * len(files))
    splits[split_name] = FolderSplit(tuple(paths), np.asarray(labels, np.int32), class_names)
  return splits


# ----------------------------------------------------------------------------------------------------------------
# Image-file checks: every file of an image folder is checked before training, so that one unreadable file fails the
# run at start-up (with the full list) rather than hours in, mid-epoch.

# What to do about unreadable files of an image folder (training); scripts/prepare_data.py has its own flag.
BAD_IMAGE_FOLDER_FIX = ('Replace or remove these files, or rerun with --config.skip_bad_images=True to leave every '
                        'unreadable file out of the run (each is then logged).')
# What to do when a file that passed the start-up check fails to decode mid-run.
MID_RUN_FOLDER_FIX = ('Replace or remove the file, then resume: with the file restored (same example count) the resume '
                      'is exact; with it removed, resuming needs --config.allow_config_change=True (the example set '
                      'changed). --config.skip_bad_images=True leaves out every file that fails the start-up check.')
# Files' last bytes must hold their format's end marker; a file without one is decoded in full, which finds
# truncation (PIL opens a truncated JPEG happily and fails only when it decodes the pixels).
_END_MARKERS = {'JPEG': b'\xff\xd9', 'MPO': b'\xff\xd9', 'PNG': b'IEND', 'GIF': b'\x3b'}
_TAIL_BYTES = 64
_CHECK_CACHE_VERSION = 1
_MAX_LISTED_BAD_FILES = 20


def check_image_file(path: str) -> str | None:
  """Why the image file `path` cannot be used, or None when it looks sound.

  Cheap: PIL reads the header (format, size) and the last bytes are checked for the format's end marker; only files
  without one (and formats without a known marker) are decoded in full. About 30-60 us per small JPEG.
  """
  try:
    if os.path.islink(path) and not os.path.exists(path):
      return f'broken symbolic link (to {os.readlink(path)})'
    with open(path, 'rb') as file, PIL.Image.open(file) as image:
      width, height = image.size
      if width < 1 or height < 1:
        return f'empty image ({width}x{height})'
      marker = _END_MARKERS.get(image.format)
      file.seek(max(0, os.fstat(file.fileno()).st_size - _TAIL_BYTES))
      if marker is None or marker not in file.read(_TAIL_BYTES):
        image.load()
  except Exception as error:  # pylint: disable=broad-except
    return f'{type(error).__name__}: {error}'
  return None


def _listing_digest(paths: Sequence[str]) -> str:
  """Hash of the files' paths, sizes and modification times (lstat: broken links count too)."""
  digest = hashlib.sha256(f'image-check-{_CHECK_CACHE_VERSION}\n'.encode())
  for path in paths:
    try:
      stat = os.stat(path)
    except OSError:
      stat = os.lstat(path)
    digest.update(f'{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
  return digest.hexdigest()


def find_bad_images(paths: Sequence[str], cache_dir: str | os.PathLike | None = None,
                    num_threads: int = 8) -> list[tuple[str, str]]:
  """(path, reason) of every file of `paths` that `check_image_file` rejects, in the order of `paths`.

  Threads overlap the file reads (the parsing holds the GIL, so they help on slow or network storage, not on a warm
  local disk). With `cache_dir`, the result is stored under a hash of the paths, sizes and modification times, so a
  resume of the same folder does not check it again (60,000 CIFAR-10 JPEGs take 2-4 s on 2 busy cores, so
  1.28 M ImageNet files a minute or more).
  """
  cache_file = None
  if cache_dir is not None:
    cache_file = pathlib.Path(cache_dir) / f'image-check-{_listing_digest(paths)[:24]}.json'
    try:
      return [tuple(entry) for entry in json.loads(cache_file.read_text())['bad']]
    except (OSError, ValueError, KeyError, TypeError):
      pass  # No (readable) result yet: check.
  chunks = [paths[i:i + 512] for i in range(0, len(paths), 512)]
  with futures.ThreadPoolExecutor(max(1, min(num_threads, len(chunks)))) as pool:
    reasons = [reason for chunk in pool.map(lambda c: [check_image_file(p) for p in c], chunks) for reason in chunk]
  bad = [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]
  if cache_file is not None:
    try:
      cache_file.parent.mkdir(parents=True, exist_ok=True)
      tmp = cache_file.with_name(f'{cache_file.name}.tmp{os.getpid()}')
      tmp.write_text(json.dumps({'num_files': len(paths), 'bad': bad}))
      os.replace(tmp, cache_file)
    except OSError:
      pass  # A read-only cache folder only costs the check again next time.
  return bad


def bad_images_message(what: str, bad: Sequence[tuple[str, str]], num_files: int, fix: str) -> str:
  """One message for all unreadable files: the count, the first ones with their reasons, and `fix`."""
  lines = [f'{len(bad)} of {num_files} image files of {what} cannot be read:']
  lines += [f'  {path}: {reason}' for path, reason in bad[:_MAX_LISTED_BAD_FILES]]
  if len(bad) > _MAX_LISTED_BAD_FILES:
    lines.append(f'  ... and {len(bad) - _MAX_LISTED_BAD_FILES} more.')
  return '\n'.join(lines + ([fix] if fix else []))


def without_files(split: FolderSplit, paths: set[str]) -> FolderSplit:
  """`split` without the files in `paths` (labels and class names unchanged)."""
  keep = [i for i, path in enumerate(split.paths) if path not in paths]
  return FolderSplit(tuple(split.paths[i] for i in keep), split.labels[keep], split.class_names)


def check_image_folder(root: str | os.PathLike, splits: dict[str, FolderSplit], *, skip_bad_images: bool,
                       cache_dir: str | os.PathLike | None = None, fix: str = BAD_IMAGE_FOLDER_FIX
                       ) -> tuple[dict[str, FolderSplit], tuple[str, ...]]:
  """Checks every file of `splits`; returns the splits without the unreadable files and those files' paths.

  Raises:
    ValueError: some files cannot be read and `skip_bad_images` is False (one error listing them, and `fix`).
  """
  paths = [path for split in splits.values() for path in split.paths]
  bad = find_bad_images(paths, cache_dir)
  if not bad:
    return splits, ()
  message = bad_images_message(f'image folder {root}', bad, len(paths), fix)
  if not skip_bad_images:
    raise ValueError(message)
  logging.warning('skip_bad_images: leaving out unreadable files. %s', message)
  skipped = {path for path, _ in bad}
  splits = {name: without_files(split, skipped) for name, split in splits.items()}
  for name, split in splits.items():
    if not split.paths:
      raise ValueError(f'Every image of the {name} split of {root} is unreadable; nothing is left to read.\n{message}')
  return splits, tuple(path for path, _ in bad)


# ----------------------------------------------------------------------------------------------------------------
# Per-example readers (picklable, for grain workers).


class TfdsReader:
  """Reads (encoded image, label) from a prepared TFDS split; the data source is opened lazily in each process."""

  def __init__(self, config, split: str):
    self._config = {'dataset': config.dataset, 'tfds_name': config.get('tfds_name'), 'data_dir': config.get('data_dir')}
    self._split = split
    self._source = None

  def __getstate__(self):
    return {'_config': self._config, '_split': self._split, '_source': None}

  def _open(self):
    if self._source is None:
      self._source = open_tfds_split(_DictConfig(self._config), self._split)
    return self._source

  def __len__(self) -> int:
    return len(self._open())

  def describe(self, index: int) -> str:
    """Names example `index` in error messages: the record index, the split and the dataset."""
    config = _DictConfig(self._config)
    return f'record #{index} of split {self._split!r} of TFDS dataset {tfds_name(config)!r} in {tfds_data_dir(config)}'

  def fix(self) -> str:
    """What to do about an unreadable record."""
    return ('The prepared dataset is damaged; prepare it again (delete the old folder first):\n  '
            f'{prepare_command(_DictConfig(self._config))}')

  def read(self, index: int) -> tuple[PIL.Image.Image, int]:
    record = self._open()[int(index)]
    return decode_image(record['image'], functools.partial(self.describe, index), self.fix), int(record['label'])

  def iter_all(self, chunk: int = 1024):
    """Yields (image, label) for every example in order, reading records in chunks."""
    source = self._open()
    for start in range(0, len(source), chunk):
      keys = list(range(start, min(start + chunk, len(source))))
      try:
        records = source.__getitems__(keys)  # Batched reads are much faster than one record at a time.
      except TypeError:  # tfds.testing.mock_data's data source has a broken __getitems__.
        records = [source[k] for k in keys]
      for offset, record in enumerate(records):
        yield (decode_image(record['image'], functools.partial(self.describe, start + offset), self.fix),
               int(record['label']))


class FolderReader:
  """Reads (image, label) from image-folder paths."""

  def __init__(self, split: FolderSplit):
    self._paths, self._labels = split.paths, split.labels

  def __len__(self) -> int:
    return len(self._paths)

  def describe(self, index: int) -> str:
    """Names example `index` in error messages: its file."""
    return self._paths[index]

  def fix(self) -> str:
    """What to do about a file that fails to decode mid-run (after it passed the start-up check)."""
    return MID_RUN_FOLDER_FIX

  def read(self, index: int) -> tuple[PIL.Image.Image, int]:
    return decode_image(self._paths[index], self._paths[index], self.fix()), int(self._labels[index])

  def iter_all(self):
    return (self.read(i) for i in range(len(self)))


class SyntheticReader:
  """Random uint8 images and labels, a pure function of (seed, split, index). For smoke runs and throughput only."""

  def __init__(self, num_examples: int, num_classes: int, image_size: int, seed: int, split_id: int):
    self._n, self._classes, self._size, self._seed, self._split_id = (
        num_examples, num_classes, image_size, seed, split_id)

  def __len__(self) -> int:
    return self._n

  def read_array(self, index: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng([self._seed, self._split_id, int(index)])
    image = rng.integers(0, 256, (self._size, self._size, 3), dtype=np.uint8)
    return image, int(rng.integers(0, self._classes))

  def read(self, index: int) -> tuple[PIL.Image.Image, int]:
    image, label = self.read_array(index)
    return PIL.Image.fromarray(image), label


class _DictConfig(dict):
  """The few config fields a reader needs, with ConfigDict's `.get` and attribute access."""
  __getattr__ = dict.__getitem__


# ----------------------------------------------------------------------------------------------------------------
# Decode-once arrays for small datasets.


def cache_dir(config) -> pathlib.Path:
  """Where decoded arrays and image-check results are cached: config.data_cache_dir or a default per source."""
  if config.get('data_cache_dir'):
    return pathlib.Path(config.data_cache_dir).expanduser()
  if config.dataset in TFDS_DATASETS:
    return pathlib.Path(tfds_data_dir(config)) / 'ffsd_decoded_cache'
  return pathlib.Path('~/.cache/ffsd_jax/decoded').expanduser()


def _decode_all(reader, expected_size: int | None) -> tuple[np.ndarray, np.ndarray]:
  n = len(reader)
  images, labels = None, np.empty((n,), np.int32)
  for i, (image, label) in enumerate(reader.iter_all()):
    labels[i] = label
    array = np.asarray(image, np.uint8)
    if images is None:
      images = np.empty((n,) + array.shape, np.uint8)
    if array.shape != images.shape[1:] or (expected_size and array.shape[:2] != (expected_size, expected_size)):
      what = reader.describe(i) if hasattr(reader, 'describe') else f'#{i}'
      raise ValueError(f'Image {what} has shape {array.shape}; the decode-once (CIFAR-style) pipeline needs every '
                       f'image to be {expected_size or images.shape[1]}x{expected_size or images.shape[2]}x3. '
                       'Resize the images (and prepare the dataset again if it is a TFDS one) or, for an image '
                       f'folder, raise --config.image_size above {SMALL_IMAGE_MAX_SIZE} for the ImageNet-style '
                       'pipeline.')
    images[i] = array
  if images is None:
    raise ValueError('The split holds no examples.')
  return images, labels


def load_decoded(config, reader, cache_key: dict[str, Any], expected_size: int | None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """All images of a small split as one uint8 (N, H, W, 3) array plus int32 labels, cached as .npy files.

  The cache file name is a hash of `cache_key` (dataset, version, split, file list ...), so a changed dataset is
  decoded again. Files are written to a temporary name and renamed, so concurrent processes never read half a file.
  """
  key = json.dumps(dict(cache_key, format=_CACHE_FORMAT_VERSION), sort_keys=True, default=str)
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  directory = cache_dir(config)
  stem = f'{cache_key.get("name", "data")}-{cache_key.get("split", "split")}-{digest}'
  images_path, labels_path = directory / f'{stem}.images.npy', directory / f'{stem}.labels.npy'
  if images_path.exists() and labels_path.exists():
    return np.load(images_path), np.load(labels_path)
  images, labels = _decode_all(reader, expected_size)
  try:
    directory.mkdir(parents=True, exist_ok=True)
    for path, array in ((images_path, images), (labels_path, labels)):
      tmp = path.with_name(f'{path.name}.tmp{os.getpid()}')
      with open(tmp, 'wb') as f:
        np.save(f, array)
      os.replace(tmp, path)
  except OSError:
    pass  # A read-only data_dir only costs decoding again next time.
  return images, labels
