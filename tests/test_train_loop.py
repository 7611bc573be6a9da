"""The training loop end to end on tiny synthetic runs: exact resume after SIGTERM, leader eval, export, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from ffsd_jax import checkpointing
from ffsd_jax import evaluation
from ffsd_jax import export
from ffsd_jax import inference
from ffsd_jax import metric_writers
from ffsd_jax import train_loop
from ffsd_jax import train_state as train_state_lib
from ffsd_jax.data.normalization import normalize_images
from test_sharding import REPO_ROOT, fast_compilation, tiny_config  # pylint: disable=unused-import

TOTAL_STEPS = 6  # 2k steps, k = 3: not a multiple of log_every_steps (2), so a logging window spans the stop.
STOP_STEP = 3


def run_config():
  # 4 steps per epoch: eval at step 4 (epoch 1) and at the last step 6; checkpoints at 4 and 6.
  return tiny_config(max_steps=TOTAL_STEPS)


def signal_at_batch(monkeypatch, step: int, signals: tuple[int, ...] = (signal.SIGTERM,)):
  """Makes the data iterator send this process real signals while the loop trains step `step` (1-based): the device
  feed places batches FEED_SIZE − 1 ahead, so that is when the iterator hands out batch step + FEED_SIZE − 1."""
  batch_number = step + train_loop.FEED_SIZE - 1
  original = train_loop.data_lib.create_train_iterator

  class _Iterator:

    def __init__(self, inner):
      self._inner, self._count = inner, 0

    def __next__(self):
      self._count += 1
      if self._count == batch_number:
        for signum in signals:
          os.kill(os.getpid(), signum)
      return next(self._inner)

    def get_state(self):
      return self._inner.get_state()

    def set_state(self, state):
      self._inner.set_state(state)

  monkeypatch.setattr(train_loop.data_lib, 'create_train_iterator',
                      lambda *a, **k: _Iterator(original(*a, **k)))


@pytest.fixture(scope='module')
def straight_run(tiny_run):
  """6 steps without interruption (the session's tiny run)."""
  assert tiny_run[1]['total_steps'] == TOTAL_STEPS
  return tiny_run


def _tree_hashes(root: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob('*')) if p.is_file()}


def _comparable(records):
  return [{k: v for k, v in r.items() if k not in metric_writers.TIMING_KEYS} for r in records]


def test_straight_run_logs_and_checkpoints(straight_run):
  workdir, summary = straight_run
  assert summary['step'] == TOTAL_STEPS and not summary['preempted']
  records = metric_writers.read_metrics(str(workdir))
  assert [r['step'] for r in records] == [2, 4, 4, 6, 6]
  train = records[0]
  for key in ('loss/total', 'accuracy/leader', 'accuracy/fusion', 'accuracy/student_1', 'lambda_scale'):
    assert key in train and np.isfinite(train[key]), key
  evals = [r for r in records if 'eval/top1/leader' in r]
  for key in ('eval/top1/student_0', 'eval/top1/student_1', 'eval/top1/fusion', 'eval/top1/ensemble'):
    assert key in evals[0]
  assert evals[-1]['eval/best_top1/leader'] == max(r['eval/top1/leader'] for r in evals)
  assert summary['best_leader_top1'] == evals[-1]['eval/best_top1/leader']
  assert sorted(os.listdir(workdir / checkpointing.LATEST_DIR)) == ['4', '6']
  assert len(os.listdir(workdir / checkpointing.BEST_DIR)) == 1
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir / 'tensorboard'))


def test_sigterm_then_resume_is_exact(straight_run, tmp_path, monkeypatch):
  straight_dir, _ = straight_run
  workdir = tmp_path / 'resumed'
  with monkeypatch.context() as patch:
    signal_at_batch(patch, STOP_STEP)
    summary = train_loop.train_and_evaluate(run_config(), str(workdir))
  assert summary['preempted'] and summary['step'] == STOP_STEP
  assert json.loads((workdir / train_loop.SUMMARY_FILE).read_text()) == summary  # Written on preemption too.
  assert os.listdir(workdir / checkpointing.LATEST_DIR) == [str(STOP_STEP)]
  assert signal.getsignal(signal.SIGTERM) is not None  # The loop put the previous handler back.

  summary = train_loop.train_and_evaluate(run_config(), str(workdir))
  assert summary['step'] == TOTAL_STEPS and not summary['preempted']
  assert _comparable(metric_writers.read_metrics(str(workdir))) == _comparable(
      metric_writers.read_metrics(str(straight_dir)))
  resumed = inference.restore_for_inference(run_config(), str(workdir), 'latest')[0]
  straight = inference.restore_for_inference(run_config(), str(straight_dir), 'latest')[0]
  leaves_resumed = jax.tree.leaves((resumed.params, resumed.batch_stats, resumed.opt_state))
  leaves_straight = jax.tree.leaves((straight.params, straight.batch_stats, straight.opt_state))
  assert len(leaves_resumed) == len(leaves_straight)
  for a, b in zip(leaves_resumed, leaves_straight):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eval_mode_reproduces_logged_leader_top1(straight_run):
  workdir, _ = straight_run
  records = [r for r in metric_writers.read_metrics(str(workdir)) if 'eval/top1/leader' in r]
  best = evaluation.evaluate(run_config(), str(workdir), checkpoint='best')
  assert best['top1'] == records[-1]['eval/best_top1/leader']
  assert best['num_examples'] == 40 and best['top5'] is not None
  latest = evaluation.evaluate(run_config(), str(workdir), checkpoint='latest')
  assert latest['top1'] == records[-1]['eval/top1/leader'] and latest['step'] == TOTAL_STEPS
  assert latest['checkpoint'].endswith(os.path.join(checkpointing.LATEST_DIR, str(TOTAL_STEPS)))
  assert (workdir / evaluation.EVAL_LEADER_FILE).exists()


def test_exported_leader_gives_the_train_state_leader_logits(straight_run, tmp_path):
  workdir, _ = straight_run
  config = run_config()
  export_dir = export.export_leader(config, str(workdir), str(tmp_path / 'export'), checkpoint='latest')
  assert sorted(os.listdir(export_dir)) == sorted([export.METADATA_FILE, export.PARAMS_FILE, export.PORTABLE_FILE])
  leader_logits = export.load_leader(export_dir)
  images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  state = inference.restore_for_inference(config, str(workdir), 'latest')[0]
  model = train_state_lib.create_model(config)
  expected = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                         normalize_images(images, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
                         train=False)['leader_logits']
  np.testing.assert_allclose(np.asarray(leader_logits(images)), np.asarray(expected), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='uint8 images of shape'):
    leader_logits(images.astype(np.float32))


@pytest.mark.multi_device
def test_batch_not_divisible_by_device_count_fails_before_writing(tmp_path):
  with pytest.raises(ValueError, match='not divisible by the number of devices'):
    train_loop.train_and_evaluate(tiny_config(batch_size=12), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_unknown_model_fails_clearly(tmp_path):
  with pytest.raises(ValueError, match=r"resnet9.*resnet20"):
    train_loop.train_and_evaluate(tiny_config(model='resnet9'), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_unknown_config_key_fails_clearly(tmp_path):
  result = subprocess.run(
      [sys.executable, 'main.py', '--config', 'configs/smoke.py', '--workdir', str(tmp_path / 'run'),
       '--config.learning_rat=0.05'], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode != 0
  assert 'learning_rat' in result.stderr and 'learning_rate' in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('override', [{'model': 'resnet8'}, {'num_students': 3}, {'method': 'dml'}])
def test_workdir_of_another_architecture_fails_and_is_untouched(straight_run, tmp_path, override):
  workdir = tmp_path / 'copy'
  shutil.copytree(straight_run[0], workdir)
  before = _tree_hashes(workdir)
  with pytest.raises(checkpointing.CheckpointError, match='another architecture'):
    train_loop.train_and_evaluate(tiny_config(max_steps=TOTAL_STEPS + 2, **override), str(workdir))
  assert _tree_hashes(workdir) == before


def test_truncated_checkpoint_fails_and_is_untouched(straight_run, tmp_path):
  workdir = tmp_path / 'copy'
  shutil.copytree(straight_run[0], workdir)
  state_dir = workdir / checkpointing.LATEST_DIR / str(TOTAL_STEPS) / 'state'
  largest = max((p for p in state_dir.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])
  before = _tree_hashes(workdir)
  with pytest.raises(checkpointing.CheckpointError, match='truncated'):
    train_loop.train_and_evaluate(tiny_config(max_steps=TOTAL_STEPS + 2), str(workdir))
  with pytest.raises(checkpointing.CheckpointError, match='truncated'):
    evaluation.evaluate(tiny_config(), str(workdir), checkpoint='latest')
  assert _tree_hashes(workdir) == before


def test_plot_metrics_draws_runs(straight_run, tmp_path):
  sys.path.insert(0, os.path.join(REPO_ROOT, 'scripts'))
  import plot_metrics  # pylint: disable=g-import-not-at-top
  from ffsd_jax import studies  # pylint: disable=g-import-not-at-top
  workdir = str(straight_run[0])
  # The same real run twice under one label: the band collapses onto the run's own leader curve.
  runs = studies.collect_runs([f'a={workdir}', f'a={workdir}', f'b={workdir}'])
  paths = plot_metrics.plot(runs, str(tmp_path / 'metrics'), keys=['leader/*'],
                            figures=plot_metrics.FIGURES + ('keys',))
  assert list(paths) == list(plot_metrics.FIGURES) + ['keys']
  for path in paths.values():
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  epochs, leader = studies.curve(metric_writers.read_metrics(workdir), 'eval/top1/leader')
  band = plot_metrics.headline_figure(runs, str(tmp_path / 'headline.png'))['']['a']
  assert band.x.tolist() == epochs.tolist() and band.count.tolist() == [2] * len(epochs)
  assert band.mean.tolist() == band.low.tolist() == band.high.tolist() == leader.tolist()
