"""Loss primitives shared by the methods (docs/method.md §6), the λ warm-up and `ObjectiveResult`.

Each term is computed in float32 whatever the compute dtype (docs/method.md §12.5). A method's objective
(ffsd_jax/methods/) returns the sum of its per-group losses: because every cross-group quantity is wrapped in
`stop_gradient` exactly where the method writes sg(·), the gradient of that sum with respect to one group's parameters
equals the gradient of the group's own loss, which is what the official code's sequential per-optimizer updates compute
(§7.3).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from ffsd_jax.attention import attention_map, diversity_shift, l2_normalize, normalized_distance

# exp(−WARMUP_SHARPNESS·(1 − e/E)²): the official code's `lambda_warmup` (docs/method.md §6.5).
WARMUP_SHARPNESS = 5.0


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """The scalar hyper-parameters of the objective (docs/method.md §6)."""
  temperature: float = 2.0
  lambda_diversity: float = 1e-5
  lambda_fusion: float = 10.0
  lambda_self_distillation: float = 1000.0

  @classmethod
  def from_config(cls, config: Any) -> 'LossWeights':
    """Reads `temperature`, `lambda_diversity`, `lambda_fusion` and `lambda_self_distillation` from a config."""
    return cls(temperature=float(config.temperature), lambda_diversity=float(config.lambda_diversity),
               lambda_fusion=float(config.lambda_fusion),
               lambda_self_distillation=float(config.lambda_self_distillation))


@dataclasses.dataclass(frozen=True)
class ObjectiveResult:
  """What an objective returns: the total to differentiate, each group's own loss, and every raw and weighted term."""
  total: jax.Array
  group_losses: dict[str, jax.Array]
  terms: dict[str, jax.Array]


# ----------------------------------------------------------------------------------------------------------------------
# Primitive losses.


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Batch-mean cross-entropy on integer labels, in float32 (no label smoothing)."""
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, labels.astype(jnp.int32)[:, None], axis=-1)[:, 0]
  return -jnp.mean(picked)


def kl_divergence(logits: jax.Array, target_logits: jax.Array, temperature: float) -> jax.Array:
  """T² · KL_T(softmax(sg(target)/T) ‖ softmax(logits/T)) with PyTorch's 'batchmean' reduction (sum / B).

  The target side is always detached (docs/method.md §2). `xlogy` gives 0·log 0 = 0 where the target underflows.
  """
  temperature = float(temperature)
  target_logits = jax.lax.stop_gradient(target_logits.astype(jnp.float32))
  target_probs = jax.nn.softmax(target_logits / temperature, axis=-1)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  pointwise = jax.scipy.special.xlogy(target_probs, target_probs) - target_probs * log_probs
  return temperature**2 * jnp.sum(pointwise) / logits.shape[0]


def attention_distance(feature: jax.Array, target_feature: jax.Array) -> jax.Array:
  """Dist(A(feature), A(target_feature)); the caller decides what is detached."""
  return normalized_distance(attention_map(feature), attention_map(target_feature))


def diversity_loss(feature: jax.Array, previous_feature: jax.Array) -> jax.Array:
  """L_div (§5.2): mean over B×N of (n(A(f_i)) − shift(A(sg(f_{i−1}))))², the target un-normalised."""
  target, _, _ = diversity_shift(attention_map(jax.lax.stop_gradient(previous_feature)))
  return jnp.mean(jnp.square(l2_normalize(attention_map(feature)) - target))


def attention_self_distillation_loss(taps: Sequence[jax.Array], decoder_targets: Sequence[jax.Array]) -> jax.Array:
  """Σ_{j < last} Dist(A(f^j), sg(A(target_j))): the students' and the leader's SD terms (§6.1, §6.3).

  Args:
    taps: the network's taps in forward order (the last one is not used).
    decoder_targets: the eval-mode decoder outputs, shallowest first, one per tap except the last.
  """
  _check_decoder_outputs(taps, decoder_targets, 'decoder targets')
  return sum(attention_distance(tap, jax.lax.stop_gradient(target)) for tap, target in zip(taps, decoder_targets))


def reconstruction_loss(reconstructions: Sequence[jax.Array], taps: Sequence[jax.Array]) -> jax.Array:
  """The raw decoder loss (§6.4, before λ_sd): Σ_{j < last} Dist(D_j, sg(f^j)) + Dist(A(D_j), A(sg(f^j))).

  The first distance is over the flattened C·H·W raw features, the second over the H·W attention maps.
  """
  _check_decoder_outputs(taps, reconstructions, 'decoder reconstructions')
  total = 0.0
  for reconstruction, tap in zip(reconstructions, taps):
    tap = jax.lax.stop_gradient(tap)
    total = total + normalized_distance(reconstruction, tap) + attention_distance(reconstruction, tap)
  return total


def _check_decoder_outputs(taps: Sequence[jax.Array], outputs: Sequence[jax.Array], what: str) -> None:
  if len(outputs) != len(taps) - 1:
    raise ValueError(f'Expected one of the {what} per tap except the last ({len(taps) - 1}), got {len(outputs)}.')
  for j, (tap, output) in enumerate(zip(taps, outputs)):
    if tap.shape != output.shape:
      raise ValueError(f'The {what}[{j}] has shape {output.shape} but tap {j} has shape {tap.shape}.')


def mean_logits(logits: Sequence[jax.Array]) -> jax.Array:
  """z̄ = (1/m) Σ z_i in float32."""
  return sum(z.astype(jnp.float32) for z in logits) / len(logits)


# ----------------------------------------------------------------------------------------------------------------------
# λ warm-up.


def lambda_warmup_factor(epoch: jax.Array | int, warmup_epochs: int = 5) -> jax.Array:
  """exp(−5·(1 − e/E)²) for 1-based epoch e ≤ E, else 1 (E = 5: 0.0408, 0.1653, 0.4493, 0.8187, 1.0)."""
  epoch = jnp.asarray(epoch, jnp.float32)
  if warmup_epochs <= 0:
    return jnp.ones_like(epoch)
  factor = jnp.exp(-WARMUP_SHARPNESS * jnp.square(1.0 - epoch / warmup_epochs))
  return jnp.where(epoch <= warmup_epochs, factor, 1.0)


def lambda_scale(step: jax.Array | int, steps_per_epoch: int, warmup_epochs: int = 5) -> jax.Array:
  """The warm-up factor at 0-based optimizer step `step`: constant within an epoch, epoch = step // spe + 1."""
  if steps_per_epoch < 1:
    raise ValueError(f'steps_per_epoch must be >= 1, got {steps_per_epoch}.')
  epoch = jnp.asarray(step, jnp.int32) // steps_per_epoch + 1
  return lambda_warmup_factor(epoch, warmup_epochs)


# ----------------------------------------------------------------------------------------------------------------------
# Objectives.


def student_logit_terms(student_logits: Sequence[jax.Array], labels: jax.Array, temperature: float,
                        with_kl: bool) -> tuple[list[jax.Array], dict[str, jax.Array]]:
  """CE and (optionally) the DML KL, (1/(m−1)) Σ_{j≠i} T²·KL_T(sg(z_j) ‖ z_i), per student."""
  num_students = len(student_logits)
  if with_kl and num_students < 2:
    raise ValueError(f'Mutual KL between students needs num_students >= 2, got {num_students}.')
  losses, terms = [], {}
  for i, logits in enumerate(student_logits):
    ce = cross_entropy(logits, labels)
    terms[f'student_{i}/ce'] = ce
    loss = ce
    if with_kl:
      kl = sum(kl_divergence(logits, student_logits[j], temperature)
               for j in range(num_students) if j != i) / (num_students - 1)
      terms[f'student_{i}/kl'] = kl
      loss = loss + kl
    losses.append(loss)
  return losses, terms


def finish_objective(group_losses: dict[str, jax.Array], terms: dict[str, jax.Array], warmup: jax.Array | float
                     ) -> ObjectiveResult:
  """The `ObjectiveResult` of per-group losses and raw terms: adds '<group>/loss', 'loss/total' and 'lambda_scale'
  (the warm-up factor the step used) to the terms, all float32; the total is the sum of the group losses."""
  terms = dict(terms)
  for group, loss in group_losses.items():
    terms[f'{group}/loss'] = loss
  total = sum(group_losses.values())
  terms['loss/total'] = total
  terms['lambda_scale'] = jnp.asarray(warmup, jnp.float32)
  terms = {name: jnp.asarray(value, jnp.float32) for name, value in terms.items()}
  return ObjectiveResult(total=jnp.asarray(total, jnp.float32), group_losses=group_losses, terms=terms)

