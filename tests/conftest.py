"""Test setup: 8 simulated CPU devices and a persistent compilation cache.

The XLA flag must be set before JAX initialises its backends, so it is set here at import time. Tests that do not
shard anything simply run on the first device.
"""

import os
import pathlib
import sys

os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
# CPU by default; FFSD_TEST_PLATFORMS=cuda,cpu runs the suite with the GPU as the default backend (gpu_check.sh).
os.environ.setdefault('JAX_PLATFORMS', os.environ.get('FFSD_TEST_PLATFORMS', 'cpu'))

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / 'shared' / 'data'
sys.path.insert(0, str(REPO_ROOT))

# Compiling dominates small tests on a 2-core CPU; the cache makes repeated compilations (within a run and across
# runs on the same machine) cheap.
jax.config.update('jax_compilation_cache_dir', os.environ.get(
    'FFSD_TEST_COMPILATION_CACHE', str(pathlib.Path.home() / '.cache' / 'ffsd_jax_test_xla')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def child_env(devices: int = 1, **overrides: str) -> dict[str, str]:
  """The environment of a child `main.py` or script: CPU with `devices` simulated devices, the repository importable,
  and the tests' compilation cache."""
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO_ROOT),
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or '', **overrides)


def report_lines(stderr: str) -> list[str]:
  """stderr less absl's log records and the lines they continue on (the parameter table): what a user reads as the
  error report of main.py or a script."""
  lines, in_record = [], False
  for line in stderr.splitlines():
    if line[:1] in 'IWEF' and line[1:5].isdigit():
      in_record = True
      continue
    if in_record and line.startswith('  '):
      continue
    in_record = False
    if line.strip():
      lines.append(line)
  return lines


def load_script(name: str):
  """Imports `scripts/<name>.py` as a module (the scripts are not a package).

  Several scripts define the same absl flags (`--config`, ...) at import time, on absl's one global registry; the
  flags of scripts imported earlier in this process are dropped first, so any order of test modules imports them.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if name not in sys.modules:
    scripts = {path.stem for path in (REPO_ROOT / 'scripts').glob('*.py')}
    stale = [flag.name for module, defined in flags.FLAGS.flags_by_module_dict().items() if module in scripts
             for flag in defined]
    for flag_name in stale:  # Collected first: deleting a flag changes absl's per-module lists.
      if flag_name in flags.FLAGS:
        delattr(flags.FLAGS, flag_name)
  sys.path.insert(0, str(REPO_ROOT / 'scripts'))
  try:
    return importlib.import_module(name)
  finally:
    sys.path.pop(0)


def pytest_configure(config):
  config.addinivalue_line('markers', 'multi_device: needs 8 devices of the default backend (8 simulated CPUs here)')


def pytest_collection_modifyitems(config, items):
  del config
  if jax.device_count() >= 8:
    return
  skip = pytest.mark.skip(reason=f'needs 8 devices; the default backend has {jax.device_count()}')
  for item in items:
    if 'multi_device' in item.keywords:
      item.add_marker(skip)


# Tests that read the real CIFAR-100 / ImageNet samples in SHARED_DATA, beside the repository rather than in it: in a
# clone without that folder they skip, and the terminal summary says so. (module file, test function) -> sample folder.
REAL_DATA_TESTS = {
    ('test_data.py', 'test_cifar100_real_samples_through_prepared_tfds'): 'cifar100-test-samples',
    ('test_data.py', 'test_reading_never_imports_tensorflow'): 'cifar100-test-samples',
    ('test_data.py', 'test_imagenet_real_samples_eval_and_train'): 'imagenet-samples',
}
_real_data_outcomes: dict[str, tuple[str, str]] = {}  # nodeid -> (outcome, skip reason)


def _is_real_data_test(report) -> bool:
  path, _, name = report.nodeid.partition('::')
  key = (pathlib.PurePath(path).name, name.split('[')[0])
  skip_reason = str(report.longrepr[-1]) if report.skipped and isinstance(report.longrepr, tuple) else ''
  return key in REAL_DATA_TESTS or str(SHARED_DATA) in skip_reason


def pytest_runtest_logreport(report):
  """Records the outcome of every real-data test (a skip or failure in any phase wins over a passed call)."""
  if not _is_real_data_test(report):
    return
  previous = _real_data_outcomes.get(report.nodeid, ('passed', ''))
  if report.failed:
    _real_data_outcomes[report.nodeid] = ('failed', '')
  elif report.skipped and previous[0] != 'failed':
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ''
    _real_data_outcomes[report.nodeid] = ('skipped', reason.removeprefix('Skipped: '))
  elif report.nodeid not in _real_data_outcomes:
    _real_data_outcomes[report.nodeid] = previous


def pytest_terminal_summary(terminalreporter):
  """Lists which real-data tests ran and which skipped because the samples are not there."""
  if not _real_data_outcomes:
    return
  terminalreporter.write_sep('-', 'real CIFAR-100 / ImageNet sample tests')
  for nodeid, (outcome, reason) in sorted(_real_data_outcomes.items()):
    line = f'{outcome.upper():8s}{nodeid}'
    terminalreporter.write_line(line + (f'  ({reason})' if reason else ''))
  if any(outcome == 'skipped' for outcome, _ in _real_data_outcomes.values()):
    terminalreporter.write_line(
        f'These tests read samples from {SHARED_DATA}, outside the repository, and skip where it is missing; the '
        'other data tests use synthetic and generated images.')


TINY_RUN_STEPS = 6


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """(workdir, summary) of a 6-step FFSD run of `test_sharding.tiny_config`, trained once per session.

  Tests read it, or copy it before damaging or extending it. It is compiled as the `fast_compilation` fixture of the
  modules that use it compiles (session fixtures are set up before module ones), so resumed runs there match it.
  """
  from test_sharding import tiny_config  # pylint: disable=g-import-not-at-top
  from ffsd_jax import train_loop  # pylint: disable=g-import-not-at-top
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  try:
    workdir = tmp_path_factory.mktemp('tiny_run')
    summary = train_loop.train_and_evaluate(tiny_config(max_steps=TINY_RUN_STEPS), str(workdir))
  finally:
    jax.config.update('jax_disable_most_optimizations', previous)
  return workdir, summary
