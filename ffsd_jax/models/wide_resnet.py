"""Pre-activation Wide ResNet WRN-16-2 / WRN-40-2 for CIFAR, as in the official code (docs/method.md §3.2).

Faithful details: every conv has a bias (PyTorch default init); the stride sits on the block's second conv; the
projection shortcut is a 1x1 conv with bias and no BN; the final BN has PyTorch momentum 0.9 (Flax 0.1). Dropout is 0 in
the reference and is therefore omitted. Taps: layer1 and layer2 (raw pre-activation sums) and relu1 (post final BN+ReLU).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffsd_jax.models import layers

ModuleDef = layers.ModuleDef


class WideBasic(nn.Module):
  """out = conv1(relu(bn1(x))); out = conv2(relu(bn2(out))) with stride s; out += shortcut(x)."""
  features: int
  norm: ModuleDef
  dtype: jnp.dtype
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_channels = x.shape[-1]
    y = nn.relu(self.norm(name='bn1')(x))
    y = layers.biased_conv(self.features, 3, in_channels, dtype=self.dtype, name='conv1')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = layers.biased_conv(self.features, 3, self.features, dtype=self.dtype, strides=self.strides, name='conv2')(y)
    if self.strides != 1 or in_channels != self.features:
      shortcut = nn.Conv(self.features, (1, 1), strides=(self.strides, self.strides), padding='VALID', use_bias=True,
                         dtype=self.dtype, kernel_init=layers.conv_kernel_init(),
                         bias_init=layers.torch_bias_init(in_channels), name='shortcut_conv')(x)
    else:
      shortcut = x
    return y + shortcut


class WideResNet(nn.Module):
  """WRN-depth-k: conv3x3(3→16, bias), three stages of (depth−4)/6 blocks (widths 16k, 32k, 64k; strides 1, 2, 2).

  The final BN + ReLU belong to the last stage (its tap is relu1). With `stages=(start, stop)` the module is that
  contiguous range of stages (stage 0 includes the stem, the head follows the last stage): it takes images when
  start == 0, else tap start−1 of the full network, and returns `(logits, taps)` when stop is the last stage, else
  `(features, taps)`; its variables keep the full network's names.

  Attributes:
    depth: 16 or 40 in the reference; must satisfy (depth − 4) % 6 == 0.
    widen_factor: k.
    num_classes: classifier width.
    dtype: compute dtype.
    arch: the registry name, used in error messages.
    stages: (start, stop), a contiguous range of stages; None for the whole network.
  """
  depth: int
  widen_factor: int
  num_classes: int
  dtype: jnp.dtype = jnp.float32
  arch: str = 'wide_resnet'
  norm: ModuleDef = nn.BatchNorm
  stages: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    if (self.depth - 4) % 6:
      raise ValueError(f'WRN depth must be 6n+4 (e.g. 16, 40); got {self.depth}.')
    blocks_per_stage = (self.depth - 4) // 6
    norm = layers.norm_factory(self.norm, train, self.dtype)
    widths = (16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor)
    num_stages = len(widths)
    start, stop = layers.stage_range(self.stages, num_stages, self.arch)
    if start == 0:
      layers.check_cifar_input(x, self.arch)
      x = layers.biased_conv(16, 3, x.shape[-1], dtype=self.dtype, name='conv1')(x.astype(self.dtype))
    else:
      layers.check_stage_input(x, self.arch, start, widths[start - 1], size=32 >> (start - 1))
      x = x.astype(self.dtype)
    taps = []
    for stage in range(start, stop):
      for block in range(blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = WideBasic(widths[stage], norm=norm, dtype=self.dtype, strides=strides, name=f'layer{stage + 1}_{block}')(x)
      if stage == num_stages - 1:
        x = layers.norm_factory(self.norm, train, self.dtype, momentum=layers.WRN_FINAL_BN_MOMENTUM)(name='bn1')(x)
        x = nn.relu(x)
      taps.append(x)  # layer1, layer2: raw pre-activation sums (can be negative); relu1
    if stop < num_stages:
      return x, tuple(taps)
    logits = layers.classifier_logits(x, self.num_classes, dtype=self.dtype, name='fc')
    return logits, tuple(taps)


WRN16_2 = functools.partial(WideResNet, depth=16, widen_factor=2, arch='wrn16_2')
WRN40_2 = functools.partial(WideResNet, depth=40, widen_factor=2, arch='wrn40_2')
