"""ImageNet ResNet-18/34 in the torchvision layout (docs/method.md §3.5), plus a tiny variant for tests.

Stem conv7x7/2 (no bias) → BN → ReLU → maxpool 3/2; four BasicBlock stages (strides 1, 2, 2, 2) with option-B
shortcuts; global average pool; fc. Taps: the four stage outputs (64@56, 128@28, 256@14, 512@7 at 224x224).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffsd_jax.models import layers
from ffsd_jax.models.resnet_cifar import BasicBlock

ModuleDef = layers.ModuleDef


class ImageNetResNet(nn.Module):
  """torchvision-style ResNet with BasicBlocks.

  With `stages=(start, stop)` the module is that contiguous range of stages (stage 0 includes the stem and its max
  pool, the head follows the last stage): it takes images when start == 0, else tap start−1 of the full network, and
  returns `(logits, taps)` when stop is the last stage, else `(features, taps)`; its variables keep the full network's
  names.

  Attributes:
    stage_sizes: BasicBlocks per stage, (2, 2, 2, 2) for ResNet-18, (3, 4, 6, 3) for ResNet-34.
    num_classes: classifier width.
    widths: the four stage widths; the stem has widths[0] channels.
    dtype: compute dtype.
    arch: the registry name, used in error messages.
    stages: (start, stop), a contiguous range of stages; None for the whole network.
  """
  stage_sizes: Sequence[int]
  num_classes: int
  widths: Sequence[int] = (64, 128, 256, 512)
  dtype: jnp.dtype = jnp.float32
  arch: str = 'imagenet_resnet'
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
      layers.check_imagenet_input(x, self.arch)
      x = conv(self.widths[0], (7, 7), strides=(2, 2), padding=layers.torch_padding(7), name='conv1')(
          x.astype(self.dtype))
      x = nn.relu(norm(name='bn1')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      # The tap sizes scale with the input size, so only the layout and channels are checked.
      layers.check_stage_input(x, self.arch, start, self.widths[start - 1])
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


ResNet18 = functools.partial(ImageNetResNet, stage_sizes=(2, 2, 2, 2), arch='resnet18')
ResNet34 = functools.partial(ImageNetResNet, stage_sizes=(3, 4, 6, 3), arch='resnet34')
ResNetImageNetTiny = functools.partial(ImageNetResNet, stage_sizes=(1, 1, 1, 1), widths=(8, 16, 32, 64),
                                       arch='resnet_imagenet_tiny')
