"""The training program: the one place that builds the jitted train and eval steps exactly as the loop runs them.

`build(setup) -> TrainingProgram` fixes the state and batch shardings, the buffer donation, the compiler options and
the on-device sum of the metrics over a logging window. The training loop, `scripts/benchmark.py`,
`scripts/profile_step.py` and the tests all call it, so a benchmark or a profile times the program that trains.

With `config.network_parallelism` > 1 (or per-device batch-norm statistics over several data shards) the state lives
in the stacked layout, split over the 'networks' mesh axis, and the step is ffsd_jax/network_parallel.py's
`shard_map`. Checkpoints, evaluation and export always see the canonical per-network layout: `from_canonical` and
`to_canonical` convert (identities for the single-program step).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ffsd_jax import network_parallel
from ffsd_jax import network_stack
from ffsd_jax import run_setup
from ffsd_jax import sharding
from ffsd_jax import train_state as train_state_lib
from ffsd_jax import train_step as train_step_lib


@dataclasses.dataclass(frozen=True)
class TrainingProgram:
  """The jitted steps of one run and the shapes and shardings they take."""
  setup: run_setup.RunSetup
  # (state, metric_sums, batch) -> (state, metric_sums): one optimizer step, its metrics added to the window's sums
  # on the device; the state and the sums are donated.
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]  # (state, batch) -> sums of every evaluated network's correct counts and losses.
  abstract_batch: dict[str, jax.ShapeDtypeStruct]  # A global training batch, with its sharding.
  metric_shapes: dict[str, jax.ShapeDtypeStruct]
  compiler_options: dict[str, Any] | None
  abstract_state: Any  # The state as the train step takes it (stacked or canonical), with its shardings.
  # Canonical → the train step's layout and back (None: the step takes the canonical layout).
  layout: tuple[Callable[[Any], Any], Callable[[Any], Any]] | None = None

  @property
  def mesh(self) -> jax.sharding.Mesh:
    return self.setup.mesh

  def init_state(self) -> Any:
    """A fresh train state in the train step's layout, built where it lives."""
    return self.from_canonical(sharding.init_replicated(self.setup.init_fn, self.mesh))

  def from_canonical(self, state: Any) -> Any:
    """A canonical train state (fresh or restored) in the train step's layout and shardings."""
    return state if self.layout is None else self.layout[0](state)

  def to_canonical(self, state: Any) -> Any:
    """The train step's state in the canonical per-network layout, replicated: what checkpoints and evaluation
    take."""
    return state if self.layout is None else self.layout[1](state)

  def metric_sums(self, values: Mapping[str, float] | None = None) -> dict[str, jax.Array]:
    """The window's metric sums on the devices: `values` (e.g. restored from a checkpoint), zeros elsewhere."""
    values = values or {}
    return jax.device_put({k: np.float32(values.get(k, 0.0)) for k in self.metric_shapes},
                          sharding.replicated_sharding(self.mesh))

  def global_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's batch as a global array sharded over the mesh's data axis."""
    return sharding.make_global_batch(dict(local_batch), self.mesh)

  def lower(self, state: Any = None) -> jax.stages.Lowered:
    """The train step lowered for `state` (default: the abstract state) and an abstract batch."""
    state = self.abstract_state if state is None else state
    abstract_sums = {k: jax.ShapeDtypeStruct(v.shape, jnp.float32, sharding=sharding.replicated_sharding(self.mesh))
                     for k, v in self.metric_shapes.items()}
    return self.train_step.lower(state, abstract_sums, self.abstract_batch)


def build(setup: run_setup.RunSetup) -> TrainingProgram:
  """Jits the method's train and eval steps for `setup`'s mesh (nothing is compiled until first use or `lower`)."""
  config, mesh = setup.config, setup.mesh
  replicated, batch_sharded = sharding.replicated_sharding(mesh), sharding.batch_sharding(mesh)
  if network_parallel.uses_shard_map(config, mesh):
    stack = network_stack.NetworkStack.for_method(setup.method)
    train_step, abstract_state, layout = _stacked_step(setup, stack)
    state_sharding = network_stack.state_shardings(abstract_state, mesh)
  else:
    train_step = train_step_lib.make_train_step(setup.model, config, setup.steps_per_epoch, setup.info.mean_std,
                                                setup.method)
    abstract_state, layout, state_sharding = setup.abstract_state, None, replicated
  size = setup.info.image_size
  abstract_batch = {
      'image': jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.uint8, sharding=batch_sharded),
      'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sharded)}
  metric_shapes = jax.eval_shape(train_step, abstract_state, abstract_batch)[1]

  def step_and_accumulate(state, metric_sums, batch):
    state, metrics = train_step(state, batch)
    metric_sums = jax.tree.map(lambda s, m: s + m.astype(jnp.float32), metric_sums, metrics)
    return state, metric_sums

  compiler_options = sharding.step_compiler_options(mesh, config)
  jitted_train = jax.jit(step_and_accumulate, in_shardings=(state_sharding, replicated, batch_sharded),
                         out_shardings=(state_sharding, replicated), donate_argnums=(0, 1),
                         compiler_options=compiler_options)
  jitted_eval = jax.jit(train_step_lib.make_eval_step(setup.model, config, setup.info.mean_std, setup.method),
                        in_shardings=(replicated, sharding.eval_batch_sharding(mesh)), out_shardings=replicated,
                        compiler_options=compiler_options)
  return TrainingProgram(setup, jitted_train, jitted_eval, abstract_batch, metric_shapes, compiler_options,
                         abstract_state, layout)


def _stacked_step(setup: run_setup.RunSetup, stack: network_stack.NetworkStack):
  """The networks-parallel train step, the abstract stacked state and the layout conversions."""
  config, mesh = setup.config, setup.mesh
  canonical_tx = setup.abstract_state.tx
  stacked_params = jax.eval_shape(stack.stack, setup.abstract_state.params)
  stacked_tx = train_state_lib.create_optimizer(config, stacked_params, setup.steps_per_epoch, setup.method, stack)
  abstract_state = jax.eval_shape(lambda state: stack.stack_state(state, stacked_tx), setup.abstract_state)
  state_sharding = network_stack.state_shardings(abstract_state, mesh)
  abstract_state = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                                abstract_state, state_sharding)
  to_stacked = jax.jit(lambda state: stack.stack_state(state, stacked_tx), out_shardings=state_sharding)
  to_canonical = jax.jit(lambda state: stack.unstack_state(state, canonical_tx),
                         out_shardings=sharding.replicated_sharding(mesh))
  train_step = train_step_lib.make_train_step(
      setup.model, config, setup.steps_per_epoch, setup.info.mean_std, setup.method,
      forward_backward=network_parallel.make_forward_backward(setup, stack), stack=stack)
  return train_step, abstract_state, (to_stacked, to_canonical)
