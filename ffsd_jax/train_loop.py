"""The training loop: `train_and_evaluate(config, workdir)` and the leader evaluation `evaluate(config, workdir)`.

One `jax.jit`-ed step (all students, the fusion module, the leader and the decoders) runs on a data-parallel mesh
with the train state replicated and donated. Metrics are summed on the device inside the jitted step and fetched to
the host only every `config.log_every_steps` steps, so the loop never waits on the device in between.

Exact resume: a checkpoint holds the train state, every process's data-iterator state and the loop state (the
metric sums of the unfinished logging window and the best leader top-1), so a run stopped at step k (SIGTERM) and
resumed continues with the same batches, the same parameters and the same logged metrics as one that never stopped.

Every start and resume writes the run record (`ffsd_jax/run_record.py`: config.json, run_info.json, parameters.txt)
and logs one line per logging interval; a workdir whose run already finished is left untouched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ffsd_jax import checkpointing
from ffsd_jax import config_checks
from ffsd_jax import data as data_lib
from ffsd_jax import methods
from ffsd_jax import metric_writers
from ffsd_jax import run_record
from ffsd_jax import sharding
from ffsd_jax import state_guard
from ffsd_jax import train_state as train_state_lib
from ffsd_jax import train_step as train_step_lib
from ffsd_jax import workdir_lock

EVAL_LEADER_FILE = 'eval_leader.json'
SUMMARY_FILE = 'summary.json'
# Errors whose message says all (what, where, the fix): main.py prints them as one line, without a traceback.
RUN_ERRORS = (checkpointing.CheckpointError, config_checks.ConfigError, state_guard.NonFiniteStateError,
              workdir_lock.WorkdirLockedError, FloatingPointError)


def deployed_network(config: ml_collections.ConfigDict) -> str:
  """The network that is tracked for the best checkpoint, evaluated alone and exported (`Method.deployed_network`:
  the leader for FFSD, student_0 for methods without one)."""
  return methods.get_method(config).deployed_network


def deployed_variables(state: Any, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The deployed network's `{'params', 'batch_stats'}` from a train state: the variables of a complete backbone."""
  return methods.get_method(config).deployed_variables(state.params, state.batch_stats, state.extra_state)


class _StopRequest:
  """Set by SIGTERM (a preemption notice) or the first Ctrl-C (SIGINT); the loop checks it after each step, saves and
  exits cleanly. A second Ctrl-C aborts at once (KeyboardInterrupt), saving nothing more."""

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
      if signum == signal.SIGINT:
        logging.warning('Ctrl-C: saving a checkpoint after the current step, then exiting (Ctrl-C again aborts '
                        'without saving).')
      else:
        logging.warning('SIGTERM received: saving a checkpoint after the current step, then exiting.')

  def close(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def write_json_atomically(path: str, value: Any) -> None:
  """Writes `value` as JSON to a temporary name and renames it, so a kill or a full disk never leaves half a file."""
  checkpointing.write_file_atomically(path, json.dumps(value, indent=2).encode())


def _is_leader_process() -> bool:
  return jax.process_index() == 0


def _to_host(tree: Any) -> Any:
  """Fetches replicated arrays to NumPy (works on every process: it reads the local copy)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x),
                      tree)


def _format_eta(seconds: float | None) -> str:
  if seconds is None or not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def _format_speed(speed: dict[str, float]) -> str:
  if 'steps_per_sec' not in speed:
    return '? steps/s'  # Only the compiling first step so far.
  text = f'{speed["steps_per_sec"]:.2f} steps/s, {speed["images_per_sec"]:.1f} images/s'
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


def _mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """Distributed runtime and the mesh, after checking that the batch sizes split over it (cheap, writes nothing)."""
  sharding.maybe_initialize_distributed(config)
  mesh = sharding.create_mesh()
  sharding.check_batch_size(config.batch_size, mesh, 'batch_size')
  sharding.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  return mesh


def _setup(config: ml_collections.ConfigDict):
  """Distributed runtime, mesh, dataset info, model and the abstract (sharded) train state."""
  mesh = _mesh(config)
  info = data_lib.get_dataset_info(config)
  steps_per_epoch = info.num_train_examples // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'config.batch_size={config.batch_size} is larger than the training set '
                     f'({info.num_train_examples} examples); lower it.')
  model = train_state_lib.create_model(config)
  init_rng = jax.random.key(config.seed)

  def init_fn():
    return train_state_lib.create_train_state(config, model, init_rng, steps_per_epoch)

  abstract_state = sharding.abstract_with_sharding(jax.eval_shape(init_fn), mesh)
  return mesh, info, model, steps_per_epoch, init_fn, abstract_state


# Jitted once at import: a jit of a fresh lambda inside the eval loop would be traced and compiled at every eval.
_add_sums = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))


def _eval_loop(eval_fn: Callable[..., Any], variables: Any, config: ml_collections.ConfigDict,
               mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Runs `eval_fn(variables, batch) -> sums` over the whole eval split; returns the host sums.

  No progress bar: it would interleave with the log lines; the eval's result line gives its duration.
  """
  sums = None
  batches = data_lib.create_eval_batches(config, global_batch_size=config.eval_batch_size,
                                        process_index=jax.process_index(), process_count=jax.process_count())
  for local_batch in batches:
    out = eval_fn(variables, sharding.make_global_batch(local_batch, mesh))
    sums = out if sums is None else _add_sums(sums, out)
  return {k: float(v) for k, v in _to_host(sums).items()}


def _eval_results(sums: dict[str, float], with_top5: bool) -> dict[str, float]:
  """Top-1 (and top-5) in percent and the mean cross-entropy for every network in the eval step's sums."""
  count = sums['count']
  results = {}
  for name, value in sums.items():
    if name.startswith('correct/'):
      results[f'eval/top1/{name[len("correct/"):]}'] = 100.0 * value / count
    elif name.startswith('cross_entropy/'):
      results[f'eval/loss/{name[len("cross_entropy/"):]}'] = value / count
    elif name.startswith('correct_top5/') and with_top5:
      results[f'eval/top5/{name[len("correct_top5/"):]}'] = 100.0 * value / count
  return results


@contextlib.contextmanager
def _writer_lock(workdir: str):
  """Holds the workdir's writer lock for the run (process 0 takes it; every process fails together if it is held)."""
  lock, error = None, None
  if _is_leader_process():
    try:
      lock = workdir_lock.WorkdirLock(workdir).acquire()
    except workdir_lock.WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if np.any(multihost_utils.process_allgather(np.array(error is not None))) and error is None:
      error = workdir_lock.WorkdirLockedError(f'Process 0 could not take the lock of the workdir {workdir}.')
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains FFSD (or the `dml` / `independent` baselines) and evaluates every network after each epoch.

  Resumes automatically from the latest checkpoint in `workdir/checkpoints`. Stops cleanly (after saving) on SIGTERM
  and on the first Ctrl-C. Holds the workdir's writer lock throughout: a second run in the same workdir refuses.

  Returns:
    A summary: final step, whether the run was stopped by a signal (and which), the leader's best and last top-1
    (percent).
  """
  config_checks.validate_config(config)  # Also for callers that do not come through main.py.
  run_record.setup_compilation_cache(config.get('jax_cache_dir'))  # Before anything compiles.
  _mesh(config)  # Fails on bad batch sizes before the workdir is touched.
  with _writer_lock(workdir):
    return _train_and_evaluate(config, workdir)


def _checkpoint_guard_advice(manager: Any, workdir: str) -> str:
  """Where a run stopped by the state guard can resume from, and how."""
  last = manager.latest_step()
  if last is None:
    return ('Nothing was saved and no earlier checkpoint exists; lower the learning rate (or the λ\'s) and start '
            'again.')
  return (f'Nothing was saved; the last good checkpoint is {os.path.join(workdir, checkpointing.LATEST_DIR, str(last))}'
          f' (step {last}). Lower the learning rate (or the λ\'s) and rerun to resume from it.')


def _restored_state_guard(state: Any, path: str) -> None:
  """A restored state must be finite: a checkpoint written before the state guard existed may not be."""
  try:
    state_guard.check_state_finite(state, what=f'The checkpoint {path}', advice='')
  except state_guard.NonFiniteStateError as e:
    raise checkpointing.CheckpointError(
        f'{e}It was left untouched. Move that step folder away to resume from an older checkpoint, or use another '
        '--workdir.') from None


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`train_and_evaluate` under the writer lock."""
  mesh, info, model, steps_per_epoch, init_fn, abstract_state = _setup(config)
  total_steps = config.max_steps if config.max_steps > 0 else config.num_epochs * steps_per_epoch
  num_epochs = math.ceil(total_steps / steps_per_epoch)
  with_top5 = info.num_classes >= 1000 or config.get('eval_top5', False)
  replicated = sharding.replicated_sharding(mesh)
  batch_sharded = sharding.batch_sharding(mesh)
  local_batch_size = config.batch_size // jax.process_count()

  manager = checkpointing.create_manager(workdir, max_to_keep=config.keep_checkpoints)
  best_manager = checkpointing.create_manager(workdir, best=True)
  # Refuse a workdir of another architecture before anything is written (the best manager would replace its one
  # checkpoint on the first improvement).
  if best_manager.latest_step() is not None:
    checkpointing.check_architecture(best_manager, best_manager.latest_step(), config)

  train_iter = data_lib.create_train_iterator(
      config, global_batch_size=config.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), seed=config.seed)
  latest = manager.latest_step()
  if latest is not None and latest >= total_steps:
    finished = _finished_summary(workdir, latest)
    if finished is not None:  # Nothing to do: no restore, no compile, nothing written.
      manager.close()
      best_manager.close()
      _log_already_finished(workdir, latest)
      return finished
  if latest is not None:
    # Changes to the optimisation are refused (unless allowed) before anything is restored or written.
    saved_config = checkpointing.check_architecture(manager, latest, config)
    config_changes = config_checks.check_resume_config(
        saved_config, checkpointing.config_to_json(config),
        allow_change=bool(config.get('allow_config_change', False)))
    state, iterator_state, loop_state = checkpointing.restore(manager, latest, abstract_state, config)
    _restored_state_guard(state, checkpointing.checkpoint_path(manager, latest))
    if iterator_state:
      train_iter.set_state(iterator_state)
    logging.info('Resuming from step %d in %s.', latest, workdir)
    if config_changes and _is_leader_process():
      logging.warning('Config changes since the checkpoint (recorded in %s):\n  %s',
                      os.path.join(workdir, config_checks.CONFIG_CHANGES_FILE),
                      '\n  '.join(config_checks.format_change(c) for c in config_changes))
      config_checks.record_config_changes(workdir, latest, config_changes)
  else:
    state = sharding.init_replicated(init_fn, mesh)
    loop_state = {}
    if config.get('init_leader_from'):
      # Fine-tuning or distilling from a trained leader; the optimizer state starts fresh.
      from ffsd_jax import official  # pylint: disable=g-import-not-at-top
      students = bool(config.get('init_students_from_leader'))
      state = official.init_leader_from(state, config.init_leader_from, config.model, config.num_classes,
                                        config.num_students, students=students)
      if _is_leader_process():
        logging.info('Initialised the leader%s from %s; the optimizer state starts fresh.',
                     ' and the students' if students else '', config.init_leader_from)
  step = int(_to_host(state.step))
  if step >= total_steps:
    _log_already_finished(workdir, step)  # Its summary.json is missing or stale: rewritten below.

  cache_dir = jax.config.jax_compilation_cache_dir or None
  if _is_leader_process():
    # The run record: what ran, with which code and config, where (one run_info entry per start or resume).
    run_record.write_config(workdir, config)
    run_record.append_run_info(workdir, run_record.run_info_entry(
        start_step=step, total_steps=total_steps, compilation_cache_dir=cache_dir))
    title = f'Parameters ({config.model}, method {config.method}, {config.num_students} students)'
    table_path = run_record.write_parameter_table(workdir, abstract_state.params, title)
    logging.info('%s, full table in %s:\n%s', title, table_path,
                 '\n'.join(run_record.network_parameter_lines(abstract_state.params)))
    logging.info('%d %s devices (%d processes), global batch %d, %d steps per epoch, %d steps in all%s.',
                 jax.device_count(), jax.devices()[0].platform, jax.process_count(), config.batch_size,
                 steps_per_epoch, total_steps, f'; compilation cache {cache_dir}' if cache_dir else '')

  # The jitted step: train_step plus the on-device sum of its metrics over the logging window.
  train_step = train_step_lib.make_train_step(model, config, steps_per_epoch, info.mean_std)
  abstract_batch = {
      'image': jax.ShapeDtypeStruct((config.batch_size, info.image_size, info.image_size, 3), jnp.uint8),
      'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
  metric_shapes = jax.eval_shape(train_step, abstract_state, abstract_batch)[1]

  def step_and_accumulate(state, metric_sums, batch):
    state, metrics = train_step(state, batch)
    metric_sums = jax.tree.map(lambda s, m: s + m.astype(jnp.float32), metric_sums, metrics)
    return state, metric_sums

  compiler_options = sharding.step_compiler_options(mesh, config)
  jitted_step = jax.jit(step_and_accumulate, in_shardings=(replicated, replicated, batch_sharded),
                        out_shardings=(replicated, replicated), donate_argnums=(0, 1),
                        compiler_options=compiler_options)
  eval_step = jax.jit(train_step_lib.make_eval_step(model, config, info.mean_std),
                      in_shardings=(replicated, batch_sharded), out_shardings=replicated,
                      compiler_options=compiler_options)

  def metric_sums_from(values: dict[str, float] | None):
    values = values or {}
    return jax.device_put({k: np.float32(values.get(k, 0.0)) for k in metric_shapes}, replicated)

  metric_sums = metric_sums_from(loop_state.get('metric_sums'))
  # Model FLOP utilisation: FLOPs of the compiled (partitioned, so per-device) step against the device's peak.
  peak_flops = run_record.peak_flops_per_sec(jax.devices()[0], config.compute_dtype)
  step_flops = None
  if step < total_steps:
    # Compiled here rather than at the first call (which reuses this executable), for XLA's cost analysis.
    compiled_step = jitted_step.lower(
        state, metric_sums, {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharded)
                             for k, v in abstract_batch.items()}).compile()
    step_flops = run_record.compiled_flops(compiled_step)
    if _is_leader_process() and step_flops is not None:
      run_record.update_last_run_info(workdir, {'step_flops_per_device': step_flops})
  window_steps = int(loop_state.get('window_steps', 0))
  best_leader_top1 = loop_state.get('best_leader_top1', -1.0)
  last_eval: dict[str, float] = loop_state.get('last_eval', {})

  # Records after `step` come from a run stopped before its next checkpoint (or from one that never saved): dropped.
  writer = metric_writers.MetricWriter(workdir, resume_step=step)
  tracked = deployed_network(config)  # The best checkpoint follows this network's eval top-1.
  writer.write_config(step, checkpointing.config_to_json(config),
                      metric_names=(f'eval/top1/{tracked}', f'eval/best_top1/{tracked}', 'loss/total'))
  stop_request = _StopRequest()
  check_finite = train_step_lib.check_finite

  def fetch_window() -> dict[str, float]:
    return {k: float(v) for k, v in _to_host(metric_sums).items()}

  def save(target_manager, at_step: int) -> None:
    if window_steps:
      # Never save a NaN state: the unfinished logging window is checked too.
      check_finite({k: v / window_steps for k, v in fetch_window().items()})
    # The metrics can stay finite while a weight or a running variance is not: check every leaf of the state.
    state_guard.check_state_finite(state, what=f'The train state at step {at_step}',
                                   advice=_checkpoint_guard_advice(manager, workdir))
    writer.sync()  # Every record up to this checkpoint is on disk before it exists.
    loop = {'metric_sums': fetch_window(), 'window_steps': window_steps, 'best_leader_top1': best_leader_top1,
            'last_eval': last_eval}
    checkpointing.save(target_manager, at_step, state,
                       iterator_states=checkpointing.gather_iterator_states(train_iter.get_state()),
                       loop_state=loop, config=config)

  window_start_time, window_start_step = time.time(), step
  # The ETA is measured from the end of the first step (after compilation), evaluations and saves included.
  timed_start_time, timed_start_step = time.time(), step
  first_step = step
  preempted = agreed_preemption = False
  try:
    while step < total_steps:
      local_batch = next(train_iter)
      train_step_lib.validate_batch(local_batch, num_classes=info.num_classes, batch_size=local_batch_size)
      state, metric_sums = jitted_step(state, metric_sums, sharding.make_global_batch(local_batch, mesh))
      step += 1
      window_steps += 1
      epoch = step / steps_per_epoch
      if step == first_step + 1:
        # Steps/s and the ETA leave out the first step's compilation (the only extra device sync of the run).
        jax.block_until_ready(metric_sums)
        window_start_time, window_start_step = time.time(), step
        timed_start_time, timed_start_step = window_start_time, step

      if step % config.log_every_steps == 0 or step == total_steps:
        averages = {k: v / window_steps for k, v in fetch_window().items()}
        check_finite(averages)  # Stops the run naming the non-finite term, before any checkpoint of it.
        now = time.time()
        speed = {}  # Left out when the window holds no timed step (only the compiling first step).
        if step > window_start_step:
          speed['steps_per_sec'] = (step - window_start_step) / max(now - window_start_time, 1e-9)
          speed['images_per_sec'] = speed['steps_per_sec'] * config.batch_size
          if peak_flops and step_flops:
            speed['mfu'] = step_flops * speed['steps_per_sec'] / peak_flops
        window_start_time, window_start_step = now, step
        writer.write_scalars(step, {**averages, **speed}, epoch=epoch)
        writer.flush()
        if _is_leader_process():
          eta = ((total_steps - step) * (now - timed_start_time) / (step - timed_start_step)
                 if step > timed_start_step else None)
          logging.info('epoch %d/%d step %d/%d | loss %.4f | %s | ETA %s', math.ceil(epoch), num_epochs, step,
                       total_steps, averages.get('loss/total', float('nan')), _format_speed(speed),
                       _format_eta(eta))
        metric_sums = metric_sums_from(None)
        window_steps = 0
        if jax.process_count() > 1:
          # Every process must stop at the same step: agree on the flag at the logging points.
          from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
          agreed_preemption = bool(np.any(multihost_utils.process_allgather(np.array(stop_request.requested))))

      io_start = time.time()
      epoch_end = step % steps_per_epoch == 0
      if (epoch_end and (step // steps_per_epoch) % config.eval_every_epochs == 0) or step == total_steps:
        sums = _eval_loop(eval_step, state, config, mesh)
        eval_seconds = time.time() - io_start
        last_eval = _eval_results(sums, with_top5)
        leader_top1 = last_eval[f'eval/top1/{tracked}']
        improved = leader_top1 > best_leader_top1
        best_leader_top1 = max(best_leader_top1, leader_top1)
        writer.write_scalars(step, {**last_eval, f'eval/best_top1/{tracked}': best_leader_top1}, epoch=epoch)
        writer.flush()
        if _is_leader_process():
          logging.info('eval after epoch %.2f (step %d, %.1f s): %s | %s loss %.4f, best top1 %.2f', epoch, step,
                       eval_seconds, ', '.join(f'{k[len("eval/"):]} {v:.2f}' for k, v in sorted(last_eval.items())
                                               if k.startswith('eval/top')),
                       tracked, last_eval.get(f'eval/loss/{tracked}', float('nan')), best_leader_top1)
        if improved:
          save(best_manager, step)

      preempted = stop_request.requested if jax.process_count() == 1 else agreed_preemption
      if step % config.checkpoint_every_steps == 0 or step == total_steps or preempted:
        save(manager, step)
      # Steps/s measure training only: the time spent evaluating and saving is left out (the ETA includes it).
      window_start_time += time.time() - io_start
      if preempted:
        logging.warning('Stopped at step %d after %s; the checkpoint is saved. Rerun the same command to resume.',
                        step, 'Ctrl-C' if stop_request.signal_name == 'SIGINT' else 'SIGTERM')
        break
  finally:
    stop_request.close()
    manager.wait_until_finished()
    best_manager.wait_until_finished()
    manager.close()
    best_manager.close()
    writer.close()

  summary = {'step': step, 'total_steps': total_steps, 'preempted': preempted,
             'stopped_by': (stop_request.signal_name or 'SIGTERM') if preempted else None,
             'network': tracked, 'best_leader_top1': best_leader_top1,
             'last_leader_top1': last_eval.get(f'eval/top1/{tracked}'),
             'last_eval': last_eval, 'skipped_bad_images': len(info.skipped_files)}
  if _is_leader_process():
    # Also when preempted (with preempted: true), so a stopped run's workdir says where it stands.
    write_json_atomically(os.path.join(workdir, SUMMARY_FILE), summary)
    if not preempted:
      logging.info('Finished at step %d: %s top-1 best %.2f, last %.2f (%s).', step, tracked, best_leader_top1,
                   summary['last_leader_top1'] if summary['last_leader_top1'] is not None else float('nan'),
                   os.path.join(workdir, SUMMARY_FILE))
  return summary


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str, checkpoint: str = 'best'):
  """Restores the train state of the best (or latest) checkpoint in `workdir`.

  Returns:
    (state, step, checkpoint_path, mesh, dataset_info).
  """
  if checkpoint not in ('best', 'latest'):
    raise ValueError(f'Unknown checkpoint {checkpoint!r}; valid choices: best, latest.')
  config_checks.validate_config(config)
  run_record.setup_compilation_cache(config.get('jax_cache_dir'))  # Before anything compiles (eval and export).
  mesh, info, _, _, _, abstract_state = _setup(config)
  manager = checkpointing.create_manager(workdir, best=checkpoint == 'best', read_only=True)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(
        f'No {checkpoint} checkpoint in {manager.directory}; train first with '
        f'`python main.py --config ... --workdir {workdir}`' +
        (', or pass --checkpoint=latest.' if checkpoint == 'best' else '.'))
  state = checkpointing.restore_state_only(manager, step, abstract_state, config)
  path = checkpointing.checkpoint_path(manager, step)
  _restored_state_guard(state, path)
  manager.close()
  return state, step, path, mesh, info


def _export_for_inference(config: ml_collections.ConfigDict, export_dir: str):
  """The deployed network's variables from an export folder (native or converted from an official checkpoint).

  Returns:
    (variables placed on the mesh, step, export folder, mesh, dataset_info).
  """
  from ffsd_jax import export  # pylint: disable=g-import-not-at-top  (export imports this module)
  config_checks.validate_config(config)
  run_record.setup_compilation_cache(config.get('jax_cache_dir'))
  mesh = _mesh(config)  # No train state is needed: only the mesh and the dataset.
  info = data_lib.get_dataset_info(config)
  metadata, variables = export.read_export(export_dir)
  saved = (metadata.get('model'), metadata.get('num_classes'), metadata.get('image_size'))
  if saved != (config.model, info.num_classes, info.image_size):
    raise export.ExportError(
        f'The export {export_dir} holds a {saved[0]} for {saved[1]} classes at {saved[2]}x{saved[2]}, but the config '
        f'asks for a {config.model} for {info.num_classes} classes at {info.image_size}x{info.image_size}; use the '
        'config the leader was trained (or converted) with.')
  variables = jax.device_put(variables, sharding.replicated_sharding(mesh))
  return variables, int(metadata.get('step', 0)), os.path.abspath(export_dir), mesh, info


def evaluate(config: ml_collections.ConfigDict, workdir: str, checkpoint: str = 'best',
             export_dir: str | None = None) -> dict[str, Any]:
  """Evaluates the leader alone (the deployed network) from the best or latest checkpoint, or from an export folder.

  `export_dir` (e.g. a leader converted from an official checkpoint by scripts/convert_official.py) is evaluated
  with the same step and data as a checkpoint's leader. Writes `workdir/eval_leader.json` with top-1 and top-5
  (percent), the mean cross-entropy, the step and the checkpoint (or export) path.
  """
  if export_dir is None:
    state, step, path, mesh, info = restore_for_inference(config, workdir, checkpoint)
    variables = deployed_variables(state, config)
  else:
    variables, step, path, mesh, info = _export_for_inference(config, export_dir)
  replicated = sharding.replicated_sharding(mesh)
  leader_eval = jax.jit(train_step_lib.make_leader_eval_step(config, info.mean_std),
                        in_shardings=(replicated, sharding.batch_sharding(mesh)), out_shardings=replicated,
                        compiler_options=sharding.step_compiler_options(mesh, config))
  network = deployed_network(config)
  sums = _eval_loop(leader_eval, variables, config, mesh)
  count = sums['count']
  top1 = [v for k, v in sums.items() if k == 'correct' or k.startswith('correct/')]
  top5 = [v for k, v in sums.items() if k == 'correct_top5' or k.startswith('correct_top5/')]
  loss = [v for k, v in sums.items() if k.startswith('cross_entropy/')]
  result = {'top1': 100.0 * top1[0] / count, 'top5': 100.0 * top5[0] / count if top5 else None,
            'loss': loss[0] / count, 'num_examples': int(count), 'step': int(step), 'checkpoint': path,
            'model': config.model, 'network': network}
  if _is_leader_process():
    # Shown before writing: a read-only workdir must not lose the result.
    logging.info('%s (%s) from %s: top-1 %.2f%%%s, loss %.4f', network, config.model, path, result['top1'],
                 f', top-5 {result["top5"]:.2f}%' if top5 else '', result['loss'])
    try:
      os.makedirs(workdir, exist_ok=True)  # Evaluating an export needs no trained workdir.
      write_json_atomically(os.path.join(workdir, EVAL_LEADER_FILE), result)
    except OSError as error:
      logging.warning('Could not write %s (%s); the result is the line above.',
                      os.path.join(workdir, EVAL_LEADER_FILE), error)
  return result
