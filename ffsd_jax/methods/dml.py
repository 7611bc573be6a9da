"""DML (Zhang et al., "Deep Mutual Learning", CVPR 2018): the baseline of docs/method.md §6.6.

m students of one architecture, each trained with cross-entropy plus the mean over its peers of
T²·KL_T(softmax(sg(z_j)/T) ‖ softmax(z_i/T)): the first two lines of FFSD's student loss, with no leader, fusion or
decoders. There is no leader, so student_0 is deployed.
"""

from __future__ import annotations


from ffsd_jax import objective
from ffsd_jax.methods import register
from ffsd_jax.methods.ffsd import StudentModelMethod, lambda_warmup


@register
class DML(StudentModelMethod):
  """Deep mutual learning among the students; student_0 is deployed."""
  name = 'dml'
  min_students = 2
  deployed_network = 'student_0'
  with_leader = False

  def warmup_factor(self, step, steps_per_epoch):
    return lambda_warmup(self.config, step, steps_per_epoch)

  def objective(self, outputs, labels, step, steps_per_epoch):
    # The λ warm-up scales no DML term; its factor is still reported ('lambda_scale') so every method logs it.
    warmup = self.warmup_factor(step, steps_per_epoch)
    student_losses, terms = objective.student_logit_terms(tuple(outputs['student_logits']), labels,
                                                          float(self.config.temperature), with_kl=True)
    group_losses = {f'student_{i}': loss for i, loss in enumerate(student_losses)}
    return objective.finish_objective(group_losses, terms, warmup)

