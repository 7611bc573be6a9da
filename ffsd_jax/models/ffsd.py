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

from typing import Any

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
    channels, m = spec.fusion_channels, self.num_students

    # Submodules, explicitly named so the tree keys are the contract's.
    students = [create_backbone(spec.name, self.num_classes, self.dtype, name=f'student_{i}') for i in range(m)]
    leader = create_backbone(spec.name, self.num_classes, self.dtype, name='leader') if self.with_leader else None
    if self.with_fusion:
      trans_fusion = TransFusionHead(channels, m, dtype=self.dtype, name='trans_fusion')
      fusion = FusionModule(channels, m, self.num_classes, dtype=self.dtype, name='fusion')
      student_decoders = [SelfDistillationDecoder(spec.decoder_channels, dtype=self.dtype, name=f'decoder_{i}')
                          for i in range(1, m)]
      leader_decoder = SelfDistillationDecoder(spec.decoder_channels, dtype=self.dtype, name='decoder_leader')

    if not train and not self.is_initializing():
      return self._evaluate(images, students, leader, fusion if self.with_fusion else None)

    out: dict[str, Any] = {}
    # 1. The leader (train mode) and its trans-fusion head.
    if leader is not None:
      out['leader_logits'], out['leader_taps'] = leader(images, train=True)
      if self.with_fusion:
        out['trans_fusion'] = trans_fusion(out['leader_taps'][-1], train=True)
    # 2. The students (train mode).
    student_outputs = [student(images, train=True) for student in students]
    out['student_logits'] = tuple(logits for logits, _ in student_outputs)
    out['student_taps'] = tuple(taps for _, taps in student_outputs)
    if not self.with_fusion:
      return out

    # 3. The fusion module on Z = concat(sg(f_i^last)), in student order.
    last_taps = [jax.lax.stop_gradient(taps[-1]) for taps in out['student_taps']]
    out['fusion_input'] = jnp.concatenate(last_taps, axis=-1)
    out['fusion_logits'], out['fused'] = fusion(out['fusion_input'], train=True)

    # 4. Eval-mode decoder passes first, so they read the running statistics from before this step.
    out['student_sd_targets'] = tuple(
        jax.lax.stop_gradient(decoder(diversity_shifted_feature(last_taps[i - 1]), train=False))
        for i, decoder in enumerate(student_decoders, start=1))
    out['leader_sd_targets'] = jax.lax.stop_gradient(
        leader_decoder(jax.lax.stop_gradient(out['fused']), train=False))

    # 5. Train-mode decoder passes on each network's own detached last tap (these update the running statistics).
    out['student_reconstructions'] = tuple(decoder(last_taps[i], train=True)
                                           for i, decoder in enumerate(student_decoders, start=1))
    out['leader_reconstructions'] = leader_decoder(jax.lax.stop_gradient(out['leader_taps'][-1]), train=True)

    self._check_decoder_shapes(out)
    return out

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

  @staticmethod
  def _check_decoder_shapes(out: dict[str, Any]) -> None:
    # Static shapes: a mismatch is a registry bug, reported in Python rather than deep inside the loss.
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
