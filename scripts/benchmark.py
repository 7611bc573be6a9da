r"""Train-step benchmark: compile time, step time, images/s, FLOP utilisation and memory, FFSD vs independent.

For one config it measures the jitted train step for every (method, compute dtype, batch size) combination asked for
and prints one line per measurement; with --output it also writes them as JSON. A method's overhead ratio is its step
time divided by the `--baseline` method's (default `independent`: FFSD's students and leader with cross-entropy
alone) under the same dtype and batch size; for FFSD it is the FFSD overhead ratio.

`--devices` and `--network_parallelism` time the same step on several mesh shapes in one run (devices = data ×
networks; e.g. 1 device, the batch split over 3, and the networks split over 3), `--batch_norm_statistics` both
batch-norm modes; every result records its mesh, its collectives by kind and the compiled memory per device.

Data come from the synthetic source by default (compute-bound figures); `--data=real` feeds the configured real
pipeline through the same loop, so input-bound figures are visible too.

A bad flag or config is one line on stderr and exit status 2, before anything is compiled (main.py's checks); a
failure while measuring is one line and status 1; --verbosity=1 adds the traceback.

Examples:
  python scripts/benchmark.py --config configs/cifar100_resnet32.py
  python scripts/benchmark.py --config configs/imagenet_resnet18.py --dtypes bfloat16 --batch_sizes 256 \
      --output /tmp/bench.json
  XLA_FLAGS=--xla_force_host_platform_device_count=3 python scripts/benchmark.py \
      --config configs/cifar100_resnet32.py --methods ffsd --dtypes float32 --devices 1,3 --network_parallelism 1,3
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Iterator

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ffsd_jax import compiled_stats  # pylint: disable=g-import-not-at-top
from ffsd_jax import config_checks
from ffsd_jax import data as data_lib
from ffsd_jax import errors
from ffsd_jax import methods
from ffsd_jax import program as program_lib
from ffsd_jax import run_record
from ffsd_jax import run_setup

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
_METHODS = flags.DEFINE_list('methods', ['ffsd', 'independent'], 'Methods to time side by side.')
_BASELINE = flags.DEFINE_string('baseline', 'independent', 'The method whose step time the others are divided by '
                                '(the overhead ratio).')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes to time.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', None, 'Global batch sizes (default: the config\'s).')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per measurement (after warm-up).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
_DATA = flags.DEFINE_enum('data', 'synthetic', ['synthetic', 'real'], 'Where batches come from.')
_OUTPUT = flags.DEFINE_string('output', None, 'Write the measurements to this JSON file.')
_DEVICES = flags.DEFINE_list('devices', None, 'Device counts to time on (the first N devices; default: all).')
_NETWORK_PARALLELISM = flags.DEFINE_list('network_parallelism', ['1'], 'Sizes of the networks mesh axis to time '
                                         '(each with every device count it divides).')
_BATCH_NORM_STATISTICS = flags.DEFINE_list('batch_norm_statistics', ['global'], "'global' and/or 'device'.")
# Checked while the flags are parsed, so a typo stops the run before anything compiles (one line, exit status 2).
flags.register_validator('methods', lambda names: set(names) <= set(methods.method_names()),
                         f'--methods: each must be one of {", ".join(methods.method_names())}')
flags.register_validator('dtypes', lambda names: set(names) <= set(config_checks.COMPUTE_DTYPES),
                         f'--dtypes: each must be one of {", ".join(config_checks.COMPUTE_DTYPES)}')
flags.register_validator('batch_sizes', lambda sizes: sizes is None or all(s.isdigit() and int(s) > 0 for s in sizes),
                         '--batch_sizes: positive integers, comma-separated')


def _peak_memory_bytes(device: jax.Device) -> tuple[int | None, str]:
  stats = device.memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device peak_bytes_in_use'
  # CPU devices have no allocator statistics: report the process's peak resident set instead.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'process max RSS (CPU)'


def _batches(config, batch_size: int, info, data: str):
  """Yields host batches without end: a fixed synthetic one, or the real pipeline's."""
  if data == 'synthetic':
    rng = np.random.default_rng(0)
    batch = {
        'image': rng.integers(0, 256, (batch_size, info.image_size, info.image_size, 3), dtype=np.uint8),
        'label': rng.integers(0, info.num_classes, (batch_size,), dtype=np.int32),
    }
    while True:
      yield batch
  else:
    iterator = data_lib.create_train_iterator(
        config, global_batch_size=batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), seed=config.seed)
    while True:
      yield next(iterator)


@dataclasses.dataclass
class CompiledStep:
  """The training loop's program (`ffsd_jax.program`) compiled for one setting, with its state and a batch source."""
  config: Any
  program: program_lib.TrainingProgram
  compiled: Any
  state: Any
  metric_sums: Any
  batches: Iterator[dict[str, np.ndarray]]
  compile_s: float
  flops_per_device: float | None
  compiler_options: dict[str, Any]

  @property
  def mesh(self) -> Any:
    return self.program.mesh

  def run(self, num_steps: int) -> list[float]:
    """Runs `num_steps` steps (state carried over); returns each one's seconds, batch placement excluded."""
    times = []
    for _ in range(num_steps):
      batch = self.program.global_batch(next(self.batches))
      start = time.perf_counter()
      self.state, self.metric_sums = self.compiled(self.state, self.metric_sums, batch)
      jax.block_until_ready((self.state, self.metric_sums))
      times.append(time.perf_counter() - start)
    return times


@dataclasses.dataclass(frozen=True)
class Mesh:
  """The devices of one measurement: the first `devices` devices, `network_parallelism` of them per network group."""
  devices: int
  network_parallelism: int = 1
  batch_norm_statistics: str = 'global'


def compile_step(config, method: str, dtype: str, batch_size: int, data: str = 'synthetic',
                 mesh: Mesh | None = None) -> CompiledStep:
  """Builds and compiles the training program for one setting (`data`: 'synthetic' or 'real'; `mesh`: default every
  device, data parallel)."""
  mesh = mesh or Mesh(jax.device_count())
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.method = method
    config.compute_dtype = dtype
    config.batch_size = batch_size
    config.network_parallelism = mesh.network_parallelism
    config.batch_norm_statistics = mesh.batch_norm_statistics
  if data == 'synthetic':
    with config.unlocked():
      config.dataset = 'synthetic'
  program = program_lib.build(run_setup.build(config, devices=jax.devices()[:mesh.devices]))
  state = program.init_state()
  batches = _batches(program.setup.config, batch_size, program.setup.info, data)
  start = time.perf_counter()
  compiled = program.lower(state).compile()
  compile_s = time.perf_counter() - start
  return CompiledStep(config, program, compiled, state, program.metric_sums(), batches, compile_s,
                      run_record.compiled_flops(compiled), program.compiler_options or {})


def measure(config, method: str, dtype: str, batch_size: int, mesh: Mesh) -> dict[str, Any]:
  """Compiles and times the train step for one setting; returns the figures."""
  step = compile_step(config, method, dtype, batch_size, _DATA.value, mesh)
  num_devices = step.mesh.devices.size
  # XLA's cost analysis of a partitioned program counts the FLOPs of one device's share.
  flops_per_device = step.flops_per_device
  flops = None if flops_per_device is None else flops_per_device * num_devices
  step.run(1 + _WARMUP.value)  # The first call and the warm-up are not timed.
  times = step.run(_STEPS.value)
  config, compiler_options, compile_s = step.config, step.compiler_options, step.compile_s

  device = jax.devices()[0]
  median = statistics.median(times)
  peak_memory, memory_source = _peak_memory_bytes(device)
  compiled_memory = compiled_stats.memory_per_device(step.compiled)
  result = {
      'model': config.model, 'method': method, 'dtype': dtype, 'batch_size': batch_size, 'data': _DATA.value,
      'num_devices': num_devices, 'mesh': dict(step.mesh.shape), 'batch_norm_statistics': mesh.batch_norm_statistics,
      'device_kind': device.device_kind,
      'compiler_options': compiler_options or {}, 'compile_s': compile_s,
      'step_s_median': median, 'step_s_min': min(times), 'step_s_max': max(times), 'timed_steps': len(times),
      'images_per_s': batch_size / median, 'images_per_s_per_device': batch_size / median / num_devices,
      'step_gflops': None if flops is None else flops / 1e9,
      'achieved_tflops': None if flops is None else flops / median / 1e12,
      'peak_memory_gib': peak_memory / 2**30, 'peak_memory_source': memory_source,
      # What the compiler planned, per device (XLA's buffer assignment; None where the backend has no analysis),
      # and the collectives one step issues, by kind (ffsd_jax/compiled_stats.py).
      'compiled_memory_per_device': compiled_memory,
      'compiled_peak_memory_gib_per_device': (None if compiled_memory['peak_bytes'] is None
                                              else compiled_memory['peak_bytes'] / 2**30),
      'collectives': compiled_stats.collectives(step.compiled),
  }
  peak = run_record.peak_flops_per_sec(device, dtype)
  if peak is not None and flops_per_device is not None:
    result['share_of_peak'] = flops_per_device / median / peak
  return result


def _write(results: list[dict[str, Any]]) -> None:
  """Writes the measurements so far (after each one, so a run cut short keeps what it measured)."""
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w') as f:
      json.dump({'jax_version': jax.__version__, 'python': platform.python_version(), 'results': results}, f,
                indent=1)


def main(argv: list[str]) -> None:
  del argv
  with errors.report_errors(verbose=flags.FLAGS.verbosity >= 1):
    benchmark(_CONFIG.value)


def _meshes() -> list[Mesh]:
  """Every (device count, networks axis, batch-norm mode) asked for where the axis divides the devices."""
  device_counts = [int(d) for d in (_DEVICES.value or [jax.device_count()])]
  if any(not 1 <= d <= jax.device_count() for d in device_counts):
    raise errors.UsageError(f'--devices={",".join(_DEVICES.value)}: each must lie in [1, {jax.device_count()}] (the '
                            'devices this process sees; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N).')
  return [Mesh(d, int(k), bn) for d in device_counts for k in _NETWORK_PARALLELISM.value
          for bn in _BATCH_NORM_STATISTICS.value if d % int(k) == 0 and (bn == 'global' or d // int(k) > 1)]


def benchmark(config) -> None:
  """Measures every (dtype, batch size, mesh, method) asked for, printing each and the overhead ratios."""
  batch_sizes = [int(b) for b in (_BATCH_SIZES.value or [config.batch_size])]
  print(f'# jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, '
        f'python {platform.python_version()}, config model={config.model}, data={_DATA.value}', flush=True)
  results = []
  for dtype in _DTYPES.value:
    for batch_size in batch_sizes:
      for mesh in _meshes():
        if batch_size % (mesh.devices // mesh.network_parallelism):
          print(f'# skipped: batch {batch_size} does not split over the {mesh.devices // mesh.network_parallelism} '
                f'data shards of {mesh}', flush=True)
          continue
        _measure_methods(config, dtype, batch_size, mesh, results)
  _write(results)


def _measure_methods(config, dtype: str, batch_size: int, mesh: Mesh, results: list[dict[str, Any]]) -> None:
  """Every method on one setting, then each one's overhead ratio against the baseline method."""
  by_method = {}
  for method in _METHODS.value:
    result = measure(config, method, dtype, batch_size, mesh)
    by_method[method] = result
    results.append(result)
    print(json.dumps(result), flush=True)
    _write(results)
  baseline = by_method.get(_BASELINE.value)
  for method, result in by_method.items():
    if baseline is None or method == _BASELINE.value:
      continue
    ratio = result['step_s_median'] / baseline['step_s_median']
    result['overhead_ratio'] = ratio
    print(f'# {config.model} {dtype} batch {batch_size} mesh {result["mesh"]}: {method} overhead ratio {ratio:.3f} '
          f'({method} {result["step_s_median"]*1e3:.1f} ms, '
          f'{_BASELINE.value} {baseline["step_s_median"]*1e3:.1f} ms)', flush=True)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  run_record.quiet_startup_noise()
  app.run(main, flags_parser=config_checks.parse_flags)
