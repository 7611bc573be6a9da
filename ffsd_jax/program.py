"""The training program: the one place that builds the jitted train and eval steps exactly as the loop runs them.

`build(setup) -> TrainingProgram` fixes the state and batch shardings, the buffer donation, the compiler options and
the on-device sum of the metrics over a logging window. The training loop, `scripts/benchmark.py`,
`scripts/profile_step.py` and the tests all call it, so a benchmark or a profile times the program that trains.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ffsd_jax import run_setup
from ffsd_jax import sharding
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

  @property
  def mesh(self) -> jax.sharding.Mesh:
    return self.setup.mesh

  def init_state(self) -> Any:
    """A fresh train state, built where it lives (replicated on the mesh)."""
    return sharding.init_replicated(self.setup.init_fn, self.mesh)

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
    state = self.setup.abstract_state if state is None else state
    abstract_sums = {k: jax.ShapeDtypeStruct(v.shape, jnp.float32, sharding=sharding.replicated_sharding(self.mesh))
                     for k, v in self.metric_shapes.items()}
    return self.train_step.lower(state, abstract_sums, self.abstract_batch)


def build(setup: run_setup.RunSetup) -> TrainingProgram:
  """Jits the method's train and eval steps for `setup`'s mesh (nothing is compiled until first use or `lower`)."""
  config, mesh = setup.config, setup.mesh
  replicated, batch_sharded = sharding.replicated_sharding(mesh), sharding.batch_sharding(mesh)
  train_step = train_step_lib.make_train_step(setup.model, config, setup.steps_per_epoch, setup.info.mean_std,
                                              setup.method)
  size = setup.info.image_size
  abstract_batch = {
      'image': jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.uint8, sharding=batch_sharded),
      'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sharded)}
  metric_shapes = jax.eval_shape(train_step, setup.abstract_state, abstract_batch)[1]

  def step_and_accumulate(state, metric_sums, batch):
    state, metrics = train_step(state, batch)
    metric_sums = jax.tree.map(lambda s, m: s + m.astype(jnp.float32), metric_sums, metrics)
    return state, metric_sums

  compiler_options = sharding.step_compiler_options(mesh, config)
  jitted_train = jax.jit(step_and_accumulate, in_shardings=(replicated, replicated, batch_sharded),
                         out_shardings=(replicated, replicated), donate_argnums=(0, 1),
                         compiler_options=compiler_options)
  jitted_eval = jax.jit(train_step_lib.make_eval_step(setup.model, config, setup.info.mean_std, setup.method),
                        in_shardings=(replicated, batch_sharded), out_shardings=replicated,
                        compiler_options=compiler_options)
  return TrainingProgram(setup, jitted_train, jitted_eval, abstract_batch, metric_shapes, compiler_options)
