"""Every network on devices of its own: the forward and backward passes as one `shard_map` over (data × networks).

With `config.network_parallelism` = k > 1 the state is in the stacked layout (ffsd_jax/network_stack.py): the n
stacked networks are split over the 'networks' axis, n/k per device, and the batch over 'data'. Each device

1. runs its own networks on its data shard with ordinary convolutions, one after another (a Python loop: a `vmap`
   over networks would turn every convolution into a grouped one, 5.6-11.6x slower on CPU, docs/benchmarks.md);
2. all-gathers what the objective needs from the other networks: their logits and taps, detached, with its own
   networks' outputs put back in their places so that gradient flows to them alone;
3. runs the method's other networks, the heads (`Method.heads_model`: FFSD's fusion, trans-fusion head and decoders),
   and the whole objective on its data shard. Every device of one data shard computes the same heads and objective;
   because every cross-network input of the objective is detached, the gradient of that objective with respect to a
   device's own networks is exactly their own loss's gradient (docs/method.md §7.3);
4. averages gradients, loss terms and (with per-device statistics) batch-norm running statistics over 'data'.

Batch norm: `config.batch_norm_statistics='global'` (default) computes statistics over the global batch of the
'data' axis (`axis_name='data'`, one all-reduce per layer), the numbers of a 1-device run; 'device' computes them
over each device's shard, as PyTorch's `DataParallel` in the official code, with no per-layer all-reduce.

The collectives therefore are the all-gathers of outputs, the data-axis all-reduces of gradients and terms, and the
per-layer statistics with 'global' batch norm. The optimizer update runs outside the `shard_map` on the sharded
state, with no communication.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp

from ffsd_jax import network_stack
from ffsd_jax import sharding
from ffsd_jax.models import create_backbone
from ffsd_jax.train_state import compute_dtype

DATA, NETWORKS = sharding.DATA_AXIS, sharding.NETWORKS_AXIS


def uses_shard_map(config: Any, mesh: jax.sharding.Mesh) -> bool:
  """Whether the run's step is this module's `shard_map`: networks split, or per-device batch-norm statistics over
  several data shards. Otherwise the single-program step of ffsd_jax/train_step.py runs, with XLA splitting the batch.
  """
  per_device_statistics = config.get('batch_norm_statistics', 'global') == 'device' and sharding.data_size(mesh) > 1
  return int(config.get('network_parallelism', 1) or 1) > 1 or per_device_statistics


def _gather_networks(local: jax.Array, per_device: int) -> jax.Array:
  """All networks' values (n, ...) from each device's own (n/k, ...): the others' detached, its own differentiable."""
  everyone = lax.all_gather(lax.stop_gradient(local), NETWORKS, axis=0, tiled=True)
  return lax.dynamic_update_slice_in_dim(everyone, local, lax.axis_index(NETWORKS) * per_device, axis=0)


def make_forward_backward(setup: Any, stack: network_stack.NetworkStack):
  """The `train_step.ForwardBackward` of a stacked state on `setup.mesh`.

  Returns:
    `(state, images, labels) -> (grads, batch_stats, terms, logits, outputs)` with `grads` and `batch_stats` in the
    stacked layout, the terms averaged over the global batch, the logits of the global batch and `outputs` None
    (the stackable methods keep no extra state).
  """
  config, method, mesh = setup.config, setup.method, setup.mesh
  dtype = compute_dtype(config)
  # Over one data shard both modes are the same statistics: no collective (XLA keeps even 1-device all-reduces).
  data_shards = sharding.data_size(mesh)
  global_statistics = config.get('batch_norm_statistics', 'global') == 'global' and data_shards > 1
  norm = functools.partial(nn.BatchNorm, axis_name=DATA) if global_statistics else nn.BatchNorm
  average = (lambda tree: lax.pmean(tree, DATA)) if data_shards > 1 else (lambda tree: tree)
  backbone = create_backbone(config.model, config.num_classes, dtype, norm=norm)
  heads = method.heads_model(dtype, norm)
  per_device = len(stack.names) // int(mesh.shape[NETWORKS])

  def local_step(stacked_params, stacked_stats, head_params, head_stats, step, images, labels):
    """One device: its networks on its data shard, the heads and the objective; gradients averaged over 'data'."""

    def loss_fn(stacked_params, head_params):
      own_outputs, own_stats = [], []
      for k in range(per_device):
        variables = jax.tree.map(lambda leaf, k=k: leaf[k], {'params': stacked_params, 'batch_stats': stacked_stats})
        output, mutated = backbone.apply(variables, images, train=True, mutable=['batch_stats'])
        own_outputs.append(output)
        own_stats.append(mutated['batch_stats'])
      gathered = jax.tree.map(lambda *leaves: _gather_networks(jnp.stack(leaves), per_device), *own_outputs)
      named = {name: jax.tree.map(lambda leaf, i=i: leaf[i], gathered) for i, name in enumerate(stack.names)}
      outputs, mutated = heads.apply({'params': head_params, 'batch_stats': head_stats}, named,
                                     mutable=['batch_stats'])
      result = method.objective(outputs, labels, step, setup.steps_per_epoch)
      new_stats = jax.tree.map(lambda *leaves: jnp.stack(leaves), *own_stats)
      return result.total, (new_stats, mutated.get('batch_stats', {}), result.terms, method.network_logits(outputs))

    (_, (new_stats, new_head_stats, terms, logits)), (stacked_grads, head_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(stacked_params, head_params)
    # Each data shard's loss is the mean over its examples, so the global batch's is their mean.
    stacked_grads, head_grads, terms = average((stacked_grads, head_grads, terms))
    if not global_statistics:  # Per-shard running statistics: keep their mean, one all-reduce at the end.
      new_stats, new_head_stats = average((new_stats, new_head_stats))
    return stacked_grads, head_grads, new_stats, new_head_stats, terms, logits

  split, replicated, data = P(NETWORKS), P(), P(DATA)
  sharded_step = jax.shard_map(
      local_step, mesh=mesh, in_specs=(split, split, replicated, replicated, replicated, data, data),
      out_specs=(split, replicated, split, replicated, replicated, data), check_vma=False)

  def forward_backward(state, images, labels):
    others = lambda tree: {key: value for key, value in tree.items() if key != network_stack.STACK_KEY}
    key = network_stack.STACK_KEY
    stacked_grads, head_grads, new_stats, new_head_stats, terms, logits = sharded_step(
        state.params[key], state.batch_stats[key], others(state.params), others(state.batch_stats), state.step,
        images, labels)
    grads = {key: stacked_grads, **head_grads}
    batch_stats = {key: new_stats, **new_head_stats}
    return grads, batch_stats, terms, logits, None

  return forward_backward
