"""`FFSDModel`: m common students, the leader, its trans-fusion head, the fusion module and the decoders
(docs/method.md §4, §7; contract in docs/architecture.md).

All networks live in one `params` / `batch_stats` tree with the top-level keys `student_0 … student_{m-1}`, `leader`,
`trans_fusion`, `fusion`, `decoder_1 … decoder_{m-1}` and `decoder_leader`. `params['leader']` with
`batch_stats['leader']` is a complete backbone (see `leader_variables`).

One train-mode call runs every forward pass of a PyTorch iteration. Every cross-network input is detached, so one
gradient of the summed objective over the whole tree gives each network exactly its own gradient (§7.3). The decoders
are applied twice and share their parameters between the two calls: first in eval mode (running statistics from before
this step) to produce the stop-gradient self-distillation targets, then in train mode on the network's own detached
last tap to produce the reconstructions that train them (which updates their running statistics).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffsd_jax.attention import diversity_shifted_feature
from ffsd_jax.models import create_backbone, get_spec
from ffsd_jax.models.heads import FusionModule, SelfDistillationDecoder, TransFusionHead


class FFSDModel(nn.Module):
  """The networks of FFSD and of the baselines that share its students: students, optional leader, optional fusion.

  Which networks exist is a question of structure, not of method name: FFSD builds everything, DML and KDCL the
  students only (`with_leader=False, with_fusion=False`), independent training the students and the leader.

  Attributes:
    backbone: registry name of the backbone shared by the students and the leader (e.g. 'resnet32').
    num_classes: classifier width.
    num_students: m, the number of common students (>= 1; the fusion needs >= 2).
    with_leader: build the leader backbone.
    with_fusion: build the fusion module, the trans-fusion head and the self-distillation decoders (needs the leader).
    dtype: compute dtype of every network (parameters stay float32; logits are float32).
  """
  backbone: str
  num_classes: int
  num_students: int = 2
  with_leader: bool = True
  with_fusion: bool = True
  dtype: Any = jnp.float32

  def __post_init__(self):
    min_students = 2 if self.with_fusion else 1
    if not isinstance(self.num_students, int) or self.num_students < min_students:
      raise ValueError(f'FFSDModel{" with a fusion module" if self.with_fusion else ""} needs num_students >= '
                       f'{min_students} (an int); got {self.num_students!r}.')
    if self.with_fusion and not self.with_leader:
      raise ValueError('FFSDModel(with_fusion=True) needs with_leader=True: the fusion module teaches the leader.')
    get_spec(self.backbone)  # fails early, listing the valid names
    super().__post_init__()

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = True) -> dict[str, Any]:
    """Run the networks; see docs/architecture.md for the keys of the returned dict.

    Args:
      images: normalised NHWC images.
      train: True for the training pass (every output); False for the evaluation logits only (students, leader,
        fusion on the students' eval-mode features). Initialisation always builds every submodule.

    Returns:
      A dict with only the keys of the networks this model builds.
    """
    spec = get_spec(self.backbone)
    if images.ndim != 4:
      raise ValueError(f'FFSDModel expects NHWC images (B, H, W, 3); got shape {tuple(images.shape)}.')
    spec.check_input_size(images.shape[1], images.shape[2])
    m = self.num_students

    # Submodules, explicitly named so the tree keys are the contract's.
    students = [create_backbone(spec.name, self.num_classes, self.dtype, name=f'student_{i}') for i in range(m)]
    leader = create_backbone(spec.name, self.num_classes, self.dtype, name='leader') if self.with_leader else None
    heads = HeadModules.build(spec, m, self.num_classes, self.dtype) if self.with_fusion else None

    if not train and not self.is_initializing():
      return self._evaluate(images, students, leader, heads.fusion if heads is not None else None)

    # 1. The leader (train mode) and its trans-fusion head, then 2. the students (train mode): the official order.
    named, trans_fusion = {}, None
    if leader is not None:
      named['leader'] = leader(images, train=True)
      if heads is not None:
        trans_fusion = heads.trans_fusion(named['leader'][1][-1], train=True)
    named.update({f'student_{i}': student(images, train=True) for i, student in enumerate(students)})
    out = backbone_outputs(named, m)
    if heads is None:
      return out
    return heads.outputs(out, trans_fusion)

  def _evaluate(self, images, students, leader, fusion) -> dict[str, Any]:
    """Eval-mode logits only: students, leader, and fusion on the students' eval-mode last taps."""
    student_outputs = [student(images, train=False) for student in students]
    out: dict[str, Any] = {'student_logits': tuple(logits for logits, _ in student_outputs)}
    if leader is not None:
      out['leader_logits'], _ = leader(images, train=False)
    if fusion is not None:
      fusion_input = jnp.concatenate([taps[-1] for _, taps in student_outputs], axis=-1)
      out['fusion_logits'], _ = fusion(fusion_input, train=False)
    return out


def backbone_outputs(named: Mapping[str, tuple[jax.Array, Sequence[jax.Array]]], num_students: int
                     ) -> dict[str, Any]:
  """The backbone part of the train-mode output dict from each network's `(logits, taps)`, by tree key.

  Args:
    named: `student_0 … student_{m-1}` and, where built, `leader`, each the `(logits, taps)` of its backbone.
    num_students: m.

  Returns:
    `student_logits`, `student_taps` (tuples in student order) and, with a leader, `leader_logits`, `leader_taps`.
  """
  out: dict[str, Any] = {}
  if 'leader' in named:
    out['leader_logits'], out['leader_taps'] = named['leader']
  out['student_logits'] = tuple(named[f'student_{i}'][0] for i in range(num_students))
  out['student_taps'] = tuple(named[f'student_{i}'][1] for i in range(num_students))
  return out


@dataclasses.dataclass(frozen=True)
class HeadModules:
  """FFSD's small heads as (bound or unbound) module instances: trans-fusion, fusion and the decoders.

  `FFSDModel` builds them as its own submodules; `FFSDHeads` builds the same ones alone, for the
  networks-parallel step (ffsd_jax/network_parallel.py), which runs the backbones one per device group and the heads
  on the gathered backbone outputs. `outputs` is the one definition of what the heads compute.
  """
  trans_fusion: nn.Module
  fusion: nn.Module
  student_decoders: tuple[nn.Module, ...]  # decoder_1 … decoder_{m-1}
  leader_decoder: nn.Module

  @classmethod
  def build(cls, spec: Any, num_students: int, num_classes: int, dtype: Any, norm: Any = nn.BatchNorm
            ) -> 'HeadModules':
    """The heads, named as the contract's top-level keys (call inside a compact `__call__`)."""
    channels = spec.fusion_channels
    return cls(
        trans_fusion=TransFusionHead(channels, num_students, dtype=dtype, norm=norm, name='trans_fusion'),
        fusion=FusionModule(channels, num_students, num_classes, dtype=dtype, norm=norm, name='fusion'),
        student_decoders=tuple(SelfDistillationDecoder(spec.decoder_channels, dtype=dtype, norm=norm,
                                                       name=f'decoder_{i}') for i in range(1, num_students)),
        leader_decoder=SelfDistillationDecoder(spec.decoder_channels, dtype=dtype, norm=norm, name='decoder_leader'))

  def outputs(self, backbone_out: Mapping[str, Any], trans_fusion: jax.Array | None = None) -> dict[str, Any]:
    """The train-mode output dict: `backbone_out` (`backbone_outputs`) plus every head's output (`trans_fusion`:
    the trans-fusion head's output when the caller has run it already)."""
    out = dict(backbone_out)
    out['trans_fusion'] = (self.trans_fusion(out['leader_taps'][-1], train=True) if trans_fusion is None
                           else trans_fusion)

    # 3. The fusion module on Z = concat(sg(f_i^last)), in student order.
    last_taps = [jax.lax.stop_gradient(taps[-1]) for taps in out['student_taps']]
    out['fusion_input'] = jnp.concatenate(last_taps, axis=-1)
    out['fusion_logits'], out['fused'] = self.fusion(out['fusion_input'], train=True)

    # 4. Eval-mode decoder passes first, so they read the running statistics from before this step.
    out['student_sd_targets'] = tuple(
        jax.lax.stop_gradient(decoder(diversity_shifted_feature(last_taps[i - 1]), train=False))
        for i, decoder in enumerate(self.student_decoders, start=1))
    out['leader_sd_targets'] = jax.lax.stop_gradient(
        self.leader_decoder(jax.lax.stop_gradient(out['fused']), train=False))

    # 5. Train-mode decoder passes on each network's own detached last tap (these update the running statistics).
    out['student_reconstructions'] = tuple(decoder(last_taps[i], train=True)
                                           for i, decoder in enumerate(self.student_decoders, start=1))
    out['leader_reconstructions'] = self.leader_decoder(jax.lax.stop_gradient(out['leader_taps'][-1]), train=True)

    _check_decoder_shapes(out)
    return out


class FFSDHeads(nn.Module):
  """Everything of an `FFSDModel` but its backbones, applied to their train-mode outputs.

  The networks-parallel step (ffsd_jax/network_parallel.py) runs the backbones on devices of their own and this module
  on their gathered outputs. Its top-level parameter keys are FFSDModel's other keys: `trans_fusion`, `fusion` and
  the decoders with the fusion, none without.

  Attributes:
    backbone: registry name of the students' and leader's backbone.
    num_classes: classifier width.
    num_students: m.
    with_fusion: build the heads (FFSD); without them the module only arranges the backbone outputs.
    dtype: compute dtype.
    norm: the batch-norm class (with `axis_name` for statistics over the global batch under `shard_map`).
  """
  backbone: str
  num_classes: int
  num_students: int
  with_fusion: bool = True
  dtype: Any = jnp.float32
  norm: Any = nn.BatchNorm

  @nn.compact
  def __call__(self, named: Mapping[str, tuple[jax.Array, Sequence[jax.Array]]]) -> dict[str, Any]:
    """`named`: each backbone's `(logits, taps)` by tree key; returns FFSDModel's train-mode output dict."""
    out = backbone_outputs(named, self.num_students)
    if not self.with_fusion:
      return out
    heads = HeadModules.build(get_spec(self.backbone), self.num_students, self.num_classes, self.dtype, self.norm)
    return heads.outputs(out)


def _check_decoder_shapes(out: Mapping[str, Any]) -> None:
  """Static shapes: a mismatch is a registry bug, reported in Python rather than deep inside the loss."""
  def check(outputs, taps, what):
    expected = [tuple(t.shape) for t in taps[:-1]]
    got = [tuple(o.shape) for o in outputs]
    if expected != got:
      raise ValueError(f'{what} outputs {got} do not match the taps they rebuild {expected}; the backbone spec\'s '
                       'decoder_channels or tap sizes are wrong.')

  for i, reconstruction in enumerate(out['student_reconstructions'], start=1):
    check(reconstruction, out['student_taps'][i], f'decoder_{i}')
  check(out['leader_reconstructions'], out['leader_taps'], 'decoder_leader')

def leader_variables(variables: dict[str, Any]) -> dict[str, Any]:
  """The leader's own variables, to apply to `create_backbone(backbone, num_classes)` alone.

  Args:
    variables: FFSDModel variables (or a train state's {'params': ..., 'batch_stats': ...}).

  Returns:
    `{'params': params['leader'], 'batch_stats': batch_stats['leader']}`.
  """
  if 'leader' not in variables.get('params', {}):
    raise ValueError('These variables hold no leader (the method builds only the students).')
  return {collection: tree['leader'] for collection, tree in variables.items() if 'leader' in tree}
