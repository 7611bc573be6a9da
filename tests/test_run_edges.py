"""A run at its edges, each failure caused for real: a signal during the final save, a full disk (a real tmpfs), a
read-only workdir (a real read-only mount), a corrupt best checkpoint, a shortened resume, eval and export with the
workdir's own config. Each checks that nothing is lost, that the error is one line and the exit status."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY_RUN_STEPS, child_env, report_lines
from ffsd_jax import checkpointing
from ffsd_jax import config_checks
from ffsd_jax import errors
from ffsd_jax import metric_writers
from ffsd_jax import train_loop
from test_sharding import fast_compilation, tiny_config  # pylint: disable=unused-import

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE_STEPS = 8  # Half of the smoke config's first epoch is not an epoch end: max_steps=8 evaluates at the end only.
SMOKE = ['main.py', '--config', 'configs/smoke.py', f'--config.max_steps={SMOKE_STEPS}',
         '--config.checkpoint_every_steps=4']


def _main(args: list[str], **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                        env=child_env(), **kwargs)


def _comparable(workdir: pathlib.Path) -> list[dict]:
  return [{k: v for k, v in r.items() if k not in metric_writers.TIMING_KEYS}
          for r in metric_writers.read_metrics(str(workdir))]


@pytest.fixture(scope='module')
def straight_smoke(tmp_path_factory):
  """An uninterrupted 8-step smoke run (the reference for resumes)."""
  workdir = tmp_path_factory.mktemp('straight') / 'run'
  result = _main([*SMOKE, '--workdir', str(workdir)])
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@contextlib.contextmanager
def _mounted(target: pathlib.Path, *mount_args: str):
  """Mounts at `target` (e.g. a small tmpfs, or a read-only bind), or skips when this machine cannot mount."""
  target.mkdir(parents=True, exist_ok=True)
  result = subprocess.run(['mount', *mount_args, str(target)], capture_output=True, text=True)
  if result.returncode:
    pytest.skip(f'cannot mount here ({result.stderr.strip() or "mount failed"}); needs root in a sandbox that allows '
                'mounts')
  try:
    yield target
  finally:
    subprocess.run(['umount', '-l', str(target)], capture_output=True)


@contextlib.contextmanager
def _read_only(folder: pathlib.Path):
  """`folder` made read-only for real: a read-only bind mount as root (root ignores permission bits), chmod else."""
  if os.geteuid() != 0:
    modes = {p: p.stat().st_mode for p in [folder, *folder.rglob('*')]}
    for p in modes:
      p.chmod(modes[p] & ~0o222)
    try:
      yield folder
    finally:
      for p, mode in modes.items():
        p.chmod(mode)
    return
  with _mounted(folder, '--bind', str(folder)):
    if subprocess.run(['mount', '-o', 'remount,ro,bind', str(folder)], capture_output=True).returncode:
      pytest.skip('cannot remount read-only here')
    yield folder


def _step_folders(workdir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in (workdir / checkpointing.LATEST_DIR).iterdir())


def test_sigterm_during_the_final_save_loses_nothing(straight_smoke, tmp_path):
  """SIGTERM lands while the last checkpoint commits (just after the last eval line): the run still finishes
  cleanly: exit 0, no temporary folder, the lock released, summary.json written, the same results."""
  workdir = tmp_path / 'run'
  run = subprocess.Popen([sys.executable, *SMOKE, '--workdir', str(workdir)], cwd=REPO_ROOT, env=child_env(),
                         stderr=subprocess.PIPE, text=True)
  lines = []
  for line in run.stderr:
    lines.append(line)
    if f'eval after epoch 0.50 (step {SMOKE_STEPS}' in line:
      time.sleep(0.15)  # Inside the final save (the reproduction: 0.15-0.6 s after the last eval line).
      run.send_signal(signal.SIGTERM)
      break
  lines += run.stderr.read().splitlines()
  assert run.wait(timeout=120) == 0, ''.join(lines)[-3000:]
  assert not (workdir / 'ffsd.lock').exists()
  assert _step_folders(workdir) == ['4', '8']  # No *.orbax-checkpoint-tmp left behind.
  assert (workdir / checkpointing.LATEST_DIR / '8' / checkpointing.MANIFEST_FILE).exists()
  summary = json.loads((workdir / train_loop.SUMMARY_FILE).read_text())
  assert summary == json.loads((straight_smoke / train_loop.SUMMARY_FILE).read_text())
  assert _comparable(workdir) == _comparable(straight_smoke)


def test_full_disk_stops_at_the_next_log_point_in_one_line_and_resumes_exactly(straight_smoke, tmp_path):
  """A 1.6 MB tmpfs holds the step-4 checkpoint but not the step-8 one: the failed asynchronous save surfaces at once
  as one line naming the folder, the cause and the step to resume from; with space again the rerun is exact."""
  with _mounted(tmp_path / 'disk', '-t', 'tmpfs', '-o', 'size=1600k', 'tmpfs') as disk:
    workdir = disk / 'run'
    result = _main([*SMOKE, '--workdir', str(workdir)])
    assert result.returncode == 1, result.stderr[-3000:]
    problem = report_lines(result.stderr)
    assert len(problem) == 1, result.stderr[-5000:]
    # The best checkpoint (after the step-8 evaluation) or the latest one (the step-8 save): whichever fails first.
    assert re.fullmatch(
        re.escape('CheckpointError: Saving a checkpoint in ') + f'({re.escape(str(workdir / "checkpoints"))}|'
        f'{re.escape(str(workdir / "checkpoints_best"))})' + re.escape(
            f' failed (no space left on device; free some space or move the workdir). Training stopped at step '
            f'{SMOKE_STEPS}. The last complete checkpoint is {workdir / "checkpoints" / "4"} (step 4); rerun the '
            'same command to resume from it.'), problem[0]), problem[0]
    assert 'Traceback' not in result.stderr and not re.search(r'^E\d{4} ', result.stderr, re.MULTILINE)
    assert subprocess.run(['mount', '-o', 'remount,size=40m', str(disk)]).returncode == 0
    resumed = _main([*SMOKE, '--workdir', str(workdir)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'Resuming from step 4' in resumed.stderr
    assert _comparable(workdir) == _comparable(straight_smoke)
    assert (json.loads((workdir / train_loop.SUMMARY_FILE).read_text())
            == json.loads((straight_smoke / train_loop.SUMMARY_FILE).read_text()))


def test_read_only_workdir(straight_smoke, tmp_path):
  """A finished run in a read-only folder says so and exits 0 (no lock is taken); training into a read-only folder is
  one line; eval still shows its result."""
  workdir = tmp_path / 'run'
  shutil.copytree(straight_smoke, workdir)
  with _read_only(workdir):
    finished = _main([*SMOKE, '--workdir', str(workdir)])
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f'Already finished at step {SMOKE_STEPS}' in finished.stderr
    longer = _main([*SMOKE, '--workdir', str(workdir), f'--config.max_steps={2 * SMOKE_STEPS}'])
    assert longer.returncode == 1, longer.stderr[-3000:]
    assert report_lines(longer.stderr) == [
        f'WorkdirError: --workdir {workdir} cannot be written: Read-only file system ({workdir}); the file system is '
        'read-only: choose another folder.']
    evaluated = _main(['main.py', '--workdir', str(workdir), '--mode', 'eval'])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert 'top-1' in evaluated.stderr and 'Could not write' in evaluated.stderr


def test_corrupt_best_checkpoint_is_moved_aside_and_a_new_best_is_written(tiny_run, tmp_path, caplog):
  """A corrupt best checkpoint does not block resuming from the intact latest one: it is moved aside (not deleted),
  the next evaluation writes a new best, and summary.json names the checkpoint behind its best."""
  workdir = tmp_path / 'run'
  shutil.copytree(tiny_run[0], workdir)
  (best_step,) = (workdir / checkpointing.BEST_DIR).iterdir()
  array_file = max((p for p in best_step.rglob('*') if p.is_file() and 'state' in p.parts),
                   key=lambda p: p.stat().st_size)
  data = bytearray(array_file.read_bytes())
  data[len(data) // 2] ^= 0xFF
  array_file.write_bytes(bytes(data))
  damaged = array_file.read_bytes()
  with caplog.at_level('WARNING'):
    summary = train_loop.train_and_evaluate(tiny_config(max_steps=TINY_RUN_STEPS + 4), str(workdir))
  assert any('cannot be read' in r.getMessage() and 'moved to' in r.getMessage() for r in caplog.records)
  (moved,) = (workdir / train_loop.UNREADABLE_BEST_DIR).iterdir()
  assert moved.name.startswith(f'{best_step.name}-')
  assert (moved / array_file.relative_to(best_step)).read_bytes() == damaged  # Kept as it was.
  evals = {r['step']: r['eval/top1/leader'] for r in metric_writers.read_metrics(str(workdir))
           if 'eval/top1/leader' in r}
  after_resume = {step: top1 for step, top1 in evals.items() if step > TINY_RUN_STEPS}
  best_step_now = max(after_resume, key=lambda step: (after_resume[step], -step))  # The first of the best.
  assert [p.name for p in (workdir / checkpointing.BEST_DIR).iterdir()] == [str(best_step_now)]
  assert summary['best_checkpoint_step'] == best_step_now
  assert summary['best_checkpoint_top1'] == after_resume[best_step_now]
  assert summary['best_leader_top1'] == max(evals.values())


def test_resume_that_would_shorten_the_run_is_refused_in_one_line(tiny_run, tmp_path):
  """A run set to 6 steps, stopped after its step-4 checkpoint, resumed with a config that ends at 5."""
  workdir = tmp_path / 'run'
  shutil.copytree(tiny_run[0], workdir)
  shutil.rmtree(workdir / checkpointing.LATEST_DIR / str(TINY_RUN_STEPS))  # As if killed after the step-4 save.
  with pytest.raises(config_checks.ConfigChangeError) as refused:
    train_loop.train_and_evaluate(tiny_config(max_steps=5), str(workdir))
  assert errors.format_error(refused.value) == (
      f'ConfigChangeError: The checkpointed run (step 4) was set to train {TINY_RUN_STEPS} steps (num_epochs=2, '
      f'max_steps={TINY_RUN_STEPS}), but this config stops at 5 (num_epochs=2, max_steps=5). Pass the same run '
      'length to finish it, or --config.allow_config_change=True to end it earlier.')
  assert errors.exit_code(refused.value) == errors.EXIT_USAGE
  assert _step_folders(workdir) == ['4']
  summary = train_loop.train_and_evaluate(tiny_config(max_steps=5, allow_config_change=True), str(workdir))
  assert summary['step'] == 5


def test_eval_and_export_read_the_workdirs_own_config(tmp_path):
  """A run trained with --config.model/--config.method overrides evaluates and exports without repeating them."""
  workdir = tmp_path / 'run'
  trained = _main(['main.py', '--config', 'configs/smoke.py', '--workdir', str(workdir), '--config.max_steps=4',
                   '--config.method=dml', '--config.num_students=3'])
  assert trained.returncode == 0, trained.stderr[-3000:]
  evaluated = _main(['main.py', '--workdir', str(workdir), '--mode', 'eval', '--checkpoint', 'latest'])
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  result = json.loads((workdir / 'eval_leader.json').read_text())
  last = [r for r in metric_writers.read_metrics(str(workdir)) if 'eval/top1/student_0' in r][-1]
  assert result['network'] == 'student_0' and result['top1'] == last['eval/top1/student_0']
  exported = _main(['main.py', '--workdir', str(workdir), '--mode', 'export', '--checkpoint', 'latest',
                    '--config.eval_batch_size=32'])
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert 'Exported student_0 (resnet8_tiny, method dml, step 4)' in exported.stderr
  # The converter reads the same config: the tiny test network has no official counterpart, and says so.
  converted = _main(['scripts/convert_official.py', '--to_official', '--workdir', str(workdir), '--out',
                     str(tmp_path / 'official')])
  assert converted.returncode == 1
  assert report_lines(converted.stderr) == [
      'OfficialFormatError: resnet8_tiny has no counterpart in the official FFSD code; the official architectures '
      'are resnet20, resnet32, resnet56, wrn16_2, wrn40_2, densenet40, googlenet, resnet18, resnet34.']
  nowhere = _main(['main.py', '--workdir', str(tmp_path / 'empty'), '--mode', 'eval'])
  assert nowhere.returncode == 2
  assert report_lines(nowhere.stderr) == [
      f'{tmp_path / "empty" / "config.json"} not found, so the config the run trained with is unknown: pass it with '
      '--config configs/<name>.py (and the --config.KEY overrides the run used).']


def test_resume_on_a_device_count_that_does_not_divide_the_batch(tmp_path):
  """The issue's case: a batch-32 run resumed on 3 devices. One line lists the device counts that fit; the
  documented way on (a new global batch with allow_config_change) resumes at the same step, the eval batch rounded up
  to the devices by itself, and the change recorded."""
  workdir = tmp_path / 'run'
  trained = _main([*SMOKE, '--workdir', str(workdir), '--config.max_steps=4'])
  assert trained.returncode == 0, trained.stderr[-3000:]
  three = child_env(devices=3)
  longer = [*SMOKE, '--workdir', str(workdir), '--config.max_steps=8']
  refused = subprocess.run([sys.executable, *longer], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                           env=three)
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert report_lines(refused.stderr) == [
      'ConfigError: config.batch_size=32 is not divisible by the number of devices (3): the global batch is split '
      'evenly over them. Device counts that fit: 1, 2, 4, 8, 16, 32 (select them with CUDA_VISIBLE_DEVICES, or '
      '--xla_force_host_platform_device_count on CPU). A new run can use a multiple of 3, e.g. '
      '--config.batch_size=30; to resume a run with another batch, see "Changing the device count" in '
      'docs/reliability.md.']
  allowed = subprocess.run([sys.executable, *longer, '--config.batch_size=30', '--config.allow_config_change=True'],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=three)
  assert allowed.returncode == 0, allowed.stderr[-3000:]
  assert 'Resuming from step 4' in allowed.stderr and 'eval_batch_size 64 rounded up to 66' in allowed.stderr
  summary = json.loads((workdir / train_loop.SUMMARY_FILE).read_text())
  assert summary['step'] == 8 and summary['last_leader_top1'] is not None
  changes = [json.loads(line) for line in (workdir / 'config_changes.jsonl').read_text().splitlines()]
  assert changes[-1]['step'] == 4
  assert {c['key']: (c['old'], c['new']) for c in changes[-1]['changes']}['batch_size'] == (32, 30)
