"""KDCL (Guo et al., "Online Knowledge Distillation via Collaborative Learning", CVPR 2020).

m independent networks of one architecture (the `FFSDModel` students, `student_i`) are trained together. Every step
their logits z_1 … z_m are ensembled into one soft target z_t, and every network learns from the ground truth and from
that target:

  L_i = CE(z_i, y) + λ·T²·KL(softmax(sg(z_t)/T) ‖ softmax(z_i/T))    (λ = `kdcl_kl_weight`, T = `kdcl_temperature`)

with the teacher z_t built by `kdcl_teacher`:

- 'minlogit' (KDCL-MinLogit): z_t[b, j] = min_i (z_i[b, j] − z_i[b, y_b]); each network's logits are shifted so the
  ground-truth logit is 0 (softmax is unchanged by the shift), then the class-wise minimum keeps, for every wrong
  class, the network that separates it best from the right one.
- 'naive' (KDCL-Naive): z_t[b] = z_k[b] with k = argmin_i CE(z_i[b], y_b), per example; the network with the lowest
  cross-entropy on the example (the first one on a tie) is its teacher.

The target is detached, so the sum of the m losses gives every network exactly its own gradient, and each network
keeps its own optimizer (SGD, `weight_decay`), as m independent networks would. student_0 is deployed. The
paper's other teachers (KDCL-Linear, KDCL-General) and its per-network input distortions are not implemented
(docs/deviations.md, "Newcomer methods").
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from ffsd_jax import objective
from ffsd_jax.methods import register
from ffsd_jax.methods.base import number_problems
from ffsd_jax.methods.ffsd import StudentModelMethod

TEACHERS = ('minlogit', 'naive')


def minlogit_teacher(logits: Sequence[jax.Array], labels: jax.Array) -> jax.Array:
  """KDCL-MinLogit: min over networks of (z_i − z_i[y]), class by class, in float32 (B, C)."""
  labels = labels.astype(jnp.int32)[:, None]
  shifted = [z.astype(jnp.float32) - jnp.take_along_axis(z.astype(jnp.float32), labels, axis=-1) for z in logits]
  return jnp.min(jnp.stack(shifted), axis=0)


def naive_teacher(logits: Sequence[jax.Array], labels: jax.Array) -> jax.Array:
  """KDCL-Naive: per example, the logits of the network with the lowest cross-entropy (float32, (B, C))."""
  stacked = jnp.stack([z.astype(jnp.float32) for z in logits])  # (m, B, C)
  log_probs = jax.nn.log_softmax(stacked, axis=-1)
  picked = jnp.take_along_axis(log_probs, labels.astype(jnp.int32)[None, :, None], axis=-1)[..., 0]  # (m, B)
  best = jnp.argmin(-picked, axis=0)  # (B,): the first network on a tie
  return jnp.take_along_axis(stacked, best[None, :, None], axis=0)[0]


TEACHER_FUNCTIONS = {'minlogit': minlogit_teacher, 'naive': naive_teacher}


def kdcl_losses(logits: Sequence[jax.Array], labels: jax.Array, teacher: str, temperature: float, kl_weight: float
                ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """The KDCL loss of every network: (group losses `student_i`, terms `student_i/ce`, `student_i/kl`).

  The teacher is detached (`kl_divergence` detaches its target), so no network receives gradient through it.
  """
  teacher_logits = jax.lax.stop_gradient(TEACHER_FUNCTIONS[teacher](logits, labels))
  group_losses, terms = {}, {}
  for i, z in enumerate(logits):
    terms[f'student_{i}/ce'] = objective.cross_entropy(z, labels)
    terms[f'student_{i}/kl'] = objective.kl_divergence(z, teacher_logits, temperature)
    group_losses[f'student_{i}'] = terms[f'student_{i}/ce'] + kl_weight * terms[f'student_{i}/kl']
  # The teacher's own cross-entropy shows how good a target it is (MinLogit's is below every network's).
  terms['kdcl_teacher/ce'] = objective.cross_entropy(teacher_logits, labels)
  return group_losses, terms


@register
class KDCL(StudentModelMethod):
  """KDCL: m independent networks distilled from an ensemble of their logits; student_0 is deployed."""
  name = 'kdcl'
  min_students = 2
  deployed_network = 'student_0'
  with_leader = False

  def check_config(self) -> list[str]:
    problems = []
    teacher = self.config.get('kdcl_teacher')
    if teacher not in TEACHERS:
      problems.append(f'config.kdcl_teacher={teacher!r}: must be one of {list(TEACHERS)} (KDCL-MinLogit or '
                      "KDCL-Naive). Set --config.kdcl_teacher=minlogit.")
    problems.extend(number_problems(self.config, 'kdcl_temperature', 0, 'Set --config.kdcl_temperature=2.0',
                                    strict=True))
    problems.extend(number_problems(self.config, 'kdcl_kl_weight', 0, 'Set --config.kdcl_kl_weight=1.0',
                                    strict=False))
    return problems

  def objective(self, outputs, labels, step, steps_per_epoch):
    group_losses, terms = kdcl_losses(tuple(outputs['student_logits']), labels, str(self.config.kdcl_teacher),
                                      float(self.config.kdcl_temperature), float(self.config.kdcl_kl_weight))
    # KDCL has no warm-up: 'lambda_scale' is reported as 1.
    return objective.finish_objective(group_losses, terms, self.warmup_factor(step, steps_per_epoch))

