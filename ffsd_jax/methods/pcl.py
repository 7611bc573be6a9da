"""PCL (Wu & Gong, "Peer Collaborative Learning for Online Knowledge Distillation", AAAI 2021).

A multi-branch network as in ONE: a trunk (the backbone's first `pcl_shared_stages` stages) shared by m peers
(branches: the remaining stages and the classifier each; m = `num_students`). Two kinds of teacher:

- the peer ensemble teacher: a Linear classifier ('peer_ensemble') on the concatenated, globally pooled last feature
  maps of the peers, z_e = W·[f_1; …; f_m] + b, trained with the rest of the network by its own cross-entropy;
- the peer mean teachers: the temporal mean (exponential moving average) of every peer's parameters, trunk included,
  θ̃ ← α_t·θ̃ + (1 − α_t)·θ after every optimizer step, with α_t = min(1 − 1/t, `pcl_ema_decay`) at update t (1-based;
  the mean-teacher rule, so the first update copies θ). They are extra state (`init_extra_state`), run in train mode
  (batch statistics) on the same batch, keep the running statistics of those passes (as a separate EMA model's
  buffers would be), and give no gradient.

With z_j the peers' logits, z̃_j the peer mean teachers' and T = `pcl_temperature`, the one loss is

  L = Σ_j CE(z_j, y) + CE(z_e, y)
      + Σ_j T²·KL(softmax(sg(z_e)/T) ‖ softmax(z_j/T))                                      (peer ensemble teacher)
      + w(e)·Σ_j 1/(m−1) Σ_{l≠j} T²·KL(softmax(z̃_l/T) ‖ softmax(z_j/T))                     (peer mean teachers)

with the ramp-up w(e) = exp(−5(1 − e/E)²) of the 0-based epoch e clipped to E = `pcl_rampup_epochs`. One SGD
(`weight_decay`) trains the trunk, the peers and the ensemble classifier. The deployed network is the temporal mean
of peer 0 ('temporal_mean_0': EMA trunk + EMA branch_0, one complete backbone). The open choices (per-peer input
augmentation, ramp-up scope) are in docs/deviations.md ("Newcomer methods").
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffsd_jax import objective
from ffsd_jax.methods import register
from ffsd_jax.methods.base import number_problems
from ffsd_jax.methods.multi_branch import (NETWORK_GROUP, TRUNK, MultiBranchMethod, branch_name, branch_variables,
                                           trunk_and_branches)
from ffsd_jax.models import layers

ENSEMBLE = 'peer_ensemble'


def temporal_mean_name(index: int) -> str:
  return f'temporal_mean_{index}'


class PCLModel(nn.Module):
  """Trunk, m peers and the peer ensemble classifier. Top-level keys: 'trunk', 'branch_0' … 'branch_{m−1}',
  'peer_ensemble'.

  `__call__(images, train)` returns {'branch_logits': m float32 (B, C)} and, with the ensemble head,
  'ensemble_logits' (B, C). Without it (`with_ensemble_head=False`) the module is the peers alone, whose variables are
  the temporal means'.

  Attributes:
    backbone: registry name of the backbone that is split into trunk and peers.
    num_classes: classifier width.
    num_branches: m >= 2.
    shared_stages: the trunk's number of stages, in [1, num_stages − 1].
    with_ensemble_head: build the peer ensemble classifier.
    dtype: compute dtype (parameters and logits stay float32).
  """
  backbone: str
  num_classes: int
  num_branches: int = 3
  shared_stages: int = 2
  with_ensemble_head: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = True) -> dict[str, Any]:
    features, branches = trunk_and_branches(self.backbone, self.num_classes, self.num_branches, self.shared_stages,
                                            self.dtype, images, train)
    branch_outputs = [branch(features, train=train) for branch in branches]
    out: dict[str, Any] = {'branch_logits': tuple(logits.astype(jnp.float32) for logits, _ in branch_outputs)}
    if self.with_ensemble_head:
      # The classifiers' own input: each peer's last feature map, globally pooled (not detached: the ensemble's
      # cross-entropy also trains the peers, as in the public implementation).
      pooled = jnp.concatenate([jnp.mean(taps[-1], axis=(1, 2)) for _, taps in branch_outputs], axis=-1)
      head = layers.torch_dense(self.num_classes, pooled.shape[-1], dtype=self.dtype, name=ENSEMBLE)
      out['ensemble_logits'] = head(pooled).astype(jnp.float32)
    return out


def peer_mean_kl(logits: jax.Array, temporal_mean_logits: Sequence[jax.Array], index: int, temperature: float
                 ) -> jax.Array:
  """1/(m−1) Σ_{l≠index} T²·KL(softmax(sg(z̃_l)/T) ‖ softmax(z/T)): what peer `index` learns from the other peers'
  temporal means."""
  others = [z for l, z in enumerate(temporal_mean_logits) if l != index]
  return sum(objective.kl_divergence(logits, z, temperature) for z in others) / len(others)


def pcl_losses(branch_logits: Sequence[jax.Array], ensemble_logits: jax.Array,
               temporal_mean_logits: Sequence[jax.Array], labels: jax.Array, temperature: float,
               peer_mean_scale: jax.Array | float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(L, terms): the PCL loss of the module docstring; terms 'peer_ensemble/ce', 'branch_j/ce', 'branch_j/pe_kl'
  (from the peer ensemble teacher) and 'branch_j/pm_kl' (from the peer mean teachers, before the ramp-up)."""
  if len(temporal_mean_logits) != len(branch_logits) or len(branch_logits) < 2:
    raise ValueError(f'PCL needs m >= 2 peers and one temporal mean per peer; got {len(branch_logits)} peers and '
                     f'{len(temporal_mean_logits)} temporal means.')
  terms = {f'{ENSEMBLE}/ce': objective.cross_entropy(ensemble_logits, labels)}
  total = terms[f'{ENSEMBLE}/ce']
  for j, z in enumerate(branch_logits):
    name = branch_name(j)
    terms[f'{name}/ce'] = objective.cross_entropy(z, labels)
    # kl_divergence detaches its target: the ensemble classifier learns from its cross-entropy only.
    terms[f'{name}/pe_kl'] = objective.kl_divergence(z, ensemble_logits, temperature)
    terms[f'{name}/pm_kl'] = peer_mean_kl(z, temporal_mean_logits, j, temperature)
    total = total + terms[f'{name}/ce'] + terms[f'{name}/pe_kl'] + peer_mean_scale * terms[f'{name}/pm_kl']
  return total, terms


def is_peer_key(top_level_key: str) -> bool:
  """Whether a top-level key belongs to the peers (trunk or a branch), i.e. has a temporal mean."""
  return top_level_key == TRUNK or top_level_key.startswith('branch_')


def ema_update(temporal_mean: Any, live: Any, step: jax.Array, decay: float) -> Any:
  """θ̃ ← α·θ̃ + (1 − α)·θ leaf by leaf, with α = min(1 − 1/step, decay) at update `step` (1-based; step 1 copies θ)."""
  step = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
  alpha = jnp.minimum(1.0 - 1.0 / step, jnp.float32(decay))
  return jax.tree.map(lambda mean, value: (alpha * mean + (1.0 - alpha) * value).astype(mean.dtype), temporal_mean,
                      live)


@register
class PCL(MultiBranchMethod):
  """PCL: peers on a shared trunk taught by their ensemble and by each other's temporal means; the temporal mean of
  peer 0 is deployed."""
  name = 'pcl'
  key_prefix = 'pcl'
  min_students = 2
  deployed_network = temporal_mean_name(0)

  def build_model(self, dtype: Any) -> nn.Module:
    return PCLModel(backbone=self.config.model, num_classes=self.config.num_classes,
                    num_branches=self.config.num_students, shared_stages=self.shared_stages(), dtype=dtype)

  def check_config(self) -> list[str]:
    problems = super().check_config()
    decay_problems = number_problems(self.config, 'pcl_ema_decay', 0, 'Set --config.pcl_ema_decay=0.999',
                                     strict=False)
    decay = self.config.get('pcl_ema_decay')
    if not decay_problems and decay >= 1:
      decay_problems.append(f'config.pcl_ema_decay={decay!r}: must be < 1 (1 would freeze the temporal means at '
                            'their first value). Set --config.pcl_ema_decay=0.999.')
    return problems + decay_problems

  @staticmethod
  def temporal_mean_model(model: nn.Module) -> nn.Module:
    """The peers without the ensemble head: the module the temporal-mean variables (extra state) are applied to."""
    return model.clone(with_ensemble_head=False)

  def apply_train(self, model, params, batch_stats, extra_state, images):
    outputs, mutated = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                                   mutable=['batch_stats'])
    # The peer mean teachers run in train mode (batch statistics) as in the mean-teacher code; the running statistics
    # this updates are theirs (`update_extra_state` keeps them), as a separate PyTorch EMA model's buffers would be.
    temporal_mean, temporal_mean_stats = self.temporal_mean_model(model).apply(dict(extra_state), images, train=True,
                                                                               mutable=['batch_stats'])
    outputs = dict(outputs)
    outputs['temporal_mean_logits'] = tuple(jax.lax.stop_gradient(z) for z in temporal_mean['branch_logits'])
    outputs['temporal_mean_batch_stats'] = jax.lax.stop_gradient(temporal_mean_stats['batch_stats'])
    return outputs, mutated['batch_stats']

  def objective(self, outputs, labels, step, steps_per_epoch):
    peer_mean_scale = self.warmup_factor(step, steps_per_epoch)
    total, terms = pcl_losses(tuple(outputs['branch_logits']), outputs['ensemble_logits'],
                              tuple(outputs['temporal_mean_logits']), labels, float(self.config.pcl_temperature),
                              peer_mean_scale)
    # 'lambda_scale' reports the peer-mean ramp-up weight of this step.
    return objective.finish_objective({NETWORK_GROUP: total}, terms, peer_mean_scale)

  def network_logits(self, outputs):
    logits = {branch_name(i): z for i, z in enumerate(outputs['branch_logits'])}
    if outputs.get('ensemble_logits') is not None:
      logits[ENSEMBLE] = outputs['ensemble_logits']
    for i, z in enumerate(outputs.get('temporal_mean_logits', ())):
      logits[temporal_mean_name(i)] = z
    return {name: z.astype(jnp.float32) for name, z in logits.items()}

  def eval_logits(self, model, params, batch_stats, extra_state, images):
    outputs = dict(model.apply({'params': params, 'batch_stats': batch_stats}, images, train=False))
    temporal_mean = self.temporal_mean_model(model).apply(dict(extra_state), images, train=False)
    outputs['temporal_mean_logits'] = temporal_mean['branch_logits']
    return self.network_logits(outputs)

  def deployed_variables(self, params, batch_stats, extra_state):
    del params, batch_stats
    return branch_variables(extra_state['params'], extra_state['batch_stats'], 0)

  def init_extra_state(self, params, batch_stats):
    # Copies, not aliases: the state is donated to the step, and one buffer must not appear twice in it.
    return {'params': {key: jax.tree.map(jnp.copy, tree) for key, tree in params.items() if is_peer_key(key)},
            'batch_stats': {key: jax.tree.map(jnp.copy, tree) for key, tree in batch_stats.items()
                            if is_peer_key(key)}}

  def update_extra_state(self, extra_state, params, batch_stats, step, outputs):
    del batch_stats  # The temporal means keep the running statistics of their own train-mode pass (`apply_train`).
    live = {key: params[key] for key in extra_state['params']}
    return {'params': ema_update(extra_state['params'], live, step, float(self.config.pcl_ema_decay)),
            'batch_stats': outputs['temporal_mean_batch_stats']}
