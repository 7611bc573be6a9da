"""Deterministic, resumable, per-process training iterators and padded evaluation batches.

Order of examples: epoch e uses the permutation `default_rng([seed, e]).permutation(N)`; global step s of the epoch
takes permutation positions [s*G, (s+1)*G) (G = global batch; the last partial batch is dropped, so an epoch has
N // G steps); process p takes the slice [p*L, (p+1)*L) of that global batch (L = G / process_count). Augmentation
randomness is a function of (seed, epoch, global position) as well, so a global batch is the same whatever the number
of processes. Batch k of the stream is therefore a pure function of k, and the iterator state is just k. With
class-balanced batches (`ClassBalancedOrder`, MCL's sampler) the permutation is replaced by a draw of classes and of
examples within them from (seed, epoch, step); everything else, resume included, is the same.

Resuming over a changed example set or global batch (N -> N', G -> G', only with allow_layout_change, i.e.
--config.allow_config_change): the state k is kept and batch k is read from the new layout, i.e. epoch k // (N' //
G'), step k % (N' // G') over the permutations of N'. Batch k is the k-th training step, so the stream's epochs stay
aligned with the training loop's, which counts epochs with the new steps-per-epoch too (learning-rate schedule,
evaluation after each epoch). When N // G is unchanged (e.g. one file of 481 removed at batch 128) that is the same
epoch and step as before. Either way every permutation changes with N (and every batch with G), so the data order from
k on differs from an uninterrupted run.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import weakref
from typing import Any, Callable, Iterator

from absl import logging
import numpy as np

from ffsd_jax import errors
from ffsd_jax.data import augment

_PERMUTATION_STREAM = 0
_AUGMENT_STREAM = 1
_CLASS_BALANCED_STREAM = 3  # sources.py draws the validation split from stream 2.


class IteratorStateError(errors.UserError, ValueError):
  """A saved training-input state that does not fit this run: a refused resume (exit status 2, as a config change).

  Raised for another seed or process layout, or (without allow_config_change) another example set or global batch.
  """

  exit_code = errors.EXIT_USAGE


class EpochOrder:
  """Maps (epoch, global position) to an example index; keeps the last epoch's permutation."""

  def __init__(self, num_examples: int, seed: int):
    self.num_examples, self.seed = num_examples, seed
    self._epoch, self._permutation = None, None

  def permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      rng = np.random.default_rng([self.seed, _PERMUTATION_STREAM, epoch])
      self._epoch, self._permutation = epoch, rng.permutation(self.num_examples)
    return self._permutation

  def indices(self, epoch: int, positions: np.ndarray) -> np.ndarray:
    """The examples at global `positions` of `epoch`."""
    return self.permutation(epoch)[positions]


def check_class_balance(per_class: int, global_batch: int, num_classes: int) -> None:
  """Raises a one-line DataError unless a global batch splits into groups of `per_class` of distinct classes."""
  if per_class and (global_batch % per_class or global_batch // per_class > num_classes):
    fits = [m for m in range(1, global_batch + 1) if global_batch % m == 0 and global_batch // m <= num_classes]
    raise errors.DataError(
        f'config.batch_images_per_class={per_class}: a batch of {global_batch} must split into whole groups of '
        f'{per_class} images of one class, at most one group per class ({num_classes} classes in the training set); '
        f'set --config.batch_images_per_class to one of {", ".join(map(str, fits))} (0: shuffled epochs).')


class ClassBalancedOrder:
  """MCL's MPerClassSampler (winycg/MCL dataset/class_sampler.py, m = `per_class`) as a pure function of the seed.

  Every global batch of G holds G / m classes drawn without replacement from the training set's classes, and m examples
  of each, drawn without replacement within the class (with replacement when it has fewer than m); class by class, in
  the drawn order. Each batch is drawn afresh, from (seed, epoch, step), so, as with the official sampler, an epoch
  (N // G steps, as with the permutation order) need not show every example once. Same interface as EpochOrder.
  """

  def __init__(self, labels: np.ndarray, per_class: int, global_batch: int, seed: int):
    self._classes = np.unique(labels)
    check_class_balance(per_class, global_batch, len(self._classes))
    self._members = [np.flatnonzero(labels == c) for c in self._classes]
    self._per_class, self._global_batch, self._seed = per_class, global_batch, seed
    self._step, self._batch = None, None

  def batch(self, epoch: int, step: int) -> np.ndarray:
    """The G example indices of global batch `step` of `epoch`, class group by class group."""
    if self._step != (epoch, step):
      rng = np.random.default_rng([self._seed, _CLASS_BALANCED_STREAM, epoch, step])
      chosen = rng.permutation(len(self._classes))[:self._global_batch // self._per_class]
      groups = [rng.choice(self._members[c], self._per_class, replace=len(self._members[c]) < self._per_class)
                for c in chosen]
      self._step, self._batch = (epoch, step), np.concatenate(groups)
    return self._batch

  def indices(self, epoch: int, positions: np.ndarray) -> np.ndarray:
    """The examples at global `positions` of `epoch` (positions within one global batch or several)."""
    positions = np.asarray(positions)
    steps = positions // self._global_batch
    out = np.empty(positions.shape, np.int64)
    for step in np.unique(steps):
      here = steps == step
      out[here] = self.batch(epoch, int(step))[positions[here] % self._global_batch]
    return out


class _Layout:
  """Batch geometry shared by the array and the grain training pipelines."""

  def __init__(self, num_examples: int, global_batch_size: int, process_index: int, process_count: int):
    if global_batch_size % process_count:
      raise ValueError(f'global_batch_size={global_batch_size} must divide by process_count={process_count}.')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} is not in [0, {process_count}).')
    self.global_batch = global_batch_size
    self.local_batch = global_batch_size // process_count
    self.process_index = process_index
    self.steps_per_epoch = num_examples // global_batch_size
    if self.steps_per_epoch == 0:
      raise errors.DataError(f'The training split has {num_examples} examples, fewer than one global batch '
                             f'({global_batch_size}); lower config.batch_size.')

  def batch_positions(self, batch: int) -> tuple[int, np.ndarray]:
    """(epoch, global positions within the epoch's permutation) of this process's part of stream batch `batch`."""
    epoch, step = divmod(batch, self.steps_per_epoch)
    start = step * self.global_batch + self.process_index * self.local_batch
    return epoch, np.arange(start, start + self.local_batch)


class ResumableIterator:
  """An endless iterator over `make_batch(k)` for k = 0, 1, ..., with a background prefetch thread.

  `get_state()` returns {'next_batch': k} (JSON-serialisable): the index of the batch the next `next()` returns,
  counting batches handed to the caller, not those prefetched. `set_state` restarts production there.
  With `allow_layout_change`, `set_state` accepts a state saved over another number of training examples or another
  global batch.
  """

  def __init__(self, make_batch: Callable[[int], dict[str, np.ndarray]], info: dict[str, Any],
               prefetch: int = 2, stream_factory: Callable[[int], Iterator[dict[str, np.ndarray]]] | None = None,
               allow_layout_change: bool = False):
    self._allow_layout_change = allow_layout_change
    self._make_batch = make_batch
    self._stream_factory = stream_factory
    self._info = info
    self._prefetch = prefetch
    self._next = 0
    self._thread = None
    self._queue = None
    self._stop = None
    self._sync_stream = None

  def __iter__(self):
    return self

  def _stream(self, start: int) -> Iterator[dict[str, np.ndarray]]:
    if self._stream_factory is not None:
      return self._stream_factory(start)
    return (self._make_batch(k) for k in _count(start))

  def _start(self):
    self._queue = queue.Queue(maxsize=max(1, self._prefetch))
    self._stop = threading.Event()
    stream, out, stop = self._stream(self._next), self._queue, self._stop

    def produce():
      try:
        for batch in stream:
          while not stop.is_set():
            try:
              out.put(('batch', batch), timeout=0.1)
              break
            except queue.Full:
              continue
          if stop.is_set():
            break
      except BaseException as error:  # Surface worker errors (e.g. an unreadable image) in the caller.
        out.put(('error', error))
      finally:
        _close_quietly(stream)  # Ends grain's worker processes now rather than at garbage collection.

    self._thread = threading.Thread(target=produce, daemon=True, name='ffsd-input')
    _open_iterators.add(self)
    self._thread.start()

  def _halt(self):
    if self._thread is not None:
      self._stop.set()
      self._thread.join(timeout=10)
      self._thread = None

  def __next__(self) -> dict[str, np.ndarray]:
    if self._prefetch <= 0:
      if self._sync_stream is None:
        self._sync_stream = self._stream(self._next)
        _open_iterators.add(self)
      batch = next(self._sync_stream)
    else:
      if self._thread is None:
        self._start()
      kind, batch = self._queue.get()
      if kind == 'error':
        self._thread = None
        raise batch
    self._next += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position of the stream (plus the settings it was made with, to check on restore)."""
    return dict(self._info, next_batch=self._next)

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues with exactly the batches the iterator that produced `state` would have yielded next.

    A state saved over another number of training examples or another global batch is refused, or, with
    allow_layout_change, resumed at the same batch index over the new layout (see the module docstring); every other
    mismatch is refused.
    """
    changed = [key for key, value in self._info.items() if key in state and state[key] != value]
    for key in changed:
      if key not in _LAYOUT_KEYS:
        raise IteratorStateError(f'Input-iterator state was saved with {key}={state[key]!r} but this run has '
                                 f'{self._info[key]!r}; exact resume needs the same dataset, batch size, seed and '
                                 'process layout.')
    next_batch = int(state['next_batch'])
    if changed:
      what = _layout_change(state, self._info)
      if not self._allow_layout_change:
        raise IteratorStateError(f'Input-iterator state was saved with {what}. {_layout_advice(state, self._info)}')
      epoch, step = divmod(next_batch, self._info['steps_per_epoch'])
      logging.warning(
          'Resuming the training input at batch %d (epoch %d, step %d of %d) with %s (allow_config_change). The data '
          'order from here on differs from an uninterrupted run.', next_batch, epoch, step,
          self._info['steps_per_epoch'], what)
    self.close()
    self._next = next_batch

  @property
  def steps_per_epoch(self) -> int:
    return self._info['steps_per_epoch']

  def close(self):
    """Stops the prefetch thread; iteration can continue (it restarts from the current position)."""
    self._halt()
    if self._sync_stream is not None:
      _close_quietly(self._sync_stream)
    self._sync_stream = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


# Settings of the stream's layout; a state saved with others can resume with allow_layout_change.
_LAYOUT_KEYS = ('num_train_examples', 'global_batch_size', 'steps_per_epoch')


def _layout_change(saved: dict[str, Any], now: dict[str, Any]) -> str:
  """'num_train_examples=481 but this run has 480' for each changed example count or global batch."""
  keys = [k for k in ('num_train_examples', 'global_batch_size') if saved.get(k) != now[k]] or ['steps_per_epoch']
  return ' and '.join(f'{k}={saved.get(k)!r} but this run has {now[k]!r}' for k in keys)


def _layout_advice(saved: dict[str, Any], now: dict[str, Any]) -> str:
  """How to resume exactly, and how to go on with the new layout."""
  if saved.get('global_batch_size') != now['global_batch_size']:
    return (f'Exact resume needs the same global batch: rerun with --config.batch_size={saved["global_batch_size"]} '
            'on a device count that divides it, or pass --config.allow_config_change=True to continue with the new '
            'batch from the same step (the step counter, the optimizer state and the step-based schedule continue; '
            'epochs are counted with the new steps per epoch; the data order from there on differs from an '
            'uninterrupted run).')
  return (f'Exact resume needs the same example set: the order of every epoch is a permutation of all training '
          f'examples, so another count changes every later batch. Either restore the training set to its '
          f'{saved.get("num_train_examples")} examples (e.g. put back a removed file; exact resume), or pass '
          f'--config.allow_config_change=True to resume at the same step over the {now["num_train_examples"]} examples '
          '(the data order from there on differs from an uninterrupted run).')


def _count(start: int):
  k = start
  while True:
    yield k
    k += 1


def training_order(labels: np.ndarray, *, global_batch_size: int, seed: int,
                   batch_images_per_class: int = 0) -> EpochOrder | ClassBalancedOrder:
  """The order examples are trained in: epoch permutations, or class-balanced batches when batch_images_per_class > 0."""
  if batch_images_per_class:
    return ClassBalancedOrder(labels, batch_images_per_class, global_batch_size, seed)
  return EpochOrder(len(labels), seed)


def array_train_iterator(images: np.ndarray, labels: np.ndarray, *, global_batch_size: int, process_index: int,
                         process_count: int, seed: int, info: dict[str, Any], prefetch: int = 2,
                         allow_layout_change: bool = False, batch_images_per_class: int = 0) -> ResumableIterator:
  """CIFAR-style training batches from decoded arrays: gather, reflect-pad 4, random crop, flip; vectorised."""
  layout = _Layout(len(images), global_batch_size, process_index, process_count)
  order = training_order(labels, global_batch_size=global_batch_size, seed=seed,
                         batch_images_per_class=batch_images_per_class)
  lock = threading.Lock()

  def make_batch(k: int) -> dict[str, np.ndarray]:
    epoch, positions = layout.batch_positions(k)
    with lock:
      indices = order.indices(epoch, positions)
    # Draw the whole global batch's parameters and take this process's slice (process-count invariant).
    rng = np.random.default_rng([seed, _AUGMENT_STREAM, k])
    tops, lefts, flips = augment.cifar_augment_params(rng, layout.global_batch, images.shape[1])
    part = slice(layout.process_index * layout.local_batch, (layout.process_index + 1) * layout.local_batch)
    batch_images = augment.cifar_augment(images[indices], tops[part], lefts[part], flips[part])
    return {'image': batch_images, 'label': labels[indices].astype(np.int32)}

  info = dict(info, steps_per_epoch=layout.steps_per_epoch)
  return ResumableIterator(make_batch, info, prefetch=prefetch, allow_layout_change=allow_layout_change)


class _ImageNetTrainExample:
  """Decodes and augments the example at one local stream position (runs in grain workers; picklable)."""

  def __init__(self, reader, layout: _Layout, order: EpochOrder | ClassBalancedOrder, seed: int, image_size: int):
    self._reader, self._layout, self._seed, self._size = reader, layout, seed, image_size
    self._order = order

  def __call__(self, local_position: int) -> dict[str, np.ndarray]:
    layout = self._layout
    batch, j = divmod(int(local_position), layout.local_batch)
    epoch, positions = layout.batch_positions(batch)
    position = int(positions[j])
    index = int(self._order.indices(epoch, np.asarray([position]))[0])
    image, label = self._reader.read(index)
    rng = np.random.default_rng([self._seed, _AUGMENT_STREAM, epoch, position])
    return {'image': augment.imagenet_train_transform(image, rng, self._size), 'label': np.int32(label)}


# Decoding threads when there are no worker processes (PIL releases the GIL while it decodes and resizes).
def _default_num_threads() -> int:
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    cores = os.cpu_count() or 2
  return min(16, max(2, cores))


# Batches each worker process keeps ready (grain's per-worker buffer); a few are enough since a worker builds whole
# batches, and each one costs local_batch decoded images of memory.
_PER_WORKER_BUFFER_BATCHES = 2


def _mark_absl_flags_parsed() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags; outside absl.app (scripts, tests) they are not parsed yet.
    flags.FLAGS.mark_as_parsed()


def _grain_stream(element_fn, start_position: int, stop_position: int, local_batch: int, num_workers: int,
                  num_threads: int | None = None):
  """An iterator over the batches of positions [start_position, stop_position), in order, per worker setting.

  Both settings yield exactly the same batches (position p always lands in batch p // local_batch):
  - num_workers == 0: threads decode single examples in parallel and batching happens after the prefetch, so the
    prefetch buffer counts examples (2 batches' worth) and the first batch is ready after ~1 batch of work.
  - num_workers > 0: every worker process builds whole batches, one example after another (no threads: the process
    is the unit of parallelism), and grain interleaves the workers' batches round-robin, i.e. in order. Each worker
    holds at most _PER_WORKER_BUFFER_BATCHES finished batches.
  """
  import grain  # pylint: disable=g-import-not-at-top
  dataset = grain.MapDataset.range(start_position, stop_position).map(element_fn)
  if num_workers == 0:
    threads = num_threads or _default_num_threads()
    dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * local_batch))
    return iter(dataset.batch(local_batch, drop_remainder=True))
  # grain's ReadOptions.prefetch_buffer_size counts the elements of the dataset it reads, here batches: no thread
  # prefetch inside a worker (the earlier 2 * local_batch *batches* per worker held e.g. 512 x 256 images at batch
  # 256 and made every restart decode them first).
  dataset = dataset.batch(local_batch, drop_remainder=True)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  _mark_absl_flags_parsed()
  dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                             per_worker_buffer_size=_PER_WORKER_BUFFER_BATCHES))
  stream = _SharedMemoryReleasingIterator(iter(dataset))
  _register_exit_cleanup()
  return stream


def _release_shared_memory(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Unlinks the names of the shared-memory blocks that grain's workers hand `batch` over in; returns `batch`.

  grain unlinks a block only when its array is garbage-collected, and then in a background thread: blocks of batches
  still alive at exit (held by the caller, or queued for the delete thread) stay behind, and Python's
  resource_tracker warns "leaked shared_memory objects" at exit. Unlinking the name as soon as the batch arrives
  removes that window; the memory itself stays mapped and valid until the array is freed (POSIX shm_unlink).
  """
  for array in batch.values():
    shm = getattr(array, 'shm', None)
    if shm is not None and getattr(array, '_unlink_on_del', False):
      array._unlink_on_del = False  # pylint: disable=protected-access  (else its __del__ would unlink it again)
      try:
        shm.unlink()
      except FileNotFoundError:
        pass
  return batch


class _SharedMemoryReleasingIterator:
  """A grain worker stream whose batches own no shared-memory names (see `_release_shared_memory`)."""

  def __init__(self, stream):
    self._stream = stream

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return _release_shared_memory(next(self._stream))

  def close(self) -> None:
    _close_quietly(self._stream)


def _close_quietly(iterator) -> None:
  close = getattr(iterator, 'close', None)
  if close is not None:
    try:
      close()
    except Exception:  # pylint: disable=broad-except
      pass


def grain_train_iterator(reader, num_examples: int, *, image_size: int, global_batch_size: int, process_index: int,
                         process_count: int, seed: int, num_workers: int, info: dict[str, Any],
                         allow_layout_change: bool = False,
                         order: EpochOrder | ClassBalancedOrder | None = None) -> ResumableIterator:
  """ImageNet-style training batches: per-example PIL decode + RandomResizedCrop + flip in grain workers.

  `order`: the training order (`training_order`); the epoch permutations of `num_examples` when None.
  """
  layout = _Layout(num_examples, global_batch_size, process_index, process_count)
  element_fn = _ImageNetTrainExample(reader, layout, order or EpochOrder(num_examples, seed), seed, image_size)
  local_batch = layout.local_batch

  def stream_factory(start_batch: int):
    return _grain_stream(element_fn, start_batch * local_batch, 2**62, local_batch, num_workers)

  def make_batch(k: int):
    return next(stream_factory(k))

  info = dict(info, steps_per_epoch=layout.steps_per_epoch)
  return ResumableIterator(make_batch, info, prefetch=2, stream_factory=stream_factory,
                           allow_layout_change=allow_layout_change)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation.


class EvalLayout:
  """Eval batch b on process p holds global positions b*G + p*L + j; positions >= N are padding (mask False)."""

  def __init__(self, num_examples: int, global_batch_size: int, process_index: int, process_count: int):
    if global_batch_size % process_count:
      raise ValueError(f'eval global_batch_size={global_batch_size} must divide by process_count={process_count}.')
    self.num_examples = num_examples
    self.global_batch = global_batch_size
    self.local_batch = global_batch_size // process_count
    self.process_index = process_index
    self.num_batches = -(-num_examples // global_batch_size)

  def positions(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
    start = batch * self.global_batch + self.process_index * self.local_batch
    positions = np.arange(start, start + self.local_batch)
    mask = positions < self.num_examples
    return np.where(mask, positions, 0), mask


class ArrayEvalBatches:
  """Re-iterable padded eval batches from decoded arrays (no augmentation: CIFAR evaluates the raw image)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, layout: EvalLayout):
    self._images, self._labels, self._layout = images, labels, layout

  def __len__(self) -> int:
    return self._layout.num_batches

  def __iter__(self):
    for b in range(self._layout.num_batches):
      indices, mask = self._layout.positions(b)
      images = self._images[indices]
      images[~mask] = 0
      labels = np.where(mask, self._labels[indices], 0).astype(np.int32)
      yield {'image': images, 'label': labels, 'mask': mask}


class _ImageNetEvalExample:
  """Decodes + resizes + centre-crops one eval position (zeros with mask False for padding); picklable."""

  def __init__(self, reader, layout: EvalLayout, image_size: int, resize_size: int):
    self._reader, self._layout, self._size, self._resize = reader, layout, image_size, resize_size

  def __call__(self, local_position: int) -> dict[str, np.ndarray]:
    batch, j = divmod(int(local_position), self._layout.local_batch)
    indices, mask = self._layout.positions(batch)
    if not mask[j]:
      return {'image': np.zeros((self._size, self._size, 3), np.uint8), 'label': np.int32(0), 'mask': np.bool_(False)}
    image, label = self._reader.read(int(indices[j]))
    return {'image': augment.imagenet_eval_transform(image, self._size, self._resize), 'label': np.int32(label),
            'mask': np.bool_(True)}


class _LiveEvalWorkers:
  """A grain worker stream over the eval batches repeated forever, kept alive between evaluations.

  Starting grain workers is the expensive part of a short eval pass (each spawned process imports grain, which
  imports jax, plus the parent's main module), so one set of workers serves every evaluation: pass after pass reads
  the next `num_batches` batches of the repeated stream. `offset` counts batches handed out; a pass that stopped
  early leaves it off a pass boundary and the next pass starts fresh workers instead.
  """

  def __init__(self, key: tuple, element_fn, layout: EvalLayout, num_workers: int):
    import grain  # pylint: disable=g-import-not-at-top
    self.key, self.offset, self.busy = key, 0, False
    dataset = grain.MapDataset.range(0, layout.num_batches * layout.local_batch).map(element_fn)
    dataset = dataset.batch(layout.local_batch, drop_remainder=True).repeat(None)
    dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    _mark_absl_flags_parsed()
    self.stream = _SharedMemoryReleasingIterator(iter(dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=_PER_WORKER_BUFFER_BATCHES))))
    _register_exit_cleanup()

  def close(self):
    _close_quietly(self.stream)


_live_eval_workers: list[_LiveEvalWorkers] = []  # At most one: the eval split of the current run.
_live_eval_lock = threading.Lock()


def close_eval_workers() -> None:
  """Ends the worker processes kept for evaluation (they also end with the main process)."""
  with _live_eval_lock:
    while _live_eval_workers:
      _live_eval_workers.pop().close()


_exit_cleanup_registered = False
_open_iterators: weakref.WeakSet = weakref.WeakSet()  # ResumableIterators, to stop their grain workers at exit.


def _close_at_exit() -> None:
  """Stops every grain worker stream and waits for grain's pending shared-memory deletes (see below)."""
  for iterator in list(_open_iterators):
    iterator.close()
  close_eval_workers()
  # Batches dropped by the closes above unlink their blocks in grain's delete thread (SharedMemoryArray.__del__);
  # multiprocessing's exit handler would then end that thread with the deletes still queued, and resource_tracker
  # would warn about leaked blocks. One no-op through the same single-thread pool waits for those queued before it.
  try:
    from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
  except ImportError:  # Another grain layout: nothing to wait for that we know of.
    return
  delete_pool = getattr(shared_memory_array.SharedMemoryArray, '_del_thread_pool', None)
  if delete_pool is not None:
    try:
      delete_pool.apply(int)
    except Exception:  # pylint: disable=broad-except  (a pool already closed has nothing left to wait for)
      pass


def _register_exit_cleanup() -> None:
  """Registers `_close_at_exit` once, after grain (and multiprocessing.util) are imported.

  atexit runs its handlers last-registered first: registered after multiprocessing's own exit handler, ours runs
  before it, while grain's worker processes and its delete thread still run.
  """
  global _exit_cleanup_registered
  if not _exit_cleanup_registered:
    _exit_cleanup_registered = True
    atexit.register(_close_at_exit)


class GrainEvalBatches:
  """Re-iterable padded eval batches decoded in grain workers (or threads when num_workers is 0).

  With workers, the worker processes persist across passes (see _LiveEvalWorkers), also across GrainEvalBatches
  objects made for the same reader and layout, so an evaluation after every epoch does not pay their start-up.
  """

  def __init__(self, reader, layout: EvalLayout, image_size: int, resize_size: int, num_workers: int):
    self._element_fn = _ImageNetEvalExample(reader, layout, image_size, resize_size)
    self._layout, self._num_workers = layout, num_workers
    self._key = (reader, layout.num_examples, layout.global_batch, layout.local_batch, layout.process_index,
                 image_size, resize_size, num_workers)

  def __len__(self) -> int:
    return self._layout.num_batches

  def __iter__(self):
    layout = self._layout
    if self._num_workers == 0:
      return _grain_stream(self._element_fn, 0, layout.num_batches * layout.local_batch, layout.local_batch, 0)
    return self._from_live_workers()

  def _acquire(self) -> _LiveEvalWorkers:
    with _live_eval_lock:
      live = _live_eval_workers[0] if _live_eval_workers else None
      if live is not None and not live.busy and live.key == self._key and live.offset % len(self) == 0:
        live.busy = True
        return live
      if live is not None and not live.busy:  # Another split or layout, or a pass that stopped early.
        _live_eval_workers.pop().close()
      live = _LiveEvalWorkers(self._key, self._element_fn, self._layout, self._num_workers)
      live.busy = True
      if not _live_eval_workers:
        _live_eval_workers.append(live)
      return live

  def _from_live_workers(self):
    live = self._acquire()
    kept = bool(_live_eval_workers) and _live_eval_workers[0] is live
    try:
      for _ in range(len(self)):
        batch = next(live.stream)
        live.offset += 1
        yield batch
    finally:
      live.busy = False
      if not kept:  # A second, concurrent pass over the same split got its own workers.
        live.close()
