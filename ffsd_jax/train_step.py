"""The functional training step and the evaluation steps (docs/method.md §7, §10).

`make_train_step` returns a PURE, un-jitted `train_step(state, batch) -> (state, metrics)`; `ffsd_jax/program.py` jits
it as the loop runs it, with its shardings and buffer donation (`jit_train_step` is a single-device convenience).
Everything method-specific comes from the method object (ffsd_jax/methods/): one train-mode call of its model runs
every forward pass of an iteration (for FFSD, of the official code), its objective puts `stop_gradient` where the
method detaches, and one `jax.value_and_grad` over the whole parameter tree gives each loss group its own gradient,
which `optax.multi_transform` hands to that group's optimizer (§7.3 explains why this equals the official code's
sequential updates). Warm-ups are computed inside the step from `state.step`, so they need no host value and no
recompilation.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ffsd_jax import errors
from ffsd_jax import methods
from ffsd_jax import network_stack
from ffsd_jax import state_guard
from ffsd_jax.models import create_backbone
from ffsd_jax.data.normalization import normalize_images
from ffsd_jax.train_state import TrainState, compute_dtype, current_learning_rates, group_schedules

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def _top1_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.argmax(logits, axis=-1) == labels


def _topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  _, indices = jax.lax.top_k(logits.astype(jnp.float32), min(k, logits.shape[-1]))
  return jnp.any(indices == labels[:, None], axis=-1)


def _per_network_squares(tree: Mapping[str, Any], stack: network_stack.NetworkStack | None) -> dict[str, jax.Array]:
  """The sum of squares of each canonical top-level key's leaves (a stacked tree's networks one by one)."""
  squares = {}
  for key, subtree in tree.items():
    leaves = [jnp.square(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(subtree)]
    if stack is not None and key == network_stack.STACK_KEY:
      per_network = sum(jnp.sum(leaf.reshape(leaf.shape[0], -1), axis=1) for leaf in leaves)
      squares.update({name: per_network[i] for i, name in enumerate(stack.names)})
    else:
      squares[key] = sum(jnp.sum(leaf) for leaf in leaves)
  return squares


def _group_norms(method: methods.Method, tree: Mapping[str, Any], stack: network_stack.NetworkStack | None = None
                 ) -> dict[str, jax.Array]:
  """L2 norm of each loss group's leaves (for FFSD, the trans-fusion head counted with the leader)."""
  squares: dict[str, jax.Array] = {}
  for key, total in _per_network_squares(tree, stack).items():
    group = method.param_group(key)
    squares[group] = squares.get(group, 0.0) + total
  return {group: jnp.sqrt(value) for group, value in squares.items()}


# (state, normalised images, labels) -> (gradients, new batch statistics, loss terms, logits by network, outputs).
ForwardBackward = Callable[[TrainState, jax.Array, jax.Array], tuple[Any, Any, Metrics, Metrics, Any]]


def single_program_forward_backward(model: Any, method: methods.Method, steps_per_epoch: int) -> ForwardBackward:
  """Every forward pass and the gradient of the method's objective as one program (XLA splits the batch)."""

  def forward_backward(state, images, labels):
    def loss_fn(params):
      outputs, batch_stats = method.apply_train(model, params, state.batch_stats, state.extra_state, images)
      result = method.objective(outputs, labels, state.step, steps_per_epoch)
      return result.total, (batch_stats, result.terms, method.network_logits(outputs), outputs)

    (_, (batch_stats, terms, logits, outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return grads, batch_stats, terms, logits, outputs

  return forward_backward


def make_train_step(model: Any, config: ml_collections.ConfigDict, steps_per_epoch: int,
                    mean_std: tuple[tuple[float, ...], tuple[float, ...]], method: methods.Method | None = None,
                    forward_backward: ForwardBackward | None = None,
                    stack: network_stack.NetworkStack | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Builds the pure training step for `config.method`.

  Args:
    model: the method's model, `train_state.create_model(config)`.
    config: the experiment config (method and its hyper-parameters, compute_dtype, schedules).
    steps_per_epoch: optimizer steps per epoch (sets the λ warm-up epochs and the lr boundaries).
    mean_std: the dataset's normalisation constants.
    method: the run's method object (built from `config` when not given).
    forward_backward: the forward and backward passes (default: `single_program_forward_backward`; the
      networks-parallel step passes its `shard_map`).
    stack: the `NetworkStack` of a state in the stacked layout (None: the canonical layout).

  Returns:
    `train_step(state, batch) -> (state, metrics)`, un-jitted. `batch` = {'image': uint8 NHWC, 'label': int32};
    metrics is a flat dict of float32 scalars (every loss term, per-group losses, training top-1 per network,
    lambda_scale, learning rates, gradient norms and 'nonfinite').
  """
  method = method or methods.get_method(config)
  dtype = compute_dtype(config)
  learning_rates = current_learning_rates(config, steps_per_epoch)
  forward_backward = forward_backward or single_program_forward_backward(model, method, steps_per_epoch)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    images = normalize_images(batch['image'], mean_std, dtype)
    labels = batch['label'].astype(jnp.int32)
    grads, batch_stats, terms, logits, outputs = forward_backward(state, images, labels)
    new_state = state.apply_gradients(grads, batch_stats)
    new_state = new_state.replace(extra_state=method.update_extra_state(
        state.extra_state, new_state.params, new_state.batch_stats, new_state.step, outputs))

    metrics: Metrics = dict(terms)
    for name, z in logits.items():
      metrics[f'accuracy/{name}'] = jnp.mean(_top1_correct(z, labels).astype(jnp.float32))
    lrs = learning_rates(state.step)
    network_keys = [key for key in grads if stack is None or key != network_stack.STACK_KEY]
    network_keys += list(stack.names) if stack is not None else []
    metrics.update({f'learning_rate/{name}': lrs[f'learning_rate/{name}']
                    for name in group_schedules(config, network_keys, method)})
    grad_norms = _group_norms(method, grads, stack)
    for group, norm in grad_norms.items():
      metrics[f'grad_norm/{group}'] = norm
    metrics['grad_norm'] = optax.tree.norm(grads)
    finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in metrics.values()]))
    metrics['nonfinite'] = 1.0 - finite.astype(jnp.float32)
    return new_state, {name: jnp.asarray(v, jnp.float32) for name, v in metrics.items()}

  return train_step


def jit_train_step(model: Any, config: ml_collections.ConfigDict, steps_per_epoch: int,
                   mean_std: tuple[tuple[float, ...], tuple[float, ...]], donate: bool = False):
  """`make_train_step` jitted for single-device use (tests, notebooks); `donate=True` donates the state."""
  return jax.jit(make_train_step(model, config, steps_per_epoch, mean_std), donate_argnums=(0,) if donate else ())


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation.


def _correct_sums(logits: Mapping[str, jax.Array], labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  sums = {'count': jnp.sum(mask.astype(jnp.int32))}
  for name, z in logits.items():
    sums[f'correct/{name}'] = jnp.sum((_top1_correct(z, labels) & mask).astype(jnp.int32))
    sums[f'correct_top5/{name}'] = jnp.sum((_topk_correct(z, labels, 5) & mask).astype(jnp.int32))
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(z.astype(jnp.float32), labels)
    sums[f'cross_entropy/{name}'] = jnp.sum(jnp.where(mask, cross_entropy, 0.0))  # where: padding may be anything.
  return sums


def _mask(batch: Batch) -> jax.Array:
  if 'mask' in batch:
    return batch['mask'].astype(bool)
  return jnp.ones(batch['label'].shape, bool)


def make_eval_step(model: Any, config: ml_collections.ConfigDict,
                   mean_std: tuple[tuple[float, ...], tuple[float, ...]], method: methods.Method | None = None
                   ) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
  """Builds `eval_step(state, batch) -> sums` over the masked batch (int32).

  Keys: 'count', and 'correct/<net>' / 'correct_top5/<net>' (int32) and 'cross_entropy/<net>' (float32 sum) for
  every network the method evaluates (`Method.eval_logits`; for FFSD: student_i, leader, fusion on the students'
  eval-mode features, and ensemble, the mean of the students' logits).
  """
  method = method or methods.get_method(config)
  dtype = compute_dtype(config)

  def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    images = normalize_images(batch['image'], mean_std, dtype)
    logits = method.eval_logits(model, state.params, state.batch_stats, state.extra_state, images)
    return _correct_sums(logits, batch['label'].astype(jnp.int32), _mask(batch))

  return eval_step


def make_leader_eval_step(config: ml_collections.ConfigDict, mean_std: tuple[tuple[float, ...], tuple[float, ...]]
                          ) -> Callable[[Mapping[str, Any], Batch], dict[str, jax.Array]]:
  """Builds `fn(leader_variables, batch) -> sums` that runs ONLY the deployed backbone (the leader for FFSD).

  `leader_variables` = `Method.deployed_variables(...)`, one complete backbone's {'params', 'batch_stats'}. Keys:
  'count', 'correct/leader', 'correct_top5/leader', 'cross_entropy/leader'.
  """
  backbone = create_backbone(config.model, config.num_classes, compute_dtype(config))
  dtype = compute_dtype(config)

  def leader_eval_step(leader_variables: Mapping[str, Any], batch: Batch) -> dict[str, jax.Array]:
    images = normalize_images(batch['image'], mean_std, dtype)
    logits, _ = backbone.apply(dict(leader_variables), images, train=False)
    return _correct_sums({'leader': logits.astype(jnp.float32)}, batch['label'].astype(jnp.int32), _mask(batch))

  return leader_eval_step


# ----------------------------------------------------------------------------------------------------------------------
# Host-side checks.


def validate_batch(batch: Mapping[str, Any], *, num_classes: int, batch_size: int) -> None:
  """Host-side NumPy checks of one (per-process) batch; raises errors.DataError (a ValueError) naming the problem
  and the fix."""
  for key in ('image', 'label'):
    if key not in batch:
      raise errors.DataError(f"The batch has no {key!r} entry (keys: {sorted(batch)}); a batch is {{'image': uint8 "
                       "(B, H, W, 3), 'label': int32 (B,)}.")
  images, labels = np.asarray(batch['image']), np.asarray(batch['label'])
  if images.ndim != 4 or images.shape[-1] != 3:
    raise errors.DataError(f"batch['image'] must be NHWC RGB (B, H, W, 3); got shape {images.shape}.")
  if images.shape[0] != batch_size:
    raise errors.DataError(f"batch['image'] holds {images.shape[0]} examples but the step expects {batch_size} (the "
                     'per-process batch size); the data pipeline must drop or pad partial batches.')
  if images.dtype != np.uint8:
    raise errors.DataError(
        f"batch['image'] must be uint8 pixels (normalisation happens on the device); got {images.dtype}.")
  if labels.shape != (batch_size,):
    raise errors.DataError(f"batch['label'] must have shape ({batch_size},); got {labels.shape}.")
  if labels.dtype != np.int32:
    raise errors.DataError(f"batch['label'] must be int32; got {labels.dtype}. Cast it with .astype(np.int32).")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)]
    raise errors.DataError(f'Labels must lie in [0, {num_classes}) (config.num_classes={num_classes}); got '
                           f'{bad[:5].tolist()}{"..." if bad.size > 5 else ""}. Check config.num_classes and the '
                           'dataset.')
  if 'mask' in batch and np.asarray(batch['mask']).shape != (batch_size,):
    raise errors.DataError(
        f"batch['mask'] must have shape ({batch_size},); got {np.asarray(batch['mask']).shape}.")


def check_finite(metrics: Mapping[str, Any]) -> None:
  """Raises NonFiniteStateError (a FloatingPointError) naming every non-finite metric (host side; the training loop
  calls it)."""
  values = {name: float(np.asarray(value)) for name, value in jax.device_get(dict(metrics)).items()}
  bad = {name: value for name, value in values.items() if not np.isfinite(value)}
  flagged = values.get('nonfinite', 0.0)
  if bad or flagged > 0:
    names = ', '.join(f'{name}={value}' for name, value in sorted(bad.items())) or 'only the nonfinite flag is set'
    raise state_guard.NonFiniteStateError(
        f'Training produced non-finite values: {names}. Stopping before the state is saved; lower the learning rate '
        '(or λ), check the input data, or use compute_dtype="float32", then resume from the last checkpoint.')
