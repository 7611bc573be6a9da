"""The backbone registry: `BackboneSpec`, `BACKBONES`, `get_spec(name)` and `create_backbone(name, num_classes, dtype)`.

Every backbone is a Flax Linen module with `__call__(images, train) -> (logits, taps)`: NHWC inputs, float32
parameters, a `dtype` field for the compute dtype, logits in float32, and taps a tuple of NHWC maps in forward order
(docs/method.md §3). The last tap feeds the fusion module, the diversity shift and the trans-fusion head; the
self-distillation decoder rebuilds every tap but the last from it.

Taps are stage outputs: a backbone has `spec.num_taps` stages, stage k outputs tap k, stage 0 includes the stem and the
head (pooling + classifier) follows the last stage. `create_backbone(..., stages=(start, stop))` builds a contiguous
range of stages that takes tap start−1 (images when start is 0) and returns `(features, taps)` (`(logits, taps)` when
stop is the last stage), with the full network's variable names, so methods can share a trunk between branches
(ONE, OKDDip, PCL): `merge_stage_variables(trunk_variables, branch_variables)` is a full backbone's variables.

The leader inside `FFSDModel` is a plain backbone, so `create_backbone(name, classes).apply({'params':
params['leader'], 'batch_stats': batch_stats['leader']}, images, train=False)` evaluates it alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ffsd_jax.models import densenet, googlenet, layers, resnet_cifar, resnet_imagenet, wide_resnet

CIFAR_FAMILIES = ('cifar_resnet', 'wide_resnet', 'densenet', 'googlenet')
IMAGENET_FAMILIES = ('imagenet_resnet',)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """Static description of one backbone.

  Attributes:
    name: canonical registry name.
    family: 'cifar_resnet', 'wide_resnet', 'densenet', 'googlenet' (CIFAR layout, 32x32 only) or 'imagenet_resnet'.
    input_size: the default (square) input size: 32 for CIFAR-layout nets, 224 for ImageNet (64 for the tiny one).
    tap_channels: channels of each tap, shallowest first.
    tap_sizes: spatial size of each tap at `input_size`, shallowest first.
    decoder_channels: the self-distillation decoder chain, from the last tap's channels down to the shallowest tap's.
    default_num_classes: 100 (CIFAR-100) or 1000 (ImageNet); `param_count` is for this many classes.
    param_count: the parameter count (γ/β included, running stats excluded) at `default_num_classes`.
    aliases: other accepted spellings (the reference's `--model` names).
    builder: the module class (or partial) taking `num_classes`, `dtype`, `name` and `stages`.
  """
  name: str
  family: str
  input_size: int
  tap_channels: tuple[int, ...]
  tap_sizes: tuple[int, ...]
  decoder_channels: tuple[int, ...]
  default_num_classes: int
  param_count: int
  aliases: tuple[str, ...] = ()
  builder: Callable[..., nn.Module] = dataclasses.field(default=None, repr=False, compare=False)

  @property
  def fusion_channels(self) -> int:
    """C: the channels of the last tap (the fusion module's output and the decoder's input)."""
    return self.tap_channels[-1]

  @property
  def num_taps(self) -> int:
    """The number of taps, which is also the number of stages: stage k outputs tap k (the `stages` unit)."""
    return len(self.tap_channels)

  @property
  def is_imagenet(self) -> bool:
    return self.family in IMAGENET_FAMILIES

  def check_input_size(self, height: int, width: int) -> None:
    """Raise a ValueError naming the expected size unless (height, width) is supported."""
    if not self.is_imagenet:
      if (height, width) != (32, 32):
        raise ValueError(f'{self.name} is a CIFAR-layout network and needs 32x32 inputs (its last tap must be 8x8 for '
                         f'the fusion module and the 8x8 average pool); got {height}x{width}.')
    elif height % 32 or width % 32 or height < 64 or width < 64:
      raise ValueError(f'{self.name} is an ImageNet-layout network and needs an input size that is a multiple of 32 '
                       f'and at least 64 ({self.input_size}x{self.input_size} by default); got {height}x{width}.')

  def tap_shapes(self, height: int | None = None, width: int | None = None) -> tuple[tuple[int, int, int], ...]:
    """(H, W, C) of every tap for an input of the given size (default `input_size`), shallowest first."""
    height = self.input_size if height is None else height
    width = height if width is None else width
    self.check_input_size(height, width)
    scale_h, scale_w = height / self.input_size, width / self.input_size
    return tuple((int(size * scale_h), int(size * scale_w), channels)
                 for size, channels in zip(self.tap_sizes, self.tap_channels))


def _cifar(name, family, tap_channels, decoder_channels, param_count, builder, aliases=()):
  return BackboneSpec(name=name, family=family, input_size=32, tap_channels=tap_channels, tap_sizes=(32, 16, 8),
                      decoder_channels=decoder_channels, default_num_classes=100, param_count=param_count,
                      aliases=aliases, builder=builder)


def _imagenet(name, input_size, tap_channels, param_count, builder, aliases=()):
  tap_sizes = tuple(input_size // factor for factor in (4, 8, 16, 32))
  return BackboneSpec(name=name, family='imagenet_resnet', input_size=input_size, tap_channels=tap_channels,
                      tap_sizes=tap_sizes, decoder_channels=tuple(reversed(tap_channels)), default_num_classes=1000,
                      param_count=param_count, aliases=aliases, builder=builder)


_RESNET_TAPS = (16, 32, 64)
_RESNET_DECODER = (64, 32, 16)

BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    _cifar('resnet20', 'cifar_resnet', _RESNET_TAPS, _RESNET_DECODER, 278_324, resnet_cifar.ResNet20),
    _cifar('resnet32', 'cifar_resnet', _RESNET_TAPS, _RESNET_DECODER, 472_756, resnet_cifar.ResNet32),
    _cifar('resnet56', 'cifar_resnet', _RESNET_TAPS, _RESNET_DECODER, 861_620, resnet_cifar.ResNet56),
    _cifar('resnet110', 'cifar_resnet', _RESNET_TAPS, _RESNET_DECODER, 1_736_564, resnet_cifar.ResNet110),
    _cifar('wrn16_2', 'wide_resnet', (32, 64, 128), (128, 64, 32), 704_420, wide_resnet.WRN16_2,
           aliases=('wideresnet1602', 'wrn-16-2')),
    _cifar('wrn40_2', 'wide_resnet', (32, 64, 128), (128, 64, 32), 2_258_084, wide_resnet.WRN40_2,
           aliases=('wideresnet4002', 'wrn-40-2')),
    # DenseNet and GoogLeNet use the reference's hard-coded decoder chains (DIYSelfDistillationModel).
    _cifar('densenet40', 'densenet', (168, 312, 456), (456, 312, 168), 1_100_428, densenet.DenseNet40,
           aliases=('densenet', 'densenet-40-12')),
    _cifar('googlenet', 'googlenet', (480, 832, 1024), (1024, 832, 480), 6_258_500, googlenet.GoogLeNet),
    _imagenet('resnet18', 224, (64, 128, 256, 512), 11_689_512, resnet_imagenet.ResNet18),
    _imagenet('resnet34', 224, (64, 128, 256, 512), 21_797_672, resnet_imagenet.ResNet34),
    # Tiny variants for fast tests.
    _cifar('resnet8', 'cifar_resnet', _RESNET_TAPS, _RESNET_DECODER, 83_892, resnet_cifar.ResNet8),
    _cifar('resnet8_tiny', 'cifar_resnet', (4, 8, 16), (16, 8, 4), 6_744, resnet_cifar.ResNet8Tiny),
    _imagenet('resnet_imagenet_tiny', 64, (8, 16, 32, 64), 143_312, resnet_imagenet.ResNetImageNetTiny),
)}

_ALIASES: dict[str, str] = {alias: spec.name for spec in BACKBONES.values() for alias in spec.aliases}


def valid_backbone_names() -> list[str]:
  """Every accepted name: the canonical names, then the aliases."""
  return list(BACKBONES) + list(_ALIASES)


def get_spec(name: str) -> BackboneSpec:
  """Look a backbone up by canonical name or alias (case-insensitive).

  Raises:
    ValueError: for an unknown name; the message lists the valid choices.
  """
  key = str(name).strip().lower()
  key = _ALIASES.get(key, key)
  if key not in BACKBONES:
    raise ValueError(f'Unknown backbone {name!r}. Valid choices: {", ".join(BACKBONES)} '
                     f'(aliases: {", ".join(f"{a}={c}" for a, c in _ALIASES.items())}).')
  return BACKBONES[key]


def create_backbone(model: str, num_classes: int, dtype: Any = jnp.float32, name: str | None = None,
                    stages: Sequence[int] | None = None, norm: Any = None) -> nn.Module:
  """Build a backbone module, or a contiguous range of its stages.

  Args:
    model: registry name or alias, e.g. 'resnet32', 'wideresnet1602'.
    num_classes: classifier width.
    dtype: compute dtype (float32 or bfloat16); parameters stay float32, logits are float32.
    name: the Flax module name (e.g. 'leader' inside a parent module).
    stages: None for the whole network, or (start, stop) with 0 <= start < stop <= `spec.num_taps`: stages start to
      stop−1 only. Such a module takes images when start == 0, else tap start−1 of the full network; it returns
      `(logits, taps)` when stop == num_taps, else `(features, taps)` (features == taps[-1]); taps are its own stages'
      taps; its variables have the full network's names (see `merge_stage_variables`).
    norm: the batch-norm module class (default `nn.BatchNorm`); the networks-parallel step passes one with
      `axis_name='data'` for statistics over the global batch.

  Returns:
    The module; `module.apply(variables, inputs, train=...)` returns `(logits or features, taps)`.

  Raises:
    ValueError: for an unknown model, a bad num_classes, or stages out of range (the message names the valid range).
  """
  spec = get_spec(model)
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'num_classes must be a positive int; got {num_classes!r}.')
  if stages is not None:
    stages = layers.stage_range(stages, spec.num_taps, spec.name)
  extra = {} if norm is None else {'norm': norm}
  return spec.builder(num_classes=num_classes, dtype=dtype, name=name, stages=stages, **extra)


def merge_stage_variables(*parts: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """Union the variables of stage-range modules, collection by collection, at the top level of each collection.

  The variables of `create_backbone(m, c, stages=(0, k))` and `(k, n)` have disjoint top-level names, and merging
  them gives exactly the variables of `create_backbone(m, c)`, e.g. to evaluate one branch of a shared trunk alone.

  Args:
    *parts: variable dicts such as `{'params': ..., 'batch_stats': ...}` (dicts or FrozenDicts).

  Returns:
    A new dict of plain dicts; the sub-trees themselves are shared with `parts`, not copied.

  Raises:
    ValueError: when two parts define the same top-level name in a collection; the message names them.
  """
  merged: dict[str, dict[str, Any]] = {}
  owners: dict[tuple[str, str], int] = {}
  for index, part in enumerate(parts):
    for collection, tree in part.items():
      target = merged.setdefault(collection, {})
      for key, value in tree.items():
        if key in target:
          raise ValueError(f'merge_stage_variables: {collection}[{key!r}] is defined by both part '
                           f'{owners[collection, key]} and part {index}; merged stage ranges must not overlap.')
        target[key] = value
        owners[collection, key] = index
  return merged


from ffsd_jax.models.ffsd import FFSDModel, leader_variables  # noqa: E402  (ffsd.py imports the registry above)

__all__ = ['BACKBONES', 'BackboneSpec', 'FFSDModel', 'create_backbone', 'get_spec', 'leader_variables',
           'merge_stage_variables', 'valid_backbone_names']
