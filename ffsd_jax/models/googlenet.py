"""CIFAR GoogLeNet (Inception v1 style), as in the official code (docs/method.md §3.4).

Every conv has a bias (PyTorch default init) and is followed by BN + ReLU. Taps: b3 480@32, e4 832@16, b5 1024@8.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffsd_jax.models import layers

ModuleDef = layers.ModuleDef

# (n1x1, n3x3red, n3x3, n5x5red, n5x5, pool_planes); the "5x5" branch is two 3x3 convs (n5x5red → n5x5 → n5x5).
INCEPTION_FILTERS = {
    'a3': (64, 96, 128, 16, 32, 32),
    'b3': (128, 128, 192, 32, 96, 64),
    'a4': (192, 96, 208, 16, 48, 64),
    'b4': (160, 112, 224, 24, 64, 64),
    'c4': (128, 128, 256, 24, 64, 64),
    'd4': (112, 144, 288, 32, 64, 64),
    'e4': (256, 160, 320, 32, 128, 128),
    'a5': (256, 160, 320, 32, 128, 128),
    'b5': (384, 192, 384, 48, 128, 128),
}

# The Inception blocks of each stage; each stage's last block is its tap.
STAGES = (('a3', 'b3'), ('a4', 'b4', 'c4', 'd4', 'e4'), ('a5', 'b5'))


def inception_channels(name: str) -> int:
  """Output channels of Inception block `name`: its four concatenated branches."""
  n1x1, _, n3x3, _, n5x5, pool_planes = INCEPTION_FILTERS[name]
  return n1x1 + n3x3 + n5x5 + pool_planes


def _max_pool(x: jax.Array, strides: int) -> jax.Array:
  # PyTorch MaxPool2d(3, stride, padding=1) pads with −inf, as Flax's max_pool does.
  return nn.max_pool(x, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)))


class ConvBNReLU(nn.Module):
  """conv (with PyTorch default bias) → BN → ReLU."""
  features: int
  kernel_size: int
  norm: ModuleDef
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = layers.biased_conv(self.features, self.kernel_size, x.shape[-1], dtype=self.dtype, name='conv')(x)
    return nn.relu(self.norm(name='bn')(x))


class Inception(nn.Module):
  """Four branches concatenated on channels: 1x1; 1x1→3x3; 1x1→3x3→3x3; maxpool 3/1→1x1."""
  filters: tuple[int, int, int, int, int, int]
  norm: ModuleDef
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n1x1, n3x3red, n3x3, n5x5red, n5x5, pool_planes = self.filters
    unit = lambda features, kernel, name: ConvBNReLU(features, kernel, norm=self.norm, dtype=self.dtype, name=name)
    b1 = unit(n1x1, 1, 'b1_0')(x)
    b2 = unit(n3x3, 3, 'b2_1')(unit(n3x3red, 1, 'b2_0')(x))
    b3 = unit(n5x5, 3, 'b3_2')(unit(n5x5, 3, 'b3_1')(unit(n5x5red, 1, 'b3_0')(x)))
    b4 = unit(pool_planes, 1, 'b4_1')(_max_pool(x, 1))
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class GoogLeNet(nn.Module):
  """Pre-layer conv3x3(3→192) + BN + ReLU; a3 b3 | maxpool | a4 b4 c4 d4 e4 | maxpool | a5 b5; AvgPool(8); Linear.

  Stage k is the k-th group of `STAGES` (stage 0 includes the pre-layer, stages 1 and 2 open with their max pool).
  With `stages=(start, stop)` the module is that contiguous range of stages (the head follows the last stage): it
  takes images when start == 0, else tap start−1 of the full network, and returns `(logits, taps)` when stop is the
  last stage, else `(features, taps)`; its variables keep the full network's names.

  Attributes:
    num_classes: classifier width.
    dtype: compute dtype.
    arch: the registry name, used in error messages.
    stages: (start, stop), a contiguous range of stages; None for the whole network.
  """
  num_classes: int
  dtype: jnp.dtype = jnp.float32
  arch: str = 'googlenet'
  norm: ModuleDef = nn.BatchNorm
  stages: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    start, stop = layers.stage_range(self.stages, len(STAGES), self.arch)
    norm = layers.norm_factory(self.norm, train, self.dtype)
    inception = lambda name: Inception(INCEPTION_FILTERS[name], norm=norm, dtype=self.dtype, name=name)
    if start == 0:
      layers.check_cifar_input(x, self.arch)
      x = ConvBNReLU(192, 3, norm=norm, dtype=self.dtype, name='pre_layers')(x.astype(self.dtype))
    else:
      layers.check_stage_input(x, self.arch, start, inception_channels(STAGES[start - 1][-1]), size=32 >> (start - 1))
      x = x.astype(self.dtype)
    taps = []
    for stage in range(start, stop):
      if stage > 0:
        x = _max_pool(x, 2)
      for name in STAGES[stage]:
        x = inception(name)(x)
      taps.append(x)  # inception_b3: 480@32, inception_e4: 832@16, inception_b5: 1024@8
    if stop < len(STAGES):
      return x, tuple(taps)
    logits = layers.classifier_logits(x, self.num_classes, dtype=self.dtype, name='linear')
    return logits, tuple(taps)
