"""What the multi-branch methods (ONE, PCL) share: a trunk of the backbone's first stages, branches made of the
remaining stages, the deployed branch as one complete backbone, the mean-teacher ramp-up, and their `Method` base.

The trunk and the branches are built with `create_backbone(..., stages=...)`, so their variables keep the full
backbone's names and `trunk + branch_i` merges into one complete backbone (`branch_variables`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ffsd_jax.methods.base import Method, number_problems
from ffsd_jax.models import create_backbone, get_spec, merge_stage_variables

# The loss group of every parameter of a multi-branch network (one optimizer, as in the official code).
NETWORK_GROUP = 'network'
TRUNK = 'trunk'
# exp(−RAMPUP_SHARPNESS·(1 − e/E)²): utils/ramps.py `sigmoid_rampup` (from the mean-teacher code).
RAMPUP_SHARPNESS = 5.0


def branch_name(index: int) -> str:
  return f'branch_{index}'


def shared_stage_count(backbone: str, shared_stages: int | None) -> int:
  """The trunk's number of stages: `shared_stages`, or all but the last stage when None (the official choice)."""
  num_stages = get_spec(backbone).num_taps
  return num_stages - 1 if shared_stages is None else int(shared_stages)


def shared_stages_problems(config: ml_collections.ConfigDict, key: str, minimum: int = 1,
                           sharing: str = 'the trunk shares the first k stages',
                           fix: str = '(a branch keeps at least the last stage). Set --config.{key}={last} (or leave it '
                                      'None for all stages but the last).') -> list[str]:
  """Problems with `config.<key>` (a number of shared stages): None or an int in [minimum, num_stages − 1].

  `sharing` says what is shared and `fix` ends the line ({key} and {last} filled in), so that each method's message
  speaks of its own layers.
  """
  value = config.get(key)
  try:
    num_stages = get_spec(config.get('model')).num_taps
  except ValueError:
    return []  # config_checks reports the unknown model.
  if value is None or (isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= num_stages - 1):
    return []
  return [f'config.{key}={value!r}: {sharing} of {config.get("model")}, which has {num_stages}; k must be an int in '
          f'[{minimum}, {num_stages - 1}] ' + fix.format(key=key, last=num_stages - 1)]


def trunk_and_branches(backbone: str, num_classes: int, num_branches: int, shared_stages: int, dtype: Any,
                       images: jax.Array, train: bool) -> tuple[jax.Array, list[nn.Module]]:
  """Runs the trunk (stages 0..k−1, named 'trunk') on `images`; returns its features and the m branches (stages
  k..n−1 + head, named 'branch_i') to apply to them.

  Call inside a parent's compact method. Their variables keep the full backbone's names, so the trunk's and one
  branch's variables merge into one complete backbone (`merge_stage_variables`).
  """
  spec = get_spec(backbone)
  spec.check_input_size(images.shape[1], images.shape[2])
  trunk = create_backbone(backbone, num_classes, dtype, name=TRUNK, stages=(0, shared_stages))
  branches = [create_backbone(backbone, num_classes, dtype, name=branch_name(i),
                              stages=(shared_stages, spec.num_taps)) for i in range(num_branches)]
  features, _ = trunk(images, train=train)
  return features, branches


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


class MultiBranchMethod(Method):
  """A method that trains one multi-branch network (trunk + `num_students` branches) with one loss and one SGD.

  Its config keys are `<key_prefix>_shared_stages` (None = all stages but the last), `<key_prefix>_temperature` and
  `<key_prefix>_rampup_epochs` (the ramp-up of `rampup_weight`, reported as 'lambda_scale').
  """
  key_prefix: ClassVar[str]
  network_parallel_refusal = 'its branches share the trunk, so they are not separate networks'

  def shared_stages(self) -> int:
    """The trunk's number of stages."""
    return shared_stage_count(self.config.model, self.config.get(f'{self.key_prefix}_shared_stages'))

  def check_config(self) -> list[str]:
    prefix = self.key_prefix
    problems = shared_stages_problems(self.config, f'{prefix}_shared_stages')
    problems.extend(number_problems(self.config, f'{prefix}_temperature', 0, f'Set --config.{prefix}_temperature=3.0',
                                    strict=True))
    rampup = self.config.get(f'{prefix}_rampup_epochs')
    if not (isinstance(rampup, int) and not isinstance(rampup, bool) and rampup >= 0):
      problems.append(f'config.{prefix}_rampup_epochs={rampup!r}: must be an int >= 0 (0 turns the ramp-up off). '
                      f'Set --config.{prefix}_rampup_epochs=80.')
    return problems

  def param_group(self, top_level_key: str) -> str:
    del top_level_key  # The trunk is shared by every branch's loss: one loss and one optimizer, as officially.
    return NETWORK_GROUP

  def warmup_factor(self, step, steps_per_epoch):
    return rampup_weight(step, steps_per_epoch, int(self.config[f'{self.key_prefix}_rampup_epochs']))
