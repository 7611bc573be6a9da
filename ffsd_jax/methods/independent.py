"""Independent training: FFSD's students and leader, each with cross-entropy only (docs/method.md §6.6).

The same networks, data, optimizers and schedules as FFSD with every distillation term removed: the baseline FFSD's
leader has to beat. The leader is deployed.
"""

from __future__ import annotations


from ffsd_jax import objective
from ffsd_jax.methods import register
from ffsd_jax.methods.ffsd import StudentModelMethod, lambda_warmup


@register
class Independent(StudentModelMethod):
  """The students and the leader trained alone; the leader is deployed."""
  name = 'independent'
  min_students = 1
  deployed_network = 'leader'

  def warmup_factor(self, step, steps_per_epoch):
    return lambda_warmup(self.config, step, steps_per_epoch)

  def objective(self, outputs, labels, step, steps_per_epoch):
    # No term is scaled by the λ warm-up; its factor is still reported ('lambda_scale') so every method logs it.
    warmup = self.warmup_factor(step, steps_per_epoch)
    student_losses, terms = objective.student_logit_terms(tuple(outputs['student_logits']), labels, 0.0,
                                                          with_kl=False)
    group_losses = {f'student_{i}': loss for i, loss in enumerate(student_losses)}
    terms['leader/ce'] = objective.cross_entropy(outputs['leader_logits'], labels)
    group_losses['leader'] = terms['leader/ce']
    return objective.finish_objective(group_losses, terms, warmup)

