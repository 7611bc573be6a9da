"""Example sources: prepared TFDS datasets (ArrayRecord), image folders and a synthetic source.

A source gives, per split, either all images decoded into one uint8 array (CIFAR-size data, decoded once and cached)
or a picklable reader that decodes one example at a time (ImageNet-size data, decoded in grain workers). Images are
always decoded with PIL, so that every path sees the same pixels. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import io
import json
import os
import pathlib
import time
from concurrent import futures
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np
import PIL.Image

from ffsd_jax import errors

TFDS_DATASETS = ('cifar100', 'cifar10', 'imagenet2012')
ALL_DATASETS = TFDS_DATASETS + ('image_folder', 'synthetic')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm')
# Image folders with images at most this size use the CIFAR-style pipeline (decode once, pad-and-crop).
SMALL_IMAGE_MAX_SIZE = 64
_CACHE_FORMAT_VERSION = 1
# Progress of long passes (image checks, decoding) is logged at most this often and per this fraction of the work.
PROGRESS_INTERVAL_S = 5.0
PROGRESS_FRACTION = 0.1


class Progress:
  """Logs a long pass over `total` items in a handful of lines, however long the pass.

  One line at the start, then one at most every PROGRESS_INTERVAL_S seconds and PROGRESS_FRACTION of the items; the
  line at the end (with `elapsed()`) is the caller's, which knows the outcome.
  """

  def __init__(self, doing: str, total: int):
    self._doing, self._total = doing, total
    self._start = self._last_time = time.monotonic()
    self._last_done = 0
    logging.info('%s ...', doing)

  def update(self, done: int) -> None:
    """Logs a line when enough time and work passed since the last one (never at the end: the caller logs that)."""
    now = time.monotonic()
    if (done < self._total and now - self._last_time >= PROGRESS_INTERVAL_S
        and done - self._last_done >= PROGRESS_FRACTION * self._total):
      logging.info('%s: %s of %s (%d%%) in %.0f s', self._doing, f'{done:,}', f'{self._total:,}',
                   100 * done // max(1, self._total), now - self._start)
      self._last_time, self._last_done = now, done

  def elapsed(self) -> float:
    """Seconds since the pass started."""
    return time.monotonic() - self._start


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

  Raises:
    errors.DataError: the data cannot be decoded (one line: what, the decoder's reason, and `fix`).
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
    raise errors.DataError(f'Cannot decode image {what}: {type(error).__name__}: {errors.one_line(error)}'
                           + (f' {fix}' if fix else '')) from error


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
  """Fails fast (before TFDS can start a download) when the dataset is not prepared under data_dir.

  Raises:
    errors.DataError: data_dir is missing, or holds no prepared copy of the dataset (with the prepare command).
  """
  name, data_dir = tfds_name(config), tfds_data_dir(config)
  folder = pathlib.Path(data_dir) / name
  where = '' if config.get('data_dir') else ' (the TFDS default: --config.data_dir is unset)'
  if not pathlib.Path(data_dir).is_dir():
    state = 'is not a folder' if pathlib.Path(data_dir).exists() else 'does not exist'
    problem = f'The data_dir {data_dir}{where} {state}, so TFDS dataset {name!r} cannot be read from it'
  elif not (folder.is_dir() and (any(folder.glob('*/dataset_info.json'))
                                 or any(folder.glob('*/*/dataset_info.json')))):
    problem = (f'TFDS dataset {name!r} is not prepared in data_dir {data_dir}{where} (no '
               f'{folder}/<version>/dataset_info.json)')
  else:
    return
  raise errors.DataError(f'{problem}; prepare it once with `{prepare_command(config)}`, or point --config.data_dir '
                         'at the folder that holds it.')


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
    raise errors.DataError(
        f'Cannot open TFDS dataset {name!r} split {split!r} in data_dir {data_dir}: {type(error).__name__}: '
        f'{errors.one_line(error)}; if the prepared copy is damaged, delete it and prepare it '
        f'again with `{prepare_command(config)}`.') from error


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
  raise errors.DataError(f'TFDS dataset {name!r} has no test, validation or val split (it has {sorted(splits)}); '
                         'prepare it again from a folder with a test/ or val/ split.')


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


# What an image folder must look like, for error messages.
_FOLDER_LAYOUT = '<root>/train/<class>/* and <root>/test/<class>/* (or val/, validation/)'


def image_folder_class_names(root: pathlib.Path) -> tuple[str, ...]:
  """Class names in label order: `<root>/classes.txt` (one per line) if present, else the sorted train folders.

  A `classes.txt` lets a folder hold a subset of a larger label space (e.g. 100 of the 1,000 ImageNet classes) and
  keep the official indices.
  """
  classes_file = root / 'classes.txt'
  if classes_file.exists():
    names = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
    repeated = sorted(name for name, count in collections.Counter(names).items() if count > 1)
    if repeated:
      raise errors.DataError(f'{classes_file} lists {_few(repeated)} more than once; list every class once.')
    return tuple(names)
  return tuple(_list_classes(root / 'train'))


def image_folder_eval_dir(root: pathlib.Path) -> pathlib.Path:
  """The evaluation split's folder of an image folder: test/, val/ or validation/ (the first present)."""
  for candidate in ('test', 'val', 'validation'):
    if (root / candidate).is_dir():
      return root / candidate
  raise errors.DataError(f'Image folder {root} has no test/, val/ or validation/ folder; an image folder needs '
                         f'{_FOLDER_LAYOUT}.')


def _few(names: Sequence[str], limit: int = 10) -> str:
  """`names` joined with ', ', at most `limit` of them, then 'and N more'."""
  shown = ', '.join(str(name) for name in names[:limit])
  return shown + (f' and {len(names) - limit:,} more' if len(names) > limit else '')


def _check_image_folder_root(root: pathlib.Path) -> None:
  if not root.exists():
    raise errors.DataError(f'Image folder {root} does not exist; set --config.image_folder to a folder holding '
                           f'{_FOLDER_LAYOUT}.')
  if not (root / 'train').is_dir():
    raise errors.DataError(f'Image folder {root} has no train/ folder; set --config.image_folder to a folder holding '
                           f'{_FOLDER_LAYOUT}.')


def _class_problems(root: pathlib.Path, eval_dir: pathlib.Path, train_classes: Sequence[str],
                    eval_classes: Sequence[str], class_names: Sequence[str]) -> list[str]:
  """Why the class folders of the two splits cannot be labelled consistently (empty when they can)."""
  problems = []
  # A class missing from one split would silently shift every later label there if each split were indexed alone.
  only_train = sorted(set(train_classes) - set(eval_classes))
  only_eval = sorted(set(eval_classes) - set(train_classes))
  if only_train or only_eval:
    problems.append(
        f'Image folder {root}: the class folders of train/ and {eval_dir.name}/ differ (only in train/: '
        f'{_few(only_train) or "none"}; only in {eval_dir.name}/: {_few(only_eval) or "none"}); add the missing '
        'class folders or remove the extra ones, so that both splits hold the same classes and labels agree.')
  unlisted = sorted(set(train_classes) - set(class_names))
  if unlisted:
    problems.append(f'Class folders {_few(unlisted)} of {root} are not listed in {root / "classes.txt"}; add them '
                    'to it or remove them.')
  return problems


def scan_image_folder(root: str | os.PathLike) -> dict[str, FolderSplit]:
  """Lists `<root>/train/<class>/*` and `<root>/test|val/<class>/*`; classes in sorted order (or classes.txt).

  Files are listed by extension only; broken symbolic links are listed too, so that `find_bad_images` reports them
  as unreadable images (a link that points nowhere is a missing image, not a file to pass over in silence).

  Raises:
    errors.DataError: the root, train/ or the evaluation folder is missing, or the class folders are unusable (a
      folder in one split only or not in classes.txt, an empty one); every such problem in one line.
  """
  root = pathlib.Path(root).expanduser()
  _check_image_folder_root(root)
  start = time.monotonic()
  logging.info('Scanning image folder %s ...', root)
  train_dir, eval_dir = root / 'train', image_folder_eval_dir(root)
  train_classes, eval_classes = _list_classes(train_dir), _list_classes(eval_dir)
  class_names = image_folder_class_names(root)
  problems = _class_problems(root, eval_dir, train_classes, eval_classes, class_names)
  index = {name: i for i, name in enumerate(class_names)}
  splits, empty = {}, []
  for split_name, split_dir, classes in (('train', train_dir, train_classes), ('test', eval_dir, eval_classes)):
    paths, labels = [], []
    for name in classes:
      files = sorted(str(p) for p in (split_dir / name).iterdir()
                     if (p.is_file() or p.is_symlink()) and p.suffix.lower() in IMAGE_EXTENSIONS)
      if not files:
        empty.append(f'{split_dir.name}/{name}')
      paths.extend(files)
      labels.extend([index.get(name, -1)] * len(files))
    splits[split_name] = FolderSplit(tuple(paths), np.asarray(labels, np.int32), class_names)
  if empty:
    several = len(empty) > 1
    problems.append(f'{len(empty):,} class folder{"s" if several else ""} of {root} hold{"" if several else "s"} no '
                    f'images ({", ".join(IMAGE_EXTENSIONS)}): {_few(empty)}; add images, or remove the class from '
                    'every split.')
  if problems:
    raise errors.DataError(' '.join(problems))
  logging.info('Found %s image files in %d classes in %s (train/ %s, %s/ %s) in %.1f s.',
               f'{sum(len(split.paths) for split in splits.values()):,}', len(train_classes), root,
               f'{len(splits["train"].paths):,}', eval_dir.name, f'{len(splits["test"].paths):,}',
               time.monotonic() - start)
  return splits


# ----------------------------------------------------------------------------------------------------------------
# Image-file checks: every file of an image folder is checked before training, so that one unreadable file (or one of
# the wrong size) fails the run at start-up, with the full count, rather than hours in, mid-epoch.

# What to do about unreadable files of an image folder (training); scripts/prepare_data.py has its own flag.
BAD_IMAGE_FOLDER_FIX = ('Replace or remove these files, or rerun with --config.skip_bad_images=True to leave every '
                        'unreadable file out of the run (each is then logged).')
# What to do when a file that passed the start-up check fails to decode mid-run.
MID_RUN_FOLDER_FIX = ('Replace or remove the file, then resume: with the file restored (same example count) the resume '
                      'is exact; with it removed, resuming needs --config.allow_config_change=True (the example set '
                      'changed). --config.skip_bad_images=True leaves out every file that fails the start-up check.')
# The same, for a run that already has --config.skip_bad_images=True (rerunning finds the file and leaves it out).
MID_RUN_FOLDER_FIX_SKIPPING = ('Replace the file and resume (exact), or resume with '
                               '--config.allow_config_change=True: the start-up check then finds the file and leaves '
                               'it out (the example set changed).')
# Files' last bytes must hold their format's end marker; a file without one is decoded in full, which finds
# truncation (PIL opens a truncated JPEG happily and fails only when it decodes the pixels).
_END_MARKERS = {'JPEG': b'\xff\xd9', 'MPO': b'\xff\xd9', 'PNG': b'IEND', 'GIF': b'\x3b'}
_TAIL_BYTES = 64
_CHECK_CACHE_VERSION = 2  # 2: the result records the image sizes.
_CHECK_CHUNK_FILES = 512  # Files per thread task (and per progress update).
_MAX_LISTED_BAD_FILES = 10
_SIZE_EXAMPLES = 3  # Files named per image size, for the wrong-size message.
_MAX_SIZES_WITH_EXAMPLES = 50  # Beyond this many distinct sizes, only the rarest keep examples (a bounded cache file).


def _short_reason(error: Exception) -> str:
  """A few words for why PIL could not read a file (the long forms name the file object, which the list names)."""
  if isinstance(error, PIL.UnidentifiedImageError):
    return 'not an image PIL can read'
  text = errors.one_line(error)
  if 'truncated' in text:
    return 'truncated'
  return f'{type(error).__name__}: {text}'


def image_file_report(path: str) -> tuple[str | None, tuple[int, int] | None]:
  """(why the image file `path` cannot be used or None, its (width, height) from the header or None).

  Cheap: PIL reads the header (format, size) and the last bytes are checked for the format's end marker; only files
  without one (and formats without a known marker) are decoded in full. About 30-60 us per small JPEG.
  """
  try:
    if os.path.islink(path) and not os.path.exists(path):
      return f'broken symbolic link to {os.readlink(path)}', None
    with open(path, 'rb') as file, PIL.Image.open(file) as image:
      width, height = image.size
      if width < 1 or height < 1:
        return f'empty image ({width}x{height})', None
      marker = _END_MARKERS.get(image.format)
      file.seek(max(0, os.fstat(file.fileno()).st_size - _TAIL_BYTES))
      if marker is None or marker not in file.read(_TAIL_BYTES):
        image.load()
  except Exception as error:  # pylint: disable=broad-except  (PIL raises many types)
    return _short_reason(error), None
  return None, (width, height)


def check_image_file(path: str) -> str | None:
  """Why the image file `path` cannot be used, or None when it looks sound (see `image_file_report`)."""
  return image_file_report(path)[0]


@dataclasses.dataclass(frozen=True)
class ImageFileCheck:
  """What the start-up check found in a list of image files."""
  bad: list[tuple[str, str]]  # (path, reason) of every unreadable file, in the order of the paths.
  size_counts: dict[tuple[int, int], int]  # (width, height) -> how many readable files have it.
  size_examples: dict[tuple[int, int], tuple[str, ...]]  # A few files per size (for the rarest sizes at least).

  def to_json(self, num_files: int) -> str:
    """The result as stored in the check cache."""
    sizes = [[w, h, count, list(self.size_examples.get((w, h), ()))] for (w, h), count in self.size_counts.items()]
    return json.dumps({'num_files': num_files, 'bad': self.bad, 'sizes': sizes})

  @classmethod
  def from_json(cls, text: str) -> ImageFileCheck:
    """A result read back from `to_json`'s text."""
    stored = json.loads(text)
    sizes = {(w, h): (count, tuple(examples)) for w, h, count, examples in stored['sizes']}
    return cls([tuple(entry) for entry in stored['bad']], {size: count for size, (count, _) in sizes.items()},
               {size: examples for size, (_, examples) in sizes.items() if examples})


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


def _summarise(paths: Sequence[str], reports: Sequence[tuple[str | None, tuple[int, int] | None]]) -> ImageFileCheck:
  bad = [(path, reason) for path, (reason, _) in zip(paths, reports) if reason is not None]
  counts: dict[tuple[int, int], int] = {}
  examples: dict[tuple[int, int], list[str]] = {}
  for path, (reason, size) in zip(paths, reports):
    if reason is None:
      counts[size] = counts.get(size, 0) + 1
      if len(examples.setdefault(size, [])) < _SIZE_EXAMPLES:
        examples[size].append(path)
  rarest = sorted(counts, key=lambda size: counts[size])[:_MAX_SIZES_WITH_EXAMPLES]
  return ImageFileCheck(bad, counts, {size: tuple(examples[size]) for size in rarest})


def check_image_files(paths: Sequence[str], cache_dir: str | os.PathLike | None = None, num_threads: int = 8,
                      what: str = 'the image folder') -> ImageFileCheck:
  """Checks every file of `paths` with `image_file_report`: the unreadable ones and the image sizes.

  Threads overlap the file reads (the parsing holds the GIL, so they help on slow or network storage, not on a warm
  local disk). With `cache_dir`, the result is stored under a hash of the paths, sizes and modification times, so a
  resume of the same folder does not check it again (60,000 CIFAR-10 JPEGs take 2-13 s on 2 busy cores, so
  1.28 M ImageNet files a minute or more). Progress is logged (see `Progress`); `what` names the files there.
  """
  cache_file = None
  if cache_dir is not None:
    cache_file = pathlib.Path(cache_dir) / f'image-check-{_listing_digest(paths)[:24]}.json'
    try:
      check = ImageFileCheck.from_json(cache_file.read_text())
      logging.info('Image check of %s: %s files, result read from %s.', what, f'{len(paths):,}', cache_file)
      return check
    except (OSError, ValueError, KeyError, TypeError):
      pass  # No (readable) result yet: check.
  progress = Progress(f'Checking {len(paths):,} image files of {what}', len(paths))
  chunks = [paths[i:i + _CHECK_CHUNK_FILES] for i in range(0, len(paths), _CHECK_CHUNK_FILES)]
  reports = []
  with futures.ThreadPoolExecutor(max(1, min(num_threads, len(chunks)))) as pool:
    for chunk_reports in pool.map(lambda chunk: [image_file_report(p) for p in chunk], chunks):
      reports.extend(chunk_reports)
      progress.update(len(reports))
  check = _summarise(paths, reports)
  logging.info('Checked %s image files of %s in %.1f s: %s unreadable.', f'{len(paths):,}', what, progress.elapsed(),
               f'{len(check.bad):,}')
  if cache_file is not None:
    try:
      cache_file.parent.mkdir(parents=True, exist_ok=True)
      tmp = cache_file.with_name(f'{cache_file.name}.tmp{os.getpid()}')
      tmp.write_text(check.to_json(len(paths)))
      os.replace(tmp, cache_file)
    except OSError:
      pass  # A read-only cache folder only costs the check again next time.
  return check


def find_bad_images(paths: Sequence[str], cache_dir: str | os.PathLike | None = None,
                    num_threads: int = 8) -> list[tuple[str, str]]:
  """(path, reason) of every file of `paths` that `check_image_file` rejects, in the order of `paths`."""
  return check_image_files(paths, cache_dir, num_threads).bad


def _shown_path(path: str, root: str | os.PathLike | None) -> str:
  """`path` relative to `root` when it lies inside it (the message names the root once), else as given."""
  if root is not None:
    try:
      return str(pathlib.Path(path).relative_to(root))
    except ValueError:
      pass
  return path


def bad_images_message(what: str, bad: Sequence[tuple[str, str]], num_files: int, fix: str,
                       root: str | os.PathLike | None = None) -> str:
  """One line for all unreadable files: the count, the first ones with their reasons, and `fix`.

  Args:
    what: names the files' folder ('image folder /data').
    bad: (path, reason) of every unreadable file.
    num_files: how many files were checked.
    fix: what to do about them ('' for none).
    root: paths inside it are shown relative to it.
  """
  listed = ', '.join(f'{_shown_path(path, root)} ({reason})' for path, reason in bad[:_MAX_LISTED_BAD_FILES])
  more = f', and {len(bad) - _MAX_LISTED_BAD_FILES:,} more' if len(bad) > _MAX_LISTED_BAD_FILES else ''
  message = f'{len(bad):,} of {num_files:,} image files of {what} cannot be read: {listed}{more}.'
  return errors.one_line(f'{message} {fix}')


def wrong_size_message(what: str, check: ImageFileCheck, image_size: int,
                       root: str | os.PathLike | None = None) -> str | None:
  """One line naming the readable images that are not image_size x image_size and the fix; None when all are.

  For the decode-once (CIFAR-style) pipeline, which stacks every image of a split into one array.
  """
  expected = (image_size, image_size)
  total = sum(check.size_counts.values())
  wrong = total - check.size_counts.get(expected, 0)
  if not wrong:
    return None
  others = sorted((size for size in check.size_counts if size != expected), key=lambda s: -check.size_counts[s])

  def one_size(size: tuple[int, int]) -> str:
    count, examples = check.size_counts[size], [_shown_path(p, root) for p in check.size_examples.get(size, ())]
    named = f': {", ".join(examples)}' if count == len(examples) else (f', e.g. {", ".join(examples)}' if examples
                                                                      else '')
    return f'{size[0]}x{size[1]} ({count:,} file{"s" if count > 1 else ""}{named})'

  sizes = ', '.join(one_size(size) for size in others[:5]) + (
      f', and {len(others) - 5:,} other sizes' if len(others) > 5 else '')
  (width, height) = others[0]
  if wrong == total and len(others) == 1 and width == height:
    fix = f'set --config.image_size={width}, the size of every image'
  else:
    fix = (f'resize them to {image_size}x{image_size}, or set --config.image_size above {SMALL_IMAGE_MAX_SIZE} (e.g. '
           '96 or 224) for the ImageNet-style pipeline, which resizes and crops every image')
  return (f'{wrong:,} of {total:,} images of {what} are not {image_size}x{image_size}: {sizes}. With '
          f'--config.image_size={image_size} (at most {SMALL_IMAGE_MAX_SIZE}) every image is decoded once into one '
          f'array, so all must be {image_size}x{image_size}: {fix}.')


def without_files(split: FolderSplit, paths: set[str]) -> FolderSplit:
  """`split` without the files in `paths` (labels and class names unchanged)."""
  keep = [i for i, path in enumerate(split.paths) if path not in paths]
  return FolderSplit(tuple(split.paths[i] for i in keep), split.labels[keep], split.class_names)


def check_image_folder(root: str | os.PathLike, splits: dict[str, FolderSplit], *, skip_bad_images: bool,
                       cache_dir: str | os.PathLike | None = None, fix: str = BAD_IMAGE_FOLDER_FIX,
                       expected_size: int | None = None) -> tuple[dict[str, FolderSplit], tuple[str, ...]]:
  """Checks every file of `splits`; returns the splits without the unreadable files and those files' paths.

  Args:
    root: the image folder (named in messages; paths inside it are shown relative to it).
    splits: from `scan_image_folder`.
    skip_bad_images: leave unreadable files out (each logged) instead of failing.
    cache_dir: where the check's result is cached (None: not cached).
    fix: what the error suggests for unreadable files.
    expected_size: every readable image must be expected_size x expected_size (None: any size).

  Raises:
    errors.DataError: files are unreadable (and `skip_bad_images` is False), some image is not expected_size
      square, or nothing readable is left in a split; one line with every problem.
  """
  paths = [path for split in splits.values() for path in split.paths]
  what = f'image folder {root}'
  check = check_image_files(paths, cache_dir, what=what)
  problems = []
  if check.bad and not skip_bad_images:
    problems.append(bad_images_message(what, check.bad, len(paths), fix, root))
  if expected_size:
    problems.append(wrong_size_message(what, check, expected_size, root) or '')
  if any(problems):
    raise errors.DataError(' '.join(problem for problem in problems if problem))
  if not check.bad:
    return splits, ()
  summary = bad_images_message(what, check.bad, len(paths), '', root)
  logging.warning('skip_bad_images: leaving out the unreadable files. %s', summary)
  for path, reason in check.bad:
    logging.warning('skip_bad_images: left out %s (%s).', path, reason)
  skipped = {path for path, _ in check.bad}
  splits = {name: without_files(split, skipped) for name, split in splits.items()}
  for name, split in splits.items():
    if not split.paths:
      raise errors.DataError(f'Every image of the {name} split of {root} is unreadable, so nothing is left to read: '
                             f'{summary}')
  return splits, tuple(path for path, _ in check.bad)


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
    return ('The prepared dataset is damaged; delete it and prepare it again with '
            f'`{prepare_command(_DictConfig(self._config))}`.')

  def read(self, index: int) -> tuple[PIL.Image.Image, int]:
    record = self._open()[int(index)]
    return decode_image(record['image'], functools.partial(self.describe, index), self.fix), int(record['label'])

  def labels(self, chunk: int = 1024) -> np.ndarray:
    """Every record's label (int32), in order; reads the records but decodes no image."""
    source = self._open()
    labels = np.empty((len(source),), np.int32)
    for start in range(0, len(source), chunk):
      keys = list(range(start, min(start + chunk, len(source))))
      try:
        records = source.__getitems__(keys)
      except TypeError:  # tfds.testing.mock_data's data source has a broken __getitems__.
        records = [source[k] for k in keys]
      labels[start:start + len(keys)] = [int(record['label']) for record in records]
    return labels

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
  """Reads (image, label) from image-folder paths; `mid_run_fix` says what to do about a file that fails mid-run."""

  def __init__(self, split: FolderSplit, mid_run_fix: str = MID_RUN_FOLDER_FIX):
    self._paths, self._labels, self._fix = split.paths, split.labels, mid_run_fix

  def __len__(self) -> int:
    return len(self._paths)

  def describe(self, index: int) -> str:
    """Names example `index` in error messages: its file."""
    return self._paths[index]

  def fix(self) -> str:
    """What to do about a file that fails to decode mid-run (after it passed the start-up check)."""
    return self._fix

  def read(self, index: int) -> tuple[PIL.Image.Image, int]:
    return decode_image(self._paths[index], self._paths[index], self.fix()), int(self._labels[index])

  def iter_all(self):
    return (self.read(i) for i in range(len(self)))

  def labels(self) -> np.ndarray:
    """Every file's label (int32), in order."""
    return np.asarray(self._labels, np.int32)


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

  def labels(self) -> np.ndarray:
    """Every example's label (int32), in order (each drawn with its image)."""
    return np.asarray([self.read_array(i)[1] for i in range(self._n)], np.int32)


class SubsetReader:
  """The examples `indices` of another reader, as examples 0 .. len(indices) - 1 (picklable, for grain workers)."""

  def __init__(self, reader, indices: np.ndarray):
    self._reader, self._indices = reader, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def describe(self, index: int) -> str:
    """Names example `index` in error messages as the underlying reader does."""
    return self._reader.describe(int(self._indices[index]))

  def fix(self) -> str:
    """The underlying reader's fix for an unreadable example."""
    return self._reader.fix()

  def read(self, index: int) -> tuple[PIL.Image.Image, int]:
    return self._reader.read(int(self._indices[index]))


# Stream of the validation choice in the seed's RNG (the training pipeline uses 0 and 1, see pipeline.py).
_VALIDATION_STREAM = 2


def hold_out(labels: np.ndarray, per_class: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(training indices, validation indices), both ascending: `per_class` examples of every class held out.

  Class c's held-out examples are the first `per_class` of a permutation of its indices drawn from
  `default_rng([seed, 2, c])`, so the choice depends only on the seed and the labels.

  Raises:
    errors.DataError: a class has no more than `per_class` training examples.
  """
  labels = np.asarray(labels)
  chosen = []
  for label in range(num_classes):
    members = np.flatnonzero(labels == label)
    if len(members) <= per_class:
      smallest = min(int(np.sum(labels == c)) for c in range(num_classes))
      raise errors.DataError(
          f'config.validation_examples_per_class={per_class} but class {label} has only {len(members)} training '
          f'examples; set --config.validation_examples_per_class to at most {max(0, smallest - 1)}.')
    rng = np.random.default_rng([seed, _VALIDATION_STREAM, label])
    chosen.append(rng.permutation(members)[:per_class])
  validation = np.sort(np.concatenate(chosen)) if chosen else np.empty((0,), np.int64)
  return np.setdiff1d(np.arange(len(labels)), validation), validation


class _DictConfig(dict):
  """The few config fields a reader needs, with ConfigDict's `.get` and attribute access."""
  __getattr__ = dict.__getitem__


# ----------------------------------------------------------------------------------------------------------------
# Decode-once arrays for small datasets.


def default_cache_root() -> pathlib.Path:
  """`$XDG_CACHE_HOME/ffsd_jax`, or `~/.cache/ffsd_jax` when XDG_CACHE_HOME is unset (as the compilation cache)."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(base) / 'ffsd_jax'


def cache_dir(config) -> pathlib.Path:
  """Where decoded arrays and image-check results are cached.

  config.data_cache_dir when set; else, for the TFDS datasets, beside the prepared data (`<data_dir>/
  ffsd_decoded_cache`, shared by every user of that data_dir); else `default_cache_root()/decoded`.
  """
  if config.get('data_cache_dir'):
    return pathlib.Path(config.data_cache_dir).expanduser()
  if config.dataset in TFDS_DATASETS:
    return pathlib.Path(tfds_data_dir(config)) / 'ffsd_decoded_cache'
  return default_cache_root() / 'decoded'


def _decode_all(reader, expected_size: int | None, what: str = 'the split') -> tuple[np.ndarray, np.ndarray]:
  n = len(reader)
  images, labels = None, np.empty((n,), np.int32)
  progress = Progress(f'Decoding {n:,} images of {what}', n)
  for i, (image, label) in enumerate(reader.iter_all()):
    labels[i] = label
    array = np.asarray(image, np.uint8)
    if images is None:
      images = np.empty((n,) + array.shape, np.uint8)
    if array.shape != images.shape[1:] or (expected_size and array.shape[:2] != (expected_size, expected_size)):
      name = reader.describe(i) if hasattr(reader, 'describe') else f'#{i}'
      raise errors.DataError(
          f'Image {name} has shape {array.shape}; the decode-once (CIFAR-style) pipeline needs every image to be '
          f'{expected_size or images.shape[1]}x{expected_size or images.shape[2]}x3. Resize the images (and prepare '
          'the dataset again if it is a TFDS one) or, for an image folder, raise --config.image_size above '
          f'{SMALL_IMAGE_MAX_SIZE} for the ImageNet-style pipeline.')
    images[i] = array
    progress.update(i + 1)
  if images is None:
    raise errors.DataError(f'{what} holds no examples; prepare the dataset again with examples in every split.')
  logging.info('Decoded %s images of %s in %.1f s.', f'{n:,}', what, progress.elapsed())
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
    logging.info('Reading the decoded %s split from %s.', cache_key.get('split', ''), images_path)
    return np.load(images_path), np.load(labels_path)
  images, labels = _decode_all(reader, expected_size, f'the {cache_key.get("split", "")} split of '
                                                      f'{cache_key.get("name", "the dataset")}')
  try:
    directory.mkdir(parents=True, exist_ok=True)
    for path, array in ((images_path, images), (labels_path, labels)):
      tmp = path.with_name(f'{path.name}.tmp{os.getpid()}')
      with open(tmp, 'wb') as f:
        np.save(f, array)
      os.replace(tmp, path)
    logging.info('Cached the decoded images in %s.', images_path)
  except OSError as error:  # A read-only data_dir only costs decoding again next time.
    logging.warning('Could not cache the decoded images in %s (%s); set --config.data_cache_dir to a writable folder '
                    'to decode once.', directory, errors.one_line(error))
  return images, labels


def load_labels(config, reader, cache_key: dict[str, Any]) -> np.ndarray:
  """Every label of a split, read once: cached as a .npy file for TFDS splits (reading them reads every record).

  Image folders and synthetic data compute theirs directly (they are in memory, or a pure function of the seed).
  """
  if not isinstance(reader, TfdsReader):
    return reader.labels()
  key = json.dumps(dict(cache_key, format=_CACHE_FORMAT_VERSION), sort_keys=True, default=str)
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  directory = cache_dir(config)
  path = directory / f'{cache_key.get("name", "data")}-{cache_key.get("split", "split")}-{digest}.labels-only.npy'
  if path.exists():
    return np.load(path)
  labels = reader.labels()
  try:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'{path.name}.tmp{os.getpid()}')
    with open(tmp, 'wb') as f:
      np.save(f, labels)
    os.replace(tmp, path)
  except OSError as error:  # A read-only cache only costs reading the labels again next time.
    logging.warning('Could not cache the labels in %s (%s).', path, errors.one_line(error))
  return labels
