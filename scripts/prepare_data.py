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
  temporary folder first.
"""

from __future__ import annotations

import argparse
import importlib.resources
import io
import os
import pathlib
import sys
import tarfile
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ffsd_jax.data import sources  # pylint: disable=g-import-not-at-top,wrong-import-position

OFFICIAL = ('cifar100', 'cifar10', 'imagenet2012')


def _png_bytes(image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format='PNG', compress_level=1)  # Lossless; low compression keeps preparation fast.
  return buffer.getvalue()


def _examples(split: sources.FolderSplit):
  for index, (path, label) in enumerate(zip(split.paths, split.labels)):
    image = sources.decode_image(path, path)
    yield index, {'image': _png_bytes(image), 'label': int(label)}


def prepare_image_folder(root: str | os.PathLike, name: str, data_dir: str | os.PathLike, version: str = '1.0.0'):
  """Stores an image folder as the TFDS dataset `name` (splits 'train' and 'test') without TensorFlow.

  Returns the builder. Example order is kept (class by class, files sorted), so the files' order is reproducible.
  """
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

  splits = sources.scan_image_folder(root)
  class_names = splits['train'].class_names
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
      'label': tfds.features.ClassLabel(names=list(class_names)),
  })
  builder = _FolderBuilder(
      name=name, version=version, features=features, data_dir=str(data_dir), file_format='array_record',
      split_datasets={split: _examples(folder_split) for split, folder_split in splits.items()},
      description=f'Image folder {root} (PNG, decoded with PIL and stored losslessly).', disable_shuffling=True)
  if builder.is_prepared():
    raise FileExistsError(f'{name} {version} is already prepared in {builder.data_dir}; delete it to rebuild.')
  builder.download_and_prepare(file_format='array_record')
  return builder


def prepare_official(dataset: str, data_dir: str, manual_dir: str | None):
  """Runs the official TFDS builder with ArrayRecord output (needs TensorFlow for the builder's own code)."""
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as error:
    raise SystemExit(
        f'Preparing {dataset} with the official TFDS builder needs TensorFlow:\n'
        '  pip install -r requirements-prepare.txt\n'
        '(or prepare it from an image folder with --image_folder ROOT --name NAME, which needs no TensorFlow).'
    ) from error
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  builder = tfds.builder(dataset, data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare(download_config=download_config, file_format='array_record')
  return builder


def _unpack_if_archive(path: pathlib.Path, tmp: str) -> pathlib.Path:
  if path.is_dir():
    return path
  if not tarfile.is_tarfile(path):
    raise SystemExit(f'--image_folder {path} is neither a folder nor a tar archive.')
  with tarfile.open(path) as archive:
    archive.extractall(tmp, filter='data')
  # The archive may hold the root itself or one top-level folder containing train/.
  root = pathlib.Path(tmp)
  if not (root / 'train').is_dir():
    children = [c for c in root.iterdir() if c.is_dir()]
    if len(children) == 1:
      root = children[0]
  return root


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--dataset', choices=OFFICIAL, help='official TFDS dataset to prepare (needs TensorFlow)')
  parser.add_argument('--image_folder', help='root with train/<class>/* and test|val/<class>/* (or a .tar.gz)')
  parser.add_argument('--name', help='TFDS name for --image_folder (e.g. cifar10_jpeg)')
  parser.add_argument('--data_dir', required=True, help='TFDS data_dir to write to')
  parser.add_argument('--manual_dir', help='folder with the ImageNet tars for --dataset imagenet2012')
  parser.add_argument('--version', default='1.0.0', help='version of an --image_folder dataset')
  args = parser.parse_args(argv)
  if bool(args.dataset) == bool(args.image_folder):
    parser.error('give exactly one of --dataset or --image_folder')
  start = time.time()
  if args.dataset:
    builder = prepare_official(args.dataset, args.data_dir, args.manual_dir)
  else:
    if not args.name:
      parser.error('--image_folder needs --name (the TFDS name to store it under)')
    with tempfile.TemporaryDirectory(prefix='ffsd_prepare_') as tmp:
      root = _unpack_if_archive(pathlib.Path(args.image_folder).expanduser(), tmp)
      builder = prepare_image_folder(root, args.name, args.data_dir, args.version)
  splits = builder.info.splits
  print(f'Prepared {builder.info.name} in {builder.data_dir} in {time.time() - start:.1f} s:')
  for split_name, split in splits.items():
    print(f'  {split_name}: {split.num_examples} examples')
  label_counts = _label_counts(args, builder)
  if label_counts is not None:
    print(f'  train examples per class: min {label_counts.min()}, max {label_counts.max()}')


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
