"""ONE (Lan, Zhu, Gong, "Knowledge Distillation by On-the-Fly Native Ensemble", NeurIPS 2018).

One multi-branch network: a trunk (the backbone's first `one_shared_stages` stages, stem included) shared by m
branches (the remaining stages and the classifier each; m = `num_students`) and a gate that weighs the branches. The
gate (official code, models/cifar/resnet.py `ONE_ResNet`) is global average pooling of the trunk's output, a Linear
layer to m units, batch norm, ReLU and softmax: g(x) ∈ Δ^m. The teacher is the gated sum of the branch logits,
z_e = Σ_i g_i(x)·z_i, and the whole network is trained with one loss (official cifar_one.py):

  L = Σ_i CE(z_i, y) + CE(z_e, y) + w(e)·Σ_i T²·KL(softmax(sg(z_e)/T) ‖ softmax(z_i/T))

with T = `one_temperature` (3, loss/kl_loss.py) and the official script's ramp-up w(e) = exp(−5(1 − e/E)²) of the
0-based epoch e clipped to E = `one_rampup_epochs` (80; 0 turns it off). The teacher is detached in the KL terms only:
its cross-entropy trains the gate, the branches and the trunk. One SGD (`weight_decay`) trains everything.

Branch 0 is deployed: trunk + branch_0 is exactly one complete backbone (`merge_stage_variables`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffsd_jax import objective
from ffsd_jax.methods import register
from ffsd_jax.methods.multi_branch import (NETWORK_GROUP, MultiBranchMethod, branch_name, branch_variables,
                                           trunk_and_branches)
from ffsd_jax.models import layers

# ----------------------------------------------------------------------------------------------------------------------
# ONE.


def gated_ensemble(branch_logits: Sequence[jax.Array], gate_weights: jax.Array) -> jax.Array:
  """z_e = Σ_i g_i·z_i in float32: (B, C) from m (B, C) logits and (B, m) gate weights."""
  gate_weights = gate_weights.astype(jnp.float32)
  return sum(gate_weights[:, i:i + 1] * z.astype(jnp.float32) for i, z in enumerate(branch_logits))


class BranchGate(nn.Module):
  """ONE's gate: GAP of the trunk's features, Linear(C → m), batch norm, ReLU, softmax (float32 (B, m) weights).

  Attributes:
    num_branches: m.
    dtype: compute dtype of the Linear layer and the batch norm.
  """
  num_branches: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, train: bool) -> jax.Array:
    pooled = jnp.mean(features, axis=(1, 2))
    scores = layers.torch_dense(self.num_branches, features.shape[-1], dtype=self.dtype, name='fc')(pooled)
    scores = layers.norm_factory(nn.BatchNorm, train, self.dtype)(name='bn')(scores)
    return jax.nn.softmax(nn.relu(scores).astype(jnp.float32), axis=-1)


class ONEModel(nn.Module):
  """Trunk, m branches and the gate. Top-level keys: 'trunk', 'branch_0' … 'branch_{m−1}', 'gate'.

  `__call__(images, train)` returns {'branch_logits': m float32 (B, C), 'gate_weights': (B, m), 'teacher_logits':
  (B, C), the gated ensemble}, the same keys in both modes.

  Attributes:
    backbone: registry name of the backbone that is split into trunk and branches.
    num_classes: classifier width.
    num_branches: m >= 2.
    shared_stages: the trunk's number of stages, in [1, num_stages − 1].
    dtype: compute dtype (parameters and logits stay float32).
  """
  backbone: str
  num_classes: int
  num_branches: int = 3
  shared_stages: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = True) -> dict[str, Any]:
    features, branches = trunk_and_branches(self.backbone, self.num_classes, self.num_branches, self.shared_stages,
                                            self.dtype, images, train)
    gate_weights = BranchGate(self.num_branches, self.dtype, name='gate')(features, train=train)
    branch_logits = tuple(branch(features, train=train)[0].astype(jnp.float32) for branch in branches)
    return {'branch_logits': branch_logits, 'gate_weights': gate_weights,
            'teacher_logits': gated_ensemble(branch_logits, gate_weights)}


def one_losses(branch_logits: Sequence[jax.Array], teacher_logits: jax.Array, labels: jax.Array, temperature: float,
               kl_scale: jax.Array | float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(L, terms): Σ_i CE(z_i) + CE(z_e) + kl_scale·Σ_i T²·KL(sg(z_e) ‖ z_i), terms 'branch_i/ce', 'branch_i/kl',
  'teacher/ce' (raw, before the ramp-up)."""
  terms = {'teacher/ce': objective.cross_entropy(teacher_logits, labels)}
  total_kl = 0.0
  total = terms['teacher/ce']
  for i, z in enumerate(branch_logits):
    terms[f'{branch_name(i)}/ce'] = objective.cross_entropy(z, labels)
    # kl_divergence detaches the teacher: the KL terms train the branches only.
    terms[f'{branch_name(i)}/kl'] = objective.kl_divergence(z, teacher_logits, temperature)
    total = total + terms[f'{branch_name(i)}/ce']
    total_kl = total_kl + terms[f'{branch_name(i)}/kl']
  return total + kl_scale * total_kl, terms


@register
class ONE(MultiBranchMethod):
  """ONE: a gated native ensemble of branches on a shared trunk teaches its branches; trunk + branch_0 is deployed."""
  name = 'one'
  key_prefix = 'one'
  min_students = 2
  deployed_network = 'branch_0'

  def build_model(self, dtype: Any) -> nn.Module:
    return ONEModel(backbone=self.config.model, num_classes=self.config.num_classes,
                    num_branches=self.config.num_students, shared_stages=self.shared_stages(), dtype=dtype)

  def objective(self, outputs, labels, step, steps_per_epoch):
    kl_scale = self.warmup_factor(step, steps_per_epoch)
    total, terms = one_losses(tuple(outputs['branch_logits']), outputs['teacher_logits'], labels,
                              float(self.config.one_temperature), kl_scale)
    if outputs.get('gate_weights') is not None:
      # The batch-mean gate weight of each branch: shows whether the gate settles on a few branches.
      for i, weight in enumerate(jnp.mean(outputs['gate_weights'].astype(jnp.float32), axis=0)):
        terms[f'gate/{branch_name(i)}'] = weight
    # 'lambda_scale' reports the KL ramp-up weight of this step.
    return objective.finish_objective({NETWORK_GROUP: total}, terms, kl_scale)

  def network_logits(self, outputs):
    logits = {branch_name(i): z for i, z in enumerate(outputs['branch_logits'])}
    logits['teacher'] = outputs['teacher_logits']
    return {name: z.astype(jnp.float32) for name, z in logits.items()}

  def deployed_variables(self, params, batch_stats, extra_state):
    del extra_state
    return branch_variables(params, batch_stats, 0)
