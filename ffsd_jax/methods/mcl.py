"""MCL (Yang, An, Cai, Xu, "Mutual Contrastive Learning for Visual Representation Learning", AAAI 2022).

Official code: winycg/MCL (main_cifar.py, losses/cifar_sup_mcl_loss.py, models/resnet.py); not winycg/MCL-OKD, an
earlier, different method. m networks (m = `num_students`), each with its own embedding head (Linear(C → D), ReLU,
Linear(D → D), L2 normalisation; D = `mcl_embedding_dim`) on its globally pooled last feature map. For m = 2 the
networks are independent (models/resnet.py `ResNet_n`); for any other m they share the stem and the first stage
(`ResNet_b`): `mcl_shared_stages` = None follows that rule, an int overrides it (0 = independent networks).

With the embeddings v^i (B, D) of network i, τ = `mcl_contrast_temperature` and S^{ij} = v^i v^jᵀ / τ (B × B), the
official contrastive terms (cifar_sup_mcl_loss.py `SupMCL`) are, for an anchor a, its positives
P(a) = {k ≠ a : y_k = y_a}
and log q_ak = S_ak − log Σ_{k' ≠ a} exp(S_ak'):

  ℓ(S) = mean over anchors a of −(1/|P(a)|) Σ_{k ∈ P(a)} log q_ak
  VCL = Σ_i ℓ(S^{ii})                      Soft VCL = Σ_{i ≠ j} T²·KL(softmax(sg(S^{jj})/T) ‖ softmax(S^{ii}/T))
  ICL = Σ_{i ≠ j} ℓ(S^{ij})                Soft ICL = Σ_{i ≠ j} T²·KL(softmax(sg(S^{ji})/T) ‖ softmax(S^{ij}/T))

(the KL terms row by row over all B columns, batch-mean, T = `mcl_temperature`). In ICL the official code uses the
same masks as in VCL: the anchor's own image in the other network (k = a) is neither a positive nor in the
denominator. The one loss (main_cifar.py) is

  L = Σ_i CE(z_i, y) + α·VCL + γ·Soft VCL + β·ICL + λ·Soft ICL

with the README's α = β = 0.1, γ = λ = 1 (`mcl_vcl_weight`, `mcl_soft_vcl_weight`, `mcl_icl_weight`,
`mcl_soft_icl_weight`; the official argument parser's defaults are 0). Only the soft terms' targets are detached;
VCL and ICL train both sides. One SGD (`weight_decay`) trains the networks and the embedding heads.

An anchor with no positive in its batch: the official code divides by |P(a)| = 0 (0/0 = NaN, so the loss would be NaN),
and never meets one because its sampler (dataset/class_sampler.py `MPerClassSampler`, m = 2) puts every class of a
batch in it twice. This pipeline draws uniform batches, so such anchors occur; ℓ leaves them out of its mean (the mean
runs over the anchors that have a positive; 0 when none has), which is the official value whenever every anchor has
one (docs/deviations.md). 'mcl/anchor_positive_rate' logs the fraction that has one.

Network 0 is deployed: branch_0 (with the trunk when one is shared) is exactly one complete backbone.
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
from ffsd_jax.methods.multi_branch import (NETWORK_GROUP, TRUNK, branch_name, branch_variables, shared_stages_problems,
                                           trunk_and_branches)
from ffsd_jax.models import create_backbone, get_spec, layers

WEIGHT_KEYS = ('mcl_vcl_weight', 'mcl_soft_vcl_weight', 'mcl_icl_weight', 'mcl_soft_icl_weight')


def embedding_name(index: int) -> str:
  return f'embed_{index}'


def official_shared_stages(num_networks: int) -> int:
  """models/resnet.py: `ResNet_n` (independent networks) for 2 networks, else `ResNet_b` (stem + first stage shared)."""
  return 0 if num_networks == 2 else 1


def l2_normalize_rows(x: jax.Array) -> jax.Array:
  """x / ‖x‖₂ row by row (cifar_sup_mcl_loss.py `Normalize(2)`: no epsilon)."""
  return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


class EmbeddingHead(nn.Module):
  """cifar_sup_mcl_loss.py `Embed`: Linear(C → D), ReLU, Linear(D → D), L2 normalisation; float32 (B, D) out.

  Attributes:
    embedding_dim: D.
    dtype: compute dtype of the Linear layers.
  """
  embedding_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pooled: jax.Array) -> jax.Array:
    hidden = layers.torch_dense(self.embedding_dim, pooled.shape[-1], dtype=self.dtype, name='fc1')(pooled)
    out = layers.torch_dense(self.embedding_dim, self.embedding_dim, dtype=self.dtype, name='fc2')(nn.relu(hidden))
    return l2_normalize_rows(out.astype(jnp.float32))


class MCLModel(nn.Module):
  """m networks (sharing the first `shared_stages` stages under 'trunk' when > 0) and their embedding heads.
  Top-level keys: ['trunk',] 'branch_0' … 'branch_{m−1}', 'embed_0' … 'embed_{m−1}'.

  `__call__(images, train)` returns {'branch_logits': m float32 (B, C), 'embeddings': m float32 (B, D) unit rows},
  the same keys in both modes.

  Attributes:
    backbone: registry name of every network.
    num_classes: classifier width.
    num_networks: m >= 2.
    shared_stages: 0 (independent networks, each 'branch_i' a whole backbone) or the trunk's number of stages.
    embedding_dim: D.
    dtype: compute dtype (parameters, logits and embeddings stay float32).
  """
  backbone: str
  num_classes: int
  num_networks: int = 2
  shared_stages: int = 0
  embedding_dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = True) -> dict[str, Any]:
    if self.shared_stages:
      features, networks = trunk_and_branches(self.backbone, self.num_classes, self.num_networks, self.shared_stages,
                                              self.dtype, images, train)
    else:
      get_spec(self.backbone).check_input_size(images.shape[1], images.shape[2])
      features = images
      networks = [create_backbone(self.backbone, self.num_classes, self.dtype, name=branch_name(i))
                  for i in range(self.num_networks)]
    outputs = [network(features, train=train) for network in networks]
    # The embedding heads read each network's globally pooled last feature map, the classifier's own input.
    embeddings = tuple(EmbeddingHead(self.embedding_dim, self.dtype, name=embedding_name(i))(
        jnp.mean(taps[-1], axis=(1, 2))) for i, (_, taps) in enumerate(outputs))
    return {'branch_logits': tuple(logits.astype(jnp.float32) for logits, _ in outputs), 'embeddings': embeddings}


def positive_mask(labels: jax.Array) -> jax.Array:
  """(B, B) float32: 1 where y_k = y_a and k ≠ a (cifar_sup_mcl_loss.py `intra_mask`)."""
  same = (labels[:, None] == labels[None, :]).astype(jnp.float32)
  return same - jnp.eye(labels.shape[0], dtype=jnp.float32)


def supervised_contrastive(similarity: jax.Array, positives: jax.Array) -> jax.Array:
  """ℓ(S): mean over anchors with a positive of −(1/|P(a)|) Σ_{k ∈ P(a)} log q_ak, q over the columns k ≠ a.

  Anchors without a positive (a 0/0 in the official code) are left out of the mean; 0 when no anchor has one.
  """
  similarity = similarity.astype(jnp.float32)
  off_diagonal = ~jnp.eye(similarity.shape[0], dtype=bool)
  log_normalizer = jax.nn.logsumexp(jnp.where(off_diagonal, similarity, -jnp.inf), axis=1, keepdims=True)
  log_prob = similarity - log_normalizer
  count = jnp.sum(positives, axis=1)
  has_positive = count > 0
  per_anchor = -jnp.sum(positives * log_prob, axis=1) / jnp.maximum(count, 1.0)
  anchors = jnp.sum(has_positive.astype(jnp.float32))
  return jnp.sum(jnp.where(has_positive, per_anchor, 0.0)) / jnp.maximum(anchors, 1.0)


def mcl_contrastive_terms(embeddings: Sequence[jax.Array], labels: jax.Array, contrast_temperature: float,
                          kl_temperature: float) -> dict[str, jax.Array]:
  """The four raw MCL terms of the module docstring: {'mcl/vcl', 'mcl/soft_vcl', 'mcl/icl', 'mcl/soft_icl'}."""
  positives = positive_mask(labels)

  def similarity(i: int, j: int) -> jax.Array:
    return embeddings[i].astype(jnp.float32) @ embeddings[j].astype(jnp.float32).T / contrast_temperature

  num_networks = len(embeddings)
  pairs = [(i, j) for i in range(num_networks) for j in range(num_networks) if i != j]
  intra = [similarity(i, i) for i in range(num_networks)]
  inter = {(i, j): similarity(i, j) for i, j in pairs}
  # `objective.kl_divergence` detaches its target, as the official `.detach()` does; rows are the "batch".
  return {
      'mcl/vcl': sum(supervised_contrastive(s, positives) for s in intra),
      'mcl/soft_vcl': sum(objective.kl_divergence(intra[i], intra[j], kl_temperature) for i, j in pairs),
      'mcl/icl': sum(supervised_contrastive(inter[pair], positives) for pair in pairs),
      'mcl/soft_icl': sum(objective.kl_divergence(inter[i, j], inter[j, i], kl_temperature) for i, j in pairs),
  }


def mcl_losses(branch_logits: Sequence[jax.Array], embeddings: Sequence[jax.Array], labels: jax.Array,
               contrast_temperature: float, kl_temperature: float, weights: Sequence[float]
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(L, terms): Σ_i CE(z_i) + α·VCL + γ·Soft VCL + β·ICL + λ·Soft ICL with `weights` = (α, γ, β, λ); terms
  'branch_i/ce', the four raw 'mcl/*' terms and 'mcl/anchor_positive_rate'."""
  terms = {f'{branch_name(i)}/ce': objective.cross_entropy(z, labels) for i, z in enumerate(branch_logits)}
  contrastive = mcl_contrastive_terms(embeddings, labels, contrast_temperature, kl_temperature)
  terms.update(contrastive)
  terms['mcl/anchor_positive_rate'] = jnp.mean((jnp.sum(positive_mask(labels), axis=1) > 0).astype(jnp.float32))
  names = ('mcl/vcl', 'mcl/soft_vcl', 'mcl/icl', 'mcl/soft_icl')
  total = sum(terms[f'{branch_name(i)}/ce'] for i in range(len(branch_logits)))
  total = total + sum(weight * contrastive[name] for weight, name in zip(weights, names))
  return total, terms


@register
class MCL(Method):
  """MCL: networks trained with cross-entropy and mutual (vanilla and soft, intra- and inter-network) supervised
  contrastive terms on their embeddings; network 0 is deployed."""
  name = 'mcl'
  min_students = 2
  deployed_network = branch_name(0)
  # MCL(×2)'s networks share no layer but are not written as stacked networks (`stacked_networks`) yet.
  network_parallel_refusal = ('its 2-network form is not written for it yet, and more networks share the stem and '
                              'first stage')

  def shared_stages(self) -> int:
    """The number of stages the networks share (0: independent)."""
    value = self.config.get('mcl_shared_stages')
    return official_shared_stages(int(self.config.num_students)) if value is None else int(value)

  def build_model(self, dtype: Any) -> nn.Module:
    return MCLModel(backbone=self.config.model, num_classes=self.config.num_classes,
                    num_networks=self.config.num_students, shared_stages=self.shared_stages(),
                    embedding_dim=self.config.mcl_embedding_dim, dtype=dtype)

  def check_config(self) -> list[str]:
    problems = shared_stages_problems(
        self.config, 'mcl_shared_stages', minimum=0, sharing='the networks share their first k stages',
        fix='(0 = independent networks). Leave it None for the official choice (independent for 2 networks, else '
            'the stem and first stage shared).')
    dim = self.config.get('mcl_embedding_dim')
    if not (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1):
      problems.append(f'config.mcl_embedding_dim={dim!r}: must be an int >= 1. Set --config.mcl_embedding_dim=128.')
    problems.extend(number_problems(self.config, 'mcl_contrast_temperature', 0,
                                    'Set --config.mcl_contrast_temperature=0.1', strict=True))
    problems.extend(number_problems(self.config, 'mcl_temperature', 0, 'Set --config.mcl_temperature=3.0',
                                    strict=True))
    for key, default in zip(WEIGHT_KEYS, (0.1, 1.0, 0.1, 1.0)):
      problems.extend(number_problems(self.config, key, 0, f'Set --config.{key}={default}', strict=False))
    return problems

  def param_group(self, top_level_key: str) -> str:
    del top_level_key  # ICL and a shared trunk couple the networks: one loss and one SGD, as officially.
    return NETWORK_GROUP

  def objective(self, outputs, labels, step, steps_per_epoch):
    total, terms = mcl_losses(tuple(outputs['branch_logits']), tuple(outputs['embeddings']), labels,
                              float(self.config.mcl_contrast_temperature), float(self.config.mcl_temperature),
                              tuple(float(self.config[key]) for key in WEIGHT_KEYS))
    # MCL has no ramp-up: 'lambda_scale' is reported as 1.
    return objective.finish_objective({NETWORK_GROUP: total}, terms, self.warmup_factor(step, steps_per_epoch))

  def network_logits(self, outputs):
    logits = {branch_name(i): z for i, z in enumerate(outputs['branch_logits'])}
    # main_cifar.py's ensemble: the sum of the networks' logits (the same top-1 as their mean, reported here).
    logits['ensemble'] = objective.mean_logits(outputs['branch_logits'])
    return {name: z.astype(jnp.float32) for name, z in logits.items()}

  def deployed_variables(self, params, batch_stats, extra_state):
    del extra_state
    if TRUNK in params:
      return branch_variables(params, batch_stats, 0)
    name = branch_name(0)
    return {'params': params[name], 'batch_stats': batch_stats.get(name, {})}
