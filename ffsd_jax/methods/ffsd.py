"""FFSD (Li et al., "Distilling a Powerful Student Model via Online Knowledge Distillation", TNNLS 2022).

m common students learn from each other (DML) while a diversity term keeps each one apart from the previous one; a
fusion module turns their concatenated last feature maps into a fused map and classifier that teach the leader;
self-distillation decoders let shallow layers learn from deeper ones. The leader is deployed. docs/method.md gives
every term; `ffsd_objective` computes them on the `FFSDModel` output dict.

Loss groups and the top-level parameter keys each one trains (docs/method.md §8.1): `student_i` → `student_i` (SGD,
`weight_decay`); `leader` → `leader` and `trans_fusion` (SGD, `weight_decay`); `fusion` → `fusion` (SGD,
`fusion_weight_decay`); `decoder_i` (the decoder of student i ≥ 1) and `decoder_leader` → themselves (Adam,
`decoder_weight_decay`, the decoders' schedule).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffsd_jax import objective
from ffsd_jax.methods import register
from ffsd_jax.methods.base import GroupOptimizer, Method
from ffsd_jax.models.ffsd import FFSDHeads, FFSDModel


def student_model_logits(outputs: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Every network's logits in an `FFSDModel` output: student_i, leader and fusion where built, and 'ensemble'.

  'ensemble' is the argmax of the mean of the students' logits (a real ensemble, not the reference's oracle "any
  student correct" rate, docs/method.md §10, §13.13); it is present when there are at least 2 students.
  """
  logits = {f'student_{i}': z for i, z in enumerate(outputs['student_logits'])}
  if outputs.get('leader_logits') is not None:
    logits['leader'] = outputs['leader_logits']
  if outputs.get('fusion_logits') is not None:
    logits['fusion'] = outputs['fusion_logits']
  if len(outputs['student_logits']) >= 2:
    logits['ensemble'] = objective.mean_logits(outputs['student_logits'])
  return {name: z.astype(jnp.float32) for name, z in logits.items()}


def lambda_warmup(config: Any, step: jax.Array | int, steps_per_epoch: int) -> jax.Array:
  """FFSD's λ warm-up factor at 0-based step `step` (`config.lambda_warmup_epochs`, docs/method.md §6)."""
  return objective.lambda_scale(step, steps_per_epoch, int(config.lambda_warmup_epochs))


class StudentModelMethod(Method):
  """A method on `FFSDModel`'s networks: m students, optionally the leader and the fusion heads (FFSD, DML, KDCL,
  independent training). The students and the leader are separate backbones, so they can be split over devices."""
  with_leader: ClassVar[bool] = True
  with_fusion: ClassVar[bool] = False

  def build_model(self, dtype: Any) -> nn.Module:
    return FFSDModel(backbone=self.config.model, num_classes=self.config.num_classes,
                     num_students=self.config.num_students, with_leader=self.with_leader,
                     with_fusion=self.with_fusion, dtype=dtype)

  def stacked_networks(self) -> tuple[str, ...]:
    students = tuple(f'student_{i}' for i in range(int(self.config.num_students)))
    return students + (('leader',) if self.with_leader else ())

  def heads_model(self, dtype: Any, norm: Any) -> nn.Module:
    return FFSDHeads(backbone=self.config.model, num_classes=self.config.num_classes,
                     num_students=self.config.num_students, with_fusion=self.with_fusion, dtype=dtype, norm=norm)

  def network_logits(self, outputs):
    return student_model_logits(outputs)


@register
class FFSD(StudentModelMethod):
  """FFSD: students, leader, fusion module and decoders; the leader is deployed."""
  name = 'ffsd'
  min_students = 2
  deployed_network = 'leader'
  with_fusion = True

  def param_group(self, top_level_key: str) -> str:
    # The trans-fusion head is trained by the leader's loss and optimizer (docs/method.md §8.1).
    return 'leader' if top_level_key == 'trans_fusion' else top_level_key

  def group_optimizer(self, group: str) -> GroupOptimizer:
    if group.startswith('decoder_'):
      return GroupOptimizer('adam', 'decoders', float(self.config.decoder_weight_decay))
    if group == 'fusion':
      return GroupOptimizer('sgd', 'networks', float(self.config.fusion_weight_decay))
    return GroupOptimizer('sgd', 'networks', float(self.config.weight_decay))

  def warmup_factor(self, step, steps_per_epoch):
    return lambda_warmup(self.config, step, steps_per_epoch)

  def objective(self, outputs, labels, step, steps_per_epoch):
    warmup = self.warmup_factor(step, steps_per_epoch)
    return ffsd_objective(outputs, labels, objective.LossWeights.from_config(self.config), warmup)


def ffsd_objective(outputs: Mapping[str, Any], labels: jax.Array, weights: objective.LossWeights,
                   warmup: jax.Array | float = 1.0) -> objective.ObjectiveResult:
  """The full FFSD objective of docs/method.md §6 on the `FFSDModel` output dict.

  Args:
    outputs: `FFSDModel.__call__(images, train=True)` (docs/architecture.md).
    labels: int labels (B,).
    weights: the λ's and the temperature.
    warmup: the λ warm-up factor of the current epoch; it scales λ_div, λ_f and λ_sd only.

  Returns:
    The total, the per-group losses and every term (raw, before λ, and weighted per group under '<group>/loss').
  """
  temperature = weights.temperature
  warmup = jnp.asarray(warmup, jnp.float32)
  lambda_diversity = weights.lambda_diversity * warmup
  lambda_fusion = weights.lambda_fusion * warmup
  lambda_self_distillation = weights.lambda_self_distillation * warmup

  student_logits = tuple(outputs['student_logits'])
  student_taps = tuple(outputs['student_taps'])
  num_students = len(student_logits)
  student_sd_targets = tuple(outputs['student_sd_targets'])
  student_reconstructions = tuple(outputs['student_reconstructions'])
  if len(student_sd_targets) != num_students - 1 or len(student_reconstructions) != num_students - 1:
    raise ValueError(f'Expected {num_students - 1} student decoder outputs (one per student i >= 1), got '
                     f'{len(student_sd_targets)} targets and {len(student_reconstructions)} reconstructions.')

  # §6.1 common students.
  group_losses: dict[str, jax.Array] = {}
  student_losses, terms = objective.student_logit_terms(student_logits, labels, temperature, with_kl=True)
  for i in range(num_students):
    loss = student_losses[i]
    if i >= 1:
      diversity = objective.diversity_loss(student_taps[i][-1], student_taps[i - 1][-1])
      self_distillation = objective.attention_self_distillation_loss(student_taps[i], student_sd_targets[i - 1])
      terms[f'student_{i}/diversity'] = diversity
      terms[f'student_{i}/sd'] = self_distillation
      # Both diversity terms are weighted by λ_div (docs/method.md §6.1, §13.3).
      loss = loss + lambda_diversity * (diversity + self_distillation)
    group_losses[f'student_{i}'] = loss

  # §6.2 fusion module: its input Z is detached by the model; the KL target z̄ is detached here.
  fusion_logits = outputs['fusion_logits']
  terms['fusion/ce'] = objective.cross_entropy(fusion_logits, labels)
  terms['fusion/kl'] = objective.kl_divergence(fusion_logits, objective.mean_logits(student_logits), temperature)
  group_losses['fusion'] = terms['fusion/ce'] + terms['fusion/kl']

  # §6.3 leader (+ trans-fusion head).
  leader_logits = outputs['leader_logits']
  leader_taps = tuple(outputs['leader_taps'])
  fused = jax.lax.stop_gradient(outputs['fused'])
  fusion_input = jax.lax.stop_gradient(outputs['fusion_input'])
  terms['leader/ce'] = objective.cross_entropy(leader_logits, labels)
  terms['leader/kl'] = objective.kl_divergence(leader_logits, fusion_logits, temperature)
  terms['leader/fusion_attention'] = objective.attention_distance(leader_taps[-1], fused)
  terms['leader/trans_fusion'] = objective.attention_distance(outputs['trans_fusion'], fusion_input)
  terms['leader/sd'] = objective.attention_self_distillation_loss(leader_taps, outputs['leader_sd_targets'])
  # λ_f scales all three feature terms, the leader's SD term included (docs/method.md §6.3, §6.5).
  group_losses['leader'] = (terms['leader/ce'] + terms['leader/kl'] + lambda_fusion * (
      terms['leader/fusion_attention'] + terms['leader/trans_fusion'] + terms['leader/sd']))

  # §6.4 decoders: inputs detached by the model, targets detached here.
  for i in range(1, num_students):
    reconstruction = objective.reconstruction_loss(student_reconstructions[i - 1], student_taps[i])
    terms[f'decoder_{i}/reconstruction'] = reconstruction
    group_losses[f'decoder_{i}'] = lambda_self_distillation * reconstruction
  reconstruction = objective.reconstruction_loss(outputs['leader_reconstructions'], leader_taps)
  terms['decoder_leader/reconstruction'] = reconstruction
  group_losses['decoder_leader'] = lambda_self_distillation * reconstruction

  return objective.finish_objective(group_losses, terms, warmup)
