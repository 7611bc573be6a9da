r"""Reliability costs: the state guard, and writing and verifying the checkpoint manifest, for real train states.

For each config, the FFSD train state (params, batch stats and optimizer state, shapes from `jax.eval_shape`) is filled
with random values, saved once through `ffsd_jax.checkpointing` (Orbax, asynchronous, as the training loop saves), and
then timed:
  save            `checkpointing.save` + `wait_until_finished` (Orbax's write, then the manifest in its finalize thread)
  write_manifest  hashing every file of the step and writing `ffsd_manifest.json` atomically
  verify          `checkpointing.verify_checkpoint`, what every restore runs first
  restore         Orbax's restore of the train state alone, for scale
  sha256, blake2b one thread over the same files, to compare the hashlib digests
  state_guard     `state_guard.nonfinite_leaves`: the on-device finiteness check run before every save and after
                  every restore (first call with its compilation, then the median)
The files were just written, so they are read from the page cache: the figures are the CPU cost of hashing, the floor
of what a restore adds (from a cold disk, reading the files dominates and Orbax reads them too).

A config file that is missing is one line on stderr and exit status 2 before anything runs; a failure while measuring
(a full disk, ...) is one line and status 1; --verbosity=1 adds the traceback. Orbax's INFO lines are left out.

Examples:
  python scripts/benchmark_reliability.py
  python scripts/benchmark_reliability.py --configs=configs/cifar100_resnet32.py --repeats=5
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ffsd_jax import checkpointing  # pylint: disable=g-import-not-at-top
from ffsd_jax import config_checks
from ffsd_jax import errors
from ffsd_jax import run_record
from ffsd_jax import sharding as sharding_lib
from ffsd_jax import state_guard
from ffsd_jax import train_state as train_state_lib

_CONFIGS = flags.DEFINE_list('configs', ['configs/cifar100_resnet32.py', 'configs/imagenet_resnet18.py'],
                             'Config files whose FFSD train state is checkpointed.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repetitions of each measurement (the median is printed).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the checkpoints are written (default: a temporary folder, '
                               'removed afterwards).')

MB = 1e6


def load_config(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (configs/*.py import `configs.default`, so the repository root is on the path)."""
  spec = importlib.util.spec_from_file_location(f'_bench_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def abstract_train_state(config: ml_collections.ConfigDict) -> Any:
  """The train state's shapes and dtypes, replicated on the local mesh, without running the initialisers."""
  model = train_state_lib.create_model(config)
  # steps_per_epoch only sets the learning-rate schedule, not any shape.
  abstract = jax.eval_shape(lambda: train_state_lib.create_train_state(config, model, jax.random.key(0), 100))
  return sharding_lib.abstract_with_sharding(abstract, sharding_lib.create_mesh())


def random_train_state(abstract: Any, seed: int = 0) -> Any:
  """Arrays of the abstract state's shapes: random floats (incompressible, like trained weights), zero integers."""
  rng = np.random.default_rng(seed)

  def fill(leaf):
    if np.issubdtype(leaf.dtype, np.floating):
      value = rng.standard_normal(leaf.shape, dtype=np.float32).astype(leaf.dtype)
    else:
      value = np.zeros(leaf.shape, leaf.dtype)
    return jax.device_put(value, leaf.sharding)

  return jax.tree.map(fill, abstract)


def state_megabytes(abstract: Any) -> float:
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract)) / MB


def step_megabytes(step_dir: str) -> tuple[float, int]:
  """Bytes and number of the files a manifest covers."""
  files = checkpointing._step_files(step_dir)  # pylint: disable=protected-access
  return sum(os.path.getsize(os.path.join(step_dir, f)) for f in files) / MB, len(files)


def median_seconds(fn: Callable[[], Any], repeats: int, before: Callable[[], Any] | None = None) -> float:
  """The median wall time of `fn` over `repeats` runs (`before` runs untimed before each)."""
  times = []
  for _ in range(repeats):
    if before is not None:
      before()
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_save(workdir: str, state: Any, config: ml_collections.ConfigDict) -> tuple[str, float]:
  """Saves step 1 as the training loop does; returns the step folder and the seconds until it and its manifest are
  on disk."""
  manager = checkpointing.create_manager(workdir)
  start = time.perf_counter()
  checkpointing.save(manager, 1, state, iterator_states={'0': {}}, loop_state={}, config=config)
  manager.wait_until_finished()
  seconds = time.perf_counter() - start
  manager.close()
  return checkpointing.checkpoint_path(manager, 1), seconds


def time_write_manifest(step_dir: str, repeats: int) -> float:
  manifest = os.path.join(step_dir, checkpointing.MANIFEST_FILE)
  return median_seconds(lambda: checkpointing.write_manifest(step_dir, 1), repeats,
                        before=lambda: os.path.exists(manifest) and os.remove(manifest))


def time_verify(step_dir: str, repeats: int) -> float:
  # Forget earlier verifications: a step verified in this process is not hashed again while its files are unchanged.
  return median_seconds(lambda: checkpointing.verify_checkpoint(step_dir), repeats,
                        before=checkpointing._verified.clear)  # pylint: disable=protected-access


def time_hash_algorithm(step_dir: str, algorithm: str, repeats: int) -> float:
  """One thread hashing every file of the step with `algorithm`."""
  paths = [os.path.join(step_dir, f) for f in checkpointing._step_files(step_dir)]  # pylint: disable=protected-access

  def hash_all():
    for path in paths:
      with open(path, 'rb') as f:
        hashlib.file_digest(f, algorithm)

  return median_seconds(hash_all, repeats)


def time_orbax_restore(workdir: str, abstract: Any, repeats: int) -> float:
  """Orbax's restore of the train state alone (no verification), for scale."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = checkpointing.create_manager(workdir, read_only=True)

  def restore():
    state = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))['state']
    jax.block_until_ready(state)

  seconds = median_seconds(restore, repeats)
  manager.close()
  return seconds


def time_state_guard(state: Any, repeats: int) -> tuple[float, float]:
  """(first call including compilation, median of the later calls) of the state guard, in seconds."""
  start = time.perf_counter()
  assert state_guard.nonfinite_leaves(state) == []
  first = time.perf_counter() - start
  return first, median_seconds(lambda: state_guard.nonfinite_leaves(state), repeats)


def benchmark_config(path: str, root: str, repeats: int) -> None:
  """Prints one line per measurement for the train state of the config at `path`."""
  config = load_config(path)
  abstract = abstract_train_state(config)
  state = random_train_state(abstract)
  workdir = os.path.join(root, os.path.splitext(os.path.basename(path))[0])
  step_dir, save_seconds = time_save(workdir, state, config)
  guard_first, guard_seconds = time_state_guard(state, repeats)
  del state
  megabytes, num_files = step_megabytes(step_dir)
  print(f'{path}: {config.model} {config.method}, train state {state_megabytes(abstract):.1f} MB in arrays, '
        f'checkpoint step {megabytes:.1f} MB in {num_files} files')

  def line(name: str, seconds: float, note: str = '') -> None:
    print(f'  {name:<15} {seconds:8.3f} s  {megabytes / seconds:8.0f} MB/s{note}')

  line('save', save_seconds, '  (one save, manifest included)')
  line('write_manifest', time_write_manifest(step_dir, repeats))
  verify_seconds = time_verify(step_dir, repeats)
  line('verify', verify_seconds)
  restore_seconds = time_orbax_restore(workdir, abstract, repeats)
  line('restore', restore_seconds, f'  (Orbax alone; verify adds {100 * verify_seconds / restore_seconds:.0f}%)')
  for algorithm in ('sha256', 'blake2b'):
    line(algorithm, time_hash_algorithm(step_dir, algorithm, repeats), '  (one thread)')
  print(f'  {"state_guard":<15} {guard_seconds:8.3f} s  (first call with compilation {guard_first:.3f} s; '
        f'{len(jax.tree.leaves(abstract))} leaves)')


def check_config_files(paths: list[str]) -> None:
  """Raises config_checks.ConfigError (exit status 2) naming every path of --configs that is not a file."""
  missing = [path for path in paths if not os.path.isfile(path)]
  if missing:
    raise config_checks.ConfigError(f'--configs: no config file {", ".join(missing)}.')


def main(argv: list[str]) -> None:
  del argv
  logging.get_absl_handler().addFilter(run_record.QuietOrbaxFilter())  # Several INFO lines per save and restore.
  with errors.report_errors(verbose=flags.FLAGS.verbosity >= 1):
    check_config_files(_CONFIGS.value)
    run_benchmarks()


def run_benchmarks() -> None:
  """Benchmarks every config of --configs, in a temporary folder unless --workdir names one."""
  print(f'{os.cpu_count()} CPUs, jax {jax.__version__} on {jax.devices()[0].platform}, median of {_REPEATS.value}')
  root = _WORKDIR.value or tempfile.mkdtemp(prefix='ffsd_reliability_')
  try:
    for path in _CONFIGS.value:
      benchmark_config(path, root, _REPEATS.value)
  finally:
    if _WORKDIR.value is None:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  run_record.quiet_startup_noise()
  app.run(main)
