"""Prepares a TFDS dataset in ArrayRecord format, for `tfds.data_source` reading by the training pipeline.

Two modes:
  Official TFDS builder (downloads where the machine can; ImageNet needs the manual tars; needs TensorFlow:
  pip install -r requirements-prepare.txt):
    python scripts/prepare_data.py --dataset cifar100 --data_dir ~/tensorflow_datasets
    python scripts/prepare_data.py --dataset imagenet2012 --data_dir DIR --manual_dir /path/to/imagenet_tars
  An image folder <root>/train/<class>/* and <root>/test|val/<class>/* (no TensorFlow needed): every image is decoded
  with PIL and stored losslessly as PNG; labels are the sorted class folders (or the order of <root>/classes.txt):
    python scripts/prepare_data.py --image_folder ROOT --name cifar10_jpeg --data_dir DIR
  Train with it: --config.dataset=cifar10 --config.tfds_name=cifar10_jpeg --config.data_dir=DIR (CIFAR-style), or
  --config.dataset=image_folder --config.tfds_name=NAME for any other folder. A .tar/.tar.gz ROOT is unpacked into a
  temporary folder first. NAME must be lower snake case (TFDS's rule; e.g. good_caps, not Good-Caps). Every file is
  checked before anything is written: unreadable ones are listed and the script stops, or, with --skip_bad_images,
  they are left out and listed. The dataset is written into a hidden folder in DIR and renamed into place at the end,
  so a preparation that fails or is killed leaves nothing that blocks the next one.
A failure is one line on stderr (exit status 2 for a bad command line, 1 otherwise); --verbosity=1 adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib.resources
import io
import os
import pathlib
import re
import shutil
import sys
import tarfile
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ffsd_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from ffsd_jax.data import sources  # pylint: disable=g-import-not-at-top,wrong-import-position

OFFICIAL = ('cifar100', 'cifar10', 'imagenet2012')


class DatasetNameError(errors.UsageError, ValueError):
  """A --name that TFDS cannot store a dataset under."""


class DatasetExistsError(errors.UserError, FileExistsError):
  """The dataset (or an unfinished one) is already in --data_dir."""


def _png_bytes(image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format='PNG', compress_level=1)  # Lossless; low compression keeps preparation fast.
  return buffer.getvalue()


_SKIP_FIX = 'Replace or remove these files, or rerun with --skip_bad_images to leave them out (they are listed).'
# What TFDS names its datasets (the snake case of the builder class): training opens the dataset by this name.
_DATASET_NAME = re.compile(r'[a-z][a-z0-9_]*')


def suggest_dataset_name(name: str) -> str:
  """A valid TFDS name close to `name`: CamelCase and separators become underscores, lower case, letter first."""
  snake = re.sub(r'([a-z0-9])([A-Z])', r'\1_\2', re.sub(r'([A-Z]+)([A-Z][a-z])', r'\1_\2', name))
  snake = re.sub(r'[^a-z0-9]+', '_', snake.lower()).strip('_')
  return snake if re.fullmatch(r'[a-z].*', snake) else f'dataset_{snake}'.rstrip('_')


def check_dataset_name(name: str) -> None:
  """Raises DatasetNameError (a ValueError), suggesting a valid name, when `name` is not a TFDS dataset name."""
  if not _DATASET_NAME.fullmatch(name or ''):
    raise DatasetNameError(
        f'--name {name!r} is not a valid TFDS dataset name: TFDS names are lower snake case (a lowercase letter, then '
        'lowercase letters, digits and underscores), and training could not open a dataset stored under another '
        f'name. Use e.g. --name {suggest_dataset_name(name or "images")}.')


class _Examples:
  """The (key, example) pairs of one split; a file that fails to decode is recorded in `failed` and left out."""

  def __init__(self, split: sources.FolderSplit, failed: list[tuple[str, str]]):
    self._split, self._failed = split, failed

  def __iter__(self):
    for index, (path, label) in enumerate(zip(self._split.paths, self._split.labels)):
      try:
        image = sources.decode_image(path, path)
      except ValueError as error:  # Listed with the others at the end, not the first crash.
        self._failed.append((path, str(error.__cause__ or error)))
        continue
      yield index, {'image': _png_bytes(image), 'label': int(label)}


def prepare_image_folder(root: str | os.PathLike, name: str, data_dir: str | os.PathLike, version: str = '1.0.0',
                         skip_bad_images: bool = False):
  """Stores an image folder as the TFDS dataset `name` (splits 'train' and 'test') without TensorFlow.

  Returns a builder read back from the written folder. Example order is kept (class by class, files sorted), so the
  files' order is reproducible. Nothing is written when the name is invalid, the dataset exists or (without
  `skip_bad_images`) a file is unreadable; the dataset appears in `data_dir` only once it is complete.

  Raises:
    DatasetNameError: `name` is invalid (a ValueError).
    errors.DataError: the folder cannot be read, or some files are unreadable and `skip_bad_images` is False (all are
      listed; a ValueError).
    DatasetExistsError: `data_dir/name/version` exists already (a FileExistsError).
  """
  check_dataset_name(name)
  target = pathlib.Path(data_dir).expanduser() / name / version
  if (target / 'dataset_info.json').exists():
    raise DatasetExistsError(f'{name} {version} is already prepared in {target}; delete it to rebuild.')
  if target.exists():
    raise DatasetExistsError(f'{target} exists but holds no dataset_info.json: an incomplete dataset (not written '
                             f'by this script, which renames a finished dataset into place). Delete it and run '
                             f'again: rm -r {target}')
  splits = sources.scan_image_folder(root)  # Both raise errors.DataError naming the folder or the files at fault.
  splits = sources.check_image_folder(root, splits, skip_bad_images=skip_bad_images, fix=_SKIP_FIX)[0]
  # tfds' adhoc builder touches `importlib_resources` (a backport not installed here); the stdlib module serves.
  import importlib.resources.abc  # pylint: disable=g-import-not-at-top,unused-import
  sys.modules.setdefault('importlib_resources', importlib.resources)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.dataset_builders import adhoc_builder  # pylint: disable=g-import-not-at-top

  class _FolderBuilder(adhoc_builder.AdhocBuilder, skip_registration=True):
    """The adhoc builder minus its `isinstance(x, tf.data.Dataset)` check, which would import TensorFlow."""

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples_iterator(examples) for split, examples in self._split_datasets.items()}

  class_names = splits['train'].class_names
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
      'label': tfds.features.ClassLabel(names=list(class_names)),
  })
  target.parent.mkdir(parents=True, exist_ok=True)
  # Written into a hidden folder beside the target (same file system) and renamed when complete.
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f'.{name}-{version}.preparing-', dir=target.parent))
  failed: list[tuple[str, str]] = []
  try:
    builder = _FolderBuilder(
        name=name, version=version, features=features, data_dir=str(staging), file_format='array_record',
        split_datasets={split: _Examples(folder_split, failed) for split, folder_split in splits.items()},
        description=f'Image folder {root} (PNG, decoded with PIL and stored losslessly).', disable_shuffling=True)
    builder.download_and_prepare(file_format='array_record')
    if failed:
      num_files = sum(len(split.paths) for split in splits.values())
      message = sources.bad_images_message(f'image folder {root}', failed, num_files, '' if skip_bad_images else
                                           _SKIP_FIX)
      if not skip_bad_images:
        raise errors.DataError(message)
      print(f'Left out (--skip_bad_images): {message}')
    os.rename(staging / name / version, target)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return tfds.builder_from_directory(str(target))


def prepare_official(dataset: str, data_dir: str, manual_dir: str | None):
  """Runs the official TFDS builder with ArrayRecord output (needs TensorFlow for the builder's own code)."""
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as error:
    raise errors.UserError(
        f'Preparing {dataset} with the official TFDS builder needs TensorFlow: pip install -r '
        'requirements-prepare.txt (or prepare it from an image folder with --image_folder ROOT --name NAME, which '
        'needs no TensorFlow).') from error
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  builder = tfds.builder(dataset, data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare(download_config=download_config, file_format='array_record')
  return builder


def _unpack_if_archive(path: pathlib.Path, tmp: str) -> pathlib.Path:
  """The image folder at `path`, or the root of the tar archive at `path` unpacked into `tmp`."""
  if path.is_dir():
    return path
  if not path.exists():
    raise errors.DataError(f'--image_folder {path} does not exist: give the folder holding train/<class>/* and '
                           'test|val/<class>/* (or a .tar/.tar.gz of it).')
  if not tarfile.is_tarfile(path):
    raise errors.DataError(f'--image_folder {path} is neither a folder nor a tar archive.')
  with tarfile.open(path) as archive:
    archive.extractall(tmp, filter='data')
  # The archive may hold the root itself or one top-level folder containing train/.
  root = pathlib.Path(tmp)
  if not (root / 'train').is_dir():
    children = [c for c in root.iterdir() if c.is_dir()]
    if len(children) == 1:
      root = children[0]
  return root


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line (argparse's own errors, e.g. a missing --data_dir, print its usage and exit with status 2)."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--dataset', choices=OFFICIAL, help='official TFDS dataset to prepare (needs TensorFlow)')
  parser.add_argument('--image_folder', help='root with train/<class>/* and test|val/<class>/* (or a .tar.gz)')
  parser.add_argument('--name', help='TFDS name for --image_folder (e.g. cifar10_jpeg)')
  parser.add_argument('--data_dir', required=True, help='TFDS data_dir to write to')
  parser.add_argument('--manual_dir', help='folder with the ImageNet tars for --dataset imagenet2012')
  parser.add_argument('--version', default='1.0.0', help='version of an --image_folder dataset')
  parser.add_argument('--skip_bad_images', action='store_true',
                      help='leave unreadable images of --image_folder out (listed) instead of stopping')
  parser.add_argument('--verbosity', type=int, default=0, help='1: show the traceback of an error as well')
  return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> None:
  """Prepares what `args` asks for and prints what was written."""
  if bool(args.dataset) == bool(args.image_folder):
    raise errors.UsageError('Give exactly one of --dataset or --image_folder.')
  if args.image_folder:
    if not args.name:
      raise errors.UsageError('--image_folder needs --name (the TFDS name to store it under).')
    check_dataset_name(args.name)  # Before anything is unpacked or written.
  start = time.time()
  if args.dataset:
    builder = prepare_official(args.dataset, args.data_dir, args.manual_dir)
  else:
    with tempfile.TemporaryDirectory(prefix='ffsd_prepare_') as tmp:
      root = _unpack_if_archive(pathlib.Path(args.image_folder).expanduser(), tmp)
      builder = prepare_image_folder(root, args.name, args.data_dir, args.version, args.skip_bad_images)
  splits = builder.info.splits
  print(f'Prepared {builder.info.name} in {builder.data_dir} in {time.time() - start:.1f} s:')
  for split_name, split in splits.items():
    print(f'  {split_name}: {split.num_examples} examples')
  label_counts = _label_counts(args, builder)
  if label_counts is not None:
    print(f'  train examples per class: min {label_counts.min()}, max {label_counts.max()}')


def main(argv: list[str] | None = None) -> None:
  """The command line: a failure is one line on stderr and its exit status (the traceback with --verbosity=1)."""
  args = parse_args(argv)
  with errors.report_errors(verbose=args.verbosity >= 1):
    prepare(args)


def _label_counts(args, builder):
  """Per-class train counts, read back through tfds.data_source (a check that reading works without TensorFlow)."""
  if args.dataset:
    return None
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.data_source(builder.info.name, split='train', data_dir=args.data_dir, download=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
  labels = [int(r['label']) for r in source.__getitems__(list(range(len(source))))]
  return np.bincount(labels, minlength=builder.info.features['label'].num_classes)


if __name__ == '__main__':
  main()
