"""The device feed: training batches placed on the devices ahead of the step, as flax's `prefetch_to_device` and
big_vision do, so the host-to-device copy of batch k+1 overlaps the step on batch k.

`DeviceFeed(batches, place, size=2)` keeps `size` batches in flight. It also keeps the input iterator's position of
each one: `get_state()` is the position of the next batch the *step* will take (not of the input iterator, which is
`size` batches ahead), so a checkpoint resumes exactly at the batch after the last one trained on.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Mapping

import numpy as np


class DeviceFeed:
  """An iterator of device batches that places the next `size` host batches ahead of their use."""

  def __init__(self, batches: Any, place: Callable[[Mapping[str, np.ndarray]], Any], size: int = 2,
               check: Callable[[Mapping[str, np.ndarray]], None] | None = None):
    """Wraps an input iterator.

    Args:
      batches: the host input iterator (`next()` gives a dict of NumPy arrays; `get_state()` / `set_state()` its
        position).
      place: host batch -> device batch (e.g. `TrainingProgram.global_batch`; asynchronous in JAX, so placing ahead
        costs the host only the dispatch).
      size: batches in flight (2: one being used, one being copied).
      check: host-side validation of each batch before it is placed (it raises on a bad batch).
    """
    if size < 1:
      raise ValueError(f'size={size}: at least one batch must be in flight.')
    self._batches, self._place, self._size, self._check = batches, place, size, check
    self._queue: collections.deque[tuple[dict[str, Any], Any]] = collections.deque()

  def _fill(self) -> None:
    while len(self._queue) < self._size:
      position = self._batches.get_state()  # Where the input stands before this batch: the resume point.
      host_batch = next(self._batches)
      if self._check is not None:
        self._check(host_batch)
      self._queue.append((position, self._place(host_batch)))

  def __iter__(self) -> 'DeviceFeed':
    return self

  def __next__(self) -> Any:
    self._fill()
    _, device_batch = self._queue.popleft()
    return device_batch

  def get_state(self) -> dict[str, Any]:
    """The input position of the next batch the step takes (the batches in flight are not yet trained on)."""
    return self._queue[0][0] if self._queue else self._batches.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    """Drops the batches in flight and moves the input to `state`."""
    self._queue.clear()
    self._batches.set_state(state)
