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
