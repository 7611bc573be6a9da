"""OKDDip (Chen, Mei, Wang, Feng, Chen, "Online Knowledge Distillation with Diverse Peers", AAAI 2020).

Official code: DefangChen/OKDDip (train_GL.py, models/model_cifar/resnet_GL.py, utils.py `KL_Loss`). One
multi-branch network: a trunk (the backbone's first `okddip_shared_stages` stages, stem included) shared by m
auxiliary peers (m = `num_students`; branches of the remaining stages and the classifier each) and one group leader
(one more such branch). With the peers' logits z_1 … z_m and pooled last features h_1 … h_m, two bias-free Linear
layers (query W_q and key W_k, width → width // 8) give every example its own peer-to-peer attention

  a_ij = softmax_j((W_q h_i) · (W_k h_j)),    target of peer i: t_i = Σ_j a_ij·z_j   (j = i included)

and the one loss, with T = `okddip_temperature`, α = `okddip_kl_weight` and the ramp-up w(e) = exp(−5(1 − e/E)²) of the
0-based epoch e clipped to E = `okddip_rampup_epochs` (train_GL.py `get_current_consistency_weight`), is

  L = Σ_i CE(z_i, y) + CE(z_L, y) + α·w(e)·(Σ_i KL_T(t_i ‖ z_i) + KL_T(mean_i z_i ‖ z_L))

KL_T(t ‖ z) = T²·Σ_c (p_c + ε)·(log(p_c + ε) − log softmax(z/T)_c) / B with p = softmax(t/T) and ε = 1e-7 (utils.py
`KL_Loss`, PyTorch's `KLDivLoss(reduction='batchmean')` on the shifted target). No target is detached, as in the
official code: the attention's W_q and W_k learn only through the peers' KL targets, and the peers also learn from
their targets and from the leader's. One SGD (`weight_decay`) trains everything.

The group leader is deployed: trunk + leader is exactly one complete backbone (`merge_stage_variables`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffsd_jax import objective
from ffsd_jax.methods import register
from ffsd_jax.methods.base import number_problems
from ffsd_jax.methods.multi_branch import NETWORK_GROUP, TRUNK, MultiBranchMethod, branch_name, trunk_and_branches
from ffsd_jax.models import create_backbone, get_spec, layers, merge_stage_variables

LEADER = 'leader'
ATTENTION = 'attention'
# resnet_GL.py: query and key map the pooled width C to C // factor, factor = 8.
ATTENTION_REDUCTION = 8
# utils.py `KL_Loss`: softmax(target / T) + 1e-7, not renormalised.
KL_TARGET_EPSILON = 1e-7


class PeerAttention(nn.Module):
  """The peers' attention: a_ij = softmax_j((W_q h_i) · (W_k h_j)) per example, W_q and W_k bias-free Linear layers.

  Attributes:
    projection_dim: the width of the query and key projections.
    dtype: compute dtype of the projections (the energies and the softmax are float32).
  """
  projection_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pooled_features: Sequence[jax.Array]) -> jax.Array:
    """(B, m, m) float32 attention weights from m (B, C) pooled peer features; row i sums to 1."""
    def projection(name: str) -> nn.Dense:
      return nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype, kernel_init=layers.dense_kernel_init(),
                      name=name)

    query, key = projection('query'), projection('key')
    queries = jnp.stack([query(h) for h in pooled_features], axis=1).astype(jnp.float32)  # (B, m, d)
    keys = jnp.stack([key(h) for h in pooled_features], axis=1).astype(jnp.float32)
    return jax.nn.softmax(jnp.einsum('bid,bjd->bij', queries, keys), axis=-1)


class OKDDipModel(nn.Module):
  """Trunk, m peers, the group leader and the peers' attention. Top-level keys: 'trunk', 'branch_0' …
  'branch_{m−1}', 'leader', 'attention'.

  `__call__(images, train)` returns {'branch_logits': m float32 (B, C), 'leader_logits': (B, C),
  'attention_weights': (B, m, m)}, the same keys in both modes.

  Attributes:
    backbone: registry name of the backbone that is split into trunk and branches.
    num_classes: classifier width.
    num_peers: m >= 2.
    shared_stages: the trunk's number of stages, in [1, num_stages − 1].
    dtype: compute dtype (parameters and logits stay float32).
  """
  backbone: str
  num_classes: int
  num_peers: int = 3
  shared_stages: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = True) -> dict[str, Any]:
    features, peers = trunk_and_branches(self.backbone, self.num_classes, self.num_peers, self.shared_stages,
                                         self.dtype, images, train)
    leader = create_backbone(self.backbone, self.num_classes, self.dtype, name=LEADER,
                             stages=(self.shared_stages, get_spec(self.backbone).num_taps))
    peer_outputs = [peer(features, train=train) for peer in peers]
    leader_logits, _ = leader(features, train=train)
    # resnet_GL.py: the attention reads each peer's globally pooled last feature map (the classifier's own input).
    pooled = [jnp.mean(taps[-1], axis=(1, 2)) for _, taps in peer_outputs]
    width = pooled[0].shape[-1]
    attention = PeerAttention(max(1, width // ATTENTION_REDUCTION), self.dtype, name=ATTENTION)(pooled)
    return {'branch_logits': tuple(logits.astype(jnp.float32) for logits, _ in peer_outputs),
            'leader_logits': leader_logits.astype(jnp.float32), 'attention_weights': attention}


def attention_targets(branch_logits: Sequence[jax.Array], attention_weights: jax.Array) -> list[jax.Array]:
  """t_i = Σ_j a_ij·z_j in float32 for every peer i (train_GL.py's `x_m[:, :, i]`); nothing detached."""
  stacked = jnp.stack([z.astype(jnp.float32) for z in branch_logits], axis=1)  # (B, m, C)
  targets = jnp.einsum('bij,bjc->bic', attention_weights.astype(jnp.float32), stacked)
  return [targets[:, i] for i in range(len(branch_logits))]


def kl_with_live_target(logits: jax.Array, target_logits: jax.Array, temperature: float) -> jax.Array:
  """T²·Σ (p + ε)(log(p + ε) − log softmax(z/T)) / B with p = softmax(target/T), ε = 1e-7: utils.py `KL_Loss`.

  Unlike `objective.kl_divergence`, the target is NOT detached: its gradient reaches whatever made the target.
  """
  temperature = float(temperature)
  target_probs = jax.nn.softmax(target_logits.astype(jnp.float32) / temperature, axis=-1) + KL_TARGET_EPSILON
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  pointwise = target_probs * (jnp.log(target_probs) - log_probs)
  return temperature**2 * jnp.sum(pointwise) / logits.shape[0]


def okddip_losses(branch_logits: Sequence[jax.Array], leader_logits: jax.Array, attention_weights: jax.Array,
                  labels: jax.Array, temperature: float, distill_scale: jax.Array | float
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(L, terms): the OKDDip loss of the module docstring with α·w(e) = `distill_scale`; terms 'branch_i/ce',
  'branch_i/kl' (to its attention target), 'leader/ce', 'leader/kl' (to the peers' logit mean), raw."""
  terms: dict[str, jax.Array] = {}
  total_ce, total_kl = 0.0, 0.0
  for i, (z, target) in enumerate(zip(branch_logits, attention_targets(branch_logits, attention_weights))):
    terms[f'{branch_name(i)}/ce'] = objective.cross_entropy(z, labels)
    terms[f'{branch_name(i)}/kl'] = kl_with_live_target(z, target, temperature)
    total_ce = total_ce + terms[f'{branch_name(i)}/ce']
    total_kl = total_kl + terms[f'{branch_name(i)}/kl']
  terms[f'{LEADER}/ce'] = objective.cross_entropy(leader_logits, labels)
  # train_GL.py: the leader's target is the mean of the peers' logits (`torch.mean(output_batch, dim=2)`), live.
  terms[f'{LEADER}/kl'] = kl_with_live_target(leader_logits, objective.mean_logits(branch_logits), temperature)
  total = total_ce + terms[f'{LEADER}/ce'] + distill_scale * (total_kl + terms[f'{LEADER}/kl'])
  return total, terms


@register
class OKDDip(MultiBranchMethod):
  """OKDDip: peers on a shared trunk distilled from their own attention-weighted peer ensembles, a group leader
  distilled from the peers' mean; trunk + leader is deployed."""
  name = 'okddip'
  key_prefix = 'okddip'
  min_students = 2
  deployed_network = LEADER

  def build_model(self, dtype: Any) -> nn.Module:
    return OKDDipModel(backbone=self.config.model, num_classes=self.config.num_classes,
                       num_peers=self.config.num_students, shared_stages=self.shared_stages(), dtype=dtype)

  def check_config(self) -> list[str]:
    return super().check_config() + number_problems(self.config, 'okddip_kl_weight', 0,
                                                    'Set --config.okddip_kl_weight=1.0', strict=False)

  def objective(self, outputs, labels, step, steps_per_epoch):
    rampup = self.warmup_factor(step, steps_per_epoch)
    total, terms = okddip_losses(tuple(outputs['branch_logits']), outputs['leader_logits'],
                                 outputs['attention_weights'], labels, float(self.config.okddip_temperature),
                                 float(self.config.okddip_kl_weight) * rampup)
    # The batch-mean weight a peer's target puts on the peer itself: whether the attention learns to look elsewhere.
    diagonal = jnp.diagonal(outputs['attention_weights'].astype(jnp.float32), axis1=1, axis2=2)
    terms['attention/self_weight'] = jnp.mean(diagonal)
    # 'lambda_scale' reports the ramp-up w(e) of this step (α is constant).
    return objective.finish_objective({NETWORK_GROUP: total}, terms, rampup)

  def network_logits(self, outputs):
    logits = {branch_name(i): z for i, z in enumerate(outputs['branch_logits'])}
    logits[LEADER] = outputs['leader_logits']
    # train_GL.py's ensemble accuracy: the mean of the peers' logits (the leader's target).
    logits['ensemble'] = objective.mean_logits(outputs['branch_logits'])
    return {name: z.astype(jnp.float32) for name, z in logits.items()}

  def deployed_variables(self, params, batch_stats, extra_state):
    del extra_state
    return merge_stage_variables({'params': params[TRUNK], 'batch_stats': batch_stats.get(TRUNK, {})},
                                 {'params': params[LEADER], 'batch_stats': batch_stats.get(LEADER, {})})
