"""The functional train state, the per-group optimizers and the learning-rate schedules (docs/method.md §8).

One `TrainState` holds every network's parameters, batch statistics, optimizer state and the method's extra state.
`optax.multi_transform` gives each loss group its own optimizer, as the reference does with one PyTorch optimizer per
network; the method (ffsd_jax/methods/) says which top-level parameter keys form each group and which optimizer it
gets (`Method.param_group`, `Method.group_optimizer`). For FFSD:

| group (top-level params keys) | optimizer | weight decay (coupled L2) | schedule |
|---|---|---|---|
| `student_i` | SGD, Nesterov momentum 0.9 | `weight_decay` (1e-4) | networks |
| `leader` + `trans_fusion` | SGD, Nesterov momentum 0.9 | `weight_decay` (1e-4) | networks |
| `fusion` | SGD, Nesterov momentum 0.9 | `fusion_weight_decay` (1e-5) | networks |
| `decoder_i`, `decoder_leader` | Adam (0.9, 0.999, 1e-8) | `decoder_weight_decay` (1e-4) | decoders |

Epoch boundaries are converted to optimizer steps with the `steps_per_epoch` the caller passes in (dataset size and
batch size), never with constants.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ffsd_jax import methods

# The ImageNet trainer's per-iteration warm-up covers epochs 1..4 (`epoch < 5`, 1-based), docs/method.md §8.3.
IMAGENET_WARMUP_EPOCHS = 5
LR_SCHEDULES = ('cifar', 'imagenet', 'cosine')
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8


class TrainState(flax.struct.PyTreeNode):
  """Everything a training step reads and writes.

  Attributes:
    step: the number of optimizer updates done so far (int32 scalar).
    params: the `FFSDModel` parameters (top-level keys per network, docs/architecture.md).
    batch_stats: the batch-norm running statistics, same top-level keys.
    opt_state: the `optax.multi_transform` state of `tx`.
    extra_state: the method's state beside the parameters (`Method.init_extra_state`; empty for most methods).
    tx: the optimizer (static).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  extra_state: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def apply_gradients(self, grads: Any, batch_stats: Any) -> 'TrainState':
    """One optimizer update of every group; also stores the new batch statistics."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)


COMPUTE_DTYPES = ('float32', 'bfloat16')


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  """The activations' dtype, `config.compute_dtype` (parameters and loss math stay float32)."""
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f'Unknown compute_dtype {config.compute_dtype!r}; valid choices: {list(COMPUTE_DTYPES)}.')
  return jnp.dtype(config.compute_dtype)


def create_model(config: ml_collections.ConfigDict, method: methods.Method | None = None):
  """The parent module of every network of `config.method` (`Method.build_model`) in `config.compute_dtype`.

  `method`: the run's method object (built from `config` when not given).
  """
  return (method or methods.get_method(config)).build_model(compute_dtype(config))


# ----------------------------------------------------------------------------------------------------------------------
# Schedules.


def _epoch_boundaries(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  boundaries = tuple(int(b) for b in config.lr_boundaries)
  if list(boundaries) != sorted(boundaries) or any(b < 1 for b in boundaries):
    raise ValueError(f'config.lr_boundaries must be increasing positive epochs, got {config.lr_boundaries}.')
  return boundaries


def multistep_schedule(base_lr: float, epoch_boundaries: tuple[int, ...], decay: float,
                       steps_per_epoch: int) -> optax.Schedule:
  """PyTorch MultiStepLR stepped once per epoch: base · decay^#{b : step ≥ b·spe}.

  MultiStepLR(milestones=[150, 225]) stepped at the end of each epoch gives 1-based epochs 1–150 the base lr and
  epoch 151 (0-based step 150·spe) the first decayed one.
  """
  # NumPy constants: a jnp array made here would be a tracer when the optimizer is built under jit (init).
  boundaries = np.asarray([b * steps_per_epoch for b in epoch_boundaries] or [0], np.int32)
  num_boundaries = len(epoch_boundaries)

  def schedule(count):
    passed = jnp.sum((jnp.asarray(count, jnp.int32) >= boundaries).astype(jnp.int32)) if num_boundaries else 0
    return jnp.asarray(base_lr, jnp.float32) * jnp.asarray(decay, jnp.float32)**passed

  return schedule


def imagenet_network_schedule(base_lr: float, epoch_boundaries: tuple[int, ...], decay: float,
                              steps_per_epoch: int) -> optax.Schedule:
  """The ImageNet trainers' per-iteration rule for students, leader and fusion (docs/method.md §8.3).

  With the 1-based epoch e = step // spe + 1 and the step within the epoch s = step % spe:
  lr = base · decay^#{b : e ≥ b}, times (1 + s + e·spe) / (5·spe) while e < 5. With boundaries (30, 60, 80) the
  first factor is the reference's 0.1^(e//30 + [e ≥ 80]) for every epoch it trains (1–89). The warm-up starts at
  (1 + spe)/(5·spe) ≈ 0.2 and reaches 1.0 on the last step of epoch 4; `len_epoch` is `steps_per_epoch` here.
  """
  boundaries = np.asarray(list(epoch_boundaries) or [1 << 30], np.int32)

  def schedule(count):
    count = jnp.asarray(count, jnp.int32)
    epoch = count // steps_per_epoch + 1
    within = count % steps_per_epoch
    passed = jnp.sum((epoch >= boundaries).astype(jnp.int32))
    lr = jnp.asarray(base_lr, jnp.float32) * jnp.asarray(decay, jnp.float32)**passed
    warmup = (1 + within + epoch * steps_per_epoch).astype(jnp.float32) / (IMAGENET_WARMUP_EPOCHS * steps_per_epoch)
    return jnp.where(epoch < IMAGENET_WARMUP_EPOCHS, lr * warmup, lr)

  return schedule


def epoch_cosine_schedule(base_lr: float, num_epochs: int, steps_per_epoch: int) -> optax.Schedule:
  """MCL's `--lr-type cosine` (winycg/MCL utils.adjust_lr), set once per epoch: base · ½(1 + cos(π·e / num_epochs)).

  e = step // steps_per_epoch is the 0-based epoch, so the first epoch trains at `base_lr` and the last at
  base · ½(1 + cos(π(E − 1)/E)); `lr_boundaries` and `lr_decay` do not enter.
  """
  if num_epochs < 1:
    raise ValueError(f'config.num_epochs must be >= 1 for the cosine schedule, got {num_epochs}.')

  def schedule(count):
    epoch = (jnp.asarray(count, jnp.int32) // steps_per_epoch).astype(jnp.float32)
    return jnp.asarray(base_lr, jnp.float32) * 0.5 * (1 + jnp.cos(jnp.pi * epoch / num_epochs))

  return schedule


def learning_rate_schedules(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict[str, optax.Schedule]:
  """The schedules by optimizer-step count: {'networks': students/leader/fusion SGD, 'decoders': decoder Adam}."""
  if steps_per_epoch < 1:
    raise ValueError(f'steps_per_epoch must be >= 1, got {steps_per_epoch}.')
  boundaries = _epoch_boundaries(config)
  decoders = multistep_schedule(config.decoder_learning_rate, boundaries, config.lr_decay, steps_per_epoch)
  if config.lr_schedule == 'cifar':
    networks = multistep_schedule(config.learning_rate, boundaries, config.lr_decay, steps_per_epoch)
  elif config.lr_schedule == 'imagenet':
    networks = imagenet_network_schedule(config.learning_rate, boundaries, config.lr_decay, steps_per_epoch)
  elif config.lr_schedule == 'cosine':
    networks = epoch_cosine_schedule(config.learning_rate, int(config.num_epochs), steps_per_epoch)
  else:
    raise ValueError(f'Unknown lr_schedule {config.lr_schedule!r}; valid choices: {list(LR_SCHEDULES)}.')
  return {'networks': networks, 'decoders': decoders}


# ----------------------------------------------------------------------------------------------------------------------
# Optimizers.


def sgd_coupled_l2(schedule: optax.Schedule, momentum: float, weight_decay: float) -> optax.GradientTransformation:
  """PyTorch `SGD(nesterov=True, dampening=0, weight_decay=wd)`: L2 added to the gradient, then Nesterov momentum."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(schedule, momentum=momentum, nesterov=True))


def adam_coupled_l2(schedule: optax.Schedule, weight_decay: float) -> optax.GradientTransformation:
  """PyTorch `Adam(weight_decay=wd)`: coupled L2 (not AdamW), β = (0.9, 0.999), eps 1e-8."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.scale_by_adam(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS),
                     optax.scale_by_learning_rate(schedule))


def _group_of(method: methods.Method, key: str, stack: Any) -> str:
  return stack.param_group(method, key) if stack is not None else method.param_group(key)


def _optimizer_of(method: methods.Method, group: str, stack: Any) -> methods.GroupOptimizer:
  return stack.group_optimizer(method, group) if stack is not None else method.group_optimizer(group)


def param_labels(method: methods.Method, params: Any, stack: Any = None) -> dict[str, Any]:
  """The `multi_transform` labels: every leaf under a top-level key gets that key's loss group."""
  return {key: jax.tree.map(lambda _, g=_group_of(method, key, stack): g, subtree) for key, subtree in params.items()}


def create_optimizer(config: ml_collections.ConfigDict, params: Any, steps_per_epoch: int,
                     method: methods.Method | None = None, stack: Any = None) -> optax.GradientTransformation:
  """One optimizer per loss group present in `params` (`Method.group_optimizer`), combined with `multi_transform`.

  `stack`: the `network_stack.NetworkStack` when `params` is in the stacked layout (its `networks` key is one group).
  """
  method = method or methods.get_method(config)
  schedules = learning_rate_schedules(config, steps_per_epoch)
  transforms = {}
  for group in sorted({_group_of(method, key, stack) for key in params}):
    spec = _optimizer_of(method, group, stack)
    if spec.kind == 'adam':
      transforms[group] = adam_coupled_l2(schedules[spec.schedule], spec.weight_decay)
    else:
      transforms[group] = sgd_coupled_l2(schedules[spec.schedule], config.momentum, spec.weight_decay)
  return optax.multi_transform(transforms, lambda tree: param_labels(method, tree, stack))


def group_schedules(config: ml_collections.ConfigDict, params: Any,
                    method: methods.Method | None = None) -> tuple[str, ...]:
  """The learning-rate schedules ('networks', 'decoders') that the loss groups of `params` (canonical top-level keys)
  use, sorted."""
  method = method or methods.get_method(config)
  return tuple(sorted({method.group_optimizer(method.param_group(key)).schedule for key in params}))


def init_variables(config: ml_collections.ConfigDict, model: Any, rng: jax.Array) -> dict[str, Any]:
  """Initialises every network on a dummy batch of `config.image_size` (train mode, so the decoders are built)."""
  images = jnp.zeros((2, config.image_size, config.image_size, 3), compute_dtype(config))
  variables = model.init({'params': rng}, images, train=True)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def create_train_state(config: ml_collections.ConfigDict, model: Any, rng: jax.Array, steps_per_epoch: int,
                       method: methods.Method | None = None) -> TrainState:
  """A fresh `TrainState`; pure, so it can run under `jax.jit(..., out_shardings=...)` and `jax.eval_shape`."""
  method = method or methods.get_method(config)
  variables = init_variables(config, model, rng)
  tx = create_optimizer(config, variables['params'], steps_per_epoch, method)
  extra_state = method.init_extra_state(variables['params'], variables['batch_stats'])
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'], batch_stats=variables['batch_stats'],
                    opt_state=tx.init(variables['params']), extra_state=extra_state, tx=tx)


def current_learning_rates(config: ml_collections.ConfigDict, steps_per_epoch: int
                           ) -> Callable[[jax.Array], dict[str, jax.Array]]:
  """A function step -> {'learning_rate/networks', 'learning_rate/decoders'} for the metrics."""
  schedules = learning_rate_schedules(config, steps_per_epoch)
  return lambda step: {f'learning_rate/{name}': jnp.asarray(s(step), jnp.float32) for name, s in schedules.items()}
