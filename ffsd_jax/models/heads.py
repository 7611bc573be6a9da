"""The fusion module, the leader's trans-fusion head and the self-distillation decoder (docs/method.md §4).

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


class DepthwiseConv3x3(nn.Module):
  """PyTorch `Conv2d(C, C, 3, padding=1, groups=C, bias=False)`, computed as nine shifted multiply-adds.

  The parameter is the one `nn.Conv(C, (3, 3), feature_group_count=C, use_bias=False)` would hold: `kernel` of shape
  (3, 3, 1, C), He fan_out initialised, and the output is the same. XLA's grouped convolution (and its gradients) is
  slow on CPU: for the fusion module's 128 channels at 8×8, batch 128, forward and backward took 0.20 s as a grouped
  convolution and 0.018 s as this elementwise sum, which XLA fuses into one loop.
  """
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    kernel = self.param('kernel', layers.conv_kernel_init(), (3, 3, 1, channels))
    height, width = x.shape[1:3]
    padded = jnp.pad(x.astype(self.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
    # The float32 kernel promotes the products, so the nine-term sum accumulates in float32 as a convolution would.
    total = sum(padded[:, dy:dy + height, dx:dx + width, :] * kernel[dy, dx, 0] for dy in range(3) for dx in range(3))
    return total.astype(self.dtype)


def _depthwise_conv(dtype: jnp.dtype, name: str) -> DepthwiseConv3x3:
  return DepthwiseConv3x3(dtype=dtype, name=name)


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
    x = _depthwise_conv(self.dtype, 'conv1')(z.astype(self.dtype))
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
    x = _depthwise_conv(self.dtype, 'conv1')(x.astype(self.dtype))
    x = nn.relu(norm(name='bn1')(x))
    x = _pointwise_conv(self.channels * self.num_students, self.dtype, 'conv1_1')(x)
    return nn.relu(norm(name='bn1_1')(x))


class StridedConvTranspose(nn.Module):
  """PyTorch `ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1, bias=False)`, computed sub-pixel style.

  The parameter is the one `nn.ConvTranspose(features, (3, 3), strides=(2, 2), padding=DECODER_PADDING,
  transpose_kernel=True)` would hold: `kernel` of shape (3, 3, features, C_in), which is PyTorch's (C_in, C_out, 3, 3)
  weight transposed, no flip. The output is the same, but instead of a convolution over the zero-dilated input
  (where 3 of every 4 input positions are zeros) it runs one 2×2 convolution on the input that produces the four
  output phases (even/odd row × even/odd column) as 4·features channels, then interleaves them (depth to space).
  Output row 2m takes input row m with kernel row 1; row 2m+1 takes rows m and m+1 with kernel rows 0 and 2 (in the
  flipped, conv orientation), and likewise for columns. On the 2-core CPU this cut one decoder layer's forward and
  backward from 0.25 s to 0.09 s (batch 128, 32→16 channels at 16×16).
  """
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    kernel = self.param('kernel', layers.conv_transpose_kernel_init(self.features), (3, 3, self.features, in_features))
    # The forward-convolution kernel of the transposed conv: spatially flipped, input/output channels swapped.
    conv_kernel = jnp.flip(kernel, (0, 1)).swapaxes(2, 3).astype(self.dtype)
    # (output phase, input offset) -> kernel index; phase 0 uses offset 0 only.
    taps = {(0, 0): 1, (1, 0): 0, (1, 1): 2}
    zeros = jnp.zeros((in_features, self.features), self.dtype)

    def phase_kernel(phase_row, phase_col, offset_row, offset_col):
      if (phase_row, offset_row) in taps and (phase_col, offset_col) in taps:
        return conv_kernel[taps[(phase_row, offset_row)], taps[(phase_col, offset_col)]]
      return zeros

    phases = [(a, b) for a in (0, 1) for b in (0, 1)]
    combined = jnp.stack([jnp.stack([jnp.concatenate([phase_kernel(a, b, dy, dx) for a, b in phases], axis=-1)
                                     for dx in (0, 1)]) for dy in (0, 1)])  # (2, 2, C_in, 4·features)
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), combined, (1, 1), ((0, 1), (0, 1)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    batch, height, width, _ = y.shape
    y = y.reshape(batch, height, width, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(batch, 2 * height, 2 * width, self.features)


class DecoderUnit(nn.Module):
  """ConvTranspose(k3, s2, PyTorch padding 1 + output_padding 1, no bias) → BN → ReLU; doubles H and W."""
  features: int
  dtype: jnp.dtype = jnp.float32
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = StridedConvTranspose(self.features, dtype=self.dtype, name='deconv')(x)
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
