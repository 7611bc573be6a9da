"""Metric writers: TensorBoard event files (tensorboardX) and `metrics.jsonl`, written by process 0 only.

`clu.metric_writers` imports TensorFlow at import time, so the TensorBoard files are written with tensorboardX.
`metrics.jsonl` holds one JSON object per line: {"step": ..., "epoch": ..., "time": unix seconds, "<name>": value, ...}.
The config goes to TensorBoard as text and as hparams (the HPARAMS tab), at every start and resume.

A resumed run reads as one run: the records and TensorBoard points logged after the checkpoint it resumes from (by a
run stopped before its next checkpoint) are dropped, and a last line torn by a kill or a full disk is cut away with
a warning. The loop calls `sync()` before every checkpoint, so every record up to a checkpoint is on disk.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

from absl import logging
import jax

from ffsd_jax import errors

METRICS_FILE = 'metrics.jsonl'
# Record keys that measure the machine, not the run: they differ between a resumed run and one that never stopped.
TIMING_KEYS = frozenset({'time', 'steps_per_sec', 'images_per_sec', 'mfu', 'data_wait_fraction'})


class DamagedMetricsError(errors.UserError, ValueError):
  """A metrics file damaged other than by a torn last line (edited, or corrupted on disk)."""


def _parse_records(path: str) -> tuple[list[dict[str, Any]], int | None]:
  """(records, line number of a torn last line or None) of a metrics file.

  Raises:
    DamagedMetricsError: a line other than the last is not valid JSON (the file was edited or damaged), naming file and line.
  """
  with open(path, 'rb') as f:
    lines = f.read().split(b'\n')
  records, torn_line = [], None
  numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
  for position, (number, line) in enumerate(numbered):
    try:
      record = json.loads(line)
      if not isinstance(record, dict):
        raise ValueError('not a JSON object')
    except ValueError as error:
      if position == len(numbered) - 1:
        torn_line = number  # A write cut short by a kill or a full disk: only ever the last line.
        break
      raise DamagedMetricsError(f'{path}, line {number}, is not a JSON record ({error}); only the last line can be torn by '
                       'a crash, so the file was edited or damaged. Fix or remove that line.') from None
    records.append(record)
  return records, torn_line


def read_metrics(workdir_or_file: str) -> list[dict[str, Any]]:
  """Reads a run's `metrics.jsonl` (given the workdir or the file) as a list of records; skips a torn last line."""
  path = workdir_or_file
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  return _parse_records(path)[0]


def _write_atomically(path: str, records: list[dict[str, Any]]) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class MetricWriter:
  """Writes scalars to TensorBoard and `metrics.jsonl` in `workdir`; a no-op on processes other than 0."""

  def __init__(self, workdir: str, *, resume_step: int | None = None):
    """Opens the writers.

    Args:
      workdir: the run's folder.
      resume_step: when resuming from a checkpoint at this step, the records and TensorBoard points logged after it
        (by a run that was stopped before its next checkpoint) are dropped, so that the run reads as one.
    """
    self._active = jax.process_index() == 0
    self._jsonl = None
    self._tensorboard = None
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILE)
    if os.path.exists(path):
      records, torn_line = _parse_records(path)
      if torn_line is not None:
        logging.warning('%s: line %d was torn (the run was killed or the disk was full while writing it); it is cut '
                        'away.', path, torn_line)
      kept = records if resume_step is None else [r for r in records if r.get('step', 0) <= resume_step]
      if torn_line is not None or len(kept) != len(records):
        _write_atomically(path, kept)
    self._jsonl = open(path, 'a')
    import tensorboardX  # pylint: disable=g-import-not-at-top
    # purge_step: TensorBoard hides the points at or after it from the earlier event files (the replayed steps).
    self._tensorboard = tensorboardX.SummaryWriter(
        os.path.join(workdir, 'tensorboard'), purge_step=None if resume_step is None else resume_step + 1)

  def write_scalars(self, step: int, scalars: Mapping[str, float], *, epoch: float | None = None) -> None:
    """Writes one record (floats; non-finite values as null in JSON) stamped with the wall-clock time."""
    if not self._active:
      return
    record: dict[str, Any] = {'step': int(step)}
    if epoch is not None:
      record['epoch'] = float(epoch)
    record['time'] = time.time()  # TensorBoard events carry their own wall time.
    for name, value in scalars.items():
      value = float(value)
      record[name] = value if math.isfinite(value) else None
      self._tensorboard.add_scalar(name, value, int(step))
    self._jsonl.write(json.dumps(record) + '\n')

  def write_config(self, step: int, config: Mapping[str, Any], metric_names: tuple[str, ...]) -> None:
    """Writes the config as TensorBoard text (a JSON block) and as hparams with `metric_names` as its metrics."""
    if not self._active:
      return
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    text = json.dumps(dict(config), indent=2, sort_keys=True)
    # Markdown: indented by 4 spaces, the JSON shows as a code block.
    self._tensorboard.add_text('config', '\n'.join('    ' + line for line in text.splitlines()), int(step))
    # hparams take numbers, strings and booleans: tuples are written as their JSON text, None left out.
    hparams = {k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else v for k, v in config.items()}
    experiment, session_start, _ = summary.hparams(hparams, {name: 0.0 for name in metric_names})
    # Into this run's own event file (SummaryWriter.add_hparams would open a new sub-run at every call).
    file_writer = self._tensorboard._get_file_writer()  # pylint: disable=protected-access
    file_writer.add_summary(experiment, int(step))
    file_writer.add_summary(session_start, int(step))

  def flush(self) -> None:
    """Hands the buffered records to the operating system (cheap; at every logging step)."""
    if self._active:
      self._jsonl.flush()
      self._tensorboard.flush()

  def sync(self) -> None:
    """Flushes and fsyncs `metrics.jsonl`: called before every checkpoint, so a resume finds every record up to it."""
    if self._active:
      self.flush()
      os.fsync(self._jsonl.fileno())

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tensorboard.close()
