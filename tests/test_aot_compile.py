"""Compiling for GPU and TPU targets without them (scripts/aot_compile.py) and what a compiled step is made of
(ffsd_jax/compiled_stats.py).

The statistics are checked on small programs compiled here for 4 of the 8 simulated CPU devices, against counts
taken independently from the program text, and on hand-written HLO for the cases CPU programs do not show
(asynchronous pairs, loops, command buffers). The target compiles need `pip install --no-deps -r
requirements-aot.txt` and skip without it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

import conftest
from ffsd_jax import compiled_stats
from ffsd_jax import errors
from ffsd_jax import run_record
from ffsd_jax import studies

aot_compile = conftest.load_script('aot_compile')

HAS_CUDA_COMPILER = all(importlib.util.find_spec(name) is not None
                        for name in ('jax_cuda12_plugin', 'jax_plugins', 'jax_plugins.xla_cuda12'))
HAS_TPU_COMPILER = importlib.util.find_spec('libtpu') is not None
NEEDS = 'pip install --no-deps -r requirements-aot.txt'


def _mesh4() -> jax.sharding.Mesh:
  return jax.make_mesh((4,), ('d',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])


def _count_in_text(opcode: str, text: str) -> int:
  """Instructions with `opcode` (or its -start form) anywhere in the module text, by a plain line regex."""
  return len(re.findall(rf'=\s.*?\s{re.escape(opcode)}(?:-start)?\(', text))


def _collective_program():
  """A 4-device program with two dependent psums (not combinable), one all_gather, one ppermute, one all_to_all."""
  mesh = _mesh4()

  def body(x):
    y = jax.lax.psum(x, 'd')
    z = jax.lax.psum(jnp.sin(y), 'd')
    gathered = jax.lax.all_gather(z, 'd', tiled=True)
    shifted = jax.lax.ppermute(x, 'd', [(i, (i + 1) % 4) for i in range(4)])
    swapped = jax.lax.all_to_all(x, 'd', 0, 0, tiled=True)
    return gathered[:x.shape[0]] + shifted + swapped

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P('d'), out_specs=P('d')))
  x = jax.ShapeDtypeStruct((64, 8), jnp.float32, sharding=NamedSharding(mesh, P('d')))
  return f.lower(x).compile()


def test_collectives_match_an_independent_count_of_the_program_text():
  compiled = _collective_program()
  text = compiled.as_text()
  counts = compiled_stats.collectives(compiled)
  assert set(counts) == set(compiled_stats.COLLECTIVE_KINDS)
  for kind in compiled_stats.COLLECTIVE_KINDS:
    assert counts[kind] == _count_in_text(kind, text), (kind, counts)
  # What the program asks for: two dependent psums, one gather, one permute, one all-to-all.
  assert counts['all-reduce'] == 2 and counts['all-gather'] == 1 and counts['collective-permute'] == 1
  assert counts['all-to-all'] == 1


def test_a_sharded_reduction_is_one_all_reduce():
  mesh = _mesh4()
  f = jax.jit(lambda x: jnp.sum(x * x), out_shardings=NamedSharding(mesh, P()))
  compiled = f.lower(jax.ShapeDtypeStruct((64,), jnp.float32, sharding=NamedSharding(mesh, P('d')))).compile()
  assert compiled_stats.collectives(compiled) == {'all-reduce': 1, 'all-gather': 0, 'reduce-scatter': 0,
                                                  'collective-permute': 0, 'all-to-all': 0}
  replicated = jax.jit(lambda x: jnp.sum(x * x)).lower(np.ones(64, np.float32)).compile()
  assert sum(compiled_stats.collectives(replicated).values()) == 0


def test_kernel_launches_count_the_entry_fusions_and_custom_calls():
  compiled = jax.jit(lambda x, w: jnp.tanh(x @ w).sum(0) + jnp.cumsum(x, 0)[-1]).lower(
      np.ones((16, 32), np.float32), np.ones((32, 32), np.float32)).compile()
  text = compiled.as_text()
  entry = text[text.index('\nENTRY'):]
  entry = entry[:entry.index('\n}')]
  expected = len(re.findall(r' (?:fusion|custom-call)\(', entry))
  assert expected >= 1
  assert compiled_stats.kernel_launches(compiled) == expected


# A scheduled GPU-like program: a while loop whose body holds an async all-reduce pair, an async-wrapped
# reduce-scatter, a command buffer (call) of two fusions, one of which nests a fusion inside (as XLA:GPU's Triton
# gemm fusions do: one kernel), a cuDNN convolution, and a reducer shared by the collectives.
_HAND_WRITTEN_HLO = """HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%fused_computation (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %n = f32[8]{0} negate(%p)
}

%nested_operand (r: f32[8]) -> f32[8] {
  %r = f32[8]{0} parameter(0)
  ROOT %t = f32[8]{0} tanh(%r)
}

%fused_computation.1 (p.1: f32[8]) -> f32[8] {
  %p.1 = f32[8]{0} parameter(0)
  %nested = f32[8]{0} fusion(%p.1), kind=kCustom, calls=%nested_operand
  ROOT %e = f32[8]{0} exponential(%nested)
}

%body (loop: (s32[], f32[8])) -> (s32[], f32[8]) {
  %loop = (s32[], f32[8]{0}) parameter(0)
  %v = f32[8]{0} get-tuple-element(%loop), index=1
  %all-reduce-start = f32[8]{0} all-reduce-start(%v), channel_id=1, to_apply=%add, metadata={op_name="all-reduce(x)"}
  %all-reduce-done = f32[8]{0} all-reduce-done(%all-reduce-start)
  %loop_fusion = f32[8]{0} fusion(%all-reduce-done), kind=kLoop, calls=%fused_computation
  %i = s32[] get-tuple-element(%loop), index=0
  ROOT %next = (s32[], f32[8]{0}) tuple(%i, %loop_fusion)
}

%cond (loop.1: (s32[], f32[8])) -> pred[] {
  %loop.1 = (s32[], f32[8]{0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%loop.1), index=0
  %limit = s32[] constant(3)
  ROOT %lt = pred[] compare(%i.1, %limit), direction=LT
}

%async_computation (q: f32[8]) -> f32[2] {
  %q = f32[8]{0} parameter(0)
  ROOT %reduce-scatter = f32[2]{0} reduce-scatter(%q), channel_id=2, dimensions={0}, to_apply=%add
}

%command_buffer (c: f32[8]) -> f32[8] {
  %c = f32[8]{0} parameter(0)
  %f1 = f32[8]{0} fusion(%c), kind=kLoop, calls=%fused_computation.1
  ROOT %f2 = f32[8]{0} fusion(%f1), kind=kLoop, calls=%fused_computation
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%zero, %x)
  %while = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  %w = f32[8]{0} get-tuple-element(%while), index=1
  %conv = (f32[8]{0}, u8[0]{0}) custom-call(%w), custom_call_target="__cudnn$convForward"
  %cv = f32[8]{0} get-tuple-element(%conv), index=0
  %rs-start = ((f32[8]{0}), f32[2]{0}) async-start(%cv), calls=%async_computation
  %rs-done = f32[2]{0} async-done(%rs-start), calls=%async_computation
  %cb = f32[8]{0} call(%cv), to_apply=%command_buffer
  %ag-start = (f32[2]{0}, f32[8]{0}) all-gather-start(%rs-done), channel_id=3, dimensions={0}
  %ag-done = f32[8]{0} all-gather-done(%ag-start)
  ROOT %out = f32[8]{0} add(%cb, %ag-done)
}
"""


class _FakeCompiled:
  """Stands in for a `jax.stages.Compiled`: its text, and a memory analysis that is missing or raises."""

  def __init__(self, text: str = '', memory: object = None):
    self._text, self._memory = text, memory

  def as_text(self) -> str:
    return self._text

  def memory_analysis(self):
    if isinstance(self._memory, Exception):
      raise self._memory
    return self._memory


def test_async_pairs_loops_and_wrapped_collectives_count_once():
  counts = compiled_stats.collectives(_FakeCompiled(_HAND_WRITTEN_HLO))
  # all-reduce-start/-done in the loop body: 1 (static); async-start/-done around reduce-scatter: 1;
  # all-gather-start/-done: 1; the op_name text naming an all-reduce is not an instruction.
  assert counts == {'all-reduce': 1, 'all-gather': 1, 'reduce-scatter': 1, 'collective-permute': 0,
                    'all-to-all': 0}


def test_kernels_include_loop_bodies_and_command_buffers_but_not_fused_insides():
  # The loop body's fusion, the cuDNN convolution, the command buffer's two fusions (not the nested one).
  assert compiled_stats.kernel_launches(_FakeCompiled(_HAND_WRITTEN_HLO)) == 4


def test_a_text_without_entry_is_refused():
  with pytest.raises(ValueError, match='ENTRY'):
    compiled_stats.collectives(_FakeCompiled('HloModule empty\n'))


def test_memory_per_device_is_the_buffer_assignment_of_one_device():
  mesh = _mesh4()
  x = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(mesh, P('d')))
  w = jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=NamedSharding(mesh, P()))
  compiled = jax.jit(lambda x, w: (x @ w, w + 1), donate_argnums=1).lower(x, w).compile()
  memory = compiled_stats.memory_per_device(compiled)
  # One device holds a quarter of x (16 x 128 floats) and all of w (128 x 128 floats).
  assert memory['argument_bytes'] == (16 * 128 + 128 * 128) * 4
  # The outputs: x @ w's quarter and w + 1, written over the donated w (aliased), plus the output tuple's table.
  assert (16 * 128 + 128 * 128) * 4 <= memory['output_bytes'] <= (16 * 128 + 128 * 128) * 4 + 64
  assert memory['alias_bytes'] == 128 * 128 * 4
  assert memory['peak_bytes'] == (memory['argument_bytes'] + memory['output_bytes'] - memory['alias_bytes'] +
                                  memory['temp_bytes'])


@pytest.mark.parametrize('memory', [None, NotImplementedError('no memory analysis here')])
def test_memory_per_device_without_an_analysis_is_all_none(memory):
  result = compiled_stats.memory_per_device(_FakeCompiled(memory=memory))
  assert set(result) == {'argument_bytes', 'output_bytes', 'alias_bytes', 'temp_bytes', 'generated_code_bytes',
                         'peak_bytes'}
  assert all(value is None for value in result.values())


def test_flops_of_a_matmul():
  compiled = jax.jit(lambda x, w: x @ w).lower(np.ones((16, 32), np.float32), np.ones((32, 8), np.float32)).compile()
  assert compiled_stats.flops(compiled) == run_record.compiled_flops(compiled) == 2 * 16 * 32 * 8


# ----------------------------------------------------------------------------------------------------------------------
# scripts/aot_compile.py


def test_an_unknown_target_is_refused_before_anything_compiles():
  with pytest.raises(errors.UsageError, match='unknown target') as raised:
    aot_compile.parse_target('a100x', 1)
  assert 'h100' in str(raised.value) and 'tpu:v5e:2x2' in str(raised.value)
  for name, devices in (('tpu:v5e', None), ('h100', 12), ('h100', 0)):
    with pytest.raises(errors.UsageError):
      aot_compile.parse_target(name, devices)
  assert aot_compile.parse_target('h100', 16).topology == '1x2x8'


def test_the_script_refuses_an_unknown_target_in_one_line():
  env = {key: value for key, value in os.environ.items() if key != 'JAX_PLATFORMS'}
  result = subprocess.run([sys.executable, 'scripts/aot_compile.py', '--config', 'configs/smoke.py', '--target',
                           'bogus'], cwd=conftest.REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == errors.EXIT_USAGE, result.stderr
  assert conftest.report_lines(result.stderr) == [result.stderr.strip()], result.stderr
  assert result.stderr.startswith('UsageError: --target=bogus: unknown target')


def test_the_synthetic_stand_in_keeps_the_real_shapes():
  config = studies.load_config_file(str(conftest.REPO_ROOT / 'configs' / 'imagenet_resnet18.py'),
                                    str(conftest.REPO_ROOT))
  synthetic = aot_compile.synthetic_config(config)
  assert (synthetic.dataset, synthetic.num_classes, synthetic.image_size) == ('synthetic', 1000, 224)
  assert (synthetic.normalization, synthetic.synthetic_num_train_examples) == ('imagenet', 1_281_167)
  assert config.dataset == 'imagenet2012'  # The caller's config is left alone.


def _smoke_config():
  return studies.load_config_file(str(conftest.REPO_ROOT / 'configs' / 'smoke.py'), str(conftest.REPO_ROOT))


@pytest.mark.skipif(not HAS_CUDA_COMPILER, reason=f'needs the jax-cuda12 plugin: {NEEDS}')
def test_smoke_step_compiles_for_one_h100():
  target = aot_compile.parse_target('h100', 1)
  step = aot_compile.compile_program(_smoke_config(), target)
  assert step.program.mesh.devices.size == 1 and 'H100' in step.program.mesh.devices.flat[0].device_kind
  text = step.compiled.as_text()
  assert '__cudnn$conv' in text  # Compiled by XLA:GPU for cuDNN, not by the host's CPU compiler.
  result = aot_compile.report(target, step)
  assert result['memory_capacity_per_device_bytes'] == 85_520_809_984
  assert result['fits'] is True and result['devices'] == 1
  assert sum(result['collectives'].values()) == 0  # One device: nothing to all-reduce.
  assert result['kernel_launches'] >= text.count('custom_call_target="__cudnn$conv')


@pytest.mark.skipif(not HAS_TPU_COMPILER, reason=f'needs libtpu: {NEEDS}')
def test_smoke_step_compiles_for_tpu_v5e_2x2():
  result = aot_compile.compile_for_target(_smoke_config(), aot_compile.parse_target('tpu:v5e:2x2', None))
  assert (result['device_kind'], result['devices'], result['mesh_shape']) == ('TPU v5 lite', 4, {'data': 4})
  assert result['memory_capacity_per_device_bytes'] == 16 * 2**30 and result['fits'] is True
  assert result['collectives']['all-reduce'] >= 1  # The gradients' (and batch statistics') all-reduce.
  assert result['flops_per_device'] > 0 and result['kernel_launches'] > 0
