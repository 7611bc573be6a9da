"""The training loop: `train_and_evaluate(config, workdir)`, in four phases.

1. Start (`_start`): restore the latest checkpoint or initialise, write the run record, compile the step.
2. Steps (`_train`): one `jax.jit`-ed step (all students, the fusion module, the leader and the decoders) on a
   data-parallel mesh with the train state replicated and donated (`ffsd_jax/program.py`), fed batches already on
   the devices (`ffsd_jax/device_feed.py`, FEED_SIZE ahead). Metrics are summed on the device inside the step
   and fetched to the host only every `config.log_every_steps` steps, so the loop never waits on the device between.
3. Evaluation (`_evaluate`): after every `eval_every_epochs` epochs, every network's test top-1; the best deployed
   network's state goes to `checkpoints_best/`.
4. Finish (`_finish`): wait until every checkpoint has committed (the stop handler stays installed until then),
   then write `summary.json`.

Exact resume: a checkpoint holds the train state, every process's data-iterator state and the loop state (the
metric sums of the unfinished logging window and the best top-1), so a run stopped at step k (SIGTERM) and resumed
continues with the same batches, the same parameters and the same logged metrics as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import signal
import threading
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ffsd_jax import checkpointing
from ffsd_jax import config_checks
from ffsd_jax import data as data_lib
from ffsd_jax import device_feed
from ffsd_jax import errors
from ffsd_jax import evaluation
from ffsd_jax import inference
from ffsd_jax import metric_writers
from ffsd_jax import official
from ffsd_jax import program as program_lib
from ffsd_jax import run_record
from ffsd_jax import run_setup
from ffsd_jax import sharding
from ffsd_jax import state_guard
from ffsd_jax import train_step as train_step_lib
from ffsd_jax import workdir_lock

SUMMARY_FILE = 'summary.json'
# Batches placed on the devices ahead of the step (ffsd_jax/device_feed.py): one in use, one being copied.
FEED_SIZE = 2
# Where the best checkpoint goes when it cannot be read: moved aside (never deleted), so training can go on.
UNREADABLE_BEST_DIR = 'checkpoints_best.unreadable'


class _StopRequest:
  """Set by SIGTERM (a preemption notice) or the first Ctrl-C (SIGINT); the loop checks it after each step, saves and
  exits cleanly. A second Ctrl-C aborts at once (KeyboardInterrupt), saving nothing more.

  Installed for the whole run, until the last checkpoint has committed: a signal during the final save only asks for
  what is already happening."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if signum == signal.SIGINT and self.signal_name == 'SIGINT':
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt('second Ctrl-C: aborted without saving')
    if self.signal_name is None:
      self.signal_name = signal.Signals(signum).name
      what = 'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM received'
      extra = ' (Ctrl-C again aborts without saving)' if signum == signal.SIGINT else ''
      logging.warning('%s: saving a checkpoint after the current step, then exiting%s.', what, extra)

  def close(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def _is_leader_process() -> bool:
  return jax.process_index() == 0


def _format_eta(seconds: float | None) -> str:
  if seconds is None or not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def _format_speed(speed: dict[str, float]) -> str:
  if 'steps_per_sec' not in speed:
    return '? steps/s'  # Only the compiling first step so far.
  text = f'{speed["steps_per_sec"]:.2f} steps/s, {speed["images_per_sec"]:.1f} images/s'
  text += f', data wait {100 * speed["data_wait_fraction"]:.0f}%' if 'data_wait_fraction' in speed else ''
  return text + (f', MFU {100 * speed["mfu"]:.1f}%' if 'mfu' in speed else '')


def _finished_summary(workdir: str, step: int) -> dict[str, Any] | None:
  """The summary of a run that finished at `step`, read from its summary.json (None if missing or of a stop)."""
  try:
    with open(os.path.join(workdir, SUMMARY_FILE)) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(summary, dict) or summary.get('step') != step or summary.get('preempted'):
    return None
  return summary


def _log_already_finished(workdir: str, step: int) -> None:
  if _is_leader_process():
    logging.info('Already finished at step %d in %s; nothing to do (raise --config.num_epochs or --config.max_steps '
                 'to train further).', step, workdir)


def _writable_workdir(workdir: str) -> None:
  """Creates the workdir, or fails with one line when it cannot hold a run (a file, read-only, full)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.WorkdirError(f'--workdir {workdir} is a file, not a folder; choose another --workdir.')
  if not _is_leader_process():
    return  # Process 0 writes the workdir's files (a probe per process could collide on a shared file system).
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test{os.getpid()}')
    with open(probe, 'wb') as f:
      f.write(b'0')
    os.remove(probe)
  except OSError as error:
    raise errors.WorkdirError(
        f'--workdir {workdir} cannot be written: {errors.describe_os_error(error, path=workdir)}') from None


class _WriterLock:
  """Holds the workdir's writer lock for the run (process 0 takes it; every process fails together if it is held)."""

  def __init__(self, workdir: str):
    self._workdir, self._lock = workdir, None

  def __enter__(self):
    error = None
    if _is_leader_process():
      try:
        self._lock = workdir_lock.WorkdirLock(self._workdir).acquire()
      except workdir_lock.WorkdirLockedError as e:
        error = e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if np.any(multihost_utils.process_allgather(np.array(error is not None))) and error is None:
        error = workdir_lock.WorkdirLockedError(f'Process 0 could not take the lock of the workdir {self._workdir}.')
    if error is not None:
      raise error
    return self

  def __exit__(self, *exc_info):
    if self._lock is not None:
      self._lock.release()


def train_and_evaluate(config: ml_collections.ConfigDict | run_setup.RunSetup, workdir: str) -> dict[str, Any]:
  """Trains `config.method` and evaluates every network after each `eval_every_epochs` epochs.

  Resumes automatically from the latest checkpoint in `workdir/checkpoints`. Stops cleanly (after saving) on SIGTERM
  and on the first Ctrl-C. Holds the workdir's writer lock throughout: a second run in the same workdir refuses.

  Args:
    config: the experiment config, or its `run_setup.build(config)`.
    workdir: the run's folder.

  Returns:
    The summary written to summary.json: final step, whether the run was stopped by a signal (and which), the
    deployed network's best and last top-1 (percent; None before the first evaluation).
  """
  setup = run_setup.ensure_setup(config)  # Fails on bad values and batch sizes before the workdir is touched.
  finished = _already_finished(setup, workdir)  # Reads only: also for a finished run in a read-only workdir.
  if finished is not None:
    return finished
  _writable_workdir(workdir)
  stop_request = _StopRequest()
  try:
    with _WriterLock(workdir):
      run = _start(setup, workdir, stop_request)
      try:
        _train(run)
      except BaseException:
        _finish_saves(run, failing=True)  # The error that stopped training is the one reported.
        raise
      _finish_saves(run)
      return _write_summary(run)
  finally:
    stop_request.close()  # Only now: the last checkpoint has committed and summary.json is written.


def _already_finished(setup: run_setup.RunSetup, workdir: str) -> dict[str, Any] | None:
  """The summary of a run in `workdir` that has already finished this config's steps (None otherwise)."""
  folder = os.path.join(workdir, checkpointing.LATEST_DIR)
  if not os.path.isdir(folder):
    return None
  steps = [int(name) for name in os.listdir(folder) if name.isdigit()]
  if not steps or max(steps) < setup.total_steps:
    return None
  finished = _finished_summary(workdir, max(steps))
  if finished is not None:
    _log_already_finished(workdir, max(steps))
  return finished


# ----------------------------------------------------------------------------------------------------------------------
# Phase 1: start.


@dataclasses.dataclass
class _Run:
  """The mutable state of a run in progress, shared by the phases."""
  setup: run_setup.RunSetup
  workdir: str
  stop_request: _StopRequest
  manager: ocp.CheckpointManager
  best_manager: ocp.CheckpointManager
  train_iter: Any
  state: Any = None
  step: int = 0
  loop_state: dict[str, Any] = dataclasses.field(default_factory=dict)
  writer: metric_writers.MetricWriter | None = None
  program: program_lib.TrainingProgram | None = None
  feed: device_feed.DeviceFeed | None = None  # The training batches on the devices, FEED_SIZE ahead.
  metric_sums: Any = None
  window_steps: int = 0
  best_top1: float | None = None  # The deployed network's best eval top-1 of the whole run.
  best_checkpoint_top1: float | None = None  # The top-1 of the state in checkpoints_best/ (None: none there).
  best_checkpoint_step: int | None = None
  # With a validation split (config.validation_examples_per_class > 0): the deployed network's best validation top-1,
  # the test top-1 of the evaluation that reached it, and the validation top-1 of the state in checkpoints_best/.
  best_val_top1: float | None = None
  test_top1_at_best_val: float | None = None
  best_checkpoint_val_top1: float | None = None
  last_eval: dict[str, float] = dataclasses.field(default_factory=dict)
  step_flops: float | None = None  # Per device, from XLA's cost analysis of the compiled step.
  peak_flops: float | None = None  # Per device and second, where the device's peak is known (for the MFU).
  preempted: bool = False

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.setup.config


def _start(setup: run_setup.RunSetup, workdir: str, stop_request: _StopRequest) -> _Run:
  """Phase 1: the checkpoint managers, the restored (or fresh) state, the run record and the compiled step."""
  config = setup.config
  manager = checkpointing.create_manager(workdir, max_to_keep=config.keep_checkpoints)
  best_manager = _best_manager(workdir, config)
  if _is_leader_process():
    logging.info('%s', data_lib.describe_dataset(setup.info, config))
  train_iter = data_lib.create_train_iterator(
      config, global_batch_size=config.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), seed=config.seed)
  run = _Run(setup, workdir, stop_request, manager, best_manager, train_iter)
  run.program = program_lib.build(setup)  # Nothing compiles yet; it gives the state's layout.
  try:
    _restore_or_initialise(run)
  except BaseException:
    manager.close()
    best_manager.close()
    raise
  _write_run_record(run)
  _compile(run)
  return run


def _restore_or_initialise(run: _Run) -> None:
  """The latest checkpoint (or a fresh state), and the loop state that goes with it."""
  latest = run.manager.latest_step()
  if latest is not None:
    _restore(run, latest)
  else:
    _initialise(run)
  run.step = int(evaluation.to_host(run.state.step))
  loop = run.loop_state
  run.window_steps = int(loop.get('window_steps', 0))
  run.best_top1 = _top1_or_none(loop.get('best_leader_top1'))
  run.best_checkpoint_top1 = _top1_or_none(loop.get('best_checkpoint_top1', loop.get('best_leader_top1')))
  run.best_val_top1 = _top1_or_none(loop.get('best_val_top1'))
  run.test_top1_at_best_val = _top1_or_none(loop.get('test_top1_at_best_val'))
  run.best_checkpoint_val_top1 = _top1_or_none(loop.get('best_checkpoint_val_top1'))
  run.best_checkpoint_step = run.best_manager.latest_step()
  if run.best_checkpoint_step is None:
    # Nothing in checkpoints_best/ (moved away): the next evaluation saves one.
    run.best_checkpoint_top1 = run.best_checkpoint_val_top1 = None
  run.last_eval = loop.get('last_eval', {})
  if run.step >= run.setup.total_steps:
    _log_already_finished(run.workdir, run.step)  # Its summary.json is missing or stale: rewritten at the end.


def _top1_or_none(value: Any) -> float | None:
  """A stored top-1, or None for 'no evaluation yet' (older checkpoints stored -1)."""
  return None if value is None or value < 0 else float(value)


def _best_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """The best-checkpoint manager; an unreadable best checkpoint is moved aside (never deleted) with a warning, so
  it does not block resuming from the intact latest checkpoint."""
  best_manager = checkpointing.create_manager(workdir, best=True)
  step = best_manager.latest_step()
  if step is None:
    return best_manager
  try:
    # Refuse a workdir of another architecture before anything is written (the best manager would replace its one
    # checkpoint on the first improvement).
    checkpointing.check_architecture(best_manager, step, config)
    return best_manager
  except checkpointing.ArchitectureError:
    raise
  except checkpointing.CheckpointError as error:  # Corrupt or unreadable files.
    best_manager.close()
    source = checkpointing.checkpoint_path(best_manager, step)
    target = os.path.join(workdir, UNREADABLE_BEST_DIR, f'{step}-{int(time.time())}')
    if _is_leader_process():
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.rename(source, target)
      logging.warning('The best checkpoint %s cannot be read (%s). It was moved to %s; the next evaluation writes a '
                      'new best checkpoint.', source, errors.one_line(error), target)
    return checkpointing.create_manager(workdir, best=True)


def _restore(run: _Run, latest: int) -> None:
  """Restores the latest checkpoint into `run`, refusing changes to the optimisation unless allowed."""
  setup, config = run.setup, run.config
  saved_config = checkpointing.check_architecture(run.manager, latest, config)
  config_changes = config_checks.check_resume_config(
      saved_config, checkpointing.config_to_json(config), allow_change=bool(config.get('allow_config_change', False)),
      steps_per_epoch=setup.steps_per_epoch, checkpoint_step=latest)
  state, iterator_state, run.loop_state = checkpointing.restore(run.manager, latest, setup.abstract_state, config)
  inference.guard_restored_state(state, checkpointing.checkpoint_path(run.manager, latest))
  run.state = run.program.from_canonical(state)  # Checkpoints hold the per-network layout, whatever the mesh.
  if iterator_state:
    run.train_iter.set_state(iterator_state)
  logging.info('Resuming from step %d in %s.', latest, run.workdir)
  if config_changes and _is_leader_process():
    logging.warning('Config changes since the checkpoint (recorded in %s):\n  %s',
                    os.path.join(run.workdir, config_checks.CONFIG_CHANGES_FILE),
                    '\n  '.join(config_checks.format_change(c) for c in config_changes))
    config_checks.record_config_changes(run.workdir, latest, config_changes)


def _initialise(run: _Run) -> None:
  """A fresh train state (optionally with the leader from a trained one)."""
  config = run.config
  state = sharding.init_replicated(run.setup.init_fn, run.setup.mesh)
  if config.get('init_leader_from'):
    # Fine-tuning or distilling from a trained leader; the optimizer state starts fresh.
    students = bool(config.get('init_students_from_leader'))
    state = official.init_leader_from(state, config.init_leader_from, config.model, config.num_classes,
                                      config.num_students, students=students)
    if _is_leader_process():
      logging.info('Initialised the leader%s from %s; the optimizer state starts fresh.',
                   ' and the students' if students else '', config.init_leader_from)
  run.state = run.program.from_canonical(state)


def _write_run_record(run: _Run) -> None:
  """config.json, run_info.json and parameters.txt; the parameter table and the run's shape on the console."""
  setup, config = run.setup, run.config
  cache_dir = jax.config.jax_compilation_cache_dir or None
  if not _is_leader_process():
    return
  run_record.write_config(run.workdir, config)
  run_record.append_run_info(run.workdir, run_record.run_info_entry(
      start_step=run.step, total_steps=setup.total_steps, compilation_cache_dir=cache_dir))
  title = f'Parameters ({config.model}, method {config.method}, {config.num_students} students)'
  table_path = run_record.write_parameter_table(run.workdir, setup.abstract_state.params, title)
  logging.info('%s, full table in %s:\n%s', title, table_path,
               '\n'.join(run_record.network_parameter_lines(setup.abstract_state.params)))
  logging.info('%d %s devices (%d processes), global batch %d, %d steps per epoch, %d steps in all%s.',
               jax.device_count(), jax.devices()[0].platform, jax.process_count(), config.batch_size,
               setup.steps_per_epoch, setup.total_steps, f'; compilation cache {cache_dir}' if cache_dir else '')


def _compile(run: _Run) -> None:
  """Compiles the training program's train step now, saying so, and starts the device feed.

  Compiled here rather than at the first call (which reuses this executable), for XLA's cost analysis (the MFU).
  """
  run.metric_sums = run.program.metric_sums(run.loop_state.get('metric_sums'))
  local_batch_size = run.config.batch_size // jax.process_count()
  run.feed = device_feed.DeviceFeed(
      run.train_iter, run.program.global_batch, size=FEED_SIZE,
      check=lambda batch: train_step_lib.validate_batch(batch, num_classes=run.setup.info.num_classes,
                                                        batch_size=local_batch_size))
  if run.step >= run.setup.total_steps:
    return
  start = time.time()
  if _is_leader_process():
    logging.info('Compiling the training step (%s, %d networks; a cached one loads in seconds, a new one takes up to '
                 'minutes)...', run.config.model, len(run.setup.abstract_state.params))
  compiled = run.program.lower(run.state).compile()
  run.step_flops = run_record.compiled_flops(compiled)
  run.peak_flops = run_record.peak_flops_per_sec(jax.devices()[0], run.config.compute_dtype)
  if _is_leader_process():
    logging.info('Compiled the training step in %.1f s.', time.time() - start)
    if run.step_flops is not None:
      run_record.update_last_run_info(run.workdir, {'step_flops_per_device': run.step_flops})


# ----------------------------------------------------------------------------------------------------------------------
# Phase 2: the steps.


@dataclasses.dataclass
class _Clock:
  """Wall-clock bookkeeping of the logging window and the ETA."""
  window_start_time: float
  window_start_step: int
  timed_start_time: float  # The ETA is measured from the end of the first step (after compilation).
  timed_start_step: int
  data_wait: float = 0.0  # Seconds spent waiting for the input pipeline in the current window.

  def restart_window(self, now: float, step: int) -> None:
    self.window_start_time, self.window_start_step, self.data_wait = now, step, 0.0


def _train(run: _Run) -> None:
  """Phase 2: steps until the end or a stop request, evaluating and saving on schedule."""
  setup, config = run.setup, run.config
  run.writer = metric_writers.MetricWriter(run.workdir, resume_step=run.step)
  tracked = setup.deployed_network
  run.writer.write_config(run.step, checkpointing.config_to_json(config),
                          metric_names=(f'eval/top1/{tracked}', f'eval/best_top1/{tracked}', 'loss/total'))
  now = time.time()
  clock = _Clock(now, run.step, now, run.step)
  first_step = run.step
  agreed_preemption = False
  while run.step < setup.total_steps:
    wait_start = time.time()
    batch = next(run.feed)
    clock.data_wait += time.time() - wait_start
    run.state, run.metric_sums = run.program.train_step(run.state, run.metric_sums, batch)
    run.step += 1
    run.window_steps += 1
    if run.step == first_step + 1:
      # Steps/s and the ETA leave out the first step (the only extra device sync of the run).
      jax.block_until_ready(run.metric_sums)
      clock.restart_window(time.time(), run.step)
      clock.timed_start_time, clock.timed_start_step = clock.window_start_time, run.step
    if run.step % config.log_every_steps == 0 or run.step == setup.total_steps:
      _log_window(run, clock)
      agreed_preemption = _agree_on_stop(run)
    io_start = time.time()
    epoch_end = run.step % setup.steps_per_epoch == 0
    if (epoch_end and (run.step // setup.steps_per_epoch) % config.eval_every_epochs == 0
        or run.step == setup.total_steps):
      _evaluate(run)
    # A stop that lands after the last step (during the final evaluation or save) is no preemption: the run is done.
    stop = run.stop_request.requested if jax.process_count() == 1 else agreed_preemption
    run.preempted = stop and run.step < setup.total_steps
    if run.step % config.checkpoint_every_steps == 0 or run.step == setup.total_steps or run.preempted:
      _save(run, run.manager)
    # Steps/s measure training only: the time spent evaluating and saving is left out (the ETA includes it).
    clock.window_start_time += time.time() - io_start
    if run.preempted:
      break


def _agree_on_stop(run: _Run) -> bool:
  """Every process must stop at the same step: they agree on the stop flag at the logging points."""
  if jax.process_count() == 1:
    return run.stop_request.requested
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.array(run.stop_request.requested))))


def _fetch_window(run: _Run) -> dict[str, float]:
  return {k: float(v) for k, v in evaluation.to_host(run.metric_sums).items()}


def _log_window(run: _Run, clock: _Clock) -> None:
  """Writes the logging window's averages (checked finite) and speed, prints the progress line, starts a new window;
  surfaces a failed asynchronous save."""
  setup, config = run.setup, run.config
  averages = {k: v / run.window_steps for k, v in _fetch_window(run).items()}
  train_step_lib.check_finite(averages)  # Stops the run naming the non-finite term, before any checkpoint of it.
  _check_saves(run)
  now = time.time()
  speed = {}  # Left out when the window holds no timed step (only the compiling first step).
  if run.step > clock.window_start_step:
    elapsed = max(now - clock.window_start_time, 1e-9)
    speed['steps_per_sec'] = (run.step - clock.window_start_step) / elapsed
    speed['images_per_sec'] = speed['steps_per_sec'] * config.batch_size
    speed['data_wait_fraction'] = min(clock.data_wait / elapsed, 1.0)
    if run.peak_flops and run.step_flops:
      speed['mfu'] = run.step_flops * speed['steps_per_sec'] / run.peak_flops
  clock.restart_window(now, run.step)
  epoch = run.step / setup.steps_per_epoch
  run.writer.write_scalars(run.step, {**averages, **speed}, epoch=epoch)
  _flush_metrics(run)
  if _is_leader_process():
    eta = ((setup.total_steps - run.step) * (now - clock.timed_start_time) / (run.step - clock.timed_start_step)
           if run.step > clock.timed_start_step else None)
    num_epochs = math.ceil(setup.total_steps / setup.steps_per_epoch)
    logging.info('epoch %d/%d step %d/%d | loss %.4f | %s | ETA %s', math.ceil(epoch), num_epochs, run.step,
                 setup.total_steps, averages.get('loss/total', float('nan')), _format_speed(speed), _format_eta(eta))
  run.metric_sums = run.program.metric_sums()
  run.window_steps = 0


def _flush_metrics(run: _Run, sync: bool = False) -> None:
  """Hands metrics.jsonl and the TensorBoard events to the OS (and to the disk with `sync`); a full or read-only
  disk stops the run with one line."""
  try:
    run.writer.sync() if sync else run.writer.flush()
  except OSError as error:
    raise errors.WorkdirError(
        f'Writing the metrics in {run.workdir} failed at step {run.step}: {errors.describe_os_error(error)} '
        f'{_resume_advice(run)}') from None


# ----------------------------------------------------------------------------------------------------------------------
# Phase 3: evaluation.


def _evaluate(run: _Run) -> None:
  """Every network's test top-1 and loss (and validation top-1 and loss, with a validation split); a new best deployed
  network is saved to checkpoints_best/: best on validation top-1 with a validation split, else on test top-1."""
  setup = run.setup
  tracked = setup.deployed_network
  start = time.time()
  if not run.last_eval and _is_leader_process():
    logging.info('First evaluation (compiling the eval step) on %d test images...', setup.info.num_eval_examples)
  with_top5 = setup.info.num_classes >= 1000 or run.config.get('eval_top5', False)
  canonical = run.program.to_canonical(run.state)  # Evaluation and checkpoints take the per-network layout.
  run.last_eval = evaluation.eval_results(evaluation.run_eval(run.program.eval_step, canonical, setup), with_top5)
  validating = setup.info.num_validation_examples > 0
  if validating:
    run.last_eval.update(evaluation.eval_results(
        evaluation.run_eval(run.program.eval_step, canonical, setup, split='validation'), with_top5, prefix='val'))
  top1 = run.last_eval[f'eval/top1/{tracked}']
  run.best_top1 = top1 if run.best_top1 is None else max(run.best_top1, top1)
  scalars = {**run.last_eval, f'eval/best_top1/{tracked}': run.best_top1}
  selected, best_selected = top1, run.best_checkpoint_top1  # What checkpoints_best/ is chosen on.
  if validating:
    selected, best_selected = run.last_eval[f'val/top1/{tracked}'], run.best_checkpoint_val_top1
    if run.best_val_top1 is None or selected > run.best_val_top1:
      run.best_val_top1, run.test_top1_at_best_val = selected, top1
    scalars[f'val/best_top1/{tracked}'] = run.best_val_top1
  epoch = run.step / setup.steps_per_epoch
  run.writer.write_scalars(run.step, scalars, epoch=epoch)
  _flush_metrics(run)
  if _is_leader_process():
    logging.info('eval after epoch %.2f (step %d, %.1f s): %s | %s loss %.4f, best top1 %.2f', epoch, run.step,
                 time.time() - start, ', '.join(f'{k[len("eval/"):]} {v:.2f}' for k, v in sorted(run.last_eval.items())
                                                if k.startswith('eval/top')),
                 tracked, run.last_eval.get(f'eval/loss/{tracked}', float('nan')), run.best_top1)
    if validating:
      logging.info('validation (%d held-out training images): %s | %s best val top1 %.2f (test top1 there %.2f)',
                   setup.info.num_validation_examples, ', '.join(
                       f'{k[len("val/"):]} {v:.2f}' for k, v in sorted(run.last_eval.items()) if k.startswith('val/top')),
                   tracked, run.best_val_top1, run.test_top1_at_best_val)
  if best_selected is None or selected > best_selected:
    run.best_checkpoint_top1, run.best_checkpoint_step = top1, run.step
    if validating:
      run.best_checkpoint_val_top1 = selected
    _save(run, run.best_manager, canonical)


# ----------------------------------------------------------------------------------------------------------------------
# Saving, and phase 4: finish.


def _resume_advice(run: _Run) -> str:
  """Where a rerun resumes from."""
  steps = [s for s in run.manager.all_steps() if os.path.isfile(
      os.path.join(checkpointing.checkpoint_path(run.manager, s), checkpointing.ORBAX_COMMIT_FILE))]
  if not steps:
    return 'No checkpoint is saved yet; a rerun starts from the beginning.'
  last = max(steps)
  return (f'The last complete checkpoint is {checkpointing.checkpoint_path(run.manager, last)} (step {last}); rerun '
          'the same command to resume from it.')


def _save_failure(run: _Run, manager: ocp.CheckpointManager, error: BaseException) -> checkpointing.CheckpointError:
  """One line for a failed asynchronous save: the folder, the cause, where training stopped and where to resume."""
  text = str(error)
  if 'No space left on device' in text or getattr(error, 'errno', None) == errno.ENOSPC:
    cause = 'no space left on device; free some space or move the workdir'
  else:
    cause = checkpointing.short_cause(error)
  return checkpointing.CheckpointError(f'Saving a checkpoint in {manager.directory} failed ({cause}). Training '
                                       f'stopped at step {run.step}. {_resume_advice(run)}')


def _check_saves(run: _Run) -> None:
  """Raises one line when an asynchronous save has failed (a full disk, a vanished folder), naming the folder, the
  cause and the step a rerun resumes from; called at every logging point, so no step is trained for nothing."""
  for manager in (run.manager, run.best_manager):
    try:
      manager.check_for_errors()
    except Exception as error:  # pylint: disable=broad-except
      raise _save_failure(run, manager, error) from None


def _save(run: _Run, manager: ocp.CheckpointManager, canonical: Any = None) -> None:
  """Starts an asynchronous save of the state (never a non-finite one) with the loop state into `manager`.

  `canonical`: the state already in the per-network layout (`TrainingProgram.to_canonical`), if the caller has it.
  """
  window = _fetch_window(run)  # One host fetch: checked, then saved with the loop state.
  if run.window_steps:
    # Never save a NaN state: the unfinished logging window is checked too.
    train_step_lib.check_finite({k: v / run.window_steps for k, v in window.items()})
  # The metrics can stay finite while a weight or a running variance is not: check every leaf of the state.
  state_guard.check_state_finite(run.state, what=f'The train state at step {run.step}',
                                 advice=_guard_advice(run))
  _flush_metrics(run, sync=True)  # Every record up to this checkpoint is on disk before it exists.
  loop = {'metric_sums': window, 'window_steps': run.window_steps, 'best_leader_top1': run.best_top1,
          'best_checkpoint_top1': run.best_checkpoint_top1, 'last_eval': run.last_eval,
          'best_val_top1': run.best_val_top1, 'test_top1_at_best_val': run.test_top1_at_best_val,
          'best_checkpoint_val_top1': run.best_checkpoint_val_top1}
  try:
    canonical = run.program.to_canonical(run.state) if canonical is None else canonical
    checkpointing.save(manager, run.step, canonical,
                       iterator_states=checkpointing.gather_iterator_states(run.feed.get_state()),
                       loop_state=loop, config=run.config)
  except checkpointing.CheckpointError:
    raise
  except Exception as error:  # pylint: disable=broad-except  (Orbax re-raises a failed earlier save here)
    raise _save_failure(run, manager, error) from None


def _guard_advice(run: _Run) -> str:
  """Where a run stopped by the state guard can resume from, and how."""
  last = run.manager.latest_step()
  if last is None:
    return ('Nothing was saved and no earlier checkpoint exists; lower the learning rate (or the λ\'s) and start '
            'again.')
  return (f'Nothing was saved; the last good checkpoint is {checkpointing.checkpoint_path(run.manager, last)} '
          f'(step {last}). Lower the learning rate (or the λ\'s) and rerun to resume from it.')


def _finish_saves(run: _Run, failing: bool = False) -> None:
  """Waits until every started save has committed (with its manifest) and closes the writers; a failed save is one
  line naming the step to resume from (only logged when `failing`: the run is already stopping on another error)."""
  failure = None
  for manager in (run.manager, run.best_manager):
    try:
      manager.wait_until_finished()
      manager.check_for_errors()
    except Exception as error:  # pylint: disable=broad-except
      failure = failure or _save_failure(run, manager, error)
    finally:
      manager.close()
  if run.writer is not None:
    try:
      run.writer.close()
    except OSError as error:
      failure = failure or errors.WorkdirError(
          f'Closing the metrics in {run.workdir} failed: {errors.describe_os_error(error)}')
  if failure is not None and failing:
    logging.warning('%s', failure)
  elif failure is not None:
    raise failure


def _write_summary(run: _Run) -> dict[str, Any]:
  """Phase 4: summary.json (also when stopped, with preempted: true, so a stopped run's workdir says where it
  stands) and the final line."""
  tracked = run.setup.deployed_network
  summary = {'step': run.step, 'total_steps': run.setup.total_steps, 'preempted': run.preempted,
             'stopped_by': (run.stop_request.signal_name or 'SIGTERM') if run.preempted else None,
             'network': tracked, 'best_leader_top1': run.best_top1,
             'last_leader_top1': run.last_eval.get(f'eval/top1/{tracked}'),
             'best_checkpoint_step': run.best_checkpoint_step, 'best_checkpoint_top1': run.best_checkpoint_top1,
             'last_eval': run.last_eval, 'skipped_bad_images': len(run.setup.info.skipped_files),
             # best_leader_top1 is the best test epoch (selected on the test set, as the papers report it); with a
             # validation split, test_top1_at_best_val is the test top-1 of the epoch with the best validation top-1.
             'last_test_top1': run.last_eval.get(f'eval/top1/{tracked}'), 'best_val_top1': run.best_val_top1,
             'test_top1_at_best_val': run.test_top1_at_best_val,
             'validation_examples': run.setup.info.num_validation_examples,
             'best_checkpoint_selected_on': 'val/top1' if run.setup.info.num_validation_examples else 'eval/top1'}
  if _is_leader_process():
    evaluation.write_json_atomically(os.path.join(run.workdir, SUMMARY_FILE), summary)
    if not run.preempted:
      describe = lambda value: 'none' if value is None else f'{value:.2f}'
      # With a validation split the headline is the unbiased figure (test top-1 where validation peaked); the best
      # test epoch, selected on the test set, is named as such.
      best = (f'test at best val {describe(run.test_top1_at_best_val)} (val {describe(run.best_val_top1)}), best '
              f'test epoch {describe(run.best_top1)}' if summary['validation_examples'] else
              f'best {describe(run.best_top1)}')
      logging.info('Finished at step %d: %s top-1 %s, last %s (%s).', run.step, tracked, best,
                   describe(summary['last_leader_top1']), os.path.join(run.workdir, SUMMARY_FILE))
    else:
      logging.warning('Stopped at step %d after %s; the checkpoint is saved. Rerun the same command to resume.',
                      run.step, 'Ctrl-C' if run.stop_request.signal_name == 'SIGINT' else 'SIGTERM')
  return summary
