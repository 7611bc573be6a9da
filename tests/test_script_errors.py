"""The scripts' user-facing errors (issue 20): one line on stderr, the documented exit status, the traceback only with
--verbosity=1; convert_official.py's one-line success report; no libtpu line on a CPU start.

Every script runs as a subprocess, as a user starts it, without JAX_PLATFORMS (so JAX probes its TPU backend as on a
user's machine). The runs are started together by one module fixture, two at a time, to keep the module fast on a
2-core machine.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from ffsd_jax import errors
from ffsd_jax import models
from ffsd_jax import official

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# absl's INFO line format: 'I1207 00:05:20.961889 139839219178368 file.py:849] ...'.
ABSL_INFO_LINE = re.compile(r'^I\d{4} ', re.MULTILINE)
TPU_PROBE_LINE = "Unable to initialize backend 'tpu'"


@dataclasses.dataclass(frozen=True)
class Case:
  """A script run that must fail: its arguments ({tmp} is a fresh folder), exit status and a part of its one line."""
  script: str
  args: tuple[str, ...]
  exit_code: int
  says: str
  # Run again with --verbosity=1, expecting the traceback. False where config_checks.parse_flags refuses a flag or
  # config while absl parses the command line (one line, never a traceback), or where another case of the same script
  # covers the same path (each run costs seconds of JAX imports).
  check_traceback: bool = True


CASES = {
    'convert_official: missing checkpoint': Case(
        'convert_official', ('--config', 'configs/cifar100_resnet20.py', '--checkpoint', '{tmp}/absent.pth',
                             '--out', '{tmp}/out'), errors.EXIT_FAILURE, 'absent.pth'),
    'convert_official: missing config': Case(
        'convert_official', ('--config', '{tmp}/absent_config.py', '--checkpoint', '{tmp}/absent.pth', '--out',
                             '{tmp}/out'), errors.EXIT_USAGE, 'absent_config.py not found',
        check_traceback=False),
    'convert_official: missing --out': Case(
        'convert_official', ('--to_official', '--export', '{tmp}/export'), errors.EXIT_USAGE, '--out is required',
        check_traceback=False),
    # Orbax opens the (empty) workdir read-only: its INFO lines and read-only warnings would be about 15 lines.
    'convert_official: workdir without checkpoints': Case(
        'convert_official', ('--to_official', '--config', 'configs/smoke.py', '--config.model=resnet20', '--workdir',
                             '{tmp}', '--out', '{tmp}/official'), errors.EXIT_FAILURE, 'CheckpointError: No best',
        check_traceback=False),
    'prepare_data: missing image folder': Case(
        'prepare_data', ('--image_folder', '{tmp}/absent', '--name', 'absent', '--data_dir', '{tmp}/tfds'),
        errors.EXIT_FAILURE, 'DataError: --image_folder'),
    'prepare_data: invalid name': Case(
        'prepare_data', ('--image_folder', '{tmp}', '--name', 'Bad-Name', '--data_dir', '{tmp}/tfds'),
        errors.EXIT_USAGE, 'Use e.g. --name bad_name', check_traceback=False),
    'compare_official: missing checkout': Case(
        'compare_official', ('--official_src', '{tmp}/absent'), errors.EXIT_USAGE, 'compare_official: --official_src'),
    'compare_convolutions: missing config': Case(
        'compare_convolutions', ('--config', '{tmp}/absent.py'), errors.EXIT_USAGE, 'is not a file'),
    'benchmark_input: missing image folder': Case(
        'benchmark_input', ('--skip_cifar', '--imagenet_folder', '{tmp}/absent', '--workers', '0'),
        errors.EXIT_FAILURE, 'DataError: --imagenet_folder'),
    'benchmark_reliability: missing config': Case(
        'benchmark_reliability', ('--configs={tmp}/absent.py',), errors.EXIT_USAGE, 'absent.py'),
    'benchmark: missing config': Case(
        'benchmark', ('--config', '{tmp}/absent.py'), errors.EXIT_USAGE, 'absent.py not found',
        check_traceback=False),
    'profile_step: unknown method': Case(
        'profile_step', ('--config', 'configs/smoke.py', '--method', 'bogus'), errors.EXIT_USAGE, 'bogus',
        check_traceback=False),
}


def _env() -> dict[str, str]:
  # Without JAX_PLATFORMS (the test suite sets cpu) JAX probes every backend, TPU included, as at a user's start.
  return {key: value for key, value in os.environ.items() if key != 'JAX_PLATFORMS'}


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(REPO_ROOT / 'scripts' / f'{script}.py'), *args], cwd=REPO_ROOT,
                        env=_env(), capture_output=True, text=True, timeout=300, check=False)


def _official_checkpoint(path: pathlib.Path) -> None:
  """A resnet20 leader and head in the official format (constant values: only the conversion is under test)."""
  spec = models.get_spec('resnet20')
  # pylint: disable-next=protected-access
  leader_template, head_template = official._templates(spec.name, spec.default_num_classes, 2)
  constant = lambda template: jax.tree.map(lambda leaf: np.full(leaf.shape, 0.5, np.float32), template)
  official.save_safetensors(str(path), official.to_official(constant(leader_template), 'resnet20',
                                                            constant(head_template)),
                            {'epoch': 1, 'cfg': 'resnet20'})


def _convert_both_ways(tmp: pathlib.Path) -> list[subprocess.CompletedProcess]:
  _official_checkpoint(tmp / 'in.safetensors')
  to_export = run_script('convert_official', '--config', 'configs/cifar100_resnet20.py', '--checkpoint',
                         str(tmp / 'in.safetensors'), '--out', str(tmp / 'export'))
  back = run_script('convert_official', '--to_official', '--export', str(tmp / 'export'), '--out', str(tmp / 'back'))
  return [to_export, back]


def _absl_start_without_quieting() -> subprocess.CompletedProcess:
  """An absl program that starts JAX's backends without `run_record.quiet_startup_noise`: the line to silence."""
  code = 'from absl import app\nimport jax\napp.run(lambda argv: jax.devices() and None)'
  return subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                        timeout=300, check=False)


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> dict[str, object]:
  """Every run of this module, keyed by case name (+ ' --verbosity=1'), 'convert' and 'unquieted start'."""
  tasks = {}
  for name, case in CASES.items():
    tmp = tmp_path_factory.mktemp('case')
    args = [arg.format(tmp=tmp) for arg in case.args]
    tasks[name] = (run_script, case.script, *args)
    if case.check_traceback:
      tasks[f'{name} --verbosity=1'] = (run_script, case.script, *args, '--verbosity=1')
  tasks['convert'] = (_convert_both_ways, tmp_path_factory.mktemp('convert'))
  tasks['unquieted start'] = (_absl_start_without_quieting,)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = {name: pool.submit(*task) for name, task in tasks.items()}
    return {name: future.result() for name, future in futures.items()}


def _lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize('name', list(CASES))
def test_error_is_one_line_with_its_exit_status(runs, name):
  case, result = CASES[name], runs[name]
  lines = _lines(result.stderr)
  assert result.returncode == case.exit_code, result.stderr
  assert 1 <= len(lines) <= 2 and 'Traceback' not in result.stderr, result.stderr
  assert case.says in lines[-1], result.stderr
  assert TPU_PROBE_LINE not in result.stderr


@pytest.mark.parametrize('name', [name for name, case in CASES.items() if case.check_traceback])
def test_verbosity_1_shows_the_traceback(runs, name):
  result = runs[f'{name} --verbosity=1']
  assert result.returncode == CASES[name].exit_code, result.stderr
  assert 'Traceback (most recent call last)' in result.stderr
  assert any(CASES[name].says in line for line in _lines(result.stderr))  # The one line as well.


def test_convert_official_reports_one_line_each_way(runs, tmp_path):
  to_export, back = runs['convert']
  assert to_export.returncode == 0 and back.returncode == 0, to_export.stderr + back.stderr
  assert _lines(to_export.stdout) == [to_export.stdout.strip()]
  assert to_export.stdout.startswith('Wrote the export ') and 'in.safetensors' in to_export.stdout
  assert _lines(back.stdout) == [back.stdout.strip()]
  assert back.stdout.startswith('Wrote the official checkpoint ') and 'back.pth' in back.stdout
  for result in (to_export, back):  # Neither JAX's TPU probe nor any other INFO line of a library.
    assert not ABSL_INFO_LINE.search(result.stderr) and TPU_PROBE_LINE not in result.stderr, result.stderr


def test_startup_without_tpu_line(runs):
  """The TPU probe's line appears on this machine without the filter, and not from an entry point (it has it)."""
  if TPU_PROBE_LINE not in runs['unquieted start'].stderr:
    pytest.skip('JAX logs no failed TPU probe here (a TPU machine, or JAX_PLATFORMS set): nothing to silence.')
  for result in runs['convert']:
    assert TPU_PROBE_LINE not in result.stderr


def test_quiet_startup_noise_drops_only_the_tpu_probe_line():
  import logging  # pylint: disable=g-import-not-at-top
  from ffsd_jax import run_record  # pylint: disable=g-import-not-at-top
  run_record.quiet_startup_noise()
  run_record.quiet_startup_noise()  # Idempotent: one filter.
  logger = logging.getLogger('jax._src.xla_bridge')
  assert sum(isinstance(f, run_record._TpuProbeFilter) for f in logger.filters) == 1  # pylint: disable=protected-access

  def shown(level: int, message: str) -> bool:
    return logger.filter(logger.makeRecord(logger.name, level, __file__, 1, message, (), None))

  assert not shown(logging.INFO, "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: ...")
  assert shown(logging.INFO, "Unable to initialize backend 'cuda': no GPU")  # A plugin that fails: kept.
  assert shown(logging.WARNING, "Unable to initialize backend 'tpu': something real")
  assert shown(logging.WARNING, 'An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not '
               'installed. Falling back to cpu.')
