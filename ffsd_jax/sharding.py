"""The device mesh, shardings and global batches built from per-process data.

The mesh has two axes, devices = data × networks. The batch is sharded on 'data'. With `network_parallelism` = 1
(the 'networks' axis has size 1) parameters and optimizer state are replicated on every device and one plain
`jax.jit` with in/out shardings runs the whole step: the compiler inserts the gradient all-reduce, and batch norm's
mean/variance over the batch axis become global-batch statistics (the same numbers as one device with the whole
batch). With more, the method's networks are stacked and split over 'networks' and the step is a `shard_map`
(ffsd_jax/network_parallel.py).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'
NETWORKS_AXIS = 'networks'


def maybe_initialize_distributed(config: Any = None) -> bool:
  """Calls `jax.distributed.initialize()` when the config or the launcher's environment asks for it.

  The environment asks when `JAX_COORDINATOR_ADDRESS` is set (then `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` give the
  process count and index, e.g. for several processes on one machine), or under Slurm / Open MPI with more than one
  task (JAX detects those itself). On TPU pods set `config.distributed=True`.

  Returns:
    True when the distributed runtime is (now) initialised.
  """
  if jax.distributed.is_initialized():
    return True
  env = os.environ
  coordinator = env.get('JAX_COORDINATOR_ADDRESS')
  slurm = int(env.get('SLURM_NTASKS', '1') or 1) > 1 and 'SLURM_JOB_ID' in env
  mpi = int(env.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1
  wanted = bool(config is not None and config.get('distributed', False))
  if not (wanted or coordinator or slurm or mpi):
    return False
  kwargs = {}
  if coordinator and 'JAX_NUM_PROCESSES' in env:
    kwargs = dict(coordinator_address=coordinator, num_processes=int(env['JAX_NUM_PROCESSES']),
                  process_id=int(env['JAX_PROCESS_ID']))
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed initialised: process %d of %d, %d local / %d global devices.',
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def create_mesh(devices: list[jax.Device] | None = None, network_parallelism: int = 1) -> jax.sharding.Mesh:
  """The ('data', 'networks') mesh over all (or the given) devices; 'networks' has `network_parallelism` devices.

  The axis types are given explicitly (Auto): the data-parallel step is plain `jax.jit` with in/out shardings and the
  compiler propagates the rest, so the model code needs no sharding annotations.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = (len(devices) // network_parallelism, network_parallelism)
  return jax.make_mesh(shape, (DATA_AXIS, NETWORKS_AXIS), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


def data_size(mesh: jax.sharding.Mesh) -> int:
  """The number of data shards of a batch (the 'data' axis size)."""
  return int(mesh.shape[DATA_AXIS])


def replicated_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The sharding of parameters, optimizer state and metrics: a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The sharding of training batches: the leading (batch) axis split over the 'data' axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def eval_batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The sharding of evaluation batches: split over every device (evaluation runs on the replicated state)."""
  return NamedSharding(mesh, P((DATA_AXIS, NETWORKS_AXIS)))


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh, name: str = 'batch_size') -> int:
  """Checks that a global batch splits evenly over the devices and processes; returns the per-process batch size.

  Raises:
    ValueError: naming the batch size, the device and process counts and the fix.
  """
  num_devices = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(
        f'config.{name}={global_batch_size} is not divisible by the number of devices ({num_devices}); the global '
        f'batch is split evenly over the devices of the mesh. Use a multiple of {num_devices}, e.g. '
        f'--config.{name}={max(1, round(global_batch_size / num_devices)) * num_devices}.')
  return global_batch_size // jax.process_count()


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                      sharding_of: Callable[[jax.sharding.Mesh], NamedSharding] = batch_sharding
                      ) -> dict[str, jax.Array]:
  """Assembles global batch-sharded arrays from this process's NumPy batch (every process reads its own shard);
  `sharding_of` gives the batch sharding (training batches by default, `eval_batch_sharding` for evaluation)."""
  sharding = sharding_of(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


# XLA:CPU can hand dots and convolutions, elementwise ops and reductions to the YNNPACK library (an experimental
# option, off by default in jaxlib 0.10). For the float32 FFSD ResNet-32 step on the 2-core development CPU this cut the
# step from 5.1 s to 3.0 s (docs/benchmarks.md): without it, every weight-gradient convolution reads its input
# through a layout transpose into which XLA fuses (and so recomputes) the whole residual chain of the stage before it.
# The results agree with the default build to float32 rounding (tests/test_sharding.py).
CPU_LIBRARY_FUSION_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type':
        'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE',
}


@functools.cache
def _cpu_accepts(options: tuple[tuple[str, str], ...], device: jax.Device) -> bool:
  """Whether this jaxlib's CPU compiler knows the options (they are experimental and may be renamed)."""
  try:
    jax.jit(lambda x: x + 1).lower(jax.device_put(np.float32(0), device)).compile(compiler_options=dict(options))
  except Exception as error:  # pylint: disable=broad-except
    logging.warning('This jaxlib rejects the CPU library-fusion options (%s); compiling the steps without them.',
                    error)
    return False
  return True


def step_compiler_options(mesh: jax.sharding.Mesh, config: Any = None) -> dict[str, str] | None:
  """XLA compiler options for the train and eval steps: YNNPACK library fusions on a CPU mesh, none elsewhere.

  Args:
    mesh: the mesh the step runs on; only an all-CPU mesh gets options.
    config: the experiment config; `config.cpu_library_fusions=False` compiles with XLA's defaults.

  Returns:
    A dict for `jax.jit(..., compiler_options=...)`, or None.
  """
  enabled = config is None or config.get('cpu_library_fusions', True)
  if not enabled or any(device.platform != 'cpu' for device in mesh.devices.flat):
    return None
  if not _cpu_accepts(tuple(CPU_LIBRARY_FUSION_OPTIONS.items()), mesh.devices.flat[0]):
    return None
  return dict(CPU_LIBRARY_FUSION_OPTIONS)


# Initialisation runs once, so its program is compiled without XLA's expensive passes: for the FFSD tiny model on a
# 2-core CPU this cut the compile from 55 s to 8.5 s (the values differ by at most ~1e-7 from an optimised build).
_FAST_COMPILE_OPTIONS = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def init_replicated(init_fn: Callable[[], Any], mesh: jax.sharding.Mesh) -> Any:
  """Runs `init_fn` under `jax.jit` with every output replicated on the mesh (a run-once, quickly compiled program).

  One sharding is given as a prefix of the output: static fields (e.g. an optimizer) differ between traces, so a
  tree of shardings built from an earlier `jax.eval_shape` would not match the output's structure.
  """
  lowered = jax.jit(init_fn, out_shardings=replicated_sharding(mesh)).lower()
  try:
    compiled = lowered.compile(compiler_options=_FAST_COMPILE_OPTIONS)
  except Exception:  # pylint: disable=broad-except
    compiled = lowered.compile()  # A backend that rejects the options: compile normally.
  return compiled()


def create_sharded(init_fn: Callable[[], Any], mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """Creates a replicated pytree (e.g. the train state) directly in its sharding, shapes before memory.

  `jax.eval_shape` gives the abstract tree without allocating it; `jax.jit(init_fn, out_shardings=...)` then builds
  every leaf where it lives.

  Returns:
    (tree, abstract_tree) where abstract_tree holds `jax.ShapeDtypeStruct`s with shardings (a restore target).
  """
  abstract = abstract_with_sharding(jax.eval_shape(init_fn), mesh)
  tree = init_replicated(init_fn, mesh)
  return tree, abstract


def abstract_with_sharding(abstract_tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Attaches the replicated sharding to every leaf of an abstract (`jax.eval_shape`) tree."""
  sharding = replicated_sharding(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_tree)
