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

  Attributes:
    num_classes: classifier width.
    depth: network depth; (depth − 4) / 3 basic layers per dense block.
    growth_rate: channels added per dense layer.
    compression: transition output = floor(channels · compression); 1 in the reference.
    dtype: compute dtype.
    arch: the registry name, used in error messages.
  """
  num_classes: int
  depth: int = 40
  growth_rate: int = 12
  compression: float = 1.0
  dtype: jnp.dtype = jnp.float32
  arch: str = 'densenet40'
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    layers.check_cifar_input(x, self.arch)
    if (self.depth - 4) % 3:
      raise ValueError(f'DenseNet depth must be 3n+4 (e.g. 40); got {self.depth}.')
    layers_per_block = (self.depth - 4) // 3
    conv = layers.conv_factory(self.conv, self.dtype)
    norm = layers.norm_factory(self.norm, train, self.dtype)
    x = conv(2 * self.growth_rate, (3, 3), padding=layers.torch_padding(3), name='conv1')(x.astype(self.dtype))
    taps = []
    for block in range(3):
      for index in range(layers_per_block):
        x = DenseLayer(self.growth_rate, conv=conv, norm=norm, name=f'dense{block + 1}_{index}')(x)
      if block < 2:
        taps.append(x)  # dense1, dense2
        x = Transition(int(x.shape[-1] * self.compression), conv=conv, norm=norm, name=f'trans{block + 1}')(x)
    x = nn.relu(norm(name='bn')(x))
    taps.append(x)  # relu
    logits = layers.classifier_logits(x, self.num_classes, dtype=self.dtype, name='fc')
    return logits, tuple(taps)


DenseNet40 = functools.partial(DenseNet, depth=40, growth_rate=12, arch='densenet40')
