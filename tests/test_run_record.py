"""The run record (config.json, run_info.json, parameters.txt, TensorBoard config, timed metrics, eval loss), the quiet
console of the smoke run, and the persistent compilation cache setting."""

from __future__ import annotations

import json
import logging as std_logging
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from ffsd_jax import checkpointing
from ffsd_jax import metric_writers
from ffsd_jax import run_record
from ffsd_jax import train_loop
from test_sharding import GLOBAL_BATCH, REPO_ROOT, fast_compilation, tiny_config  # pylint: disable=unused-import

TINY_STEPS = 6  # The session's tiny run (conftest.tiny_run).
NETWORKS = ('student_0', 'student_1', 'leader', 'fusion', 'ensemble')
# The tests' own compilation cache (conftest), read before any test here changes JAX's setting.
TEST_CACHE_DIR = jax.config.jax_compilation_cache_dir


@pytest.fixture
def restore_jax_cache():
  """Puts JAX's compilation-cache settings back after a test that changes them (conftest's cache for the others)."""
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')
  previous = {name: getattr(jax.config, name) for name in names}
  yield
  for name, value in previous.items():
    jax.config.update(name, value)
  run_record.compilation_cache.reset_cache()


def _read_tensorboard(folder):
  """(config text, hparams of the session-start records) from a TensorBoard folder, with TensorBoard's own reader."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=g-import-not-at-top
  accumulator = event_accumulator.EventAccumulator(str(folder), size_guidance={'tensors': 0})
  accumulator.Reload()
  texts = [event.tensor_proto.string_val[0].decode() for event in accumulator.Tensors('config/text_summary')]
  content = accumulator.PluginTagToContent('hparams')
  session = plugin_data_pb2.HParamsPluginData.FromString(content['_hparams_/session_start_info'])
  experiment = plugin_data_pb2.HParamsPluginData.FromString(content['_hparams_/experiment'])
  hparams = {k: v.WhichOneof('kind') and getattr(v, v.WhichOneof('kind'))
             for k, v in session.session_start_info.hparams.items()}
  metrics = [m.name.tag for m in experiment.experiment.metric_infos]
  return texts, hparams, metrics


def _is_head_or_its_ancestor(commit: str) -> bool:
  """True for HEAD or an earlier commit of it (the repository may gain commits while the tests run)."""
  return subprocess.run(['git', '-C', str(REPO_ROOT), 'merge-base', '--is-ancestor', commit, 'HEAD'],
                        capture_output=True).returncode == 0


def test_start_writes_the_run_record(tiny_run):
  workdir, summary = tiny_run
  config = tiny_config(max_steps=TINY_STEPS)
  assert json.loads((workdir / run_record.CONFIG_FILE).read_text()) == checkpointing.config_to_json(config)

  [entry] = run_record.read_run_info(str(workdir))
  assert entry['start_step'] == 0 and entry['total_steps'] == TINY_STEPS
  assert sorted(entry['git']) == ['commit', 'dirty'] and isinstance(entry['git']['dirty'], bool)
  assert re.fullmatch('[0-9a-f]{40}', entry['git']['commit']) and _is_head_or_its_ancestor(entry['git']['commit'])
  assert entry['packages']['jax'] == jax.__version__ and entry['packages']['numpy'] == np.__version__
  for name in ('jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'python'):
    assert entry['packages'][name], name
  assert (entry['device_count'], entry['process_count'], entry['platform']) == (jax.device_count(), 1, 'cpu')
  assert entry['compilation_cache_dir'] == TEST_CACHE_DIR  # config.jax_cache_dir=None keeps the caller's setting.
  assert entry['step_flops_per_device'] > 0 and entry['command_line'][0] == sys.executable

  table = (workdir / run_record.PARAMETERS_FILE).read_text().splitlines()
  assert table[0] == 'Parameters (resnet8_tiny, method ffsd, 2 students)'
  assert any(line.startswith('| student_1/') for line in table) and table[-1].startswith('Total: 20,388')

  records = metric_writers.read_metrics(str(workdir))
  first_time = entry['start_time']
  assert all(first_time < r['time'] < os.path.getmtime(workdir / metric_writers.METRICS_FILE) + 1 for r in records)
  assert [r['time'] for r in records] == sorted(r['time'] for r in records)
  train = [r for r in records if 'loss/total' in r]
  assert [r['step'] for r in train] == [2, 4, 6]
  for r in train:
    assert r['images_per_sec'] == pytest.approx(r['steps_per_sec'] * GLOBAL_BATCH, rel=1e-12)
    assert 'mfu' not in r  # No known peak for CPUs.
  evals = [r for r in records if 'eval/top1/leader' in r]
  for r in evals:
    assert sorted(k for k in r if k.startswith('eval/loss/')) == sorted(f'eval/loss/{n}' for n in NETWORKS)
    assert all(0 < r[f'eval/loss/{n}'] < 10 for n in NETWORKS)
  assert json.loads((workdir / train_loop.SUMMARY_FILE).read_text()) == summary

  texts, hparams, metrics = _read_tensorboard(workdir / 'tensorboard')
  assert len(texts) == 1 and '"model": "resnet8_tiny"' in texts[0]
  assert hparams['model'] == 'resnet8_tiny' and hparams['batch_size'] == GLOBAL_BATCH
  assert hparams['lr_boundaries'] == '[1]' and hparams['allow_config_change'] is False
  assert metrics == ['eval/top1/leader', 'eval/best_top1/leader', 'loss/total']


def test_resume_appends_run_info_uses_the_cache_and_reports_mfu(tiny_run, tmp_path, monkeypatch, caplog,
                                                                restore_jax_cache):
  workdir, cache = tmp_path / 'run', tmp_path / 'cache'
  shutil.copytree(tiny_run[0], workdir)
  monkeypatch.setitem(run_record.PEAK_TFLOPS, 'cpu', {'float32': 2.0})  # A pretend peak: 2 TFLOP/s per device.
  # Logging every step: the first window after the resume holds only the compiling step, so nothing is timed yet.
  config = tiny_config(max_steps=TINY_STEPS + 2, jax_cache_dir=str(cache), log_every_steps=1)
  caplog.set_level(std_logging.INFO, logger='absl')
  summary = train_loop.train_and_evaluate(config, str(workdir))
  assert summary['step'] == TINY_STEPS + 2
  progress = [r.getMessage() for r in caplog.records if re.match(r'epoch \d/\d step \d/8 ', r.getMessage())]
  assert len(progress) == 2 and progress[0].endswith('| ? steps/s | ETA ?'), progress
  assert re.search(r'\| [\d.]+ steps/s, [\d.]+ images/s, data wait \d+%, MFU [\d.]+% \| ETA 0:00:00$', progress[1]), (
      progress)

  first, second = run_record.read_run_info(str(workdir))
  assert (first['start_step'], second['start_step'], second['total_steps']) == (0, TINY_STEPS, TINY_STEPS + 2)
  assert second['compilation_cache_dir'] == str(cache) and jax.config.jax_compilation_cache_dir == str(cache)
  assert json.loads((workdir / run_record.CONFIG_FILE).read_text()) == checkpointing.config_to_json(config)
  # The resumed run compiled its train step into the configured cache (the eval step may compile in less than
  # CACHE_MIN_COMPILE_SECS here, so it is not required).
  entries = os.listdir(cache)
  assert any(name.startswith('jit_step_and_accumulate-') for name in entries), entries

  untimed, last = [r for r in metric_writers.read_metrics(str(workdir)) if 'loss/total' in r][-2:]
  assert untimed['step'] == TINY_STEPS + 1 and not metric_writers.TIMING_KEYS - {'time'} & set(untimed)
  assert last['step'] == TINY_STEPS + 2
  assert last['mfu'] == pytest.approx(second['step_flops_per_device'] * last['steps_per_sec'] / 2e12, rel=1e-9)
  texts, _, _ = _read_tensorboard(workdir / 'tensorboard')
  assert len(texts) == 2 and f'"max_steps": {TINY_STEPS + 2}' in texts[1]

  # A rerun of the finished workdir does nothing and says so.
  caplog.clear()
  before = {p: os.path.getmtime(workdir / p) for p in os.listdir(workdir) if os.path.isfile(workdir / p)}
  assert train_loop.train_and_evaluate(config, str(workdir)) == summary
  assert f'Already finished at step {TINY_STEPS + 2} in {workdir}' in caplog.text
  assert len(run_record.read_run_info(str(workdir))) == 2
  assert {p: os.path.getmtime(workdir / p) for p in before} == before


def test_cache_setting_is_honoured(tmp_path, monkeypatch, restore_jax_cache):
  # A folder: JAX's own setting points at it and compiles land there.
  folder = tmp_path / 'cache'
  assert run_record.setup_compilation_cache(str(folder)) == str(folder)
  assert jax.config.jax_compilation_cache_dir == str(folder)
  assert jax.config.jax_persistent_cache_min_compile_time_secs == run_record.CACHE_MIN_COMPILE_SECS
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)  # Cache even this tiny compile.
  jax.jit(lambda x: x * 3.0 + 1.0)(np.arange(7.0)).block_until_ready()
  assert len(os.listdir(folder)) == 1

  # '': no cache at all; nothing more is written.
  assert run_record.setup_compilation_cache('') is None and jax.config.jax_compilation_cache_dir is None
  jax.jit(lambda x: x * 5.0 - 2.0)(np.arange(7.0)).block_until_ready()
  assert len(os.listdir(folder)) == 1

  # None: the user's cache folder (XDG_CACHE_HOME honoured) unless JAX already has one.
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert run_record.setup_compilation_cache(None) == str(tmp_path / 'xdg' / 'ffsd_jax' / 'jax')
  assert os.path.isdir(tmp_path / 'xdg' / 'ffsd_jax' / 'jax')
  jax.config.update('jax_compilation_cache_dir', str(folder))
  assert run_record.setup_compilation_cache(None) == str(folder)

  # A folder that cannot be created: a warning, and no cache.
  (tmp_path / 'file').write_text('')
  assert run_record.setup_compilation_cache(str(tmp_path / 'file' / 'cache')) is None
  assert jax.config.jax_compilation_cache_dir is None


def test_main_drops_orbax_read_only_warnings_only():
  quiet = run_record.QuietOrbaxFilter()
  orbax_file = '/site-packages/orbax/checkpoint/checkpoint_manager.py'

  def record(level, message, path=orbax_file):
    return std_logging.LogRecord('absl', level, path, 1, message, (), None)

  assert not quiet.filter(record(std_logging.WARNING, 'Given directory is read only=/w/checkpoints_best'))
  assert not quiet.filter(record(std_logging.WARNING, 'CheckpointManagerOptions.read_only=True, setting '
                                 'max_to_keep=None.'))
  assert not quiet.filter(record(std_logging.INFO, 'Saving checkpoint'))
  assert quiet.filter(record(std_logging.WARNING, 'Something else went wrong'))
  assert quiet.filter(record(std_logging.INFO, 'Given directory is read only', path='/repo/ffsd_jax/train_loop.py'))
  # A failed background save: the loop reports it in one line; --verbosity=1 keeps Orbax's own reports.
  save_failed = record(std_logging.ERROR, 'Failed to run 6 Handler Commit operations')
  abandoned = record(std_logging.ERROR, '_GatheringFuture exception was never retrieved',
                     path='/lib/asyncio/base_events.py')
  assert not quiet.filter(save_failed) and not quiet.filter(abandoned)
  verbose = run_record.QuietOrbaxFilter(verbose=True)
  assert verbose.filter(save_failed) and verbose.filter(abandoned)
  assert quiet.filter(record(std_logging.ERROR, 'Something else failed', path='/repo/ffsd_jax/train_loop.py'))


def test_smoke_run_console_is_short_and_truthful(tmp_path):
  workdir = tmp_path / 'smoke'
  result = subprocess.run(
      [sys.executable, 'main.py', '--config', 'configs/smoke.py', '--workdir', str(workdir)], cwd=REPO_ROOT,
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='', JAX_COMPILATION_CACHE_DIR=TEST_CACHE_DIR or ''))
  lines = (result.stdout + result.stderr).splitlines()
  assert result.returncode == 0, '\n'.join(lines[-30:])
  assert len(lines) <= 30, '\n'.join(lines)

  start = next(i for i, line in enumerate(lines) if 'Parameters (resnet8_tiny, method ffsd, 2 students)' in line)
  assert lines[start].endswith(f'full table in {workdir / run_record.PARAMETERS_FILE}:')
  networks = [line.split()[0] for line in lines[start + 1:start + 9]]
  assert networks == ['decoder_1', 'decoder_leader', 'fusion', 'leader', 'student_0', 'student_1', 'trans_fusion',
                      'total']
  assert re.fullmatch(r'\s+total\s+20,388 parameters\s+81,552 bytes', lines[start + 8])
  assert sum('Parameters' in line for line in lines) == 1 and not any(line.startswith('|') for line in lines)

  progress = [line for line in lines if re.search(r'\] epoch \d/2 step \d+/32 \|', line)]
  assert [int(re.search(r'step (\d+)/32', line).group(1)) for line in progress] == list(range(4, 33, 4))
  for line in progress:
    speed_and_eta = re.search(r'\| ([\d.]+) steps/s, ([\d.]+) images/s, data wait \d+% \| ETA (\d+):(\d\d):(\d\d)$',
                              line)
    assert speed_and_eta, line
    assert int(speed_and_eta.group(3)) == 0, line  # A 32-step run: never hours.
  assert sum(' eval after epoch ' in line for line in lines) == 2
  # No silent phase: the dataset in one line, compiling announced and timed, the first eval's compilation announced.
  assert sum(re.search(r'\] Dataset synthetic \(random pixels', line) is not None for line in lines) == 1
  assert sum(line.endswith('a new one takes up to minutes)...') for line in lines) == 1
  assert sum(re.search(r'\] Compiled the training step in [\d.]+ s\.$', line) is not None for line in lines) == 1
  assert sum('First evaluation (compiling the eval step) on 256 test images...' in line for line in lines) == 1
  assert not any("Unable to initialize backend 'tpu'" in line for line in lines)
  summary = json.loads((workdir / train_loop.SUMMARY_FILE).read_text())
  assert lines[-1].endswith(f'Finished at step 32: leader top-1 best {summary["best_leader_top1"]:.2f}, last '
                            f'{summary["last_leader_top1"]:.2f} ({workdir / train_loop.SUMMARY_FILE}).')
  assert len(run_record.read_run_info(str(workdir))) == 1


def test_git_state_outside_a_repository_is_none(tmp_path):
  assert run_record._git_state(str(tmp_path)) is None  # pylint: disable=protected-access
