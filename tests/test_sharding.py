"""Data parallelism: the sharded FFSD step on 8 simulated CPU devices against one device, global-batch BN statistics,
two processes against one, and the batch-size check."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.default import get_config
from ffsd_jax import inference
from ffsd_jax import program as program_lib
from ffsd_jax import run_setup
from ffsd_jax import sharding
from ffsd_jax import train_state as train_state_lib
from ffsd_jax import train_step as train_step_lib
from ffsd_jax.data.normalization import get_mean_std

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH = 16


@pytest.fixture(autouse=True, scope='module')
def fast_compilation():
  """XLA without most optimisations: these tests check logic and agreement, and compiling dominates on 2 cores
  (the FFSD init compiles in 6 s instead of 49 s here). Both sides of every comparison run with the same setting."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """resnet8_tiny FFSD on synthetic 32x32 data: the smallest config that runs every part of the method."""
  config = get_config()
  config.model = 'resnet8_tiny'
  config.dataset = 'synthetic'
  config.num_classes = 10
  config.normalization = 'cifar10'
  config.synthetic_num_train_examples = 64
  config.synthetic_num_eval_examples = 40
  config.batch_size = GLOBAL_BATCH
  config.eval_batch_size = 16
  config.num_epochs = 2
  config.lr_boundaries = (1,)
  config.lambda_warmup_epochs = 1
  config.log_every_steps = 2
  config.checkpoint_every_steps = 4
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def one_step():
  """One FFSD step from the same state and batch on 1 device and on 8 devices (batch sharded, state replicated).

  Compiled with XLA's optimisations on: without them, float32 sums in another order differed by up to 5% on
  leader BN-bias gradients with heavy cancellation (with them, everything agrees to 2e-4). The sharded step is
  compiled as the training loop compiles it (with the CPU library-fusion options), the single-device one with XLA's
  defaults, so the comparison covers both.
  """
  assert jax.device_count() == 8
  jax.config.update('jax_disable_most_optimizations', False)
  config = tiny_config()
  mean_std = get_mean_std('cifar10')
  model = train_state_lib.create_model(config)
  # Jitted (not eager) init: its compilation is in the persistent cache on reruns.
  state = jax.jit(lambda: train_state_lib.create_train_state(config, model, jax.random.key(3), 4),
                  out_shardings=jax.sharding.SingleDeviceSharding(jax.devices()[0]))()
  rng = np.random.default_rng(0)
  # Each device's pair of images has its own brightness band, so per-device BN statistics would differ from the
  # global-batch ones (see the BN test).
  offsets = 24 * (np.arange(GLOBAL_BATCH) // 2)[:, None, None, None]
  batch = {'image': (rng.integers(0, 80, (GLOBAL_BATCH, 32, 32, 3)) + offsets).astype(np.uint8),
           'label': rng.integers(0, 10, (GLOBAL_BATCH,), dtype=np.int32)}
  step_fn = train_step_lib.make_train_step(model, config, 4, mean_std)

  single_device = jax.devices()[0]
  single_state, single_metrics = jax.jit(step_fn)(jax.device_put(state, single_device),
                                                  jax.device_put(batch, single_device))
  # The sharded side is the training loop's own program (ffsd_jax/program.py): one step, so its metric sums are
  # the step's metrics.
  program = program_lib.build(run_setup.build(config))
  global_batch = program.global_batch(batch)
  assert global_batch['image'].sharding.spec == jax.sharding.PartitionSpec('data')
  assert len(global_batch['image'].addressable_shards) == 8
  # From a host copy: the program donates its state, and a device_put onto device 0 may alias `state` itself.
  sharded_state, sharded_metrics = program.train_step(
      jax.device_put(jax.device_get(state), sharding.replicated_sharding(program.mesh)), program.metric_sums(),
      global_batch)
  jax.block_until_ready((single_metrics, sharded_metrics))
  jax.config.update('jax_disable_most_optimizations', True)
  return dict(config=config, state=state, batch=batch, mean_std=mean_std, single=(single_state, single_metrics),
              sharded=(sharded_state, sharded_metrics))


@pytest.mark.multi_device
def test_sharded_step_equals_single_device_step(one_step):
  single_state, single_metrics = one_step['single']
  sharded_state, sharded_metrics = one_step['sharded']
  assert sharded_state.params['leader']['conv1']['kernel'].sharding.is_fully_replicated
  for name in ('params', 'batch_stats'):
    flat_single = jax.tree_util.tree_leaves_with_path(getattr(single_state, name))
    flat_sharded = jax.tree.leaves(getattr(sharded_state, name))
    assert len(flat_single) == len(flat_sharded) > 50
    for (path, a), b in zip(flat_single, flat_sharded):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=2e-6,
                                 err_msg=f'{name}{jax.tree_util.keystr(path)}')
  # The step changed the parameters (so equality is not trivial).
  before = np.asarray(one_step['state'].params['student_0']['fc']['kernel'])
  assert np.abs(np.asarray(sharded_state.params['student_0']['fc']['kernel']) - before).max() > 1e-4
  assert set(single_metrics) == set(sharded_metrics)
  for key in single_metrics:
    np.testing.assert_allclose(float(sharded_metrics[key]), float(single_metrics[key]), rtol=2e-4, atol=1e-6,
                               err_msg=key)


def _numpy_conv3x3(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """NHWC 3x3 convolution, stride 1, zero padding 1 (PyTorch's padding=1), in float64."""
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  height, width = x.shape[1:3]
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for dy in range(3):
    for dx in range(3):
      out += np.einsum('nhwc,cd->nhwd', padded[:, dy:dy + height, dx:dx + width], kernel[dy, dx])
  return out


def _library_fusion_count(compiled) -> int:
  return compiled.as_text().count('"kind":"__ynn_fusion"')


def test_cpu_library_fusion_options_are_dropped_when_this_jaxlib_rejects_them(monkeypatch):
  mesh = sharding.create_mesh(jax.devices('cpu'))
  monkeypatch.setitem(sharding.CPU_LIBRARY_FUSION_OPTIONS, 'xla_cpu_experimental_ynn_fusion_type', 'NO_SUCH_TYPE')
  assert sharding.step_compiler_options(mesh, tiny_config()) is None


def test_cpu_library_fusions_change_the_program_not_the_numbers():
  """A conv → affine → ReLU → channel sums and its kernel gradient, as in the networks: with the step options more
  of the program runs in YNNPACK, and both builds match a float64 NumPy computation to float32 rounding."""
  cpu = jax.devices('cpu')  # Also when the suite runs with a GPU as the default backend (gpu_check.sh).
  mesh = sharding.create_mesh(cpu)
  options = sharding.step_compiler_options(mesh, tiny_config())
  assert options == sharding.CPU_LIBRARY_FUSION_OPTIONS
  assert sharding.step_compiler_options(mesh, tiny_config(cpu_library_fusions=False)) is None
  rng = np.random.default_rng(7)
  x = jax.device_put(rng.standard_normal((8, 16, 16, 8)).astype(np.float32), cpu[0])
  kernel = jax.device_put((0.2 * rng.standard_normal((3, 3, 8, 8))).astype(np.float32), cpu[0])

  def channel_sums(x, kernel):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.sum(jax.nn.relu(1.5 * y + 0.1), axis=(0, 1, 2))

  def sums_and_kernel_grad(x, kernel):
    return channel_sums(x, kernel), jax.grad(lambda k: jnp.sum(channel_sums(x, k) ** 2))(kernel)

  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    default = jax.jit(sums_and_kernel_grad).lower(x, kernel).compile()
    with_options = jax.jit(sums_and_kernel_grad, compiler_options=options).lower(x, kernel).compile()
  finally:
    jax.config.update('jax_disable_most_optimizations', previous)
  assert _library_fusion_count(with_options) > _library_fusion_count(default)

  # NumPy float64: z = 1.5·conv(x) + 0.1, s = Σ relu(z); d(Σ s²)/dK[i,j,c,d] = Σ 2·s_d·1.5·[z>0]·x_pad[.., i, j, c].
  x64, kernel64 = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  pre_activation = 1.5 * _numpy_conv3x3(x64, kernel64) + 0.1
  sums = np.maximum(pre_activation, 0).sum(axis=(0, 1, 2))
  upstream = 2 * sums * 1.5 * (pre_activation > 0)
  padded = np.pad(x64, ((0, 0), (1, 1), (1, 1), (0, 0)))
  kernel_grad = np.stack([np.stack([np.einsum('nhwc,nhwd->cd', padded[:, i:i + 16, j:j + 16], upstream)
                                    for j in range(3)]) for i in range(3)])
  for compiled in (default, with_options):
    got_sums, got_grad = compiled(x, kernel)
    np.testing.assert_allclose(np.asarray(got_sums), sums, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_grad), kernel_grad, rtol=1e-4, atol=1e-3 * np.abs(kernel_grad).max())


@pytest.mark.multi_device
def test_batch_norm_running_statistics_are_global_batch_statistics(one_step):
  """bn1 of student_0 after one sharded step: 0.9·old + 0.1·(mean, biased var) over all 16 images, not per shard."""
  (mean, std), state = one_step['mean_std'], one_step['state']
  images = (one_step['batch']['image'] / 255.0 - np.asarray(mean)) / np.asarray(std)
  features = _numpy_conv3x3(images, np.asarray(state.params['student_0']['conv1']['kernel'], np.float64))
  global_mean = features.mean(axis=(0, 1, 2))
  global_var = features.var(axis=(0, 1, 2))
  old = jax.tree.map(np.asarray, state.batch_stats['student_0']['bn1'])
  sharded_stats = one_step['sharded'][0].batch_stats['student_0']['bn1']
  np.testing.assert_allclose(np.asarray(sharded_stats['mean']), 0.9 * old['mean'] + 0.1 * global_mean,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(sharded_stats['var']), 0.9 * old['var'] + 0.1 * global_var,
                             rtol=1e-4, atol=1e-6)
  # Per-device statistics (2 images each) would give a visibly different variance: the check above can fail.
  per_shard_var = np.mean([features[i:i + 2].var(axis=(0, 1, 2)) for i in range(0, GLOBAL_BATCH, 2)], axis=0)
  assert np.abs(0.1 * (per_shard_var - global_var)).max() > 1e-3


@pytest.mark.multi_device
def test_batch_size_not_divisible_by_device_count_fails_clearly():
  mesh = sharding.create_mesh()
  with pytest.raises(ValueError, match=r'batch_size=12 is not divisible by the number of devices \(8\).*16'):
    sharding.check_batch_size(12, mesh)
  assert sharding.check_batch_size(16, mesh) == 16


_PROCESS_SCRIPT = r'''
import json, sys
sys.path.insert(0, {repo!r})
import jax
jax.config.update('jax_compilation_cache_dir', {cache!r})
jax.config.update('jax_disable_most_optimizations', True)
import ml_collections
from ffsd_jax import train_loop
config = ml_collections.ConfigDict(json.loads({config!r}))
summary = train_loop.train_and_evaluate(config, {workdir!r})
print('SUMMARY', jax.process_index(), jax.process_count(), jax.device_count(), json.dumps(summary))
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.multi_device
def test_two_processes_match_one_process(tmp_path):
  """2 processes x 4 CPU devices (jax.distributed over localhost) == 1 process x 8 devices: params and metrics."""
  from ffsd_jax import metric_writers, train_loop  # pylint: disable=g-import-not-at-top
  config = tiny_config(max_steps=2, eval_every_epochs=1)
  config_json = json.dumps(config.to_dict())
  multi_dir, single_dir = tmp_path / 'two_processes', tmp_path / 'one_process'
  script = _PROCESS_SCRIPT.format(repo=REPO_ROOT, cache=jax.config.jax_compilation_cache_dir or '',
                                  config=config_json, workdir=str(multi_dir))
  port = _free_port()
  processes = []
  for process_id in range(2):
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(process_id))
    processes.append(subprocess.Popen([sys.executable, '-c', script], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
  # Meanwhile, the same run in this process on its 8 devices.
  train_loop.train_and_evaluate(config, str(single_dir))
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-3000:]
  assert 'SUMMARY 0 2 8' in outputs[0] and 'SUMMARY 1 2 8' in outputs[1]

  multi_records, single_records = metric_writers.read_metrics(str(multi_dir)), metric_writers.read_metrics(
      str(single_dir))
  assert [r['step'] for r in multi_records] == [r['step'] for r in single_records] == [2, 2]
  for a, b in zip(multi_records, single_records):
    assert set(a) == set(b)
    for key in a:
      if key not in metric_writers.TIMING_KEYS:
        np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=1e-6, err_msg=key)
  multi_state = inference.restore_for_inference(config, str(multi_dir), 'latest')[0]
  single_state = inference.restore_for_inference(config, str(single_dir), 'latest')[0]
  assert int(multi_state.step) == 2
  for a, b in zip(jax.tree.leaves((multi_state.params, multi_state.batch_stats)),
                  jax.tree.leaves((single_state.params, single_state.batch_stats))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
