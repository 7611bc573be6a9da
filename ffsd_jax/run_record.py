"""What a workdir records about its runs, and the persistent compilation cache.

- `config.json`: the resolved config of the latest start (written atomically at every start and resume).
- `run_info.json`: a list with one entry per start or resume: command line, git commit and dirty flag of the code,
  package versions, devices and processes, host, start time, the step it started from, the compilation cache.
- `parameters.txt`: the full per-leaf parameter table (clu.parameter_overview); the console shows one line per network.

The model FLOP utilisation (MFU) helpers live here too, so the training loop and scripts/benchmark.py share one peak
table: FLOPs come from XLA's cost analysis of the compiled (partitioned, so per-device) step. So do the console's
filters: Orbax's log chatter (`QuietOrbaxFilter`, installed on absl's handler by main.py and the scripts) and JAX's
line about a missing TPU (`quiet_startup_noise`, called by every entry point before JAX starts its backends).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging as std_logging
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any, Mapping

from absl import logging
import jax
from jax.experimental.compilation_cache import compilation_cache
import ml_collections

from ffsd_jax import checkpointing
from ffsd_jax.data import sources

CONFIG_FILE = 'config.json'
RUN_INFO_FILE = 'run_info.json'
PARAMETERS_FILE = 'parameters.txt'
# Versions recorded in run_info.json (distribution names, as pip knows them).
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'ml_collections', 'grain', 'clu',
            'tensorboardX', 'tensorflow-datasets', 'array_record', 'jax-cuda12-plugin', 'libtpu')
# Compiles shorter than this are not worth a cache entry (JAX's default is 1 s; the eval steps of the small CIFAR
# models compile in about 0.5-1 s on CPU and are recompiled at every start, so they are kept too).
CACHE_MIN_COMPILE_SECS = 0.5

# Dense peak TFLOP/s per device by device-kind substring and compute dtype (vendor data sheets, SXM parts, no
# sparsity). float32 matmuls on Hopper/Ampere run as TF32 by default in XLA, so the TF32 peak is the ceiling.
PEAK_TFLOPS = {
    'H100': {'bfloat16': 989.0, 'float32': 494.7},
    'H200': {'bfloat16': 989.0, 'float32': 494.7},
    'A100': {'bfloat16': 312.0, 'float32': 156.0},
}


# ----------------------------------------------------------------------------------------------------------------------
# Compilation cache.


def default_cache_dir() -> str:
  """`$XDG_CACHE_HOME/ffsd_jax/jax`, or `~/.cache/ffsd_jax/jax` when XDG_CACHE_HOME is unset (beside the decoded-image
  cache, `sources.default_cache_root()/decoded`)."""
  return str(sources.default_cache_root() / 'jax')


def setup_compilation_cache(cache_dir: str | None) -> str | None:
  """Points JAX's persistent compilation cache at `cache_dir` (JAX's own settings); call it before anything compiles.

  Args:
    cache_dir: `config.jax_cache_dir`. None: JAX's own setting if one is made (JAX_COMPILATION_CACHE_DIR or
      jax.config), else `default_cache_dir()`. '': no cache. Otherwise that folder (`~` expanded).

  Returns:
    The cache folder in use, or None when there is none (turned off, or the folder cannot be created: warned).
  """
  if cache_dir is None:
    if jax.config.jax_compilation_cache_dir:
      return jax.config.jax_compilation_cache_dir  # The environment or the caller chose one: respected.
    cache_dir = default_cache_dir()
  path = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else None
  if path is not None:
    try:
      os.makedirs(path, exist_ok=True)
      if not os.access(path, os.W_OK):
        raise PermissionError('not writable')
    except OSError as error:
      logging.warning('Cannot use %s as the compilation cache (%s); continuing without a persistent cache (set '
                      '--config.jax_cache_dir to a writable folder, or to "" to silence this).', path, error)
      path = None
  previous = jax.config.jax_compilation_cache_dir
  if path != previous:
    jax.config.update('jax_compilation_cache_dir', path)
    if previous:
      # JAX opens its cache once per process: reset it so the new folder (or none) applies to the next compile.
      compilation_cache.reset_cache()
  if path is not None and 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', CACHE_MIN_COMPILE_SECS)
  return path


# ----------------------------------------------------------------------------------------------------------------------
# FLOPs and peaks.


def peak_flops_per_sec(device: jax.Device, dtype: str) -> float | None:
  """The device's dense peak FLOP/s for `dtype` ('float32' | 'bfloat16'), or None when unknown (CPUs, other GPUs)."""
  for kind, peaks in PEAK_TFLOPS.items():
    if kind in device.device_kind and dtype in peaks:
      return peaks[dtype] * 1e12
  return None


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled computation from XLA's cost analysis; per device for a partitioned one."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None  # Some backends do not implement it: MFU is then simply not reported.
  if isinstance(analysis, (list, tuple)):  # Older JAX returned one dict per computation.
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


# ----------------------------------------------------------------------------------------------------------------------
# Run information.


def _git_state(folder: str) -> dict[str, Any] | None:
  """{'commit', 'dirty'} of the git repository holding `folder`, or None outside git (or without a git binary)."""
  try:
    commit = subprocess.run(['git', '-C', folder, 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=10,
                            check=True).stdout.strip()
    status = subprocess.run(['git', '-C', folder, 'status', '--porcelain', '--untracked-files=no'],
                            capture_output=True, text=True, timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return {'commit': commit, 'dirty': bool(status.strip())}


def package_versions() -> dict[str, str]:
  """Installed versions of the packages in `PACKAGES` (missing ones are left out)."""
  versions = {'python': platform.python_version()}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def run_info_entry(*, start_step: int, total_steps: int, compilation_cache_dir: str | None,
                   step_flops: float | None = None) -> dict[str, Any]:
  """One `run_info.json` entry describing this start (or resume) of a run."""
  devices = jax.devices()
  now = time.time()
  code_folder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return {
      'start_time': now,
      'start_time_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now)),
      'command_line': [sys.executable] + sys.argv,
      'cwd': os.getcwd(),
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'start_step': int(start_step),
      'total_steps': int(total_steps),
      'git': _git_state(code_folder),
      'code_folder': code_folder,
      'packages': package_versions(),
      'platform': devices[0].platform,
      'device_kind': devices[0].device_kind,
      'device_count': jax.device_count(),
      'local_device_count': jax.local_device_count(),
      'process_count': jax.process_count(),
      'compilation_cache_dir': compilation_cache_dir,
      'step_flops_per_device': step_flops,
  }


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes the resolved config to `workdir/config.json`, atomically."""
  checkpointing.write_file_atomically(
      os.path.join(workdir, CONFIG_FILE), json.dumps(checkpointing.config_to_json(config), indent=2).encode())


def read_run_info(workdir: str) -> list[dict[str, Any]]:
  """The entries of `workdir/run_info.json` ([] when there is none)."""
  path = os.path.join(workdir, RUN_INFO_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def append_run_info(workdir: str, entry: Mapping[str, Any]) -> None:
  """Appends `entry` to `workdir/run_info.json` (rewritten atomically); an unreadable file is kept aside, not lost."""
  path = os.path.join(workdir, RUN_INFO_FILE)
  try:
    entries = read_run_info(workdir)
    if not isinstance(entries, list):
      raise ValueError('not a JSON list')
  except ValueError as error:
    aside = f'{path}.unreadable.{int(time.time())}'
    os.replace(path, aside)
    logging.warning('%s was not a JSON list (%s); moved to %s and started anew.', path, error, aside)
    entries = []
  entries.append(dict(entry))
  checkpointing.write_file_atomically(path, json.dumps(entries, indent=2).encode())


def update_last_run_info(workdir: str, values: Mapping[str, Any]) -> None:
  """Adds `values` to the last `run_info.json` entry (facts known only after the start, e.g. the step's FLOPs)."""
  entries = read_run_info(workdir)
  entries[-1].update(values)
  checkpointing.write_file_atomically(os.path.join(workdir, RUN_INFO_FILE), json.dumps(entries, indent=2).encode())


def network_parameter_lines(params: Mapping[str, Any]) -> list[str]:
  """One line per network (top-level key of the parameter tree): parameter count and bytes, then the total."""
  def count_and_bytes(tree):
    leaves = jax.tree.leaves(tree)
    return sum(int(x.size) for x in leaves), sum(int(x.size) * x.dtype.itemsize for x in leaves)

  width = max(len(name) for name in params)
  lines = []
  for name, subtree in params.items():
    count, size = count_and_bytes(subtree)
    lines.append(f'  {name:<{width}} {count:>13,} parameters {size:>15,} bytes')
  count, size = count_and_bytes(params)
  lines.append(f'  {"total":<{width}} {count:>13,} parameters {size:>15,} bytes')
  return lines


def write_parameter_table(workdir: str, params: Mapping[str, Any], title: str) -> str:
  """Writes the full per-leaf table (clu.parameter_overview) to `workdir/parameters.txt`; returns its path."""
  from clu import parameter_overview  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, PARAMETERS_FILE)
  table = parameter_overview.get_parameter_overview(params, include_stats=False)
  checkpointing.write_file_atomically(path, f'{title}\n{table}\n'.encode())
  return path


# ----------------------------------------------------------------------------------------------------------------------
# The console.


class QuietOrbaxFilter(std_logging.Filter):
  """Drops Orbax's INFO chatter (several lines per save/restore) and the 3 warnings every read-only checkpoint
  manager emits (eval and export open theirs read-only on purpose); its other warnings still show.

  Without `verbose`, Orbax's error reports of a failed background save (each with a traceback, and asyncio's "Future
  ... exception was never retrieved" for the writes it abandoned) are dropped too: the training loop reports such a
  failure itself in one line (the folder, the cause, the step to resume from). `--verbosity=1` keeps them.
  """

  def __init__(self, verbose: bool = False):
    super().__init__()
    self._verbose = verbose

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.ERROR and not self._verbose:
      abandoned_write = 'asyncio' in record.pathname and 'exception was never retrieved' in record.getMessage()
      if 'orbax' in record.pathname or abandoned_write:
        return False
    if 'orbax' not in record.pathname:
      return True
    if record.levelno < std_logging.WARNING:
      return False
    message = record.getMessage()
    return 'read_only=True' not in message and 'directory is read only' not in message


# JAX probes its optional TPU backend at every start; without libtpu or a TPU the probe fails quietly but logs one INFO
# line ("Unable to initialize backend 'tpu': ... Failed to open libtpu.so ..."), which absl's handler shows.
_BACKEND_PROBE_LOGGER = 'jax._src.xla_bridge'
_TPU_PROBE_PREFIX = "Unable to initialize backend 'tpu'"


class _TpuProbeFilter(std_logging.Filter):
  """Drops the INFO line of the failed TPU probe on a machine without TPUs. A failed probe of another backend (a CUDA
  plugin that cannot start on a machine with a GPU) and every warning or error of JAX still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not record.getMessage().startswith(_TPU_PROBE_PREFIX)


def quiet_startup_noise() -> None:
  """Silences JAX's "Unable to initialize backend 'tpu'" INFO line; call it before JAX starts its backends.

  The filter sits on JAX's backend-discovery logger itself, so it works whichever handler (absl's, or one a caller
  adds) prints the logs. Calling it again adds nothing.
  """
  logger = std_logging.getLogger(_BACKEND_PROBE_LOGGER)
  if not any(isinstance(f, _TpuProbeFilter) for f in logger.filters):
    logger.addFilter(_TpuProbeFilter())
