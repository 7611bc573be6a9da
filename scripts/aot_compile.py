r"""Compile the real training step for a GPU or TPU target on this (CPU) machine: does it compile, fit, and what runs.

Builds the training program exactly as the training loop does (`run_setup.build` and `program.build`), with the
mesh made of a compile-only target's devices instead of this machine's, compiles its train step with the target's
XLA compiler, and reports per target, as one JSON object on stdout (and in --output): the mesh, the compile time,
the memory per device and whether it fits the target's memory, the FLOPs per device, the kernels per step and the
collectives by kind (ffsd_jax/compiled_stats.py). Nothing runs: no accelerator is needed.

Targets:
  --target h100 --devices N   NVIDIA GPUs described by ffsd_jax/targets/<name>.textproto (XLA's GPU target
                              description); N devices, 8 per host beyond 8 (N a multiple of 8 then).
  --target tpu:v5e:2x2        any topology name libtpu knows (tpu:v4:2x2x1, tpu:v5p:2x2x1, tpu:v6e:4x4; multi-host
                              slices such as tpu:v5e:4x4 compile as one program).

The dataset is never read: the script sets dataset=synthetic with the real dataset's class count, normalisation and
training-set size, so the program has the real shapes and schedule. Nothing is autotuned (no device): the GPU
compiler picks its default kernels (--xla_gpu_autotune_level=0).

Needs `pip install --no-deps -r requirements-aot.txt` (the jax-cuda12 plugin and PJRT library, libtpu).

Errors are one line on stderr (an unknown target or bad --devices: status 2; missing wheels, a failed compile:
status 1); --verbosity=1 adds the traceback.

Examples:
  python scripts/aot_compile.py --config configs/cifar100_resnet32.py --target h100 --devices 4
  python scripts/aot_compile.py --config configs/imagenet_resnet18.py --target tpu:v5e:4x4 --output /tmp/v5e.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import platform
import re
import sys
import tempfile
import time
from typing import Any, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ffsd_jax import errors  # pylint: disable=g-import-not-at-top  (imports no JAX)


@contextlib.contextmanager
def native_stderr_quieted(quiet: bool = True) -> Iterator[None]:
  """Silences what native libraries print on file descriptor 2 while they load: with requirements-aot.txt installed,
  `import jax` loads the CUDA plugin, whose "Could not find cuda drivers" lines and absl's pre-initialisation notices
  are no error on a machine without a GPU and would bury the script's one-line errors. Python exceptions are raised,
  not printed, inside, so none is lost."""
  if not quiet:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


with native_stderr_quieted(not errors.verbose_from_argv()):
  # pylint: disable=g-import-not-at-top,g-bad-import-order
  from absl import app
  from absl import flags
  import jax
  import jaxlib
  from ml_collections import config_flags

  from ffsd_jax import compiled_stats
  from ffsd_jax import config_checks
  from ffsd_jax import program as program_lib
  from ffsd_jax import run_record
  from ffsd_jax import run_setup
  # pylint: enable=g-import-not-at-top,g-bad-import-order

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
_TARGET = flags.DEFINE_string('target', None, 'A GPU described in ffsd_jax/targets/ (e.g. h100) or '
                              'tpu:<topology> (e.g. tpu:v5e:2x2).')
_DEVICES = flags.DEFINE_integer('devices', None, 'GPU targets: the number of GPUs (default 1). TPU targets: '
                                'optional, checked against the topology\'s device count.')
_OUTPUT = flags.DEFINE_string('output', None, 'Also write the report to this JSON file.')

TARGETS_DIR = pathlib.Path(__file__).resolve().parents[1] / 'ffsd_jax' / 'targets'
INSTALL_HINT = 'pip install --no-deps -r requirements-aot.txt'
GPUS_PER_HOST = 8
# HBM per chip by the device_kind libtpu gives: Google's published figures (GB), read as GiB. Chips whose two
# TensorCores are two devices (v2, v3 and v4 as libtpu describes them here) share it.
TPU_HBM_GIB_PER_CHIP = {'TPU v2': 16, 'TPU v3': 32, 'TPU v4': 32, 'TPU v5': 95, 'TPU v5 lite': 16, 'TPU v6 lite': 32}
# The accelerator types libtpu expects in TPU_ACCELERATOR_TYPE, by generation; counts are chips (v5e, v6e) or
# TensorCores (2 per chip) as Cloud TPU names them. Set only to quiet libtpu's start-up warnings.
_ACCELERATOR_TYPES = {'v2': ('v2', 2), 'v3': ('v3', 2), 'v4': ('v4', 2), 'v5p': ('v5p', 2), 'v5e': ('v5litepod', 1),
                      'v6e': ('v6e', 1)}
# The CUDA plugin's own memory-size figure in the target description.
_DEVICE_MEMORY = re.compile(r'^\s*device_memory_size:\s*(\d+)', re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Target:
  """A compile-only target: its name as given, the PJRT platform, and the topology string that platform takes."""
  name: str
  platform: str  # 'cuda' | 'tpu'
  topology: str  # cuda: '<slices>x<hosts>x<devices per host>'; tpu: libtpu's name, e.g. 'v5e:2x2'.
  gpu_description: str | None = None  # cuda: the text of XLA's GpuTargetConfigProto.
  requested_devices: int | None = None  # --devices, checked against a TPU topology's count once it is known.


def gpu_target_names() -> list[str]:
  """The GPU targets: the names of the descriptions in ffsd_jax/targets/ (h100.textproto -> 'h100')."""
  return sorted(path.stem for path in TARGETS_DIR.glob('*.textproto'))


def parse_target(name: str, devices: int | None) -> Target:
  """The target named by --target and --devices, checked before anything is imported or compiled.

  Raises:
    errors.UsageError: an unknown target, or a device count the target cannot have.
  """
  if devices is not None and devices < 1:
    raise errors.UsageError(f'--devices={devices}: must be at least 1.')
  if name.startswith('tpu:'):
    topology = name[len('tpu:'):]
    if not re.fullmatch(r'[A-Za-z0-9_]+[:_=][0-9x]+(_twisted|_untwisted)?', topology):
      raise errors.UsageError(f'--target={name}: a TPU target is tpu:<generation>:<topology>, e.g. tpu:v5e:2x2 or '
                              'tpu:v4:2x2x1.')
    return Target(name, 'tpu', topology, requested_devices=devices)
  if name not in gpu_target_names():
    raise errors.UsageError(
        f'--target={name}: unknown target; use a GPU described in {TARGETS_DIR} ({", ".join(gpu_target_names())}) '
        'with --devices N, or tpu:<topology> such as tpu:v5e:2x2.')
  count = devices or 1
  if count <= GPUS_PER_HOST:
    topology = f'1x1x{count}'
  elif count % GPUS_PER_HOST == 0:
    topology = f'1x{count // GPUS_PER_HOST}x{GPUS_PER_HOST}'
  else:
    raise errors.UsageError(f'--devices={count}: beyond {GPUS_PER_HOST} GPUs (one host) the count must be a multiple '
                            f'of {GPUS_PER_HOST} (hosts of {GPUS_PER_HOST} GPUs).')
  return Target(name, 'cuda', topology, (TARGETS_DIR / f'{name}.textproto').read_text())


def _check_wheels(target: Target) -> None:
  """Raises errors.UserError naming requirements-aot.txt when the target's compiler is not installed."""
  needed = {'cuda': ('jax_plugins.xla_cuda12', 'jax_cuda12_plugin'), 'tpu': ('libtpu',)}[target.platform]
  missing = [module for module in needed if importlib.util.find_spec(module.split('.')[0]) is None or
             importlib.util.find_spec(module) is None]
  if missing:
    what = 'the jax-cuda12 plugin and PJRT library' if target.platform == 'cuda' else 'libtpu'
    raise errors.UserError(f'Compiling for {target.name} needs {what} (missing: {", ".join(missing)}): '
                           f'{INSTALL_HINT}, at the versions pinned there for jax {jax.__version__}.')


def _tpu_environment(topology: str) -> None:
  """Sets (unless set) what libtpu reads at start-up, so that a compile-only start on a non-TPU machine is quiet."""
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  generation, _, shape = topology.partition(':')
  if generation in _ACCELERATOR_TYPES and shape:
    prefix, cores_per_chip = _ACCELERATOR_TYPES[generation]
    chips = math.prod(int(side) for side in shape.split('_')[0].split('x'))
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', f'{prefix}-{chips * cores_per_chip}')


def target_devices(target: Target, quiet: bool = True) -> list[Any]:
  """The compile-only devices of `target` (`jax.experimental.topologies`)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  _check_wheels(target)
  if target.platform == 'tpu':
    _tpu_environment(target.topology)  # Before libtpu is loaded.
  with native_stderr_quieted(quiet):
    jax.devices('cpu')  # Starts the backends and registers the plugins while the native start-up noise is hidden.
    if target.platform == 'tpu':
      try:
        return list(topologies.get_topology_desc(topology_name=target.topology, platform='tpu').devices)
      except Exception as error:  # pylint: disable=broad-except
        # libtpu rejects an unknown generation or shape as an invalid argument, saying which; anything else is not
        # the command line's fault and keeps its traceback.
        if 'INVALID_ARGUMENT' not in str(error):
          raise
        raise errors.UsageError(f'--target={target.name}: libtpu does not know this topology: '
                                f'{errors.one_line(error)}') from error
    return list(topologies.get_topology_desc(platform='cuda', target_config=target.gpu_description,
                                             topology=target.topology).devices)


def memory_per_device_bytes(target: Target, devices: list[Any]) -> int | None:
  """The target's memory per device: the GPU description's figure, or a TPU chip's HBM over its devices."""
  if target.platform == 'cuda':
    match = _DEVICE_MEMORY.search(target.gpu_description or '')
    return int(match.group(1)) if match else None
  hbm_gib = TPU_HBM_GIB_PER_CHIP.get(devices[0].device_kind)
  if hbm_gib is None:
    return None
  chips = len({tuple(getattr(device, 'coords', (device.id,))) for device in devices})
  return hbm_gib * 2**30 * chips // len(devices)


# The real datasets' class counts, normalisations and training-set sizes, so that the synthetic stand-in gives the
# program the same shapes and the same learning-rate schedule (steps per epoch).
_DATASETS = {'cifar10': (10, 'cifar10', 50_000), 'cifar100': (100, 'cifar100', 50_000),
             'imagenet2012': (1000, 'imagenet', 1_281_167)}


def synthetic_config(config: Any) -> Any:
  """A copy of `config` that reads no data: dataset=synthetic with the real dataset's shapes.

  Raises:
    errors.UsageError: num_classes=0 (the dataset's own count) for a dataset whose count is not known here.
  """
  config = config.copy_and_resolve_references()
  num_classes, normalization, num_train = _DATASETS.get(config.dataset, (None, None, None))
  with config.unlocked():
    if not config.num_classes:
      if num_classes is None:
        raise errors.UsageError(f'config.dataset={config.dataset} with num_classes=0: the class count is read from '
                                'the data, which this script does not read; set --config.num_classes.')
      config.num_classes = num_classes
    if normalization and not config.get('normalization'):
      config.normalization = normalization
    if num_train:
      config.synthetic_num_train_examples = num_train
    config.dataset = 'synthetic'
  return config


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """The training program built on a target's devices and its train step, lowered and compiled."""
  program: program_lib.TrainingProgram
  lowered: Any  # jax.stages.Lowered
  compiled: Any  # jax.stages.Compiled
  lower_s: float  # Tracing and lowering the step.
  compile_s: float  # The target's XLA compiler alone.


def compile_program(config: Any, target: Target, quiet: bool = True) -> CompiledStep:
  """Builds the training program of `config` (on synthetic data) on `target`'s devices and compiles its train step.

  Raises:
    errors.UserError: the target's compiler is not installed, or `config` cannot be built (errors.UsageError: a
      device count or topology the target does not have).
  """
  devices = target_devices(target, quiet)
  if target.requested_devices not in (None, len(devices)):
    raise errors.UsageError(f'--devices={target.requested_devices}: {target.name} has {len(devices)} devices.')
  # The same code path as training: only the mesh's devices differ (run_setup.build's `devices`).
  program = program_lib.build(run_setup.build(synthetic_config(config), devices=devices))
  # Nothing can be autotuned without a device: XLA:GPU keeps its default kernel choices.
  options = {'xla_gpu_autotune_level': 0} if target.platform == 'cuda' else None
  start = time.perf_counter()
  lowered = program.lower()
  lowered_at = time.perf_counter()
  with _no_persistent_cache_writes():
    compiled = lowered.compile(compiler_options=options)
  return CompiledStep(program, lowered, compiled, lowered_at - start, time.perf_counter() - lowered_at)


@contextlib.contextmanager
def _no_persistent_cache_writes() -> Iterator[None]:
  """Keeps the compile-only program out of JAX's persistent compilation cache: it is written there but cannot be
  read back without the device (every later run would warn and compile again), and it costs megabytes."""
  previous = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_persistent_cache_min_compile_time_secs', float('inf'))
  try:
    yield
  finally:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', previous)


def compile_for_target(config: Any, target: Target, quiet: bool = True) -> dict[str, Any]:
  """Compiles the train step of `config` for `target` and returns the report (`report`)."""
  return report(target, compile_program(config, target, quiet))


def _unpartitioned_flops(lowered: Any) -> float | None:
  """FLOPs of the whole (unpartitioned) step by XLA:CPU's cost analysis of the lowered program, for targets whose
  compiler gives no cost analysis (the compile-only GPU client)."""
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  try:
    analysis = _jax.hlo_module_cost_analysis(jax.devices('cpu')[0].client, lowered.compiler_ir('hlo').as_hlo_module())
  except Exception:  # pylint: disable=broad-except
    return None
  return float(analysis['flops']) if analysis and 'flops' in analysis else None


def report(target: Target, step: CompiledStep) -> dict[str, Any]:
  """The JSON-ready figures of one compiled train step on `target`.

  `fits`: whether the step's peak memory per device (arguments + outputs - donated outputs + temporaries, from XLA's
  buffer assignment; arguments + temporaries when every output is donated) is within the target's memory.
  """
  program, compiled = step.program, step.compiled
  config, mesh, devices = program.setup.config, program.mesh, list(program.mesh.devices.flat)
  memory = compiled_stats.memory_per_device(compiled)
  capacity = memory_per_device_bytes(target, devices)
  flops, flops_source = compiled_stats.flops(compiled), 'compiled program cost analysis (one device)'
  if flops is None:
    unpartitioned = _unpartitioned_flops(step.lowered)
    flops = None if unpartitioned is None else unpartitioned / len(devices)
    flops_source = ('XLA:CPU cost analysis of the unpartitioned step / devices (the target compiler gives none; '
                    'replicated work such as the optimizer update is split too)')
  fits = None if capacity is None or memory['peak_bytes'] is None else memory['peak_bytes'] <= capacity
  return {
      'target': target.name, 'platform': target.platform, 'topology': target.topology,
      'device_kind': devices[0].device_kind, 'devices': len(devices),
      'processes': len({device.process_index for device in devices}),
      'mesh_shape': dict(mesh.shape),
      'model': config.model, 'method': config.method, 'compute_dtype': config.compute_dtype,
      'batch_size': config.batch_size, 'batch_per_device': config.batch_size // int(mesh.shape['data']),
      'lower_s': round(step.lower_s, 2), 'compile_s': round(step.compile_s, 2),
      'memory_per_device': memory, 'memory_capacity_per_device_bytes': capacity, 'fits': fits,
      'flops_per_device': flops, 'flops_source': flops_source,
      'kernel_launches': compiled_stats.kernel_launches(compiled),
      'collectives': compiled_stats.collectives(compiled),
      'jax_version': jax.__version__, 'jaxlib_version': jaxlib.__version__, 'python': platform.python_version(),
      'date': time.strftime('%Y-%m-%d'),
  }


def main(argv: list[str]) -> None:
  """Compiles for --target and prints the report (one line on stderr and a non-zero status on an error)."""
  del argv
  verbose = flags.FLAGS.verbosity >= 1
  with errors.report_errors(verbose=verbose):
    target = parse_target(_TARGET.value, _DEVICES.value)
    result = compile_for_target(_CONFIG.value, target, quiet=not verbose)
    text = json.dumps(result, indent=1)
    if _OUTPUT.value:
      pathlib.Path(_OUTPUT.value).write_text(text + '\n')
    print(text, flush=True)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  flags.mark_flag_as_required('target')
  # Every target is compiled from the host's CPU backend: an accelerator of this machine, if any, is not used.
  jax.config.update('jax_platforms', 'cpu')
  run_record.quiet_startup_noise()
  app.run(main, flags_parser=config_checks.parse_flags)
