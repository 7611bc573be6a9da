"""Metric writers: TensorBoard event files (tensorboardX) and `metrics.jsonl`, written by process 0 only.

`clu.metric_writers` imports TensorFlow at import time, so the TensorBoard files are written with tensorboardX.
`metrics.jsonl` holds one JSON object per line: {"step": ..., "epoch": ..., "<name>": value, ...}.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax

METRICS_FILE = 'metrics.jsonl'


def read_metrics(workdir_or_file: str) -> list[dict[str, Any]]:
  """Reads a run's `metrics.jsonl` (given the workdir or the file) as a list of records."""
  path = workdir_or_file
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
  """Writes scalars to TensorBoard and `metrics.jsonl` in `workdir`; a no-op on processes other than 0."""

  def __init__(self, workdir: str, *, resume_step: int | None = None):
    """Opens the writers.

    Args:
      workdir: the run's folder.
      resume_step: when resuming from a checkpoint at this step, the records logged after it (by a run that was
        stopped before its next checkpoint) are dropped from `metrics.jsonl`, so that the file reads as one run.
    """
    self._active = jax.process_index() == 0
    self._jsonl = None
    self._tensorboard = None
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILE)
    if resume_step is not None and os.path.exists(path):
      kept = [r for r in read_metrics(path) if r.get('step', 0) <= resume_step]
      with open(path + '.tmp', 'w') as f:
        for record in kept:
          f.write(json.dumps(record) + '\n')
      os.replace(path + '.tmp', path)
    self._jsonl = open(path, 'a')
    import tensorboardX  # pylint: disable=g-import-not-at-top
    self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write_scalars(self, step: int, scalars: Mapping[str, float], *, epoch: float | None = None) -> None:
    """Writes one record (floats; non-finite values as null in JSON)."""
    if not self._active:
      return
    record: dict[str, Any] = {'step': int(step)}
    if epoch is not None:
      record['epoch'] = float(epoch)
    for name, value in scalars.items():
      value = float(value)
      record[name] = value if math.isfinite(value) else None
      self._tensorboard.add_scalar(name, value, int(step))
    self._jsonl.write(json.dumps(record) + '\n')

  def flush(self) -> None:
    if self._active:
      self._jsonl.flush()
      self._tensorboard.flush()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tensorboard.close()
