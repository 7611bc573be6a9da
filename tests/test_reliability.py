"""Runs that cannot lose or poison their own results: the state guard, the workdir lock, torn metrics, Ctrl-C, kill -9.

Each test makes the failure for real (a diverging learning rate, a second process, a torn line, real signals) and
checks what is on disk afterwards.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from ffsd_jax import checkpointing
from ffsd_jax import config_checks
from ffsd_jax import errors
from ffsd_jax import evaluation
from ffsd_jax import inference
from ffsd_jax import metric_writers
from ffsd_jax import run_setup
from ffsd_jax import state_guard
from ffsd_jax import train_loop
from ffsd_jax import workdir_lock
from test_sharding import REPO_ROOT, fast_compilation, tiny_config  # pylint: disable=unused-import
from test_train_loop import signal_at_batch

TOTAL_STEPS = 6
STOP_STEP = 3


def run_config():
  return tiny_config(max_steps=TOTAL_STEPS)


def _subprocess_env(**overrides: str) -> dict[str, str]:
  """The environment of a child run: CPU, the repository importable, and the tests' compilation cache."""
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO_ROOT),
              JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir, **overrides)


def _comparable(records):
  return [{k: v for k, v in r.items() if k not in metric_writers.TIMING_KEYS} for r in records]


def _state_leaves(config, workdir) -> list[np.ndarray]:
  state = inference.restore_for_inference(config, str(workdir), 'latest')[0]
  return [np.asarray(x) for x in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))]


def _assert_same_run(workdir, straight_dir):
  assert _comparable(metric_writers.read_metrics(str(workdir))) == _comparable(
      metric_writers.read_metrics(str(straight_dir)))
  for a, b in zip(_state_leaves(run_config(), workdir), _state_leaves(run_config(), straight_dir), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope='module')
def straight_run(tiny_run):
  """The session's 6-step run without interruption."""
  assert tiny_run[1]['total_steps'] == TOTAL_STEPS
  return tiny_run[0]


# ---------------------------------------------------------------------------------------------------------------
# State guard.


class _State(NamedTuple):
  params: Any
  batch_stats: Any
  opt_state: Any


def test_state_guard_names_every_nonfinite_leaf_as_numpy_finds_them():
  rng = np.random.default_rng(0)
  tree = {'params': {'leader': {'conv': rng.normal(size=(3, 3, 4)), 'bias': rng.normal(size=(4,))},
                     'student_0': {'dense': rng.normal(size=(5, 2))}},
          'batch_stats': {'leader': {'bn': {'var': rng.uniform(size=(4,))}}},
          'opt_state': ({'count': np.int32(7)}, {'trace': rng.normal(size=(6,))})}
  tree['batch_stats']['leader']['bn']['var'][2] = np.inf
  tree['params']['student_0']['dense'][4, 1] = np.nan
  state = _State(**jax.tree.map(lambda x: jnp.asarray(x, jnp.int32 if x.dtype == np.int32 else jnp.float32), tree))
  expected = [f'{group}/' + jax.tree_util.keystr(path, simple=True, separator='/')
              for group in ('params', 'batch_stats', 'opt_state')
              for path, leaf in jax.tree_util.tree_leaves_with_path(tree[group])
              if np.issubdtype(np.asarray(leaf).dtype, np.floating) and not np.isfinite(leaf).all()]
  assert state_guard.nonfinite_leaves(state) == expected == ['params/student_0/dense', 'batch_stats/leader/bn/var']
  with pytest.raises(state_guard.NonFiniteStateError,
                     match=r'^The state at step 9 holds NaN or inf values in params/student_0/dense and 1 more leaves'
                     r'\. resume from 6$'):
    state_guard.check_state_finite(state, what='The state at step 9', advice='resume from 6')
  finite = _State(**jax.tree.map(lambda x: jnp.nan_to_num(x, posinf=1.0), state._asdict()))
  assert state_guard.nonfinite_leaves(finite) == []
  state_guard.check_state_finite(finite, what='x', advice='y')


def test_diverging_run_saves_no_nonfinite_state(tmp_path):
  """The issue's case: lr=30 on the smoke config keeps the logged metrics finite at step 8 while the leader's
  running variances overflow; the checkpoint due at step 9 must not be written."""
  workdir = tmp_path / 'lr30'
  result = subprocess.run(
      [sys.executable, 'main.py', '--config', 'configs/smoke.py', '--workdir', str(workdir),
       '--config.learning_rate=30', '--config.checkpoint_every_steps=3'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=_subprocess_env(XLA_FLAGS=''))  # 1 device.
  assert result.returncode == 1
  assert re.search(r'^NonFiniteStateError: The train state at step 9 holds NaN or inf values in \S+/leader/\S+',
                   result.stderr.splitlines()[-1]), result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  assert f'the last good checkpoint is {workdir / "checkpoints" / "6"} (step 6)' in result.stderr
  assert sorted(os.listdir(workdir / 'checkpoints'), key=int) == ['3', '6']
  smoke = _load_smoke_config(learning_rate=30.0, checkpoint_every_steps=3)
  abstract_state = run_setup.build(smoke).abstract_state
  manager = checkpointing.create_manager(str(workdir), read_only=True)
  for step in (3, 6):
    state = checkpointing.restore_state_only(manager, step, abstract_state, smoke)
    assert state_guard.nonfinite_leaves(state) == []
  manager.close()


def _load_smoke_config(**overrides):
  from configs import smoke  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  config.update(overrides)
  return config


def test_restoring_a_nonfinite_checkpoint_is_refused(straight_run, tmp_path):
  """A checkpoint written without the guard (an older version) holding inf is refused on resume and in eval."""
  config = run_config()
  workdir = tmp_path / 'poisoned'
  setup = run_setup.build(config)
  mesh, abstract_state = setup.mesh, setup.abstract_state
  manager = checkpointing.create_manager(str(straight_run), read_only=True)
  state, iterator_state, loop_state = checkpointing.restore(manager, TOTAL_STEPS, abstract_state, config)
  manager.close()
  params = jax.tree.map(lambda x: x, state.params)
  params['leader'] = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf), params['leader'])
  poisoned = state.replace(params=params)
  manager = checkpointing.create_manager(str(workdir))
  checkpointing.save(manager, TOTAL_STEPS, poisoned, iterator_states={'0': iterator_state}, loop_state=loop_state,
                     config=config)
  manager.wait_until_finished()
  manager.close()
  del mesh
  with pytest.raises(checkpointing.CheckpointError, match=r'holds NaN or inf values in params/leader/.*left untouched'):
    train_loop.train_and_evaluate(tiny_config(max_steps=TOTAL_STEPS + 2), str(workdir))
  with pytest.raises(checkpointing.CheckpointError, match='holds NaN or inf values'):
    evaluation.evaluate(config, str(workdir), checkpoint='latest')


# ---------------------------------------------------------------------------------------------------------------
# Workdir lock.


_HOLDER = """
import sys, time
from ffsd_jax import workdir_lock
lock = workdir_lock.WorkdirLock(sys.argv[1]).acquire()
print('held', flush=True)
time.sleep(120)
"""


def test_second_run_on_a_held_workdir_refuses_at_once_naming_the_holder(tmp_path):
  workdir = tmp_path / 'run'
  holder = subprocess.Popen([sys.executable, '-c', _HOLDER, str(workdir)], cwd=REPO_ROOT, env=_subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    start = time.time()
    result = subprocess.run(
        [sys.executable, 'main.py', '--config', 'configs/smoke.py', '--workdir', str(workdir)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=_subprocess_env())
    elapsed = time.time() - start
    assert result.returncode != 0
    assert f'in use by another run (PID {holder.pid} on host {socket.gethostname()}' in result.stderr, (
        result.stderr[-3000:])
    assert os.listdir(workdir) == [workdir_lock.LOCK_FILE]  # Nothing else was written.
    assert elapsed < 60, elapsed  # Refused before any compilation.
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing: its lock is stale (dead PID on this host) and is taken over.
  with workdir_lock.WorkdirLock(str(workdir)) as lock:
    assert json.loads(pathlib.Path(lock.path).read_text())['pid'] == os.getpid()
  assert not (workdir / workdir_lock.LOCK_FILE).exists()


def _write_lock(workdir: pathlib.Path, holder: dict[str, Any], age_seconds: float = 0.0) -> pathlib.Path:
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / workdir_lock.LOCK_FILE
  path.write_text(json.dumps(holder))
  mtime = time.time() - age_seconds
  os.utime(path, (mtime, mtime))
  return path


def test_lock_stale_detection(tmp_path):
  me = {'host': socket.gethostname(), 'pid': os.getpid(), 'pid_start_ticks': None, 'command': ['x']}
  # A live holder on this host (this very process, as another run would see it): refused.
  _write_lock(tmp_path / 'live', me)
  with pytest.raises(workdir_lock.WorkdirLockedError, match=f'PID {os.getpid()} on host'):
    workdir_lock.WorkdirLock(str(tmp_path / 'live')).acquire()
  # The PID is alive but started at another time: a reused PID, stale.
  _write_lock(tmp_path / 'reused', dict(me, pid_start_ticks=-5))
  workdir_lock.WorkdirLock(str(tmp_path / 'reused')).acquire().release()
  # Another host: judged by the heartbeat's age.
  other = {'host': 'elsewhere.example', 'pid': 1, 'command': ['x']}
  _write_lock(tmp_path / 'fresh', other, age_seconds=5)
  with pytest.raises(workdir_lock.WorkdirLockedError, match='elsewhere.example'):
    workdir_lock.WorkdirLock(str(tmp_path / 'fresh'), stale_after_seconds=60).acquire()
  _write_lock(tmp_path / 'old', other, age_seconds=120)
  lock = workdir_lock.WorkdirLock(str(tmp_path / 'old'), stale_after_seconds=60).acquire()
  assert json.loads(pathlib.Path(lock.path).read_text())['pid'] == os.getpid()
  lock.release()
  assert not (tmp_path / 'old' / workdir_lock.LOCK_FILE).exists()


def test_lock_heartbeat_refreshes_the_file(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path), heartbeat_seconds=0.05).acquire()
  try:
    os.utime(lock.path, (0, 0))
    time.sleep(0.5)
    assert time.time() - os.stat(lock.path).st_mtime < 5
  finally:
    lock.release()


# ---------------------------------------------------------------------------------------------------------------
# Metrics, signals and kills.


def _stop_at(monkeypatch, workdir, signals):
  with monkeypatch.context() as patch:
    signal_at_batch(patch, STOP_STEP, signals)
    return train_loop.train_and_evaluate(run_config(), str(workdir))


def test_ctrl_c_torn_metrics_line_and_replayed_tensorboard_points_resume_exactly(straight_run, tmp_path,
                                                                                 monkeypatch):
  """Ctrl-C at step 3 saves; then a record torn by a full disk and a TensorBoard point logged past the checkpoint
  (a run killed after logging step 4): the resumed run's metrics, parameters and TensorBoard points are those of the
  run that never stopped."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  def scalars(workdir):
    accumulator = event_accumulator.EventAccumulator(str(workdir / 'tensorboard'), size_guidance={'scalars': 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()['scalars']
            if tag not in metric_writers.TIMING_KEYS}

  workdir = tmp_path / 'sigint'
  summary = _stop_at(monkeypatch, workdir, (signal.SIGINT,))
  assert summary['preempted'] and summary['stopped_by'] == 'SIGINT' and summary['step'] == STOP_STEP
  assert os.listdir(workdir / checkpointing.LATEST_DIR) == [str(STOP_STEP)]
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # The previous handler is back.
  assert not (workdir / workdir_lock.LOCK_FILE).exists()
  writer = metric_writers.MetricWriter(str(workdir))
  writer.write_scalars(4, {'loss/total': 123.0})
  writer.close()
  with open(workdir / metric_writers.METRICS_FILE, 'a') as f:
    f.write('{"step": 4, "loss/total": 1.2')  # Cut short by a full disk.
  assert [r['step'] for r in metric_writers.read_metrics(str(workdir))] == [2, 4]  # The torn line is skipped.

  train_loop.train_and_evaluate(run_config(), str(workdir))
  _assert_same_run(workdir, straight_run)
  assert scalars(workdir) == scalars(straight_run)


def test_damaged_metrics_line_in_the_middle_is_named(tmp_path):
  path = tmp_path / metric_writers.METRICS_FILE
  path.write_text('{"step": 2}\n{"step": 4, "lo\n{"step": 6}\n')
  with pytest.raises(ValueError, match=rf'{path}, line 2, is not a JSON record'):
    metric_writers.read_metrics(str(tmp_path))


def test_ctrl_c_on_the_command_line_saves_and_exits_130(tmp_path):
  workdir = tmp_path / 'smoke'
  run = subprocess.Popen([sys.executable, 'main.py', '--config', 'configs/smoke.py', '--workdir', str(workdir)],
                         cwd=REPO_ROOT, env=_subprocess_env(XLA_FLAGS=''), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  metrics = workdir / metric_writers.METRICS_FILE
  # The first record (step 4) is written once training runs, with the handler installed.
  while not (metrics.exists() and metrics.stat().st_size) and run.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  run.send_signal(signal.SIGINT)
  _, stderr = run.communicate(timeout=240)
  assert run.returncode == 130, stderr[-3000:]
  stopped = re.search(r'Stopped at step (\d+) after Ctrl-C; the checkpoint is saved', stderr)
  assert stopped, stderr[-3000:]
  assert os.listdir(workdir / checkpointing.LATEST_DIR) == [stopped.group(1)]
  assert 'Traceback' not in stderr


def test_second_ctrl_c_aborts_without_saving(tmp_path, monkeypatch):
  workdir = tmp_path / 'abort'
  with pytest.raises(KeyboardInterrupt):
    _stop_at(monkeypatch, workdir, (signal.SIGINT, signal.SIGINT))
  assert not (workdir / checkpointing.LATEST_DIR).exists() or not os.listdir(workdir / checkpointing.LATEST_DIR)
  assert not (workdir / workdir_lock.LOCK_FILE).exists()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


_KILLED_RUN = """
import sys
sys.path.insert(0, 'tests')
import conftest  # 8 simulated devices, as in the parent.
import jax
jax.config.update('jax_disable_most_optimizations', True)  # As the fast_compilation fixture of the straight run.
from test_sharding import tiny_config
from ffsd_jax import train_loop
train_loop.train_and_evaluate(tiny_config(max_steps=6), sys.argv[1])
"""


def test_kill_9_right_after_a_checkpoint_resumes_exactly(straight_run, tmp_path):
  """SIGKILL as soon as the step-4 checkpoint is committed (while the run saves, logs and trains on): the rerun
  continues as if nothing had happened."""
  workdir = tmp_path / 'killed'
  run = subprocess.Popen([sys.executable, '-c', _KILLED_RUN, str(workdir)], cwd=REPO_ROOT, env=_subprocess_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  committed = workdir / checkpointing.LATEST_DIR / '4'
  deadline = time.time() + 240
  while not committed.exists() and run.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  run.kill()
  run.wait()
  assert committed.exists()
  train_loop.train_and_evaluate(run_config(), str(workdir))
  _assert_same_run(workdir, straight_run)


def test_eval_result_is_shown_even_when_the_workdir_is_read_only(straight_run, monkeypatch, caplog):
  def refuse(path, value):
    raise PermissionError(13, 'Read-only file system', path)

  monkeypatch.setattr(evaluation, 'write_json_atomically', refuse)
  with caplog.at_level('INFO'):
    result = evaluation.evaluate(run_config(), str(straight_run), checkpoint='latest')
  messages = [r.getMessage() for r in caplog.records]
  assert any(f'top-1 {result["top1"]:.2f}%' in m for m in messages), messages
  assert any('Could not write' in m and 'Read-only file system' in m for m in messages), messages


# ---------------------------------------------------------------------------------------------------------------
# Config changes on resume, and bad images.


def _tree_hashes(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def test_config_change_on_resume_is_refused_and_allowed_with_the_flag(straight_run, tmp_path):
  workdir = tmp_path / 'changed'
  shutil.copytree(straight_run, workdir)
  before = _tree_hashes(workdir)
  with pytest.raises(config_checks.ConfigChangeError,
                     match=r'config.learning_rate: 0.1 in the checkpoint, 0.05 now.*allow_config_change=True'):
    train_loop.train_and_evaluate(tiny_config(max_steps=TOTAL_STEPS + 2, learning_rate=0.05), str(workdir))
  assert _tree_hashes(workdir) == before
  summary = train_loop.train_and_evaluate(
      tiny_config(max_steps=TOTAL_STEPS + 2, learning_rate=0.05, allow_config_change=True), str(workdir))
  assert summary['step'] == TOTAL_STEPS + 2
  # Step folders holding manifests still restore, and max_to_keep deletes old steps with theirs.
  assert sorted(os.listdir(workdir / checkpointing.LATEST_DIR)) == ['6', '8']
  assert len(os.listdir(workdir / checkpointing.BEST_DIR)) == 1
  for step_dir in [*(workdir / checkpointing.LATEST_DIR).iterdir(), *(workdir / checkpointing.BEST_DIR).iterdir()]:
    assert checkpointing.verify_checkpoint(str(step_dir)) is True
  records = [json.loads(line) for line in (workdir / config_checks.CONFIG_CHANGES_FILE).read_text().splitlines()]
  assert len(records) == 1 and records[0]['step'] == TOTAL_STEPS
  assert {(c['key'], c.get('old'), c.get('new')) for c in records[0]['changes']} == {
      ('learning_rate', 0.1, 0.05), ('max_steps', TOTAL_STEPS, TOTAL_STEPS + 2), ('allow_config_change', False, True)}


def _folder_config(root: pathlib.Path, **overrides):
  return tiny_config(dataset='image_folder', image_folder=str(root), num_classes=2, max_steps=2,
                     data_cache_dir=str(root.parent / 'cache'), **overrides)


def test_corrupt_image_is_reported_before_training_and_skipped_with_the_option(tmp_path):
  rng = np.random.default_rng(3)
  root = tmp_path / 'images'
  for split, count in (('train', 20), ('test', 8)):
    for name in ('a', 'b'):
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / name / f'{i}.png')
  corrupt = root / 'train' / 'b' / 'broken.png'
  corrupt.write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
  workdir = tmp_path / 'run'
  with pytest.raises(errors.DataError, match=f'{re.escape(str(root))}.*train/b/broken.png'):
    train_loop.train_and_evaluate(_folder_config(root), str(workdir))
  assert not workdir.exists()
  summary = train_loop.train_and_evaluate(_folder_config(root, skip_bad_images=True), str(workdir))
  assert summary['step'] == 2 and summary['skipped_bad_images'] == 1
