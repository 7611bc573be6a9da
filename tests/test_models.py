"""Tests of the backbones, heads and FFSDModel against docs/method.md (§3, §4, §7, §12) and NumPy.

Shapes and parameter counts use `jax.eval_shape` (nothing is compiled or allocated, so even ResNet-34 is cheap).
Functional tests use variables filled with random values from NumPy instead of a compiled `init`: compiling the
threefry-based init of a whole network costs tens of seconds on a 2-core CPU, and random BN statistics make the
train/eval distinctions visible.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from ffsd_jax import methods, models
from ffsd_jax.attention import diversity_shifted_feature
from ffsd_jax.models import heads, layers
from ffsd_jax.models.resnet_cifar import BasicBlock

KEY = jax.random.key(0)


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def random_variables(abstract, seed: int = 0):
  """Concrete variables shaped like `abstract`: He-scaled kernels, random γ/β, random running mean/var."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'var':
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == 'scale':
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == 'kernel':
      value = rng.normal(size=leaf.shape) * math.sqrt(1.0 / math.prod(leaf.shape[:-1]))
    else:  # bias, mean
      value = rng.normal(size=leaf.shape) * 0.1
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _cifar_resnet_param_count(blocks: int, widths=(16, 32, 64), classes: int = 100) -> int:
  """§3.1 from the definition: stem conv + BN, BasicBlocks (two 3x3 convs + BNs, option-B projection), Linear."""
  total = 3 * widths[0] * 9 + 2 * widths[0]
  in_channels = widths[0]
  for width in widths:
    for _ in range(blocks):
      total += in_channels * width * 9 + 2 * width + width * width * 9 + 2 * width
      if in_channels != width:
        total += in_channels * width + 2 * width
      in_channels = width
  return total + widths[-1] * classes + classes


# --------------------------------------------------------------------------------------------------------------------
# Parameter counts, tap shapes, decoder shapes.

REFERENCE_PARAM_COUNTS = {  # docs/method.md §3 (100 CIFAR classes, 1000 ImageNet classes)
    'resnet20': 278_324, 'resnet32': 472_756, 'resnet56': 861_620, 'wrn16_2': 704_420, 'wrn40_2': 2_258_084,
    'densenet40': 1_100_428, 'googlenet': 6_258_500, 'resnet18': 11_689_512, 'resnet34': 21_797_672,
}

REFERENCE_TAPS = {  # docs/method.md §3, (H, W, C) at the default input size
    'resnet20': ((32, 32, 16), (16, 16, 32), (8, 8, 64)),
    'wrn16_2': ((32, 32, 32), (16, 16, 64), (8, 8, 128)),
    'wrn40_2': ((32, 32, 32), (16, 16, 64), (8, 8, 128)),
    'densenet40': ((32, 32, 168), (16, 16, 312), (8, 8, 456)),
    'googlenet': ((32, 32, 480), (16, 16, 832), (8, 8, 1024)),
    'resnet18': ((56, 56, 64), (28, 28, 128), (14, 14, 256), (7, 7, 512)),
    'resnet34': ((56, 56, 64), (28, 28, 128), (14, 14, 256), (7, 7, 512)),
    'resnet_imagenet_tiny': ((16, 16, 8), (8, 8, 16), (4, 4, 32), (2, 2, 64)),
    'resnet8_tiny': ((32, 32, 4), (16, 16, 8), (8, 8, 16)),
}
for _name in ('resnet32', 'resnet56', 'resnet110', 'resnet8'):
  REFERENCE_TAPS[_name] = REFERENCE_TAPS['resnet20']


def test_cifar_resnet_formula_matches_reference_and_defines_resnet110():
  assert _cifar_resnet_param_count(3) == 278_324
  assert _cifar_resnet_param_count(5) == 472_756
  assert _cifar_resnet_param_count(9) == 861_620
  # ResNet-110 is not in the release (§13.9): the standard BasicBlock [18, 18, 18] with option-B shortcuts.
  assert _cifar_resnet_param_count(18) == 1_736_564
  assert models.get_spec('resnet110').param_count == 1_736_564
  assert models.get_spec('resnet8').param_count == _cifar_resnet_param_count(1)
  assert models.get_spec('resnet8_tiny').param_count == _cifar_resnet_param_count(1, (4, 8, 16))


@pytest.mark.parametrize('name', list(models.BACKBONES))
def test_backbone_params_taps_and_decoder_shapes(name):
  spec = models.get_spec(name)
  size = spec.input_size
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  backbone = models.create_backbone(name, spec.default_num_classes)
  (logits, taps), variables = jax.eval_shape(
      lambda x: backbone.init_with_output(KEY, x, train=True), images)

  assert _count(variables['params']) == spec.param_count
  if name in REFERENCE_PARAM_COUNTS:
    assert spec.param_count == REFERENCE_PARAM_COUNTS[name]
  assert logits.shape == (2, spec.default_num_classes) and logits.dtype == jnp.float32
  tap_shapes = tuple(tuple(t.shape[1:]) for t in taps)
  assert tap_shapes == REFERENCE_TAPS[name] == spec.tap_shapes()
  assert spec.tap_channels == tuple(s[-1] for s in tap_shapes)
  assert spec.decoder_channels[0] == spec.fusion_channels == tap_shapes[-1][-1]

  decoder = heads.SelfDistillationDecoder(spec.decoder_channels)
  reconstructions, _ = jax.eval_shape(lambda t: decoder.init_with_output(KEY, t, train=True), taps[-1])
  assert [r.shape for r in reconstructions] == [t.shape for t in taps[:-1]]


@pytest.mark.parametrize('channels,classes,expected', [
    (64, 100, 16_228), (128, 100, 48_740), (456, 100, 472_516), (1024, 100, 2_224_228), (512, 1000, 1_049_576)])
def test_fusion_module_param_count(channels, classes, expected):
  fusion = heads.FusionModule(channels, 2, classes)
  z = jax.ShapeDtypeStruct((2, 8, 8, 2 * channels), jnp.float32)
  (logits, fused), variables = jax.eval_shape(lambda z: fusion.init_with_output(KEY, z, train=True), z)
  assert _count(variables['params']) == expected
  assert logits.shape == (2, classes) and fused.shape == (2, 8, 8, channels)


def test_trans_fusion_head_shapes_and_count():
  head = heads.TransFusionHead(64, 3)
  out, variables = jax.eval_shape(
      lambda x: head.init_with_output(KEY, x, train=True), jax.ShapeDtypeStruct((2, 8, 8, 64), jnp.float32))
  assert out.shape == (2, 8, 8, 192)
  # depthwise 9·C + BN 2C + 1x1 C·3C + BN 2·3C
  assert _count(variables['params']) == 9 * 64 + 2 * 64 + 64 * 192 + 2 * 192


def test_imagenet_tiny_accepts_other_sizes():
  spec = models.get_spec('resnet_imagenet_tiny')
  backbone = models.create_backbone('resnet_imagenet_tiny', 10)
  (_, taps), _ = jax.eval_shape(lambda x: backbone.init_with_output(KEY, x, train=True),
                                jax.ShapeDtypeStruct((1, 96, 128, 3), jnp.float32))
  assert tuple(tuple(t.shape[1:]) for t in taps) == spec.tap_shapes(96, 128)
  assert models.get_spec('resnet18').tap_shapes(224)[-1] == (7, 7, 512)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  backbone = models.create_backbone('resnet8_tiny', 10, dtype=jnp.bfloat16)
  (logits, taps), variables = jax.eval_shape(
      lambda x: backbone.init_with_output(KEY, x, train=True), jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert logits.dtype == jnp.float32
  assert all(t.dtype == jnp.bfloat16 for t in taps)


# --------------------------------------------------------------------------------------------------------------------
# Batch norm: train/eval behaviour and the momentum of every BN layer.

def test_batch_norm_train_and_eval_match_numpy():
  rng = np.random.default_rng(1)
  x = rng.normal(2.0, 3.0, size=(8, 4, 4, 5)).astype(np.float32)
  variables = {
      'params': {'scale': rng.uniform(0.5, 1.5, 5).astype(np.float32), 'bias': rng.normal(size=5).astype(np.float32)},
      'batch_stats': {'mean': rng.normal(size=5).astype(np.float32),
                      'var': rng.uniform(0.5, 1.5, 5).astype(np.float32)},
  }
  scale, bias = variables['params']['scale'], variables['params']['bias']
  old_mean, old_var = variables['batch_stats']['mean'], variables['batch_stats']['var']

  train_bn = layers.norm_factory(nn.BatchNorm, train=True, dtype=jnp.float32)()
  y, updated = train_bn.apply(variables, x, mutable=['batch_stats'])
  batch_mean = x.mean(axis=(0, 1, 2))
  batch_var = x.var(axis=(0, 1, 2))  # biased, as Flax (PyTorch uses the unbiased one for the running var, §12.1)
  np.testing.assert_allclose(y, (x - batch_mean) / np.sqrt(batch_var + 1e-5) * scale + bias, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updated['batch_stats']['mean'], 0.9 * old_mean + 0.1 * batch_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updated['batch_stats']['var'], 0.9 * old_var + 0.1 * batch_var, rtol=1e-5, atol=1e-6)

  eval_bn = layers.norm_factory(nn.BatchNorm, train=False, dtype=jnp.float32)()
  y_eval = eval_bn.apply(variables, x)
  np.testing.assert_allclose(y_eval, (x - old_mean) / np.sqrt(old_var + 1e-5) * scale + bias, rtol=1e-5, atol=1e-5)


def _batch_norm_settings(module, *args, **kwargs):
  """(path, momentum, epsilon, use_running_average) of every BatchNorm called in a traced forward pass."""
  seen = []

  def interceptor(next_fun, fun_args, fun_kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__':
      bn = context.module
      seen.append(('/'.join(bn.path), bn.momentum, bn.epsilon, bn.use_running_average))
    return next_fun(*fun_args, **fun_kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda: module.init(KEY, *args, **kwargs))
  return seen


@pytest.mark.parametrize('name', ['wrn16_2', 'resnet8', 'densenet40', 'googlenet', 'resnet_imagenet_tiny'])
def test_batch_norm_momentum_and_epsilon(name):
  spec = models.get_spec(name)
  images = jnp.zeros((1, spec.input_size, spec.input_size, 3))
  for train in (True, False):
    settings = _batch_norm_settings(models.create_backbone(name, 10), images, train=train)
    assert settings
    for path, momentum, epsilon, use_running_average in settings:
      # WRN's final bn1 has PyTorch momentum 0.9 → Flax 0.1 (§3.2, §12.1); every other BN PyTorch 0.1 → Flax 0.9.
      assert momentum == (0.1 if (name == 'wrn16_2' and path == 'bn1') else 0.9), path
      assert epsilon == 1e-5 and use_running_average == (not train)
  if name == 'wrn16_2':
    assert ('bn1', 0.1, 1e-5, False) in _batch_norm_settings(models.create_backbone(name, 10), images, train=True)


# --------------------------------------------------------------------------------------------------------------------
# Initialisation (§3.6, §12.4).

def test_initialisers_follow_pytorch_defaults():
  rbg_key = jax.random.key(3, impl='rbg')  # cheap to compile, unlike threefry, and the init does not depend on it
  block = BasicBlock(64, conv=layers.conv_factory(nn.Conv, jnp.float32),
                     norm=layers.norm_factory(nn.BatchNorm, True, jnp.float32), strides=2)
  params = jax.jit(block.init)(rbg_key, jnp.ones((2, 8, 8, 32)))['params']
  # He normal fan_out: std √(2 / (k·k·C_out)), zero mean; 36,864 samples → ~0.4% std error.
  kernel = np.asarray(params['conv2']['kernel'])
  assert kernel.shape == (3, 3, 64, 64)
  assert abs(kernel.std() / math.sqrt(2 / (9 * 64)) - 1) < 0.03 and abs(kernel.mean()) < 3e-3
  shortcut = np.asarray(params['shortcut_conv']['kernel'])
  assert abs(shortcut.std() / math.sqrt(2 / 64) - 1) < 0.05
  np.testing.assert_array_equal(params['bn1']['scale'], 1.0)
  np.testing.assert_array_equal(params['bn1']['bias'], 0.0)

  def check_uniform(values, bound):
    values = np.asarray(values).ravel()
    assert np.all(np.abs(values) <= bound) and np.abs(values).max() > 0.9 * bound
    if values.size >= 1000:  # the std of U(±b) is b/√3; too noisy to check on a bias vector
      assert abs(values.std() / (bound / math.sqrt(3)) - 1) < 0.05

  # nn.Linear: weight and bias U(±1/√in).
  dense = layers.torch_dense(100, 64, dtype=jnp.float32)
  dense_params = jax.jit(dense.init)(rbg_key, jnp.ones((1, 64)))['params']
  check_uniform(dense_params['kernel'], 1 / 8)
  check_uniform(dense_params['bias'], 1 / 8)
  # Conv biases (WRN, GoogLeNet): U(±1/√(C_in·k·k)).
  conv = layers.biased_conv(64, 3, 32, dtype=jnp.float32)
  conv_params = jax.jit(conv.init)(rbg_key, jnp.ones((1, 8, 8, 32)))['params']
  check_uniform(conv_params['bias'], 1 / math.sqrt(32 * 9))
  assert abs(np.asarray(conv_params['kernel']).std() / math.sqrt(2 / (9 * 64)) - 1) < 0.05
  # Decoder ConvTranspose2d: U(±1/√(9·C_out)).
  unit = heads.DecoderUnit(32)
  unit_params = jax.jit(lambda k, x: unit.init(k, x, train=True))(rbg_key, jnp.ones((1, 4, 4, 64)))['params']
  assert unit_params['deconv']['kernel'].shape == (3, 3, 32, 64)
  check_uniform(unit_params['deconv']['kernel'], 1 / math.sqrt(9 * 32))


# --------------------------------------------------------------------------------------------------------------------
# Transposed convolution alignment (§4.3, §12.2).

def _numpy_torch_conv_transpose(x, weight, stride=2, padding=1, output_padding=1):
  """PyTorch ConvTranspose2d by its scatter definition: out[i·s − p + k] += x[i] · W[:, :, k]; NHWC in and out.

  Args:
    x: (B, H, W, C_in).
    weight: PyTorch layout (C_in, C_out, kh, kw).
  """
  batch, height, width, _ = x.shape
  _, out_channels, kh_size, kw_size = weight.shape
  out_h = (height - 1) * stride - 2 * padding + kh_size + output_padding
  out_w = (width - 1) * stride - 2 * padding + kw_size + output_padding
  full = np.zeros((batch, (height - 1) * stride + kh_size + output_padding,
                   (width - 1) * stride + kw_size + output_padding, out_channels))
  for i in range(height):
    for j in range(width):
      for kh in range(kh_size):
        for kw in range(kw_size):
          full[:, i * stride + kh, j * stride + kw, :] += x[:, i, j, :] @ weight[:, :, kh, kw]
  return full[:, padding:padding + out_h, padding:padding + out_w, :]


def test_decoder_unit_matches_pytorch_conv_transpose():
  rng = np.random.default_rng(2)
  in_channels, out_channels = 6, 4
  x = rng.normal(size=(2, 5, 5, in_channels))
  torch_weight = rng.normal(size=(in_channels, out_channels, 3, 3))
  mean, var = rng.normal(size=out_channels), rng.uniform(0.5, 1.5, out_channels)
  scale, bias = rng.uniform(0.5, 1.5, out_channels), rng.normal(size=out_channels)
  variables = {
      # The Flax kernel is (3, 3, C_out, C_in) with K[kh, kw, o, i] = W_torch[i, o, kh, kw]: no flip (heads.py).
      'params': {'deconv': {'kernel': torch_weight.transpose(2, 3, 1, 0)}, 'bn': {'scale': scale, 'bias': bias}},
      'batch_stats': {'bn': {'mean': mean, 'var': var}},
  }
  variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), variables)
  got = heads.DecoderUnit(out_channels).apply(variables, jnp.asarray(x, jnp.float32), train=False)
  deconv = _numpy_torch_conv_transpose(x, torch_weight)
  assert deconv.shape == (2, 10, 10, out_channels)
  expected = np.maximum((deconv - mean) / np.sqrt(var + 1e-5) * scale + bias, 0)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# FFSDModel.

FFSD_KEYS = {'student_logits', 'student_taps', 'leader_logits', 'leader_taps', 'trans_fusion', 'fusion_input', 'fused',
             'fusion_logits', 'student_sd_targets', 'leader_sd_targets', 'student_reconstructions',
             'leader_reconstructions'}


@pytest.mark.parametrize('method,num_students,expected', [
    ('ffsd', 2, ['decoder_1', 'decoder_leader', 'fusion', 'leader', 'student_0', 'student_1', 'trans_fusion']),
    ('ffsd', 3, ['decoder_1', 'decoder_2', 'decoder_leader', 'fusion', 'leader', 'student_0', 'student_1',
                 'student_2', 'trans_fusion']),
    ('dml', 2, ['student_0', 'student_1']),
    ('independent', 1, ['leader', 'student_0']),
])
def test_ffsd_model_tree_and_output_shapes(method, num_students, expected):
  config = default.get_config()
  config.update(model='resnet8_tiny', num_classes=10, num_students=num_students, method=method)
  model = methods.get_method(config).build_model(jnp.float32)
  images = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(KEY, x), images)
  assert sorted(variables['params']) == expected
  assert sorted(variables['batch_stats']) == expected
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[0], variables, images)
  eval_out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  taps = ((4, 32, 32, 4), (4, 16, 16, 8), (4, 8, 8, 16))
  assert len(out['student_logits']) == num_students
  assert all(logits.shape == (4, 10) for logits in out['student_logits'])
  assert all(tuple(t.shape for t in student) == taps for student in out['student_taps'])
  if 'leader' not in expected:
    assert set(out) == {'student_logits', 'student_taps'}
    assert set(eval_out) == {'student_logits'}
    return
  assert out['leader_logits'].shape == (4, 10) and tuple(t.shape for t in out['leader_taps']) == taps
  if 'fusion' not in expected:
    assert set(out) == {'student_logits', 'student_taps', 'leader_logits', 'leader_taps'}
    assert set(eval_out) == {'student_logits', 'leader_logits'}
    return
  assert set(out) == FFSD_KEYS
  assert set(eval_out) == {'student_logits', 'leader_logits', 'fusion_logits'}
  m = num_students
  assert out['trans_fusion'].shape == (4, 8, 8, 16 * m)
  assert out['fusion_input'].shape == (4, 8, 8, 16 * m)
  assert out['fused'].shape == (4, 8, 8, 16) and out['fusion_logits'].shape == (4, 10)
  assert len(out['student_sd_targets']) == len(out['student_reconstructions']) == m - 1
  for outputs in (*out['student_sd_targets'], *out['student_reconstructions'], out['leader_sd_targets'],
                  out['leader_reconstructions']):
    assert tuple(o.shape for o in outputs) == taps[:-1]


def test_ffsd_model_init_in_eval_mode_builds_everything_and_bfloat16_outputs():
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  model = models.FFSDModel('resnet8_tiny', 10, dtype=jnp.bfloat16)
  train_tree = jax.eval_shape(lambda x: model.init(KEY, x, train=True), images)
  eval_tree = jax.eval_shape(lambda x: model.init(KEY, x, train=False), images)
  assert jax.tree.structure(train_tree) == jax.tree.structure(eval_tree)
  assert {leaf.dtype for leaf in jax.tree.leaves(train_tree)} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[0], train_tree, images)
  assert all(logits.dtype == jnp.float32 for logits in (*out['student_logits'], out['leader_logits'],
                                                        out['fusion_logits']))
  assert out['fused'].dtype == jnp.bfloat16 and out['student_sd_targets'][0][0].dtype == jnp.bfloat16


@pytest.fixture(scope='module')
def ffsd_run():
  """One jitted train-mode FFSDModel call (resnet8_tiny, m=2) on random variables."""
  model = models.FFSDModel('resnet8_tiny', 10, num_students=2)
  images = jnp.asarray(np.random.default_rng(4).normal(size=(4, 32, 32, 3)), jnp.float32)
  variables = random_variables(jax.eval_shape(lambda x: model.init(KEY, x), images))
  out, updated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(variables, images)
  return model, images, variables, out, updated['batch_stats']


def test_ffsd_decoder_targets_use_the_old_running_stats(ffsd_run):
  model, _, variables, out, new_stats = ffsd_run
  old_stats = variables['batch_stats']
  params = variables['params']
  decoder = heads.SelfDistillationDecoder(models.get_spec('resnet8_tiny').decoder_channels)
  for name in ('decoder_1', 'decoder_leader'):  # the train-mode pass updated the running stats …
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), old_stats[name], new_stats[name])
    assert all(jax.tree.leaves(changed))

  @jax.jit
  def eval_decoder(params, stats, x):
    return decoder.apply({'params': params, 'batch_stats': stats}, x, train=False)

  @jax.jit
  def train_decoder(params, stats, x):
    return decoder.apply({'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'])

  # … but the targets equal a separate eval-mode apply with the stats from before the call.
  shifted = diversity_shifted_feature(out['student_taps'][0][-1])
  targets = eval_decoder(params['decoder_1'], old_stats['decoder_1'], shifted)
  for got, want in zip(out['student_sd_targets'][0], targets):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with_new_stats = eval_decoder(params['decoder_1'], new_stats['decoder_1'], shifted)
  assert not np.allclose(out['student_sd_targets'][0][0], with_new_stats[0], atol=1e-3)
  leader_targets = eval_decoder(params['decoder_leader'], old_stats['decoder_leader'], out['fused'])
  for got, want in zip(out['leader_sd_targets'], leader_targets):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  # The train-mode passes: D_1 on student 1's own last tap, D_L on the leader's; they produce the new stats.
  for name, last_tap, reconstructions in (
      ('decoder_1', out['student_taps'][1][-1], out['student_reconstructions'][0]),
      ('decoder_leader', out['leader_taps'][-1], out['leader_reconstructions'])):
    want, updated = train_decoder(params[name], old_stats[name], last_tap)
    for got, expected in zip(reconstructions, want):
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 new_stats[name], updated['batch_stats'])

  np.testing.assert_array_equal(
      out['fusion_input'], jnp.concatenate([taps[-1] for taps in out['student_taps']], axis=-1))


def test_ffsd_leader_alone_equals_leader_inside_model(ffsd_run):
  model, images, variables, _, new_stats = ffsd_run
  variables = {'params': variables['params'], 'batch_stats': new_stats}  # non-trivial running stats
  eval_out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  leader = models.create_backbone('resnet8_tiny', 10)
  alone, _ = jax.jit(lambda v, x: leader.apply(v, x, train=False))(models.leader_variables(variables), images)
  np.testing.assert_allclose(eval_out['leader_logits'], alone, rtol=1e-5, atol=1e-5)
  assert set(models.leader_variables(variables)) == {'params', 'batch_stats'}
  assert not np.allclose(eval_out['leader_logits'], eval_out['student_logits'][0])


# --------------------------------------------------------------------------------------------------------------------
# Clear errors.

def test_unknown_backbone_lists_choices():
  with pytest.raises(ValueError, match='Valid choices: resnet20, resnet32'):
    models.get_spec('resnet999')
  with pytest.raises(ValueError, match='wideresnet1602'):
    models.FFSDModel('vgg16', 100)
  assert models.get_spec('WideResNet1602').name == 'wrn16_2'
  assert models.get_spec('densenet').name == 'densenet40'
  assert models.get_spec('wideresnet4002').name == 'wrn40_2'


def test_wrong_input_size_fails_in_python():
  cifar = models.create_backbone('resnet32', 100)
  with pytest.raises(ValueError, match='needs 32x32'):
    jax.eval_shape(lambda x: cifar.init(KEY, x, train=True), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  imagenet = models.create_backbone('resnet18', 1000)
  with pytest.raises(ValueError, match='224x224'):
    jax.eval_shape(lambda x: imagenet.init(KEY, x, train=True), jax.ShapeDtypeStruct((1, 100, 100, 3), jnp.float32))
  with pytest.raises(ValueError, match='32x32'):
    models.get_spec('googlenet').check_input_size(224, 224)
  model = models.FFSDModel('resnet8_tiny', 10)
  with pytest.raises(ValueError, match='32x32'):
    jax.eval_shape(lambda x: model.init(KEY, x), jax.ShapeDtypeStruct((1, 28, 28, 3), jnp.float32))


def test_channel_mismatch_fails_clearly():
  decoder = heads.SelfDistillationDecoder((64, 32, 16))
  with pytest.raises(ValueError, match='64 channels'):
    jax.eval_shape(lambda x: decoder.init(KEY, x, train=True), jax.ShapeDtypeStruct((1, 8, 8, 128), jnp.float32))
  fusion = heads.FusionModule(64, 2, 100)
  with pytest.raises(ValueError, match='128 channels'):
    jax.eval_shape(lambda x: fusion.init(KEY, x, train=True), jax.ShapeDtypeStruct((1, 8, 8, 64), jnp.float32))
  head = heads.TransFusionHead(64, 2)
  with pytest.raises(ValueError, match='64 channels'):
    jax.eval_shape(lambda x: head.init(KEY, x, train=True), jax.ShapeDtypeStruct((1, 8, 8, 32), jnp.float32))


def test_bad_method_or_student_count_fails_clearly():
  with pytest.raises(ValueError, match='valid choices: ffsd, dml, independent'):
    methods.method_class('kd')
  with pytest.raises(ValueError, match='with a fusion module needs num_students >= 2'):
    models.FFSDModel('resnet32', 100, num_students=1)
  with pytest.raises(ValueError, match='needs with_leader=True'):
    models.FFSDModel('resnet32', 100, with_leader=False)
  with pytest.raises(ValueError, match='num_students >= 1'):
    models.FFSDModel('resnet32', 100, num_students=0, with_fusion=False)
  models.FFSDModel('resnet32', 100, num_students=1, with_fusion=False)
  with pytest.raises(ValueError, match='no leader'):
    models.leader_variables({'params': {'student_0': {}}})
  with pytest.raises(ValueError, match='num_classes'):
    models.create_backbone('resnet32', 0)


def test_sub_pixel_transposed_conv_equals_flax_conv_transpose():
  """The decoder's sub-pixel transposed conv computes exactly nn.ConvTranspose with the same kernel, and its grads."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 5, 7, 6)), jnp.float32)  # Odd, non-square sizes exercise the border phases.
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)
  reference = nn.ConvTranspose(4, (3, 3), strides=(2, 2), padding=heads.DECODER_PADDING, use_bias=False,
                               transpose_kernel=True)
  ours = heads.StridedConvTranspose(4)

  def loss(module, kernel, x):
    return jnp.sum(jnp.sin(module.apply({'params': {'kernel': kernel}}, x)))

  np.testing.assert_allclose(ours.apply({'params': {'kernel': kernel}}, x),
                             reference.apply({'params': {'kernel': kernel}}, x), rtol=1e-5, atol=1e-5)
  for ours_grad, reference_grad in zip(jax.grad(lambda k, x: loss(ours, k, x), argnums=(0, 1))(kernel, x),
                                       jax.grad(lambda k, x: loss(reference, k, x), argnums=(0, 1))(kernel, x)):
    np.testing.assert_allclose(ours_grad, reference_grad, rtol=1e-4, atol=1e-4)


def test_depthwise_conv_equals_grouped_conv_and_numpy():
  """The heads' depthwise 3x3 (nine shifted multiply-adds) computes exactly PyTorch's groups=C conv, and its grads."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(3, 5, 7, 6)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 6)), jnp.float32)
  reference = nn.Conv(6, (3, 3), padding=layers.torch_padding(3), feature_group_count=6, use_bias=False)
  ours = heads.DepthwiseConv3x3()
  assert jax.eval_shape(lambda: ours.init(KEY, x))['params']['kernel'].shape == kernel.shape
  # NumPy (float64): out[n, h, w, c] = Σ_{dy, dx} x_pad[n, h + dy, w + dx, c] · kernel[dy, dx, 0, c].
  padded = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = sum(padded[:, dy:dy + 5, dx:dx + 7, :] * np.asarray(kernel, np.float64)[dy, dx, 0]
             for dy in range(3) for dx in range(3))
  np.testing.assert_allclose(ours.apply({'params': {'kernel': kernel}}, x), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(reference.apply({'params': {'kernel': kernel}}, x), want, rtol=1e-5, atol=1e-5)

  def loss(module, kernel, x):
    return jnp.sum(jnp.sin(module.apply({'params': {'kernel': kernel}}, x)))

  for ours_grad, reference_grad in zip(jax.grad(lambda k, x: loss(ours, k, x), argnums=(0, 1))(kernel, x),
                                       jax.grad(lambda k, x: loss(reference, k, x), argnums=(0, 1))(kernel, x)):
    np.testing.assert_allclose(ours_grad, reference_grad, rtol=1e-4, atol=1e-4)
