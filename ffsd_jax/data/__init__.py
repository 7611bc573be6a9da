"""Input pipelines: TFDS (ArrayRecord) / image-folder / synthetic sources, augmentation (docs/method.md §9), batches.

Public API (the contract the train loop codes against):
  DatasetInfo, get_dataset_info(config), create_train_iterator(config, ...), create_eval_batches(config, ...).

Batches are dicts of NumPy arrays: {'image': uint8 (B, H, W, 3) augmented but not normalised, 'label': int32 (B,)};
eval batches add 'mask': bool (B,) (False on padding). Normalise on the device with
`normalization.normalize_images(images, info.mean_std)`.

Config keys read: dataset, data_dir, image_folder, num_classes, image_size, num_data_workers,
synthetic_num_train_examples, seed; optional: tfds_name (read a dataset prepared under another name, e.g.
'cifar10_jpeg'), normalization ('cifar100' | 'cifar10' | 'imagenet', image folders / synthetic only),
synthetic_num_eval_examples, data_cache_dir (where decoded CIFAR-size arrays and image-check results are cached),
eval_resize_size, skip_bad_images (image folders: leave unreadable files out instead of failing),
allow_config_change (resume the training stream over a changed example count).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Iterable

import numpy as np

from ffsd_jax.data import normalization
from ffsd_jax.data import pipeline
from ffsd_jax.data import sources

__all__ = ['DatasetInfo', 'get_dataset_info', 'create_train_iterator', 'create_eval_batches']


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the loop need to know about a dataset (cheap to compute; decodes nothing)."""
  name: str
  num_classes: int
  image_size: int
  num_train_examples: int
  num_eval_examples: int
  mean_std: tuple[tuple[float, ...], tuple[float, ...]]
  # Image folders with config.skip_bad_images: the unreadable files (train and eval) left out of the counts above.
  skipped_files: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How a config is read: the info, the pipeline style and the split readers."""
  info: DatasetInfo
  small: bool  # True: decode once into arrays, CIFAR-style augmentation; False: per-example ImageNet-style.
  train_reader: Any
  eval_reader: Any
  cache_key: dict[str, Any]


def _config_key(config) -> tuple:
  keys = ('dataset', 'data_dir', 'image_folder', 'tfds_name', 'num_classes', 'image_size', 'normalization',
          'synthetic_num_train_examples', 'synthetic_num_eval_examples', 'seed', 'skip_bad_images')
  return tuple((k, str(config.get(k))) for k in keys)


def _check_num_classes(config, actual: int, what: str) -> None:
  if config.num_classes != actual:
    raise ValueError(f'config.num_classes={config.num_classes} but {what} has {actual} classes; '
                     f'set --config.num_classes={actual}.')


def _normalization_for(config, small: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
  name = config.get('normalization') or ('cifar100' if small else 'imagenet')
  return normalization.get_mean_std(name)


@functools.lru_cache(maxsize=8)
def _plan_cached(config: _FrozenConfig) -> _Plan:
  return _make_plan(config)


def _plan(config) -> _Plan:
  """The data plan of `config`, built once per distinct data setting (opening sources and decoding are costly)."""
  return _plan_cached(_FrozenConfig(config))


class _FrozenConfig:
  """Hashable view of the config: equal when the fields the data code reads (`_config_key`) are equal."""

  def __init__(self, config):
    self._values = dict(_config_key(config))
    self._config = config

  def __hash__(self):
    return hash(tuple(self._values.items()))

  def __eq__(self, other):
    return isinstance(other, _FrozenConfig) and self._values == other._values

  def get(self, key, default=None):
    return self._config.get(key, default)

  def __getattr__(self, key):
    return getattr(self._config, key)


def _make_plan(config) -> _Plan:
  dataset = config.dataset
  if dataset not in sources.ALL_DATASETS:
    raise ValueError(f'Unknown dataset {dataset!r}; valid choices: {list(sources.ALL_DATASETS)}.')
  image_size = int(config.image_size)

  if dataset in sources.TFDS_DATASETS or (dataset == 'image_folder' and config.get('tfds_name')):
    train_split, eval_split, num_train, num_eval, num_classes = sources.tfds_splits(config)
    name = sources.tfds_name(config)
    _check_num_classes(config, num_classes, f'TFDS dataset {name!r}')
    if dataset in ('cifar100', 'cifar10'):
      small, mean_std = True, normalization.get_mean_std(dataset)
      if image_size != 32:
        raise ValueError(f'{dataset} images are 32x32; set --config.image_size=32 (got {image_size}).')
    elif dataset == 'imagenet2012':
      small, mean_std = False, normalization.get_mean_std('imagenet')
    else:
      small = image_size <= sources.SMALL_IMAGE_MAX_SIZE
      mean_std = _normalization_for(config, small)
    train_reader = sources.TfdsReader(config, train_split)
    eval_reader = sources.TfdsReader(config, eval_split)
    cache_key = {'name': name, 'data_dir': str(pathlib.Path(sources.tfds_data_dir(config)).resolve()),
                 'num_train': num_train, 'num_eval': num_eval, 'splits': (train_split, eval_split)}
    info = DatasetInfo(name, num_classes, image_size, num_train, num_eval, mean_std)
    return _Plan(info, small, train_reader, eval_reader, cache_key)

  if dataset == 'image_folder':
    if not config.get('image_folder'):
      raise ValueError("dataset='image_folder' needs --config.image_folder=<root> (with <root>/train/<class>/* and "
                       "<root>/test|val/<class>/*), or --config.tfds_name for a folder prepared with "
                       'scripts/prepare_data.py --image_folder.')
    root = pathlib.Path(config.image_folder).expanduser().resolve()
    splits = sources.scan_image_folder(root)
    num_classes = len(splits['train'].class_names)
    _check_num_classes(config, num_classes, f'image folder {root}')
    # Every file is checked here, before anything compiles: one error lists all unreadable files.
    splits, skipped = sources.check_image_folder(root, splits, skip_bad_images=bool(config.get('skip_bad_images')),
                                                 cache_dir=sources.cache_dir(config))
    small = image_size <= sources.SMALL_IMAGE_MAX_SIZE
    info = DatasetInfo(f'image_folder:{root.name}', num_classes, image_size, len(splits['train'].paths),
                       len(splits['test'].paths), _normalization_for(config, small), skipped_files=skipped)
    cache_key = {'name': root.name, 'root': str(root), 'image_size': image_size,
                 'files': _folder_fingerprint(splits)}
    return _Plan(info, small, sources.FolderReader(splits['train']), sources.FolderReader(splits['test']), cache_key)

  # Synthetic: random pixels and labels, for smoke runs and throughput only (never for accuracy).
  num_train = int(config.get('synthetic_num_train_examples', 50_000))
  num_eval = int(config.get('synthetic_num_eval_examples', 10_000) or 10_000)
  small = image_size <= sources.SMALL_IMAGE_MAX_SIZE
  seed = int(config.get('seed', 0))
  info = DatasetInfo('synthetic', int(config.num_classes), image_size, num_train, num_eval,
                     _normalization_for(config, small))
  return _Plan(info, small,
               sources.SyntheticReader(num_train, info.num_classes, image_size, seed, split_id=0),
               sources.SyntheticReader(num_eval, info.num_classes, image_size, seed, split_id=1), {})


def _folder_fingerprint(splits) -> str:
  import hashlib  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256()
  for split in splits.values():
    for path, label in zip(split.paths, split.labels):
      stat = os.stat(path)
      digest.update(f'{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
  return digest.hexdigest()


def get_dataset_info(config) -> DatasetInfo:
  """Describes the configured dataset; fails here, within seconds, when it is missing (with the prepare command)."""
  return _plan(config).info


def _small_arrays(config, plan: _Plan, split: str) -> tuple[np.ndarray, np.ndarray]:
  reader = plan.train_reader if split == 'train' else plan.eval_reader
  if isinstance(reader, sources.SyntheticReader):
    return _synthetic_arrays(reader)
  return sources.load_decoded(config, reader, dict(plan.cache_key, split=split), expected_size=plan.info.image_size)


@functools.lru_cache(maxsize=4)
def _synthetic_arrays_cached(n, classes, size, seed, split_id) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng([seed, split_id])
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, classes, n).astype(np.int32)
  return images, labels


def _synthetic_arrays(reader: sources.SyntheticReader):
  return _synthetic_arrays_cached(reader._n, reader._classes, reader._size, reader._seed,  # pylint: disable=protected-access
                                  reader._split_id)  # pylint: disable=protected-access


def create_train_iterator(config, *, global_batch_size: int, process_index: int, process_count: int, seed: int
                          ) -> pipeline.ResumableIterator:
  """Endless per-process training batches (local batch = global // process_count), deterministic for `seed`.

  Each epoch is reshuffled (permutation from (seed, epoch)) and has num_train_examples // global_batch_size steps:
  the last partial batch is dropped. `get_state()` / `set_state()` give exact resume. `.steps_per_epoch` is set.
  A state saved over another number of training examples is refused, unless config.allow_config_change is True:
  then the stream continues at the same batch index over the new example set (see ResumableIterator.set_state).
  """
  plan = _plan(config)
  info = {'dataset': plan.info.name, 'global_batch_size': int(global_batch_size), 'process_index': int(process_index),
          'process_count': int(process_count), 'seed': int(seed), 'num_train_examples': plan.info.num_train_examples}
  allow_change = bool(config.get('allow_config_change', False))
  if plan.small:
    images, labels = _small_arrays(config, plan, 'train')
    return pipeline.array_train_iterator(images, labels, global_batch_size=global_batch_size,
                                         process_index=process_index, process_count=process_count, seed=seed,
                                         info=info, allow_example_count_change=allow_change)
  return pipeline.grain_train_iterator(plan.train_reader, plan.info.num_train_examples,
                                       image_size=plan.info.image_size, global_batch_size=global_batch_size,
                                       process_index=process_index, process_count=process_count, seed=seed,
                                       num_workers=int(config.get('num_data_workers', 0) or 0), info=info,
                                       allow_example_count_change=allow_change)


def create_eval_batches(config, *, global_batch_size: int, process_index: int, process_count: int
                        ) -> Iterable[dict[str, np.ndarray]]:
  """Re-iterable per-process eval batches, padded to full size with 'mask'; every example seen exactly once overall.

  Every process gets ceil(num_eval_examples / global_batch_size) batches.
  """
  plan = _plan(config)
  layout = pipeline.EvalLayout(plan.info.num_eval_examples, global_batch_size, process_index, process_count)
  if plan.small:
    images, labels = _small_arrays(config, plan, 'eval')
    return pipeline.ArrayEvalBatches(images, labels, layout)
  size = plan.info.image_size
  resize_size = int(config.get('eval_resize_size') or round(size * 256 / 224))
  return pipeline.GrainEvalBatches(plan.eval_reader, layout, size, resize_size,
                                   int(config.get('num_data_workers', 0) or 0))
