"""Multi-seed studies: run methods × seeds × configs into one workdir tree, read the workdirs back, aggregate them.

A study root holds one workdir per run, `ROOT/<config name>/<method>/seed<k>` (config name = the config file's name
without `.py`). `scripts/study.py run` trains them one after the other (a finished workdir is skipped, an unfinished
one resumed by rerunning `main.py`); `scripts/study.py aggregate` turns finished or running workdirs into a table of
mean ± sample std (ddof=1) and per-seed values; `scripts/plot_metrics.py` draws them. This module holds the logic of
both scripts so that it is testable without training; it never imports the model code (only the schedules, lazily).

What a workdir is read from (every file but metrics.jsonl or summary.json may be absent):
- `summary.json`: step, total_steps, preempted, the tracked network, best and last leader top-1, last eval top-1;
  with a validation split (config.validation_examples_per_class > 0) also best_val_top1 and test_top1_at_best_val.
  It is written at the end of a run and at a stop; a best or last top-1 that is null (before the first evaluation),
  negative (the -1.0 of older versions) or missing means "no evaluation" and is never averaged.
- `metrics.jsonl`: the eval records (best and last top-1 of a run still in progress, the curves), steps per epoch
  (step / epoch), the wall time from the records' `time` field when they have one. Records past the summary's step
  (a run resumed after a stop) are newer than the summary and win over it.
- `config.json` (the resolved config): method and seed (they override the folder names), total steps and the
  schedules; without it the method and seed come from the folder layout.
- `tensorboard/events.out.tfevents.<unix time>.*`: the start time when the records carry no `time`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ffsd_jax import errors
from ffsd_jax import metric_writers

SUMMARY_FILE = 'summary.json'
CONFIG_FILE = 'config.json'
SEED_DIR_PREFIX = 'seed'

FINISHED = 'finished'  # summary.json with step == total_steps and not preempted.
PREEMPTED = 'preempted'  # summary.json written on preemption (preempted: true).
INCOMPLETE = 'incomplete'  # Records or a summary short of total_steps: running, or stopped; rerun to resume.
NEW = 'new'  # Nothing written yet.

MISSING = '–'  # An en dash: a value that does not exist (yet), in the markdown tables.

# The markdown table's top-1 columns, named by the evaluation each one selects.
BEST_TEST_COLUMN = 'best top-1 (best test epoch)'
LAST_TEST_COLUMN = 'last top-1 (last epoch)'
BEST_VAL_COLUMN = 'best val top-1'
TEST_AT_BEST_VAL_COLUMN = 'test top-1 at best val'

WALL_TIME_FROM_EVENTS_AND_RECORDS = 'first TensorBoard event file to the last metrics.jsonl time'
WALL_TIME_FROM_RECORDS = 'metrics.jsonl time, first to last record (misses the compilation)'
WALL_TIME_FROM_FILES = 'file times: first TensorBoard event file to metrics.jsonl mtime'
WALL_TIME_SOURCES = (WALL_TIME_FROM_EVENTS_AND_RECORDS, WALL_TIME_FROM_RECORDS, WALL_TIME_FROM_FILES)

# Folders inside a workdir that never hold another workdir: not walked when looking for runs.
_WORKDIR_SUBFOLDERS = ('checkpoints', 'checkpoints_best', 'tensorboard', 'export')
# Prefixes of `<prefix>/<name>` record keys that are not `<network>/<loss term>` (every other prefix names a network:
# student_i, leader, branch_i, temporal_mean_i, teacher, ..., whatever a method logs).
_NOT_NETWORK_PREFIXES = frozenset({'loss', 'accuracy', 'learning_rate', 'grad_norm', 'eval', 'gate', 'correct',
                                   'correct_top5', 'cross_entropy'})


class StudyError(errors.UserError, ValueError):
  """A bad study command line or study folder; the message names the problem and the fix (exit status 2)."""

  exit_code = errors.EXIT_USAGE


class UnreadableWorkdirError(errors.UserError, ValueError):
  """A workdir file that cannot be read back (a damaged metrics.jsonl); the message names the file and the fix."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse, but a bad command line is one line on stderr (exit status 2) instead of the usage and the error."""

  def error(self, message: str):
    self.exit(errors.EXIT_USAGE, f'{self.prog}: error: {errors.one_line(message)} (--help shows the usage)\n')


def top1_value(value: Any) -> float | None:
  """A top-1 (%) as read from summary.json or metrics.jsonl, or None for 'no evaluation'.

  The loop writes null before its first evaluation; older versions wrote the sentinel -1.0. A top-1 is never
  negative, so any negative (or non-finite, or non-numeric) value means no evaluation.
  """
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  value = float(value)
  return value if np.isfinite(value) and value >= 0 else None


# ----------------------------------------------------------------------------------------------------------------------
# Running a study.


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  """One run of a study: which config, method and seed, and its workdir."""
  config_path: str
  config_name: str
  method: str
  seed: int
  workdir: str

  def command(self, overrides: Sequence[str] = (), python: str = sys.executable, main_py: str = 'main.py'
              ) -> list[str]:
    """The `main.py` command line that trains (or resumes) this run."""
    return [python, main_py, '--config', self.config_path, '--workdir', self.workdir,
            f'--config.method={self.method}', f'--config.seed={self.seed}', *overrides]


def config_name(config_path: str) -> str:
  """The study's folder name of a config file: its file name without `.py`."""
  return os.path.splitext(os.path.basename(os.path.normpath(config_path)))[0]


def check_overrides(overrides: Sequence[str]) -> None:
  """Checks that every override is `--config.KEY=VALUE` and none sets the method or seed (the study sets them).

  Raises:
    StudyError: naming the bad override and the fix.
  """
  for override in overrides:
    if not re.match(r'^--config\.[A-Za-z_][\w.]*=', override):
      raise StudyError(f'{override!r} is not a --config.KEY=VALUE override; write it as --config.KEY=VALUE.')
    key = override.split('=', 1)[0][len('--config.'):]
    if key in ('method', 'seed'):
      raise StudyError(f'{override!r}: the study sets config.{key} itself (use --methods / --seeds).')


def plan_study(config_paths: Sequence[str], methods: Sequence[str], seeds: Sequence[int], root: str
               ) -> list[PlannedRun]:
  """The study's runs in the order they train: per config, seed 0 of every method first, then seed 1, ...

  So a study stopped half way has already compared the methods on the first seeds.

  Raises:
    StudyError: two configs with the same file name (they would share a folder), or a duplicate method or seed.
  """
  names = [config_name(p) for p in config_paths]
  for what, values in (('config name', names), ('method', list(methods)), ('seed', list(seeds))):
    duplicates = sorted({str(v) for v in values if list(values).count(v) > 1})
    if duplicates:
      raise StudyError(f'Duplicate {what}: {", ".join(duplicates)}; give each only once (two configs need '
                       'different file names: the file name is the folder).')
  return [PlannedRun(path, name, method, int(seed), os.path.join(root, name, method, f'{SEED_DIR_PREFIX}{seed}'))
          for path, name in zip(config_paths, names) for seed in seeds for method in methods]


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None  # Absent, or being replaced right now: the caller treats it as not there.


def read_summary(workdir: str) -> dict[str, Any] | None:
  """The workdir's summary.json, or None."""
  summary = _read_json(os.path.join(workdir, SUMMARY_FILE))
  return summary if isinstance(summary, dict) else None


def read_records(workdir: str) -> list[dict[str, Any]]:
  """The records of the workdir's metrics.jsonl ([] without one); a torn last line is skipped.

  Raises:
    UnreadableWorkdirError: a line other than the last is damaged (the message names the file and line).
  """
  path = os.path.join(workdir, metric_writers.METRICS_FILE)
  if not os.path.exists(path):
    return []
  try:
    return metric_writers.read_metrics(path)
  except metric_writers.DamagedMetricsError as error:
    raise UnreadableWorkdirError(str(error)) from None


def last_step(records: Iterable[Mapping[str, Any]]) -> int | None:
  """The largest integer `step` of the records, or None."""
  steps = [r['step'] for r in records if isinstance(r.get('step'), int) and not isinstance(r.get('step'), bool)]
  return max(steps, default=None)


def summary_is_newest(summary: Mapping[str, Any] | None, records: Sequence[Mapping[str, Any]]) -> bool:
  """Whether summary.json is at least as new as metrics.jsonl (its step >= the records' last step).

  A run stopped (summary.json with preempted: true) and then resumed logs past the summary's step before it writes
  the next one: those records are newer, and a kill -9 or a crash may leave the stale summary for good.
  """
  if summary is None:
    return False
  records_step = last_step(records)
  summary_step = summary.get('step')
  if records_step is None:
    return True
  return isinstance(summary_step, int) and summary_step >= records_step


def workdir_status(workdir: str, records: Sequence[Mapping[str, Any]] | None = None) -> str:
  """FINISHED, PREEMPTED, INCOMPLETE or NEW (see the constants).

  Args:
    workdir: the run's folder.
    records: its metrics.jsonl records when already read (read here otherwise; a damaged file counts as none).
  """
  if records is None:
    try:
      records = read_records(workdir)
    except UnreadableWorkdirError:
      records = []  # The status then comes from summary.json alone; reading the run names the damage.
  summary = read_summary(workdir)
  if summary is not None:
    if not summary_is_newest(summary, records):
      return INCOMPLETE  # Resumed after the summary was written: running, or stopped without a new summary.
    if summary.get('preempted'):
      return PREEMPTED
    if summary.get('step') is not None and summary.get('step') == summary.get('total_steps'):
      return FINISHED
    return INCOMPLETE
  if records or os.path.exists(os.path.join(workdir, metric_writers.METRICS_FILE)) or os.path.isdir(
      os.path.join(workdir, 'checkpoints')):
    return INCOMPLETE
  return NEW


def call_main(command: list[str]) -> int:
  """Runs one main.py command and returns its exit status, letting it stop cleanly on Ctrl-C and SIGTERM.

  `subprocess.call` would SIGKILL the run a quarter second after a Ctrl-C, before it saves. Here this process waits
  through Ctrl-C (the terminal sends SIGINT to the run too; forwarding it would be a second Ctrl-C, which aborts
  without saving) and forwards a SIGTERM sent to it alone, so the run saves a checkpoint and exits.
  """
  process = subprocess.Popen(command)

  def forward_sigterm(signum, frame):
    del frame
    if process.poll() is None:
      process.send_signal(signum)

  # Python-function handlers (not SIG_IGN, which a child would inherit): reset to the defaults in the run.
  previous = {signal.SIGINT: signal.signal(signal.SIGINT, lambda signum, frame: None),
              signal.SIGTERM: signal.signal(signal.SIGTERM, forward_sigterm)}
  try:
    return process.wait()
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


# Exit statuses of a main.py run stopped by Ctrl-C: 130 after saving; -SIGINT when a second Ctrl-C aborted it
# (Python re-raises an uncaught KeyboardInterrupt as the signal), which leaves its last checkpoint to resume from.
CTRL_C_EXIT_STATUSES = (errors.EXIT_SIGINT, -int(signal.SIGINT))


@dataclasses.dataclass
class StudyOutcome:
  """The runs of a study by outcome, and whether Ctrl-C stopped it."""
  skipped: list[PlannedRun] = dataclasses.field(default_factory=list)  # Already finished.
  done: list[PlannedRun] = dataclasses.field(default_factory=list)  # Ran to their last step.
  stopped: list[PlannedRun] = dataclasses.field(default_factory=list)  # Ctrl-C or preempted: resumable.
  failed: list[PlannedRun] = dataclasses.field(default_factory=list)  # Non-zero exit status, not a stop.
  not_started: list[PlannedRun] = dataclasses.field(default_factory=list)  # After a stop.
  interrupted: bool = False  # Ctrl-C stopped the study.


def _file_fingerprint(path: str) -> tuple[int, int, int] | None:
  """(inode, mtime in ns, size) of a file, or None: changes whenever the file is rewritten (atomically or not)."""
  try:
    info = os.stat(path)
  except OSError:
    return None
  return info.st_ino, info.st_mtime_ns, info.st_size


def _stop_reason(workdir: str, returncode: int, summary_before: tuple[int, int, int] | None) -> str | None:
  """Why a run that just exited with `returncode` stopped short and can be resumed, or None (finished or failed).

  Args:
    workdir: the run's folder.
    returncode: main.py's exit status.
    summary_before: `_file_fingerprint` of its summary.json before the run: a summary counts only if the run
      (re)wrote it, since a stale 'preempted' summary of an earlier stop says nothing about a run that crashed now.
  """
  if returncode in CTRL_C_EXIT_STATUSES:
    return 'Ctrl-C'
  summary_path = os.path.join(workdir, SUMMARY_FILE)
  summary = read_summary(workdir)
  written_now = summary is not None and _file_fingerprint(summary_path) != summary_before
  if written_now and summary.get('preempted'):
    return f'preempted ({summary.get("stopped_by") or "SIGTERM"})'
  if returncode == 0 and workdir_status(workdir) != FINISHED:
    return 'preempted'  # Exit 0 short of the last step: stopped by SIGTERM (older versions wrote no summary).
  return None


def run_study(runs: Sequence[PlannedRun], overrides: Sequence[str] = (), *, python: str = sys.executable,
              main_py: str = 'main.py', call: Callable[[list[str]], int] = call_main,
              log: Callable[[str], None] = print) -> StudyOutcome:
  """Trains the runs one after the other and returns them by outcome.

  A finished workdir is skipped; any other one is (re)started with `main.py`, which resumes from its checkpoint. A
  run that fails (a non-zero exit that is not a stop) is reported and the study goes on. A run stopped by Ctrl-C
  (exit 130) or by a preemption (summary.json says preempted, or exit 0 short of its last step: the machine is going
  away) is 'stopped (resumable)' and stops the study; so does a Ctrl-C between runs. Rerun the same command to
  continue.
  """
  outcome = StudyOutcome()
  for index, run in enumerate(runs):
    label = f'[{index + 1}/{len(runs)}] {run.config_name} {run.method} seed {run.seed}'
    called = False
    try:
      status = workdir_status(run.workdir)
      if status == FINISHED:
        log(f'{label}: already finished at step {read_summary(run.workdir)["step"]}; skipped ({run.workdir})')
        outcome.skipped.append(run)
        continue
      command = run.command(overrides, python=python, main_py=main_py)
      log(f'{label}: {"resuming" if status != NEW else "starting"}: {shlex.join(command)}')
      summary_before = _file_fingerprint(os.path.join(run.workdir, SUMMARY_FILE))
      called = True
      returncode = call(command)
    except KeyboardInterrupt:
      # Ctrl-C while this process, not a run, had the terminal's attention (between runs, or a test's `call`).
      (outcome.stopped if called else outcome.not_started).append(run)
      outcome.not_started.extend(runs[index + 1:])
      outcome.interrupted = True
      break
    reason = _stop_reason(run.workdir, returncode, summary_before)
    if reason is not None:
      log(f'{label}: stopped (resumable): {reason}; rerun the study to continue.')
      outcome.stopped.append(run)
      outcome.not_started.extend(runs[index + 1:])
      outcome.interrupted = reason == 'Ctrl-C'
      break
    (outcome.failed if returncode else outcome.done).append(run)
    if returncode:
      log(f'{label}: failed with exit status {returncode}; going on with the next run.')
  return outcome


# ----------------------------------------------------------------------------------------------------------------------
# Reading workdirs.


@dataclasses.dataclass
class RunResult:
  """What one workdir holds, for the table and the plots."""
  workdir: str
  config: str  # The study's config name ('' outside a study tree).
  method: str
  seed: int | None
  status: str
  step: int | None
  total_steps: int | None
  network: str  # The tracked network: 'leader', or 'student_0' for dml (no leader).
  best_top1: float | None
  last_top1: float | None
  last_eval: dict[str, float]  # {network: last eval top-1}.
  wall_time_s: float | None
  wall_time_source: str | None
  records: list[dict[str, Any]]
  config_values: dict[str, Any] | None  # config.json, when present.
  # With a validation split: the tracked network's best validation top-1, and the test top-1 of that evaluation.
  best_val_top1: float | None = None
  test_top1_at_best_val: float | None = None


def find_workdirs(path: str) -> list[str]:
  """The workdirs at or under `path` (folders holding summary.json or metrics.jsonl), sorted."""
  found = []
  for folder, subfolders, files in os.walk(path):
    if SUMMARY_FILE in files or metric_writers.METRICS_FILE in files:
      found.append(folder)
      subfolders.clear()  # A workdir never holds another one.
      continue
    subfolders[:] = sorted(s for s in subfolders if s not in _WORKDIR_SUBFOLDERS)
  return sorted(found)


def read_config_json(workdir: str) -> dict[str, Any] | None:
  """The resolved config in `workdir/config.json` as a dict (also accepted nested under a 'config' key), or None."""
  value = _read_json(os.path.join(workdir, CONFIG_FILE))
  if isinstance(value, dict) and isinstance(value.get('config'), dict):
    value = value['config']
  return value if isinstance(value, dict) else None


def _layout(workdir: str, root: str) -> tuple[str, str | None, int | None]:
  """(config name, method, seed) from the path below `root`: `<config>/<method>/seed<k>`, or shorter."""
  relative = os.path.relpath(workdir, root)
  parts = [] if relative == '.' else relative.split(os.sep)
  seed = None
  if parts and re.fullmatch(rf'{SEED_DIR_PREFIX}(\d+)', parts[-1]):
    seed = int(parts.pop()[len(SEED_DIR_PREFIX):])
  method = parts.pop() if parts else None
  return '/'.join(parts), method, seed


def steps_per_epoch(records: Iterable[Mapping[str, Any]]) -> int | None:
  """Steps per epoch from the records (step / epoch of the first record past step 0), or None."""
  for record in records:
    if record.get('epoch') and record.get('step'):
      return max(1, round(record['step'] / record['epoch']))
  return None


def tracked_network(records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any] | None = None) -> str:
  """The network whose best top-1 the run tracks: from summary.json, the records' eval/best_top1 key, or 'leader'."""
  if summary and summary.get('network'):
    return summary['network']
  for record in records:
    for key in record:
      if key.startswith('eval/best_top1/'):
        return key[len('eval/best_top1/'):]
  has_leader = any('eval/top1/leader' in r for r in records)
  return 'leader' if has_leader or not records else 'student_0'


def _wall_time(workdir: str, records: Sequence[Mapping[str, Any]]) -> tuple[float | None, str | None]:
  """(seconds, source): from the run's start to its last record.

  The start is the earliest TensorBoard event file's creation time (in its name: the writer opens it before the
  first compilation) or, without one, the first record's `time` (which misses the compilation and the first logging
  window); the end is the last record's `time`, or metrics.jsonl's modification time for records without one.
  """
  times = [r['time'] for r in records if isinstance(r.get('time'), (int, float))]
  starts = []
  for name in glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*')):
    match = re.match(r'events\.out\.tfevents\.(\d+)\.', os.path.basename(name))
    if match:
      starts.append(int(match.group(1)))
  metrics_path = os.path.join(workdir, metric_writers.METRICS_FILE)
  if times and (starts or len(times) > 1):
    start = min(starts + times)
    return max(times) - start, WALL_TIME_FROM_EVENTS_AND_RECORDS if starts else WALL_TIME_FROM_RECORDS
  if starts and os.path.exists(metrics_path):
    return max(0.0, os.path.getmtime(metrics_path) - min(starts)), WALL_TIME_FROM_FILES
  return None, None


def _eval_values(records: Sequence[Mapping[str, Any]], network: str
                 ) -> tuple[float | None, float | None, dict[str, float]]:
  """(best, last top-1 of `network`, {network: last eval top-1}) from the records' evaluations."""
  eval_records = [r for r in records if any(k.startswith('eval/top1/') for k in r)]
  last_eval = _last_eval_of(eval_records[-1] if eval_records else {})
  seen = [top1_value(r.get(k)) for r in eval_records for k in (f'eval/top1/{network}', f'eval/best_top1/{network}')]
  seen = [v for v in seen if v is not None]
  return (max(seen) if seen else None), last_eval.get(network), last_eval


def _validation_values(records: Sequence[Mapping[str, Any]], network: str) -> tuple[float | None, float | None]:
  """(best validation top-1 of `network`, its test top-1 at the first evaluation that reached it) from the records."""
  best_val, test_at_best = None, None
  for record in records:
    val = top1_value(record.get(f'val/top1/{network}'))
    if val is not None and (best_val is None or val > best_val):
      best_val, test_at_best = val, top1_value(record.get(f'eval/top1/{network}'))
  return best_val, test_at_best


def _last_eval_of(values: Mapping[str, Any]) -> dict[str, float]:
  """{network: top-1} of the `eval/top1/<network>` keys holding a top-1 (no null, no -1 sentinel)."""
  last_eval = {k[len('eval/top1/'):]: top1_value(v) for k, v in values.items() if k.startswith('eval/top1/')}
  return {k: v for k, v in last_eval.items() if v is not None}


def _first_top1(*values: Any) -> float | None:
  """The first of the values that is a top-1 (see `top1_value`), or None."""
  return next((v for v in map(top1_value, values) if v is not None), None)


def _total_steps(config_values: Mapping[str, Any] | None, records: Sequence[Mapping[str, Any]]) -> int | None:
  """Total steps from config.json: max_steps, else num_epochs × the records' steps per epoch; or None."""
  if config_values is None:
    return None
  if (config_values.get('max_steps') or -1) > 0:
    return int(config_values['max_steps'])
  spe = steps_per_epoch(records)
  return int(config_values['num_epochs']) * spe if spe and config_values.get('num_epochs') else None


def read_run(workdir: str, root: str | None = None, method: str | None = None) -> RunResult:
  """Reads one workdir (finished, preempted or still running).

  summary.json and metrics.jsonl are merged by step: whichever is newer wins. A summary's `best_leader_top1` or
  `last_leader_top1` that is null, negative (the -1.0 of older versions) or missing means no evaluation yet.

  Args:
    workdir: the run's folder.
    root: the study root it lies under: the config name, method and seed come from the folders between them.
    method: a label that overrides the method (e.g. from `label=path` on a command line).

  Raises:
    UnreadableWorkdirError: metrics.jsonl is damaged (a line other than the last).
  """
  root = workdir if root is None else root
  name, layout_method, seed = _layout(workdir, root)
  config_values = read_config_json(workdir)
  if config_values is not None:
    # The resolved config is the truth; the folder names are only a convention.
    layout_method = config_values.get('method', layout_method)
    seed = config_values.get('seed', seed)
  records = read_records(workdir)
  summary = read_summary(workdir)
  network = tracked_network(records, summary)
  best, last, last_eval = _eval_values(records, network)
  best_val, test_at_best_val = _validation_values(records, network)
  step, total_steps = last_step(records), _total_steps(config_values, records)
  if summary_is_newest(summary, records):
    # summary.json is written at the end of the run or at a stop; records after its step (a resume) are newer.
    step = summary.get('step', step)
    total_steps = summary.get('total_steps') or total_steps
    best = _first_top1(summary.get('best_leader_top1'), best)
    last = _first_top1(summary.get('last_leader_top1'), last)
    last_eval = _last_eval_of(summary.get('last_eval') or {}) or last_eval
    if top1_value(summary.get('best_val_top1')) is not None:  # The pair comes from one evaluation: taken together.
      best_val = top1_value(summary['best_val_top1'])
      test_at_best_val = top1_value(summary.get('test_top1_at_best_val'))
  elif summary is not None and total_steps is None:
    total_steps = summary.get('total_steps')
  wall_time_s, wall_time_source = _wall_time(workdir, records)
  return RunResult(workdir=workdir, config=name, method=method or layout_method or os.path.basename(workdir),
                   seed=None if seed is None else int(seed), status=workdir_status(workdir, records), step=step,
                   total_steps=total_steps, network=network, best_top1=best, last_top1=last, last_eval=last_eval,
                   wall_time_s=wall_time_s, wall_time_source=wall_time_source, records=records,
                   config_values=config_values, best_val_top1=best_val, test_top1_at_best_val=test_at_best_val)


def collect_runs(paths: Sequence[str]) -> list[RunResult]:
  """The runs under each path: a study root, a workdir, or `label=path` (the label is the method of its runs).

  Raises:
    StudyError: a path that is not a folder, or holds no workdir.
    UnreadableWorkdirError: a damaged metrics.jsonl.
  """
  runs = []
  for spec in paths:
    label, path = spec.split('=', 1) if '=' in spec and not os.path.exists(spec) else (None, spec)
    if not os.path.isdir(path):
      what = 'is a file, not a folder' if os.path.exists(path) else 'no such folder'
      raise StudyError(f'{path}: {what}; give a study root (the --root of scripts/study.py run), a workdir, or '
                       'label=workdir.')
    workdirs = find_workdirs(path)
    if not workdirs:
      raise StudyError(f'{path}: no workdir (a folder with summary.json or metrics.jsonl) in or under it; give the '
                       'study root or a workdir of a run that has started logging.')
    runs.extend(read_run(w, root=path, method=label) for w in workdirs)
  return runs


# ----------------------------------------------------------------------------------------------------------------------
# Aggregating.


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
  """(mean, sample std with ddof=1) of the values; std is None for fewer than 2 values, both None for none."""
  values = [float(v) for v in values if v is not None]
  if not values:
    return None, None
  mean = float(np.mean(values))
  return mean, (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def network_sort_key(network: str) -> tuple[int, str, int]:
  """Students by number, then the leader, the fusion classifier, the ensemble, then anything else by name (a
  numbered one, e.g. branch_10, by kind and number)."""
  match = re.fullmatch(r'(.+)_(\d+)', network)
  kind, number = (match.group(1), int(match.group(2))) if match else (network, -1)
  if kind == 'student':
    return 0, '', number
  order = {'leader': 1, 'fusion': 2, 'ensemble': 3}
  return order.get(network, 4), kind, number


@dataclasses.dataclass
class GroupRow:
  """One (config, method) of a study: per-seed values (in seed order) and their mean ± sample std."""
  config: str
  method: str
  network: str
  seeds: list[int | None]
  statuses: list[str]
  steps: list[tuple[int | None, int | None]]
  best_top1: list[float | None]
  last_top1: list[float | None]
  last_eval: dict[str, list[float | None]]  # {network: per-seed last top-1}.
  wall_time_s: list[float | None]
  wall_time_sources: list[str | None]
  best_val_top1: list[float | None] = dataclasses.field(default_factory=list)
  test_top1_at_best_val: list[float | None] = dataclasses.field(default_factory=list)


def aggregate(runs: Sequence[RunResult], finished_only: bool = False) -> list[GroupRow]:
  """Groups the runs by (config, method), in the order of first appearance; seeds sorted within a group."""
  groups: dict[tuple[str, str], list[RunResult]] = {}
  for run in runs:
    if finished_only and run.status != FINISHED:
      continue
    groups.setdefault((run.config, run.method), []).append(run)
  rows = []
  for (name, method), members in groups.items():
    members = sorted(members, key=lambda r: (r.seed is None, r.seed or 0, r.workdir))
    networks = sorted({n for r in members for n in r.last_eval}, key=network_sort_key)
    tracked = sorted({r.network for r in members})
    rows.append(GroupRow(
        config=name, method=method, network='/'.join(tracked), seeds=[r.seed for r in members],
        statuses=[r.status for r in members], steps=[(r.step, r.total_steps) for r in members],
        best_top1=[r.best_top1 for r in members], last_top1=[r.last_top1 for r in members],
        last_eval={n: [r.last_eval.get(n) for r in members] for n in networks},
        wall_time_s=[r.wall_time_s for r in members], wall_time_sources=[r.wall_time_source for r in members],
        best_val_top1=[r.best_val_top1 for r in members],
        test_top1_at_best_val=[r.test_top1_at_best_val for r in members]))
  return rows


def count_values(values: Sequence[float | None]) -> int:
  """n: how many of the per-seed values exist (the seeds that have evaluated)."""
  return sum(v is not None for v in values)


def _format_mean_std(values: Sequence[float | None]) -> str:
  """'mean ± std', 'mean' for one value, MISSING for none; '(n=k)' when only k of the seeds have a value."""
  mean, std = mean_std(values)
  if mean is None:
    return MISSING
  text = f'{mean:.2f} ± {std:.2f}' if std is not None else f'{mean:.2f}'
  n = count_values(values)
  return text if n == len(values) else f'{text} (n={n})'


def _format_values(values: Sequence[float | None]) -> str:
  return ', '.join(MISSING if v is None else f'{v:.2f}' for v in values)


def _format_duration(seconds: float | None) -> str:
  if seconds is None:
    return MISSING
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def _format_steps(steps: Sequence[tuple[int | None, int | None]]) -> str:
  texts = [f'{"?" if s is None else s}/{"?" if t is None else t}' for s, t in steps]
  return texts[0] if len(set(texts)) == 1 else ', '.join(texts)


def _wall_time_note(rows: Sequence[GroupRow]) -> str:
  sources = [s for row in rows for s in row.wall_time_sources]
  counts = [f'{sources.count(s)} runs from {s}' for s in WALL_TIME_SOURCES if s in sources]
  if None in sources:
    counts.append(f'{sources.count(None)} unknown')
  return 'Wall time (mean over seeds, h:mm:ss, including any pause between a stop and its resume): ' + '; '.join(
      counts) + '.'


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
  """The lines of a markdown table; every row has the header's column count ('|' in a cell is escaped).

  Raises:
    ValueError: a row with another number of cells (a bug: the table would render shifted).
  """
  def line(cells: Sequence[str]) -> str:
    return '| ' + ' | '.join(str(c).replace('|', '\\|') for c in cells) + ' |'
  for cells in body:
    if len(cells) != len(header):
      raise ValueError(f'A table row has {len(cells)} cells for {len(header)} columns: {list(cells)}.')
  return [line(header), '|' + '---|' * len(header)] + [line(cells) for cells in body]


def markdown_tables(rows: Sequence[GroupRow]) -> str:
  """The study as markdown: the tracked network's best and last top-1, then every network's last top-1."""
  lines = ["Test top-1 (%) of the tracked network (the method's deployed one: the leader, or e.g. student_0 for "
           'dml): mean ± sample std (ddof=1) over seeds, then the per-seed values in seed order. '
           f'{MISSING}: no evaluation yet; (n=k): the mean of only the k seeds that have evaluated. Selection: '
           f'"{BEST_TEST_COLUMN}" is the best test epoch (selected on the test set, as the papers report it); '
           f'"{LAST_TEST_COLUMN}" is the last evaluation; "{TEST_AT_BEST_VAL_COLUMN}" is the test top-1 of the '
           f'evaluation with the best validation top-1 ("{BEST_VAL_COLUMN}"; runs with '
           'config.validation_examples_per_class > 0 only), an unbiased estimate.', '']
  header = ['config', 'method', 'network', 'seeds', 'finished', 'steps', BEST_TEST_COLUMN, LAST_TEST_COLUMN,
            BEST_VAL_COLUMN, TEST_AT_BEST_VAL_COLUMN, 'best per seed', 'last per seed', 'test at best val per seed',
            'wall time']
  body = []
  for row in rows:
    seeds = ' '.join('?' if s is None else str(s) for s in row.seeds)
    body.append([row.config or MISSING, row.method, row.network, seeds,
                 f'{row.statuses.count(FINISHED)}/{len(row.seeds)}', _format_steps(row.steps),
                 _format_mean_std(row.best_top1), _format_mean_std(row.last_top1),
                 _format_mean_std(row.best_val_top1), _format_mean_std(row.test_top1_at_best_val),
                 _format_values(row.best_top1), _format_values(row.last_top1),
                 _format_values(row.test_top1_at_best_val), _format_duration(mean_std(row.wall_time_s)[0])])
  lines += markdown_table(header, body) + ['', _wall_time_note(rows), '']
  networks = sorted({n for row in rows for n in row.last_eval}, key=network_sort_key)
  # Before any evaluation there is no network to show: one column of MISSING keeps the table well formed.
  columns = networks or ['no network evaluated yet']
  lines += ['Last test top-1 (%) of every network: mean ± sample std (ddof=1) over seeds (per-seed values: CSV).', '']
  lines += markdown_table(['config', 'method', *columns], [
      [row.config or MISSING, row.method,
       *(_format_mean_std(row.last_eval[n]) if n in row.last_eval else MISSING for n in columns)] for row in rows])
  return '\n'.join(lines) + '\n'


def _csv_number(value: float | None) -> str:
  return '' if value is None else repr(float(value))


def _seed_columns(row: GroupRow) -> list[str]:
  """The CSV column suffix of each of the row's runs: 'seed<k>', or 'run<i>' (its position) for an unknown seed."""
  return [f'{SEED_DIR_PREFIX}{s}' if s is not None else f'run{i}' for i, s in enumerate(row.seeds)]


def csv_rows(rows: Sequence[GroupRow]) -> list[dict[str, str]]:
  """One CSV row per (config, method): for each value, its mean, sample std, n (seeds with the value) and one column
  per seed (`<value>_seed<k>`); a value that does not exist (no evaluation yet, a network the method lacks, one
  seed's std) is an empty cell."""
  networks = sorted({n for row in rows for n in row.last_eval}, key=network_sort_key)
  # Every row gets every seed column (the same columns in the same order), empty where its group lacks the seed.
  suffixes = sorted({c for row in rows for c in _seed_columns(row)},
                    key=lambda c: (c.startswith('run'), int(re.sub(r'^\D+', '', c))))
  table = []
  for row in rows:
    out = {'config': row.config, 'method': row.method, 'network': row.network,
           'seeds': ' '.join('' if s is None else str(s) for s in row.seeds), 'num_seeds': str(len(row.seeds)),
           'num_finished': str(row.statuses.count(FINISHED)),
           'steps': ' '.join(f'{"" if s is None else s}/{"" if t is None else t}' for s, t in row.steps)}
    columns = [('best_top1', row.best_top1), ('last_top1', row.last_top1), ('best_val_top1', row.best_val_top1),
               ('test_top1_at_best_val', row.test_top1_at_best_val)] + [
        (f'last_top1/{n}', row.last_eval.get(n, [None] * len(row.seeds))) for n in networks]
    for name, values in columns:
      mean, std = mean_std(values)
      out[f'{name}_mean'], out[f'{name}_std'] = _csv_number(mean), _csv_number(std)
      out[f'{name}_n'] = str(count_values(values))
      by_suffix = dict(zip(_seed_columns(row), values))
      for suffix in suffixes:
        out[f'{name}_{suffix}'] = _csv_number(by_suffix.get(suffix))
    out['wall_time_s_mean'] = _csv_number(mean_std(row.wall_time_s)[0])
    out['wall_time_source'] = '; '.join(sorted({s or 'unknown' for s in row.wall_time_sources}))
    table.append(out)
  return table


def write_csv(rows: Sequence[GroupRow], path: str) -> str:
  """Writes the study's CSV (see `csv_rows`) to `path`; returns `path`."""
  table = csv_rows(rows)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(table[0]) if table else ['config', 'method'])
    writer.writeheader()
    writer.writerows(table)
  return path


# ----------------------------------------------------------------------------------------------------------------------
# Curves for the plots.


def curve(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(epochs, values) of `key` over the records that hold it (non-null), in record order.

  A top-1 or top-5 key (`eval/top1/...`, `eval/best_top1/...`, `eval/top5/...`) leaves out negative values: the
  'no evaluation yet' sentinel of older versions is not a point of the curve.
  """
  is_top_k = key.startswith(('eval/top1/', 'eval/best_top1/', 'eval/top5/'))
  points = [(r['epoch'], r[key]) for r in records if r.get(key) is not None and r.get('epoch') is not None
            and not (is_top_k and top1_value(r[key]) is None)]
  return np.asarray([p[0] for p in points], np.float64), np.asarray([p[1] for p in points], np.float64)


@dataclasses.dataclass
class Band:
  """Mean and min–max over seeds at each x reached by at least one seed; `count` seeds contribute at each x."""
  x: np.ndarray
  mean: np.ndarray
  low: np.ndarray
  high: np.ndarray
  count: np.ndarray


def band(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> Band:
  """Mean, min and max over the curves at every x (epochs; a run still going contributes up to where it is)."""
  by_x: dict[float, list[float]] = {}
  for x, y in curves:
    for xi, yi in zip(np.asarray(x, np.float64).tolist(), np.asarray(y, np.float64).tolist()):
      by_x.setdefault(xi, []).append(yi)
  xs = np.asarray(sorted(by_x), np.float64)
  columns = [by_x[value] for value in xs.tolist()]
  return Band(x=xs, mean=np.asarray([np.mean(c) for c in columns]), low=np.asarray([np.min(c) for c in columns]),
              high=np.asarray([np.max(c) for c in columns]), count=np.asarray([len(c) for c in columns]))


def loss_terms(records: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
  """{term: [networks]} of the records' `<network>/<term>` keys (ce, kl, loss, sd, ...), plus 'loss/total'.

  Any prefix but the non-network ones (eval, accuracy, learning_rate, grad_norm, gate, ...) is a network: student_i,
  leader, branch_i, temporal_mean_i, teacher, ... whatever the method logs.
  """
  terms: dict[str, set[str]] = {}
  for record in records:
    for key in record:
      network, _, term = key.partition('/')
      if key == 'loss/total':
        terms.setdefault('total', set()).add('loss')
      elif term and network not in _NOT_NETWORK_PREFIXES:
        terms.setdefault(term, set()).add(network)
  return {term: sorted(nets, key=network_sort_key) for term, nets in sorted(terms.items())}


def network_names(records: Iterable[Mapping[str, Any]]) -> list[str]:
  """Every network the records name: evaluated (`eval/top1/<network>`) or with a loss term; sorted."""
  records = list(records)
  names = {k[len('eval/top1/'):] for r in records for k in r if k.startswith('eval/top1/')}
  names.update(n for networks in loss_terms(records).values() for n in networks if n != 'loss')
  return sorted(names, key=network_sort_key)


def load_config_file(path: str, repo_root: str | None = None):
  """`get_config()` of a configs/*.py file (the repository root goes on sys.path for `from configs...` imports).

  Raises:
    StudyError: no such file, or it defines no get_config().
  """
  if not os.path.isfile(path):
    raise StudyError(f'{path}: no such config file; give a configs/*.py file.')
  repo_root = repo_root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if repo_root not in sys.path:
    sys.path.insert(0, repo_root)
  spec = importlib.util.spec_from_file_location(f'_study_config_{config_name(path)}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, 'get_config', None)):
    raise StudyError(f'{path} defines no get_config(); give a config file like configs/*.py.')
  return module.get_config()


def schedule_curves(config: Any, steps_per_epoch_: int, total_steps: int, max_points: int = 2000
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The learning rates and the λ warm-up factor the config trains with, without training.

  Evaluated with the training code's own schedules (ffsd_jax.train_state, `Method.warmup_factor`) at optimizer step
  counts c (at most `max_points` of them, evenly spaced, plus the steps around every epoch boundary so that steps
  in the schedule are drawn as steps); x is the epoch at the end of that step, (c + 1) / steps_per_epoch, as in the
  records.

  Returns:
    {'learning_rate/networks', 'learning_rate/decoders', 'lambda_scale'}: (epochs, values).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ffsd_jax import methods  # pylint: disable=g-import-not-at-top
  from ffsd_jax import train_state  # pylint: disable=g-import-not-at-top
  if isinstance(config, Mapping):
    config = ml_collections.ConfigDict(dict(config))
  counts = set(np.linspace(0, total_steps - 1, min(max_points, total_steps)).astype(np.int64).tolist())
  for epoch in range(total_steps // steps_per_epoch_ + 1):
    counts.update(c for c in (epoch * steps_per_epoch_ - 1, epoch * steps_per_epoch_) if 0 <= c < total_steps)
  counts = np.asarray(sorted(counts), np.int32)
  epochs = (counts.astype(np.float64) + 1) / steps_per_epoch_
  curves = {}
  for name, schedule in train_state.learning_rate_schedules(config, steps_per_epoch_).items():
    curves[f'learning_rate/{name}'] = (epochs, np.asarray(jax.vmap(schedule)(counts), np.float64))
  warmup = lambda c: methods.get_method(config).warmup_factor(c, steps_per_epoch_)
  curves['lambda_scale'] = (epochs, np.asarray(jax.vmap(warmup)(counts), np.float64))
  return curves
