"""CIFAR ResNet-20/32/56/110 with BasicBlocks and option-B shortcuts (docs/method.md §3.1).

Taps are the outputs of the three stages (after each stage's last ReLU): 16@32, 32@16, 64@8 for the standard widths.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffsd_jax.models import layers

ModuleDef = layers.ModuleDef


class BasicBlock(nn.Module):
  """conv3x3(stride) → BN → ReLU → conv3x3 → BN → + shortcut → ReLU; shortcut conv1x1(stride) + BN when needed."""
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x
    y = self.conv(self.features, (3, 3), strides=(self.strides, self.strides), padding=layers.torch_padding(3),
                  name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), padding=layers.torch_padding(3), name='conv2')(y)
    y = self.norm(name='bn2')(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      # Option B: a projection shortcut (1x1 conv, no bias, + BN), not He et al.'s zero-padding option A.
      residual = self.conv(self.features, (1, 1), strides=(self.strides, self.strides), padding='VALID',
                           name='shortcut_conv')(x)
      residual = self.norm(name='shortcut_bn')(residual)
    return nn.relu(y + residual)


class CifarResNet(nn.Module):
  """The CIFAR ResNet of the reference: stem conv3x3(3→w0) + BN + ReLU, three stages (strides 1, 2, 2), GAP, Linear.

  With `stages=(start, stop)` the module is that contiguous range of stages (stage 0 includes the stem, the head
  follows the last stage): it takes images when start == 0, else tap start−1 of the full network, and returns
  `(logits, taps)` when stop is the last stage, else `(features, taps)`; its variables keep the full network's names.

  Attributes:
    stage_sizes: BasicBlocks per stage, e.g. (5, 5, 5) for ResNet-32.
    num_classes: classifier width.
    widths: the three stage widths (16, 32, 64 in the reference).
    dtype: compute dtype (parameters are float32; logits are returned in float32).
    arch: the registry name, used in error messages.
    stages: (start, stop), a contiguous range of stages; None for the whole network.
  """
  stage_sizes: Sequence[int]
  num_classes: int
  widths: Sequence[int] = (16, 32, 64)
  dtype: jnp.dtype = jnp.float32
  arch: str = 'cifar_resnet'
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  stages: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    num_stages = len(self.stage_sizes)
    start, stop = layers.stage_range(self.stages, num_stages, self.arch)
    conv = layers.conv_factory(self.conv, self.dtype)
    norm = layers.norm_factory(self.norm, train, self.dtype)
    if start == 0:
      layers.check_cifar_input(x, self.arch)
      x = conv(self.widths[0], (3, 3), padding=layers.torch_padding(3), name='conv1')(x.astype(self.dtype))
      x = nn.relu(norm(name='bn1')(x))
    else:
      layers.check_stage_input(x, self.arch, start, self.widths[start - 1], size=32 >> (start - 1))
      x = x.astype(self.dtype)
    taps = []
    for stage in range(start, stop):
      for block in range(self.stage_sizes[stage]):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.widths[stage], conv=conv, norm=norm, strides=strides, name=f'layer{stage + 1}_{block}')(x)
      taps.append(x)
    if stop < num_stages:
      return x, tuple(taps)
    logits = layers.classifier_logits(x, self.num_classes, dtype=self.dtype, name='fc')
    return logits, tuple(taps)


ResNet8 = functools.partial(CifarResNet, stage_sizes=(1, 1, 1), arch='resnet8')
ResNet8Tiny = functools.partial(CifarResNet, stage_sizes=(1, 1, 1), widths=(4, 8, 16), arch='resnet8_tiny')
ResNet20 = functools.partial(CifarResNet, stage_sizes=(3, 3, 3), arch='resnet20')
ResNet32 = functools.partial(CifarResNet, stage_sizes=(5, 5, 5), arch='resnet32')
ResNet56 = functools.partial(CifarResNet, stage_sizes=(9, 9, 9), arch='resnet56')
# Not in the official code (docs/method.md §13.9); the standard definition, BasicBlock [18, 18, 18].
ResNet110 = functools.partial(CifarResNet, stage_sizes=(18, 18, 18), arch='resnet110')
