"""Input pipelines: TFDS (ArrayRecord) / image-folder / synthetic sources, augmentation (docs/method.md §9), batches.

Public API (the contract the train loop codes against):
  DatasetInfo, get_dataset_info(config), describe_dataset(info, config), create_train_iterator(config, ...),
  create_eval_batches(config, ...), create_validation_batches(config, ...).

Validation split (config.validation_examples_per_class = K > 0): K training examples of every class, chosen from
config.seed (`sources.hold_out`), are left out of the training stream and read by `create_validation_batches` with the
evaluation transforms; info.num_train_examples counts the examples left for training.

Class-balanced batches (config.batch_images_per_class = m > 0, MCL's sampler): every global batch holds
batch_size / m classes, m training examples of each (`pipeline.ClassBalancedOrder`); 0 keeps the shuffled epochs.

Every problem with the data that a researcher can fix (missing or unprepared data, unreadable or wrong-size images,
empty or mismatched class folders, a wrong num_classes) raises `errors.DataError` from `get_dataset_info`, before the
training loop writes anything; its message is one line naming the problem, the path and the fix.

Batches are dicts of NumPy arrays: {'image': uint8 (B, H, W, 3) augmented but not normalised, 'label': int32 (B,)};
eval batches add 'mask': bool (B,) (False on padding). Normalise on the device with
`normalization.normalize_images(images, info.mean_std)`.

Config keys read: dataset, data_dir, image_folder, num_classes (0: the dataset's own count, not for synthetic),
image_size, num_data_workers, synthetic_num_train_examples, seed; optional: tfds_name (read a dataset prepared under
another name, e.g. 'cifar10_jpeg'), normalization ('cifar100' | 'cifar10' | 'imagenet', image folders / synthetic
only), synthetic_num_eval_examples, data_cache_dir (where decoded CIFAR-size arrays and image-check results are cached;
default $XDG_CACHE_HOME/ffsd_jax/decoded, or <data_dir>/ffsd_decoded_cache for the TFDS datasets), eval_resize_size,
skip_bad_images (image folders: leave unreadable files out instead of failing), allow_config_change (resume the
training stream over a changed example count), validation_examples_per_class, batch_images_per_class.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any, Callable, Iterable

import numpy as np

from ffsd_jax import errors
from ffsd_jax.data import augment
from ffsd_jax.data import normalization
from ffsd_jax.data import pipeline
from ffsd_jax.data import sources

__all__ = ['DatasetInfo', 'get_dataset_info', 'describe_dataset', 'create_train_iterator', 'create_eval_batches',
           'create_validation_batches']


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the loop need to know about a dataset (cheap to compute; decodes nothing)."""
  name: str
  num_classes: int  # The dataset's count (also when config.num_classes is 0).
  image_size: int
  num_train_examples: int
  num_eval_examples: int
  mean_std: tuple[tuple[float, ...], tuple[float, ...]]
  # Image folders with config.skip_bad_images: the unreadable files (train and eval) left out of the counts above.
  skipped_files: tuple[str, ...] = ()
  # Training examples held out as the validation split (config.validation_examples_per_class x num_classes); they are
  # not in num_train_examples.
  num_validation_examples: int = 0


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How a config is read: the info, the pipeline style and the split readers."""
  info: DatasetInfo
  small: bool  # True: decode once into arrays, CIFAR-style augmentation; False: per-example ImageNet-style.
  train_reader: Any
  eval_reader: Any
  cache_key: dict[str, Any]
  source: str = ''  # Where the examples come from, for `describe_dataset`.
  eval_split: str = 'test'
  classes_of: str = ''  # What has info.num_classes classes, for the num_classes error.


def _config_key(config) -> tuple:
  keys = ('dataset', 'data_dir', 'image_folder', 'tfds_name', 'image_size', 'normalization',
          'synthetic_num_train_examples', 'synthetic_num_eval_examples', 'seed', 'skip_bad_images',
          'validation_examples_per_class')
  # config.num_classes only picks the labels of synthetic data; elsewhere it is checked against the plan (in `_plan`),
  # so that an entry point writing the resolved count back into the config (0 -> 100) does not plan again.
  if config.get('dataset') == 'synthetic':
    keys += ('num_classes',)
  return tuple((k, str(config.get(k))) for k in keys)


def _resolve_num_classes(config, actual: int, what: str) -> int:
  """`actual`, the dataset's class count, when config.num_classes is 0 (unset) or agrees with it.

  Raises:
    errors.DataError: config.num_classes is another nonzero count.
  """
  requested = int(config.get('num_classes') or 0)
  if requested not in (0, actual):
    raise errors.DataError(f'config.num_classes={requested} but {what} has {actual} classes; set '
                           f'--config.num_classes={actual} (or 0 to take the dataset\'s count).')
  return actual


def _normalization_for(config, small: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
  name = config.get('normalization') or ('cifar100' if small else 'imagenet')
  return normalization.get_mean_std(name)


@functools.lru_cache(maxsize=8)
def _plan_cached(config: _FrozenConfig) -> _Plan:
  return _make_plan(config)


def _plan(config) -> _Plan:
  """The data plan of `config`, built once per distinct data setting (opening sources and decoding are costly)."""
  plan = _plan_cached(_FrozenConfig(config))
  _resolve_num_classes(config, plan.info.num_classes, plan.classes_of)
  return plan


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
  return _with_validation(config, _make_full_plan(config))


def validation_per_class(config) -> int:
  """config.validation_examples_per_class (0 when unset): training examples of each class held out."""
  return int(config.get('validation_examples_per_class') or 0)


def _with_validation(config, plan: _Plan) -> _Plan:
  """`plan` with the held-out examples counted out of the training set (labels are read later, in `_split`).

  Raises:
    errors.DataError: the held-out examples would leave no training example.
  """
  per_class = validation_per_class(config)
  if not per_class:
    return plan
  info = plan.info
  held = per_class * info.num_classes
  if held >= info.num_train_examples:
    raise errors.DataError(
        f'config.validation_examples_per_class={per_class} holds out {held:,} of the {info.num_train_examples:,} '
        f'training examples ({info.num_classes} classes); set --config.validation_examples_per_class to at most '
        f'{(info.num_train_examples - 1) // info.num_classes}.')
  info = dataclasses.replace(info, num_train_examples=info.num_train_examples - held, num_validation_examples=held)
  return dataclasses.replace(plan, info=info)


def _make_full_plan(config) -> _Plan:
  dataset = config.dataset
  if dataset not in sources.ALL_DATASETS:
    raise errors.DataError(f'Unknown dataset {dataset!r}; set --config.dataset to one of '
                           f'{", ".join(sources.ALL_DATASETS)}.')
  if dataset in sources.TFDS_DATASETS or (dataset == 'image_folder' and config.get('tfds_name')):
    return _tfds_plan(config)
  if dataset == 'image_folder':
    return _image_folder_plan(config)
  return _synthetic_plan(config)


def _raise_problems(*problems: str) -> None:
  """One DataError with every problem found (each a sentence), so that one rerun shows all of them."""
  found = [problem for problem in problems if problem]
  if found:
    raise errors.DataError(' '.join(found))


def _problem(check: Callable[[], Any]) -> tuple[Any, str]:
  """(check(), '') or (None, the DataError's message)."""
  try:
    return check(), ''
  except errors.DataError as error:
    return None, str(error)


def _tfds_plan(config) -> _Plan:
  dataset, image_size = config.dataset, int(config.image_size)
  train_split, eval_split, num_train, num_eval, num_classes = sources.tfds_splits(config)
  name = sources.tfds_name(config)
  _, classes_problem = _problem(lambda: _resolve_num_classes(config, num_classes, f'TFDS dataset {name!r}'))
  size_problem = ''
  if dataset in ('cifar100', 'cifar10'):
    small, mean_std = True, normalization.get_mean_std(dataset)
    if image_size != 32:
      size_problem = f'{dataset} images are 32x32; set --config.image_size=32 (got {image_size}).'
  elif dataset == 'imagenet2012':
    small, mean_std = False, normalization.get_mean_std('imagenet')
  else:
    small = image_size <= sources.SMALL_IMAGE_MAX_SIZE
    mean_std = _normalization_for(config, small)
  _raise_problems(classes_problem, size_problem)
  data_dir = pathlib.Path(sources.tfds_data_dir(config)).resolve()
  cache_key = {'name': name, 'data_dir': str(data_dir), 'num_train': num_train, 'num_eval': num_eval,
               'splits': (train_split, eval_split)}
  info = DatasetInfo(name, num_classes, image_size, num_train, num_eval, mean_std)
  return _Plan(info, small, sources.TfdsReader(config, train_split), sources.TfdsReader(config, eval_split),
               cache_key, source=f'TFDS ArrayRecord in {data_dir}', eval_split=eval_split,
               classes_of=f'TFDS dataset {name!r}')


def _image_folder_plan(config) -> _Plan:
  if not config.get('image_folder'):
    raise errors.DataError(
        "dataset='image_folder' needs --config.image_folder=<root> (with <root>/train/<class>/* and "
        '<root>/test|val/<class>/*), or --config.tfds_name=<name> with --config.data_dir for a folder prepared by '
        '`python scripts/prepare_data.py --image_folder <root> --name <name> --data_dir <dir>`.')
  image_size = int(config.image_size)
  root = pathlib.Path(config.image_folder).expanduser().resolve()
  splits = sources.scan_image_folder(root)
  num_classes = len(splits['train'].class_names)
  _, classes_problem = _problem(lambda: _resolve_num_classes(config, num_classes, f'image folder {root}'))
  small = image_size <= sources.SMALL_IMAGE_MAX_SIZE
  skip_bad_images = bool(config.get('skip_bad_images'))
  # Every file is checked here, before anything compiles or is written: one error lists every problem.
  checked, check_problem = _problem(lambda: sources.check_image_folder(
      root, splits, skip_bad_images=skip_bad_images, cache_dir=sources.cache_dir(config),
      expected_size=image_size if small else None))
  _raise_problems(classes_problem, check_problem)
  splits, skipped = checked
  info = DatasetInfo(f'image_folder:{root.name}', num_classes, image_size, len(splits['train'].paths),
                     len(splits['test'].paths), _normalization_for(config, small), skipped_files=skipped)
  cache_key = {'name': root.name, 'root': str(root), 'image_size': image_size,
               'files': _folder_fingerprint(splits)}
  mid_run_fix = sources.MID_RUN_FOLDER_FIX_SKIPPING if skip_bad_images else sources.MID_RUN_FOLDER_FIX
  return _Plan(info, small, sources.FolderReader(splits['train'], mid_run_fix),
               sources.FolderReader(splits['test'], mid_run_fix), cache_key, source=f'image folder {root}',
               eval_split=sources.image_folder_eval_dir(root).name, classes_of=f'image folder {root}')


def _synthetic_plan(config) -> _Plan:
  """Random pixels and labels, for smoke runs and throughput only (never for accuracy)."""
  num_classes = int(config.get('num_classes') or 0)
  if num_classes < 1:
    raise errors.DataError("dataset='synthetic' needs --config.num_classes (e.g. 100): synthetic data has no classes "
                           "of its own, so 0 (take the dataset's count) does not apply.")
  num_train = int(config.get('synthetic_num_train_examples', 50_000))
  num_eval = int(config.get('synthetic_num_eval_examples', 10_000) or 10_000)
  image_size = int(config.image_size)
  small = image_size <= sources.SMALL_IMAGE_MAX_SIZE
  seed = int(config.get('seed', 0))
  info = DatasetInfo('synthetic', num_classes, image_size, num_train, num_eval, _normalization_for(config, small))
  return _Plan(info, small,
               sources.SyntheticReader(num_train, info.num_classes, image_size, seed, split_id=0),
               sources.SyntheticReader(num_eval, info.num_classes, image_size, seed, split_id=1), {},
               source=f'random pixels and labels from seed {seed}, for smoke runs and throughput only',
               classes_of='synthetic data')


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
  """Describes the configured dataset; checks it first (an image folder's every file, from cache on a rerun).

  Raises:
    errors.DataError: the dataset cannot be read as configured (one line: the problem, the path and the fix).
  """
  info = _plan(config).info
  pipeline.check_class_balance(int(config.get('batch_images_per_class') or 0), int(config.batch_size),
                               info.num_classes)
  return info


def _eval_resize_size(config, image_size: int) -> int:
  return int(config.get('eval_resize_size') or round(image_size * 256 / 224))


def _floats(values: Iterable[float]) -> str:
  return '(' + ', '.join(f'{v:g}' for v in values) + ')'


def describe_dataset(info: DatasetInfo, config) -> str:
  """One line saying what the run reads: source, counts, classes, size, pipelines, normalisation, cache, skips.

  Args:
    info: `get_dataset_info(config)`.
    config: the run's config.
  """
  plan = _plan(config)
  size = info.image_size
  parts = [f'{info.num_train_examples:,} train / {info.num_eval_examples:,} {plan.eval_split} images',
           f'{info.num_classes:,} classes', f'{size}x{size}']
  synthetic = isinstance(plan.train_reader, sources.SyntheticReader)
  if plan.small:
    parts.append(f'train pipeline: reflect-pad {augment.CIFAR_PAD} + crop {size} + flip, eval: the image as stored')
  else:
    workers = num_workers(config)
    made = 'generated' if synthetic else 'decoded'
    parts.append(f'train pipeline: random-resized-crop {size} (scale 0.08-1, ratio 3/4-4/3) + flip, eval: resize '
                 f'{_eval_resize_size(config, size)} + centre-crop {size}, {made} per example in '
                 + (f'{workers} worker processes' if workers else 'threads'))
  mean, std = info.mean_std
  parts.append(f'normalisation mean {_floats(mean)} std {_floats(std)}')
  parts.append(f'decoded-image cache: {sources.cache_dir(config) if plan.small and not synthetic else "none"}')
  if info.num_validation_examples:
    parts.append(f'{info.num_validation_examples:,} training images held out for validation '
                 f'({validation_per_class(config)} per class, seed {int(config.get("seed", 0))})')
  if info.skipped_files:
    parts.append(f'{len(info.skipped_files):,} unreadable images left out (skip_bad_images)')
  return f'Dataset {info.name} ({plan.source}): ' + ', '.join(parts)


def _small_arrays(config, plan: _Plan, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Decoded images and labels of 'train' (all of it, held-out examples included) or 'eval'."""
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


def num_workers(config) -> int:
  """The grain worker processes of the per-example (ImageNet-style) pipeline: `config.num_data_workers`, or for -1
  (the default) the host's spare cores: all this process may use but one, which runs the training loop.

  The CIFAR-size pipeline needs none (it augments arrays in memory, at tens of thousands of images per second).
  """
  wanted = int(config.get('num_data_workers', -1))
  if wanted >= 0:
    return wanted
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
  return max(0, cores - 1)


def create_train_iterator(config, *, global_batch_size: int, process_index: int, process_count: int, seed: int
                          ) -> pipeline.ResumableIterator:
  """Endless per-process training batches (local batch = global // process_count), deterministic for `seed`.

  Each epoch is reshuffled (permutation from (seed, epoch)) and has num_train_examples // global_batch_size steps:
  the last partial batch is dropped. `get_state()` / `set_state()` give exact resume. `.steps_per_epoch` is set.
  A state saved over another number of training examples or another global batch is refused, unless
  config.allow_config_change is True: then the stream continues at the same batch index over the new layout (see
  ResumableIterator.set_state).
  """
  plan = _plan(config)
  train_indices, _ = _split(config)
  info = {'dataset': plan.info.name, 'global_batch_size': int(global_batch_size), 'process_index': int(process_index),
          'process_count': int(process_count), 'seed': int(seed), 'num_train_examples': plan.info.num_train_examples}
  allow_change = bool(config.get('allow_config_change', False))
  per_class = int(config.get('batch_images_per_class') or 0)
  if plan.small:
    images, labels = _small_arrays(config, plan, 'train')
    if train_indices is not None:
      images, labels = images[train_indices], labels[train_indices]
    return pipeline.array_train_iterator(images, labels, global_batch_size=global_batch_size,
                                         process_index=process_index, process_count=process_count, seed=seed,
                                         info=info, allow_layout_change=allow_change,
                                         batch_images_per_class=per_class)
  reader = plan.train_reader if train_indices is None else sources.SubsetReader(plan.train_reader, train_indices)
  order = None
  if per_class:  # Class-balanced batches need every training label first.
    labels = _training_labels(config, plan)
    order = pipeline.training_order(labels if train_indices is None else labels[train_indices],
                                    global_batch_size=global_batch_size, seed=seed, batch_images_per_class=per_class)
  return pipeline.grain_train_iterator(reader, plan.info.num_train_examples,
                                       image_size=plan.info.image_size, global_batch_size=global_batch_size,
                                       process_index=process_index, process_count=process_count, seed=seed,
                                       num_workers=num_workers(config), info=info,
                                       allow_layout_change=allow_change, order=order)


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
  resize_size = _eval_resize_size(config, size)
  return pipeline.GrainEvalBatches(plan.eval_reader, layout, size, resize_size, num_workers(config))


def _training_labels(config, plan: _Plan) -> np.ndarray:
  """Every label of the training split, held-out examples included (read once and cached for TFDS)."""
  if plan.small:
    return _small_arrays(config, plan, 'train')[1]
  return sources.load_labels(config, plan.train_reader, dict(plan.cache_key, split='train'))


@functools.lru_cache(maxsize=4)
def _split_cached(config: _FrozenConfig) -> tuple[np.ndarray | None, np.ndarray | None, Any]:
  plan = _plan_cached(config)
  per_class = validation_per_class(config)
  if not per_class:
    return None, None, None
  labels = _training_labels(config, plan)
  train, validation = sources.hold_out(labels, per_class, plan.info.num_classes, int(config.get('seed', 0)))
  # One reader object per split, so that the evaluation workers kept between passes are reused (pipeline.py).
  return train, validation, sources.SubsetReader(plan.train_reader, validation)


def _split(config) -> tuple[np.ndarray | None, np.ndarray | None]:
  """(training indices, validation indices) into the training split; (None, None) without a validation split.

  Raises:
    errors.DataError: a class has too few training examples for config.validation_examples_per_class.
  """
  _plan(config)
  train, validation, _ = _split_cached(_FrozenConfig(config))
  return train, validation


def create_validation_batches(config, *, global_batch_size: int, process_index: int, process_count: int
                              ) -> Iterable[dict[str, np.ndarray]]:
  """The held-out training examples as `create_eval_batches` makes eval batches (eval transforms, padded, masked).

  Raises:
    ValueError: config.validation_examples_per_class is 0 (there is no validation split).
  """
  plan = _plan(config)
  if not plan.info.num_validation_examples:
    raise ValueError('There is no validation split: config.validation_examples_per_class is 0.')
  _, validation, reader = _split_cached(_FrozenConfig(config))
  layout = pipeline.EvalLayout(len(validation), global_batch_size, process_index, process_count)
  if plan.small:
    images, labels = _small_arrays(config, plan, 'train')
    return pipeline.ArrayEvalBatches(images[validation], labels[validation], layout)
  size = plan.info.image_size
  return pipeline.GrainEvalBatches(reader, layout, size, _eval_resize_size(config, size), num_workers(config))
