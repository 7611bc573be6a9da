"""The `Method` interface: everything that makes one online knowledge-distillation method, in one object.

A method answers six questions, and every other module asks it instead of testing method names:

1. Which networks does it train? `build_model` returns one parent Flax module whose top-level parameter keys name
   the networks (`student_0`, `leader`, `fusion`, `trunk`, `branch_1`, ...).
2. Which parameters does each loss group train, with which optimizer? `param_group` maps a top-level key to its
   group; `group_optimizer` gives the group's optimizer (`GroupOptimizer`).
3. What is the objective? `objective(outputs, labels, step, steps_per_epoch)` returns an `ObjectiveResult`: the total
   whose gradient trains every group at once (each cross-group quantity detached), the per-group losses and every
   term for the metrics.
4. Which networks are evaluated every epoch? `network_logits` names the logits of every network (and ensemble).
5. Which network is deployed? `deployed_network` is the name whose top-1 the best checkpoint tracks;
   `deployed_variables` cuts its variables out of the train state as a complete backbone for `create_backbone`, which
   is what `--mode eval` runs and `--mode export` writes.
6. Does it keep extra state? `init_extra_state` / `update_extra_state` hold anything updated after each optimizer
   step, such as exponential-moving-average ("temporal mean") networks; it is saved and restored with the state.
7. Can its networks run on devices of their own (`config.network_parallelism` > 1)? `stacked_networks` names its
   same-architecture backbones that share no layer; `heads_model` is everything else, applied to their outputs.

Register a subclass with `@register` (ffsd_jax/methods/__init__.py); `config.method` selects it.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ffsd_jax.objective import ObjectiveResult

Outputs = Mapping[str, Any]
Variables = dict[str, Any]

OPTIMIZER_KINDS = ('sgd', 'adam')
SCHEDULES = ('networks', 'decoders')


@dataclasses.dataclass(frozen=True)
class GroupOptimizer:
  """How one loss group's parameters are optimised (built by `train_state.create_optimizer`).

  Attributes:
    kind: 'sgd' (PyTorch SGD with Nesterov momentum `config.momentum` and coupled L2) or 'adam' (PyTorch Adam with
      coupled L2, β = (0.9, 0.999), eps 1e-8).
    schedule: the learning-rate schedule, 'networks' (`config.learning_rate`, `lr_schedule`) or 'decoders'
      (`config.decoder_learning_rate`); both decay at `config.lr_boundaries`.
    weight_decay: the coupled L2 coefficient.
  """
  kind: str
  schedule: str
  weight_decay: float

  def __post_init__(self):
    if self.kind not in OPTIMIZER_KINDS:
      raise ValueError(f'GroupOptimizer.kind must be one of {OPTIMIZER_KINDS}, got {self.kind!r}.')
    if self.schedule not in SCHEDULES:
      raise ValueError(f'GroupOptimizer.schedule must be one of {SCHEDULES}, got {self.schedule!r}.')


class Method(abc.ABC):
  """One online knowledge-distillation method (see the module docstring for the six questions it answers).

  Attributes:
    name: the `config.method` value that selects it.
    min_students: the least `config.num_students` it accepts.
    deployed_network: the network `--mode eval/export` uses and the best checkpoint tracks (a key of
      `network_logits`).
    config: the experiment config it was built from.
  """
  name: ClassVar[str]
  min_students: ClassVar[int] = 2
  deployed_network: ClassVar[str] = 'leader'

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  # 1. Networks.
  @abc.abstractmethod
  def build_model(self, dtype: Any) -> nn.Module:
    """The parent module of every network, for `config.model`, `config.num_classes` and `config.num_students`.

    `model(images, train=True)` returns what `objective` needs; `model(images, train=False)` what `network_logits`
    needs. Initialisation runs the train-mode call, so it must build every submodule.
    """

  def check_config(self) -> list[str]:
    """Problems with this method's own config keys, one line each naming the key, the value and the fix
    (`config_checks.validate_config` checks the shared keys, `num_students >= min_students` included)."""
    return []

  # 2. Loss groups and optimizers.
  def param_group(self, top_level_key: str) -> str:
    """The loss group (and optimizer) of a top-level parameter key; by default each network is its own group."""
    return top_level_key

  def group_optimizer(self, group: str) -> GroupOptimizer:
    """The optimizer of `group`; by default the students' SGD with `config.weight_decay`."""
    del group
    return GroupOptimizer('sgd', 'networks', float(self.config.weight_decay))

  # 3. Objective.
  def apply_train(self, model: nn.Module, params: Any, batch_stats: Any, extra_state: Any, images: jax.Array
                  ) -> tuple[Outputs, Any]:
    """The train-mode forward pass: (outputs for `objective`, the new batch statistics).

    Override to run extra networks (for example temporal-mean teachers held in `extra_state`).
    """
    del extra_state
    outputs, mutated = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                                   mutable=['batch_stats'])
    return outputs, mutated['batch_stats']

  @abc.abstractmethod
  def objective(self, outputs: Outputs, labels: jax.Array, step: jax.Array, steps_per_epoch: int
                ) -> ObjectiveResult:
    """The method's losses at optimizer step `step` (0-based; for warm-ups and ramps)."""

  def warmup_factor(self, step: jax.Array | int, steps_per_epoch: int) -> jax.Array:
    """The factor the method's warm-up or ramp-up puts on its distillation terms at 0-based step `step` (logged as
    'lambda_scale' and drawn by the schedule plots); 1 for a method without one."""
    del step, steps_per_epoch
    return jnp.ones((), jnp.float32)

  # 4. Evaluation.
  @abc.abstractmethod
  def network_logits(self, outputs: Outputs) -> dict[str, jax.Array]:
    """Every network's (and ensemble's) float32 logits by metric name, from train- or eval-mode outputs."""

  def eval_logits(self, model: nn.Module, params: Any, batch_stats: Any, extra_state: Any, images: jax.Array
                  ) -> dict[str, jax.Array]:
    """The logits evaluated every epoch; override to add networks held in `extra_state`."""
    del extra_state
    outputs = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=False)
    return self.network_logits(outputs)

  # 5. Deployment.
  def deployed_variables(self, params: Any, batch_stats: Any, extra_state: Any) -> Variables:
    """The deployed network's `{'params', 'batch_stats'}`: the variables of one complete `create_backbone` network."""
    del extra_state
    network = self.deployed_network
    return {'params': params[network], 'batch_stats': batch_stats.get(network, {})}

  # 6. Extra state.
  def init_extra_state(self, params: Any, batch_stats: Any) -> Any:
    """State kept beside the parameters and updated after every step (a pytree; empty by default)."""
    del params, batch_stats
    return {}

  # 7. Networks parallelism (ffsd_jax/network_parallel.py).
  network_parallel_refusal: ClassVar[str] = 'its networks share layers'

  def stacked_networks(self) -> tuple[str, ...]:
    """The top-level keys of the same-architecture backbones (`create_backbone(config.model)`, no shared layers, one
    optimizer) that `config.network_parallelism` splits over devices, in stacking order; () when the method cannot
    split its networks (`network_parallel_refusal` says why)."""
    return ()

  def heads_model(self, dtype: Any, norm: Any) -> nn.Module:
    """The method's networks other than `stacked_networks`, as one module: `apply(variables, backbone_outputs)`
    takes `{key: (logits, taps)}` of the stacked networks' train-mode passes and returns what `objective` takes.
    Its top-level parameter keys are the method's other keys. `norm` is the batch-norm class to use."""
    raise NotImplementedError(f'Method {self.name!r} does not split its networks: {self.network_parallel_refusal}.')

  def update_extra_state(self, extra_state: Any, params: Any, batch_stats: Any, step: jax.Array, outputs: Outputs
                         ) -> Any:
    """The extra state after the optimizer update that produced `params` / `batch_stats` (`step` counts updates,
    this one included); `outputs` are this step's `apply_train` outputs (computed before the update)."""
    del params, batch_stats, step, outputs
    return extra_state


def number_problems(config: Any, key: str, minimum: float, fix: str, *, strict: bool) -> list[str]:
  """[] when `config.<key>` is a finite number > `minimum` (>= when not `strict`), else one line naming key, value, fix.

  For the methods' `check_config`.
  """
  value = config.get(key)
  number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if number and (value > minimum if strict else value >= minimum):
    return []
  return [f'config.{key}={value!r}: must be a finite number {">" if strict else ">="} {minimum:g}. {fix}.']
