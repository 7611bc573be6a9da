"""The fusion module, the leader's trans-fusion head and the self-distillation decoder (reference §4).

Decoder kernel layout: the units use `nn.ConvTranspose(..., transpose_kernel=True)`, whose kernel K has shape
(3, 3, C_out, C_in) and satisfies K[kh, kw, o, i] = W_torch[i, o, kh, kw] for a PyTorch `ConvTranspose2d` weight
W_torch (C_in, C_out, 3, 3): the layer then computes exactly PyTorch's transposed convolution (the gradient of a
convolution) with the same kernel orientation, so a PyTorch weight ports by an axis transpose, no flip. With padding
((1, 2), (1, 2)) it matches `ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1)`: every unit doubles H and W
(Flax 'SAME' would pad (2, 1) and shift the output by one pixel). `tests/test_models.py` checks this against a NumPy
implementation of PyTorch's scatter definition.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffsd_jax.models import layers

ModuleDef = layers.ModuleDef

# lax.conv_transpose pads the stride-dilated input: k−1−p = 1 before and k−1−p+output_padding = 2 after.
DECODER_PADDING = ((1, 2), (1, 2))


def _check_channels(x: jax.Array, expected: int, what: str) -> None:
  if x.ndim != 4 or x.shape[-1] != expected:
    raise ValueError(f'{what} expects an NHWC input with {expected} channels; got shape {tuple(x.shape)}. Check that '
                     f'the backbone spec (tap channels / decoder chain) matches the features fed in.')


def _depthwise_conv(channels: int, dtype: jnp.dtype, name: str) -> nn.Conv:
  return nn.Conv(channels, (3, 3), padding=layers.torch_padding(3), feature_group_count=channels, use_bias=False,
                 dtype=dtype, kernel_init=layers.conv_kernel_init(), name=name)


def _pointwise_conv(channels: int, dtype: jnp.dtype, name: str) -> nn.Conv:
  return nn.Conv(channels, (1, 1), padding='VALID', use_bias=False, dtype=dtype, kernel_init=layers.conv_kernel_init(),
                 name=name)


class FusionModule(nn.Module):
  """F (§4.1): depthwise 3x3 on C·m + BN + ReLU, 1x1 C·m→C + BN + ReLU (= h_F), global average pool, Linear.

  Attributes:
    channels: C, the channels of one student's last tap.
    num_students: m; the input is the concatenation of m last taps, C·m channels.
    num_classes: classifier width.
    dtype: compute dtype.
  """
  channels: int
  num_students: int
  num_classes: int
  dtype: jnp.dtype = jnp.float32
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, z: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """Returns `(fusion_logits z_F (float32), fused map h_F)`."""
    in_channels = self.channels * self.num_students
    _check_channels(z, in_channels, f'FusionModule(C={self.channels}, m={self.num_students})')
    norm = layers.norm_factory(self.norm, train, self.dtype)
    x = _depthwise_conv(in_channels, self.dtype, 'conv1')(z.astype(self.dtype))
    x = nn.relu(norm(name='bn1')(x))
    x = _pointwise_conv(self.channels, self.dtype, 'conv1_1')(x)
    fused = nn.relu(norm(name='bn1_1')(x))
    logits = layers.classifier_logits(fused, self.num_classes, dtype=self.dtype, name='fc2')
    return logits, fused


class TransFusionHead(nn.Module):
  """The leader's trans-fusion head (§4.2): depthwise 3x3 on C + BN + ReLU, 1x1 C→C·m + BN + ReLU → t_L."""
  channels: int
  num_students: int
  dtype: jnp.dtype = jnp.float32
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    _check_channels(x, self.channels, f'TransFusionHead(C={self.channels})')
    norm = layers.norm_factory(self.norm, train, self.dtype)
    x = _depthwise_conv(self.channels, self.dtype, 'conv1')(x.astype(self.dtype))
    x = nn.relu(norm(name='bn1')(x))
    x = _pointwise_conv(self.channels * self.num_students, self.dtype, 'conv1_1')(x)
    return nn.relu(norm(name='bn1_1')(x))


class DecoderUnit(nn.Module):
  """ConvTranspose(k3, s2, PyTorch padding 1 + output_padding 1, no bias) → BN → ReLU; doubles H and W."""
  features: int
  dtype: jnp.dtype = jnp.float32
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.ConvTranspose(self.features, (3, 3), strides=(2, 2), padding=DECODER_PADDING, use_bias=False,
                         transpose_kernel=True, dtype=self.dtype,
                         kernel_init=layers.conv_transpose_kernel_init(self.features), name='deconv')(x)
    return nn.relu(layers.norm_factory(self.norm, train, self.dtype)(name='bn')(x))


class SelfDistillationDecoder(nn.Module):
  """D (§4.3): a chain of decoder units from the last tap up to the shallowest one.

  Attributes:
    channels: the chain, input channels first, e.g. (64, 32, 16) (generic halving) or the hard-coded
      (456, 312, 168) / (1024, 832, 480); one unit per step.
    dtype: compute dtype.
  """
  channels: Sequence[int]
  dtype: jnp.dtype = jnp.float32
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, ...]:
    """Returns every unit's output, reversed so that index j matches tap j (0 = shallowest)."""
    _check_channels(x, self.channels[0], f'SelfDistillationDecoder(chain={tuple(self.channels)})')
    x = x.astype(self.dtype)
    outputs = []
    for index, features in enumerate(self.channels[1:]):
      x = DecoderUnit(features, dtype=self.dtype, norm=self.norm, name=f'unit{index}')(x, train)
      outputs.append(x)
    return tuple(reversed(outputs))
