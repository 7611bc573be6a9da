"""DenseNet-40 (growth 12, basic non-bottleneck layers, no compression) for CIFAR (docs/method.md §3.3).

Channels: 24 after the stem, 168 after dense1, 312 after dense2, 456 after dense3. Taps: dense1 168@32, dense2 312@16,
relu 456@8 (after the final BN + ReLU).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffsd_jax.models import layers

ModuleDef = layers.ModuleDef

# Dense blocks, i.e. stages (one tap each).
NUM_DENSE_BLOCKS = 3


class DenseLayer(nn.Module):
  """BN → ReLU → conv3x3(→growth, no bias), concatenated after the input on channels."""
  growth_rate: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.relu(self.norm(name='bn1')(x))
    y = self.conv(self.growth_rate, (3, 3), padding=layers.torch_padding(3), name='conv1')(y)
    return jnp.concatenate([x, y], axis=-1)


class Transition(nn.Module):
  """BN → ReLU → conv1x1(c→c·compression, no bias) → avgpool 2."""
  out_channels: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.relu(self.norm(name='bn1')(x))
    y = self.conv(self.out_channels, (1, 1), padding='VALID', name='conv1')(y)
    return nn.avg_pool(y, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
  """The reference `DenseNet` with its defaults (depth 40, growth 12, compression 1, no dropout).

  Stage k is dense block k+1, preceded by the transition of block k (stage 0: by the stem); the final BN + ReLU belong
  to the last stage (its tap is relu). With `stages=(start, stop)` the module is that contiguous range of stages (the
  head follows the last stage): it takes images when start == 0, else tap start−1 of the full network, and returns
  `(logits, taps)` when stop is the last stage, else `(features, taps)`; its variables keep the full network's names.

  Attributes:
    num_classes: classifier width.
    depth: network depth; (depth − 4) / 3 basic layers per dense block.
    growth_rate: channels added per dense layer.
    compression: transition output = floor(channels · compression); 1 in the reference.
    dtype: compute dtype.
    arch: the registry name, used in error messages.
    stages: (start, stop), a contiguous range of stages; None for the whole network.
  """
  num_classes: int
  depth: int = 40
  growth_rate: int = 12
  compression: float = 1.0
  dtype: jnp.dtype = jnp.float32
  arch: str = 'densenet40'
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  stages: tuple[int, int] | None = None

  def tap_channels(self, stage: int) -> int:
    """Channels of the tap of `stage` (the output of dense block stage+1, before any transition or final BN)."""
    layers_per_block = (self.depth - 4) // 3
    channels = 2 * self.growth_rate
    for block in range(stage + 1):
      if block > 0:
        channels = int(channels * self.compression)
      channels += layers_per_block * self.growth_rate
    return channels

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    if (self.depth - 4) % 3:
      raise ValueError(f'DenseNet depth must be 3n+4 (e.g. 40); got {self.depth}.')
    layers_per_block = (self.depth - 4) // 3
    start, stop = layers.stage_range(self.stages, NUM_DENSE_BLOCKS, self.arch)
    conv = layers.conv_factory(self.conv, self.dtype)
    norm = layers.norm_factory(self.norm, train, self.dtype)
    if start == 0:
      layers.check_cifar_input(x, self.arch)
      x = conv(2 * self.growth_rate, (3, 3), padding=layers.torch_padding(3), name='conv1')(x.astype(self.dtype))
    else:
      layers.check_stage_input(x, self.arch, start, self.tap_channels(start - 1), size=32 >> (start - 1))
      x = x.astype(self.dtype)
    taps = []
    for block in range(start, stop):
      if block > 0:
        # The transition sits after the previous block's tap (dense1, dense2), so it opens this stage.
        x = Transition(int(x.shape[-1] * self.compression), conv=conv, norm=norm, name=f'trans{block}')(x)
      for index in range(layers_per_block):
        x = DenseLayer(self.growth_rate, conv=conv, norm=norm, name=f'dense{block + 1}_{index}')(x)
      if block == NUM_DENSE_BLOCKS - 1:
        x = nn.relu(norm(name='bn')(x))
      taps.append(x)  # dense1, dense2, relu
    if stop < NUM_DENSE_BLOCKS:
      return x, tuple(taps)
    logits = layers.classifier_logits(x, self.num_classes, dtype=self.dtype, name='fc')
    return logits, tuple(taps)


DenseNet40 = functools.partial(DenseNet, depth=40, growth_rate=12, arch='densenet40')
