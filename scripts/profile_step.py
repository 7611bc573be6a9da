r"""Where the train step spends its time: a JAX profiler trace and a per-operation table of the compiled step.

Compiles the training loop's step for a config (synthetic data), runs it a few times under `jax.profiler.trace`, and
prints the time of each XLA operation kind (`ynn_fusion`, `transpose_copy_fusion`, `add_maximum_fusion`, ...) and of
the slowest single operations with the model op they come from. On CPU the XLA operations are recorded by the thunk
executor; on GPU they are the kernels the profiler sees. The trace itself (`--trace_dir`) opens in Perfetto or
TensorBoard's profile plugin.

Times are summed over threads, so on a 2-core CPU they can add up to more than the wall-clock step.

A bad flag or config is one line on stderr and exit status 2, before anything is compiled (main.py's checks); a
failure while profiling is one line and status 1; --verbosity=1 adds the traceback.

Examples:
  python scripts/profile_step.py --config configs/cifar100_resnet32.py
  python scripts/profile_step.py --config configs/cifar100_resnet32.py --config.cpu_library_fusions=False \
      --method independent --top 30
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ffsd_jax import config_checks  # pylint: disable=g-import-not-at-top
from ffsd_jax import errors
from ffsd_jax import methods
from ffsd_jax import program as program_lib
from ffsd_jax import run_record
from ffsd_jax import run_setup

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
_METHOD = flags.DEFINE_enum('method', None, list(methods.method_names()), 'Method (default: the config\'s).')
_STEPS = flags.DEFINE_integer('steps', 2, 'Profiled steps (after one warm-up step).')
_TOP = flags.DEFINE_integer('top', 20, 'Rows in each table.')
_TRACE_DIR = flags.DEFINE_string('trace_dir', None, 'Where the trace is written (default: a new temporary folder).')

# XLA's CPU runtime names its own bookkeeping events; they are not operations of the program.
_RUNTIME_EVENT = re.compile(r'^(\$|end: )|Thunk|PjRt|Pjit|ParseArguments|Handle inputs|ThreadPool')


def _compiled_step(config):
  """The training loop's program (`ffsd_jax.program`) for `config` on synthetic data, its train step compiled, with
  its state, metric sums and one batch."""
  with config.unlocked():
    config.dataset = 'synthetic'
  program = program_lib.build(run_setup.build(config))
  state, sums = program.init_state(), program.metric_sums()
  info = program.setup.info
  rng = np.random.default_rng(0)
  host_batch = {
      'image': rng.integers(0, 256, (config.batch_size, info.image_size, info.image_size, 3), dtype=np.uint8),
      'label': rng.integers(0, info.num_classes, (config.batch_size,), dtype=np.int32),
  }
  batch = program.global_batch(host_batch)
  return program.lower(state).compile(), state, sums, batch


def _operation_sources(hlo_text: str) -> dict[str, str]:
  """Maps each instruction of the entry computation to the model op it came from (its `op_name`, digits folded)."""
  entry = hlo_text.split('\nENTRY', 1)[-1]
  sources = {}
  for line in entry.split('\n'):
    name = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = ', line)
    if name:
      op_name = re.search(r'op_name="([^"]+)"', line)
      sources[name.group(1)] = re.sub(r'\d+', '#', op_name.group(1)) if op_name else ''
  return sources


def _print_table(title: str, rows: list[tuple[float, int, str]], top: int) -> None:
  print(f'\n{title}\n{"ms/step":>10} {"count":>6}  name')
  for milliseconds, count, name in rows[:top]:
    print(f'{milliseconds:10.1f} {count:6d}  {name}')


def main(argv: list[str]) -> None:
  del argv
  with errors.report_errors(verbose=flags.FLAGS.verbosity >= 1):
    profile(_CONFIG.value)


def profile(config) -> None:
  """Profiles the config's step and prints the per-operation tables."""
  if _METHOD.value:
    with config.unlocked():
      config.method = _METHOD.value
  start = time.perf_counter()
  compiled, state, sums, batch = _compiled_step(config)
  print(f'# jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; {config.model} '
        f'{config.method} {config.compute_dtype} batch {config.batch_size}; compiled in '
        f'{time.perf_counter() - start:.1f} s', flush=True)
  state, sums = compiled(state, sums, batch)
  jax.block_until_ready(sums)

  trace_dir = _TRACE_DIR.value or tempfile.mkdtemp(prefix='ffsd_profile_')
  step_times = []
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(_STEPS.value):
      start = time.perf_counter()
      state, sums = compiled(state, sums, batch)
      jax.block_until_ready(sums)
      step_times.append(time.perf_counter() - start)
  print(f'# step times: {", ".join(f"{t:.3f} s" for t in step_times)}; trace in {trace_dir}')

  trace_files = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
  if not trace_files:
    raise errors.UserError(f'No trace file was written under {trace_dir}; is the profiler available on this backend?')
  with gzip.open(trace_files[0]) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  per_operation = collections.defaultdict(float)
  operation_count = collections.Counter()
  for event in events:
    if event.get('ph') == 'X' and not _RUNTIME_EVENT.search(event['name']):
      per_operation[event['name']] += event.get('dur', 0) / 1e3 / _STEPS.value
      operation_count[event['name']] += 1
  sources = _operation_sources(compiled.as_text())
  per_kind = collections.defaultdict(float)
  kind_count = collections.Counter()
  per_source = collections.defaultdict(float)
  source_count = collections.Counter()
  for name, milliseconds in per_operation.items():
    kind = re.sub(r'\.\d+$', '', name)
    per_kind[kind] += milliseconds
    kind_count[kind] += operation_count[name] // _STEPS.value
    per_source[(kind, sources.get(name, ''))] += milliseconds
    source_count[(kind, sources.get(name, ''))] += operation_count[name] // _STEPS.value
  total = sum(per_kind.values())
  print(f'# operations: {total:.1f} ms per step summed over threads (wall clock {np.median(step_times) * 1e3:.1f} ms)')
  _print_table('By operation kind', sorted(((v, kind_count[k], k) for k, v in per_kind.items()), reverse=True),
               _TOP.value)
  _print_table('By operation kind and model op',
               sorted(((v, source_count[k], f'{k[0]:28s} {k[1] or "(no op_name)"}') for k, v in per_source.items()),
                      reverse=True),
               _TOP.value)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  run_record.quiet_startup_noise()
  app.run(main, flags_parser=config_checks.parse_flags)
