"""PyTorch-faithful initialisers, the batch-norm factory and small shared layers (docs/method.md §3.6, §12).

Every model family takes `conv` / `norm` module factories the Flax-imagenet way and binds the initialisers below, so
that a freshly initialised network has the same parameter distributions as the PyTorch reference:

- backbone and head convolutions: He normal with fan_out (`kaiming_normal_(mode='fan_out', nonlinearity='relu')`);
- `nn.Linear`: PyTorch's default, kernel and bias ~ U(±1/√fan_in);
- conv biases (WRN, GoogLeNet): PyTorch's default U(±1/√(C_in·k·k));
- the decoders' `ConvTranspose2d`: PyTorch's default U(±1/√(9·C_out)), no bias;
- batch norm: γ=1, β=0, eps 1e-5, PyTorch momentum 0.1 = Flax momentum 0.9.

Parameters are always float32; `dtype` is only the compute dtype.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any
Dtype = Any
Initializer = Callable[..., jax.Array]

# Flax momentum = 1 − PyTorch momentum (PyTorch default 0.1).
BN_MOMENTUM = 0.9
# WRN's final `bn1` has PyTorch momentum 0.9 in the official code (docs/method.md §3.2), i.e. Flax momentum 0.1.
WRN_FINAL_BN_MOMENTUM = 0.1
BN_EPSILON = 1e-5


def conv_kernel_init() -> Initializer:
  """He normal with fan_out: N(0, 2 / (k·k·C_out)); for a depthwise (k, k, 1, C) kernel fan_out is k·k·C as in PyTorch."""
  return nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def dense_kernel_init() -> Initializer:
  """PyTorch `nn.Linear` weight default (kaiming_uniform, a=√5): U(±1/√fan_in)."""
  return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def symmetric_uniform_init(bound: float) -> Initializer:
  """U(−bound, bound) for any shape, in the requested dtype."""

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

  return init


def torch_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default bias of a Conv2d / Linear: U(±1/√fan_in), fan_in = C_in·k·k (C_in for a Linear)."""
  return symmetric_uniform_init(1.0 / math.sqrt(fan_in))


def conv_transpose_kernel_init(out_channels: int, kernel_size: int = 3) -> Initializer:
  """PyTorch's default `ConvTranspose2d` weight, U(±1/√(k·k·C_out)) (PyTorch's fan_in of a (C_in, C_out, k, k) weight)."""
  return symmetric_uniform_init(1.0 / math.sqrt(kernel_size * kernel_size * out_channels))


def torch_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Symmetric padding k//2 on both sides, as PyTorch's `padding=k//2`.

  Flax's 'SAME' pads (0, 1) for a stride-2 3x3 conv on an even input, PyTorch pads (1, 1): the output size is the same
  but the sampling grid is shifted by one pixel, so explicit padding is used everywhere.
  """
  pad = kernel_size // 2
  return ((pad, pad), (pad, pad))


def conv_factory(conv: ModuleDef, dtype: Dtype) -> ModuleDef:
  """A bias-free conv factory with the He fan_out init; callers pass features, kernel size, strides, padding, name."""
  return functools.partial(conv, use_bias=False, dtype=dtype, kernel_init=conv_kernel_init())


def norm_factory(norm: ModuleDef, train: bool, dtype: Dtype, momentum: float = BN_MOMENTUM) -> ModuleDef:
  """A batch-norm factory: batch statistics and running-stat updates in train mode, running stats in eval mode.

  Args:
    norm: the module class, normally `nn.BatchNorm`.
    train: True for batch statistics (and running-stat updates when `batch_stats` is mutable).
    dtype: compute dtype; the statistics are reduced in float32 regardless (Flax `force_float32_reductions`).
    momentum: Flax momentum (= 1 − PyTorch momentum).

  Returns:
    `norm` with use_running_average, momentum, epsilon and dtype bound; γ=1 and β=0 are the Flax defaults.
  """
  return functools.partial(norm, use_running_average=not train, momentum=momentum, epsilon=BN_EPSILON, dtype=dtype)


def biased_conv(features: int, kernel_size: int, in_channels: int, *, dtype: Dtype, strides: int = 1,
                name: str | None = None) -> nn.Conv:
  """A conv with PyTorch's default bias (WRN, GoogLeNet): He fan_out kernel, bias U(±1/√(C_in·k·k)), padding k//2."""
  return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides), padding=torch_padding(kernel_size),
                 use_bias=True, dtype=dtype, kernel_init=conv_kernel_init(),
                 bias_init=torch_bias_init(in_channels * kernel_size * kernel_size), name=name)


def torch_dense(features: int, in_features: int, *, dtype: Dtype, name: str | None = None) -> nn.Dense:
  """A Dense layer with PyTorch `nn.Linear` defaults: kernel and bias U(±1/√in_features)."""
  return nn.Dense(features, dtype=dtype, kernel_init=dense_kernel_init(), bias_init=torch_bias_init(in_features),
                  name=name)


def classifier_logits(features: jax.Array, num_classes: int, *, dtype: Dtype, name: str = 'fc') -> jax.Array:
  """Global average pool (the reference's AvgPool over the whole 8x8 / 7x7 map) and a PyTorch-initialised Linear.

  The logits are returned in float32 whatever the compute dtype.
  """
  pooled = jnp.mean(features, axis=(1, 2))
  logits = torch_dense(num_classes, features.shape[-1], dtype=dtype, name=name)(pooled)
  return logits.astype(jnp.float32)


def check_cifar_input(images: jax.Array, model: str) -> None:
  """Raise a clear ValueError unless `images` is (B, 32, 32, C), before XLA sees a shape mismatch."""
  if images.ndim != 4 or tuple(images.shape[1:3]) != (32, 32):
    raise ValueError(
        f'{model} is a CIFAR-layout network and needs 32x32 NHWC inputs (its last tap must be 8x8 for the '
        f'fusion module and the 8x8 average pool); got shape {tuple(images.shape)}. Resize/crop the images to 32x32 '
        f'or pick an ImageNet-layout backbone (resnet18, resnet34).')


def check_imagenet_input(images: jax.Array, model: str) -> None:
  """Raise a clear ValueError unless H and W are multiples of 32 and at least 64 (224 is the default).

  The stem and the four stages divide the size by 32 exactly, so each tap is then exactly twice the next one (the
  decoder's ×2 upsampling reproduces the tap sizes), and the last tap has at least 2x2 positions (the diversity shift
  needs ≥ 3).
  """
  if images.ndim != 4:
    raise ValueError(f'{model} needs NHWC inputs (B, H, W, 3); got shape {tuple(images.shape)}.')
  height, width = images.shape[1:3]
  if height % 32 or width % 32 or height < 64 or width < 64:
    raise ValueError(
        f'{model} is an ImageNet-layout network and needs an input size that is a multiple of 32 and at least 64 '
        f'(expected 224x224 by default, giving taps 56/28/14/7); got {height}x{width} in shape '
        f'{tuple(images.shape)}. Resize/crop the images, e.g. to 224x224.')


def stage_range(stages: Sequence[int] | None, num_stages: int, model: str) -> tuple[int, int]:
  """Validate a backbone's `stages` attribute and return it as (start, stop); None means all stages.

  Raises:
    ValueError: unless `stages` is None or a pair of ints with 0 <= start < stop <= num_stages; the message names the
      valid range.
  """
  if stages is None:
    return 0, num_stages
  valid = (f'{model} has {num_stages} stages (stage k outputs tap k; stage 0 includes the stem, the head follows '
           f'stage {num_stages - 1}): stages must be None (all) or (start, stop) with 0 <= start < stop <= '
           f'{num_stages}')
  if (isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or len(stages) != 2
      or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in stages)):
    raise ValueError(f'{valid}; got {stages!r}.')
  start, stop = int(stages[0]), int(stages[1])
  if not 0 <= start < stop <= num_stages:
    raise ValueError(f'{valid}; got {stages!r}.')
  return start, stop


def check_stage_input(features: jax.Array, model: str, start: int, channels: int, size: int | None = None) -> None:
  """Raise a clear ValueError unless `features` looks like what stage `start - 1` of `model` outputs.

  Checked before any layer is built, because a wrong channel count would otherwise silently initialise a different
  parameter tree (e.g. an extra projection shortcut) instead of failing.

  Args:
    features: the input of a backbone built with stages=(start, stop), start > 0.
    model: the registry name, for the message.
    start: the first stage of the module.
    channels: the channels of tap `start - 1`.
    size: the spatial size of tap `start - 1` where it is fixed (CIFAR layout), else None.
  """
  shape = tuple(features.shape)
  size_ok = size is None or (len(shape) == 4 and shape[1:3] == (size, size))
  if len(shape) != 4 or shape[-1] != channels or not size_ok:
    expected = f'(B, {size}, {size}, {channels})' if size is not None else f'(B, H, W, {channels})'
    raise ValueError(
        f'{model} built with stages starting at {start} takes the output of stage {start - 1} (tap {start - 1} of the '
        f'full network), an NHWC map of shape {expected}; got shape {shape}. Only stages starting at 0 take images.')
