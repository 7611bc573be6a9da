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
import ml_collections

from ffsd_jax import objective
from ffsd_jax.methods import register
from ffsd_jax.methods.base import Method, number_problems
from ffsd_jax.models import create_backbone, get_spec, merge_stage_variables
from ffsd_jax.models import layers

# The loss group of every parameter of a multi-branch network (one optimizer, as in the official code).
NETWORK_GROUP = 'network'
TRUNK = 'trunk'
# exp(−RAMPUP_SHARPNESS·(1 − e/E)²): utils/ramps.py `sigmoid_rampup` (from the mean-teacher code).
RAMPUP_SHARPNESS = 5.0


# ----------------------------------------------------------------------------------------------------------------------
# Shared by the multi-branch methods (ONE, PCL).


def branch_name(index: int) -> str:
  return f'branch_{index}'


def shared_stage_count(backbone: str, shared_stages: int | None) -> int:
  """The trunk's number of stages: `shared_stages`, or all but the last stage when None (the official choice)."""
  num_stages = get_spec(backbone).num_taps
  return num_stages - 1 if shared_stages is None else int(shared_stages)


def shared_stages_problems(config: ml_collections.ConfigDict, key: str) -> list[str]:
  """Problems with `config.<key>` (the trunk's number of stages): None or an int in [1, num_stages − 1]."""
  value = config.get(key)
  try:
    num_stages = get_spec(config.get('model')).num_taps
  except ValueError:
    return []  # config_checks reports the unknown model.
  if value is None or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= num_stages - 1):
    return []
  return [f'config.{key}={value!r}: the trunk shares the first k stages of {config.get("model")}, which has '
          f'{num_stages}; k must be an int in [1, {num_stages - 1}] (a branch keeps at least the last stage). Set '
          f'--config.{key}={num_stages - 1} (or leave it None for all stages but the last).']


def trunk_and_branches(backbone: str, num_classes: int, num_branches: int, shared_stages: int, dtype: Any
                       ) -> tuple[nn.Module, list[nn.Module]]:
  """The trunk (stages 0..k−1, named 'trunk') and m branches (stages k..n−1 + head, named 'branch_i').

  Call inside a parent's compact method. Their variables keep the full backbone's names, so the trunk's and one
  branch's variables merge into one complete backbone (`merge_stage_variables`).
  """
  num_stages = get_spec(backbone).num_taps
  trunk = create_backbone(backbone, num_classes, dtype, name=TRUNK, stages=(0, shared_stages))
  branches = [create_backbone(backbone, num_classes, dtype, name=branch_name(i), stages=(shared_stages, num_stages))
              for i in range(num_branches)]
  return trunk, branches


def branch_variables(tree: dict[str, Any], batch_stats: dict[str, Any], index: int) -> dict[str, dict[str, Any]]:
  """trunk + branch_`index` of a multi-branch tree as the variables of one complete backbone."""
  name = branch_name(index)
  return merge_stage_variables({'params': tree[TRUNK], 'batch_stats': batch_stats.get(TRUNK, {})},
                               {'params': tree[name], 'batch_stats': batch_stats.get(name, {})})


def rampup_weight(step: jax.Array | int, steps_per_epoch: int, rampup_epochs: int) -> jax.Array:
  """exp(−5·(1 − e/E)²) with e = step // steps_per_epoch (0-based epoch) clipped to [0, E]; 1 when E = 0.

  The official ONE code's `sigmoid_rampup(epoch, 80)` (utils/ramps.py), evaluated once per epoch as there: epoch 0
  gives exp(−5) ≈ 0.0067, epoch E and later 1.
  """
  if steps_per_epoch < 1:
    raise ValueError(f'steps_per_epoch must be >= 1, got {steps_per_epoch}.')
  if rampup_epochs <= 0:
    return jnp.ones((), jnp.float32)
  epoch = jnp.asarray(step, jnp.int32) // steps_per_epoch
  phase = 1.0 - jnp.clip(epoch.astype(jnp.float32), 0.0, float(rampup_epochs)) / rampup_epochs
  return jnp.exp(-RAMPUP_SHARPNESS * phase * phase)


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
    get_spec(self.backbone).check_input_size(images.shape[1], images.shape[2])
    trunk, branches = trunk_and_branches(self.backbone, self.num_classes, self.num_branches, self.shared_stages,
                                         self.dtype)
    features, _ = trunk(images, train=train)
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
class ONE(Method):
  """ONE: a gated native ensemble of branches on a shared trunk teaches its branches; trunk + branch_0 is deployed."""
  name = 'one'
  min_students = 2
  deployed_network = 'branch_0'

  def build_model(self, dtype: Any) -> nn.Module:
    return ONEModel(backbone=self.config.model, num_classes=self.config.num_classes,
                    num_branches=self.config.num_students,
                    shared_stages=shared_stage_count(self.config.model, self.config.get('one_shared_stages')),
                    dtype=dtype)

  def check_config(self) -> list[str]:
    problems = shared_stages_problems(self.config, 'one_shared_stages')
    problems.extend(number_problems(self.config, 'one_temperature', 0, 'Set --config.one_temperature=3.0',
                                    strict=True))
    rampup = self.config.get('one_rampup_epochs')
    if not (isinstance(rampup, int) and not isinstance(rampup, bool) and rampup >= 0):
      problems.append(f'config.one_rampup_epochs={rampup!r}: must be an int >= 0 (0 turns the KL ramp-up off). Set '
                      '--config.one_rampup_epochs=80.')
    return problems

  def param_group(self, top_level_key: str) -> str:
    del top_level_key  # The trunk is shared by every branch's loss: one loss and one optimizer, as officially.
    return NETWORK_GROUP

  def warmup_factor(self, step, steps_per_epoch):
    return rampup_weight(step, steps_per_epoch, int(self.config.one_rampup_epochs))

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
