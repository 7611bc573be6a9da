"""What every entry point builds first: the resolved config, the method object, the mesh, the dataset and the model.

`build(config)` resolves the config once (validation, `num_classes` from the dataset when it is 0, the eval batch
rounded up to the device count) and returns a `RunSetup`; the training loop, evaluation and export take it from there,
so the method object and the dataset description are built in one place.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from absl import logging
import jax
import ml_collections

from ffsd_jax import config_checks
from ffsd_jax import data as data_lib
from ffsd_jax import methods
from ffsd_jax import run_record
from ffsd_jax import sharding
from ffsd_jax import train_state as train_state_lib


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """Everything a run derives from its config before it touches the workdir."""
  config: ml_collections.ConfigDict  # Resolved: num_classes and eval_batch_size as used.
  method: methods.Method
  mesh: jax.sharding.Mesh
  info: data_lib.DatasetInfo
  model: Any  # The method's parent module of every network.
  steps_per_epoch: int
  init_fn: Callable[[], Any]  # () -> a fresh TrainState.
  abstract_state: Any  # jax.eval_shape of init_fn, with shardings: the restore target.

  @property
  def total_steps(self) -> int:
    config = self.config
    return config.max_steps if config.max_steps > 0 else config.num_epochs * self.steps_per_epoch

  @property
  def deployed_network(self) -> str:
    """The network tracked for the best checkpoint, evaluated alone and exported (`Method.deployed_network`)."""
    return self.method.deployed_network


def check_batch_divides(config: ml_collections.ConfigDict, num_shards: int) -> None:
  """Fails with one line when the global batch does not split over the data shards (devices / network_parallelism),
  naming the shard counts that fit the batch and a batch that fits the shards."""
  batch = config.batch_size
  if batch % num_shards == 0:
    return
  fitting = ', '.join(str(d) for d in range(1, batch + 1) if batch % d == 0)
  lower = max(num_shards, batch // num_shards * num_shards)
  parallel = int(config.get('network_parallelism', 1) or 1)
  what = (f'the number of devices ({num_shards})' if parallel == 1 else
          f'the number of data shards ({num_shards} = devices / network_parallelism {parallel})')
  raise config_checks.ConfigError(
      f'config.batch_size={batch} is not divisible by {what}: the global batch is split evenly over them. '
      f'{"Device" if parallel == 1 else "Data-shard"} counts that fit: {fitting} (select them with '
      'CUDA_VISIBLE_DEVICES, or --xla_force_host_platform_device_count on CPU). A new run can use a multiple of '
      f'{num_shards}, e.g. --config.batch_size={lower}; to resume a run with another batch, see "Changing the device '
      'count" in docs/reliability.md.')


def check_network_parallelism(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """`config.network_parallelism` after checking that it divides the device count (one line listing the values that
  fit both the devices and the method's networks otherwise)."""
  parallel = int(config.get('network_parallelism', 1) or 1)
  if jax.process_count() > 1 and jax.local_device_count() % parallel:
    # Each host then holds whole groups of networks and a share of the data shards in proportion to its devices.
    raise config_checks.ConfigError(
        f'config.network_parallelism={parallel} does not divide the {jax.local_device_count()} devices of each host; '
        'on several hosts a networks group must lie within one host. Use a divisor of the devices per host.')
  if num_devices % parallel == 0:
    return parallel
  networks = len(methods.get_method(config).stacked_networks())
  valid = ', '.join(str(d) for d in range(1, networks + 1) if networks % d == 0 and num_devices % d == 0)
  raise config_checks.ConfigError(
      f'config.network_parallelism={parallel} does not divide the {num_devices} devices (devices = data × '
      f'networks); values that fit the devices and the {networks} networks: {valid}.')


def create_mesh(config: ml_collections.ConfigDict, devices: list[Any] | None = None) -> jax.sharding.Mesh:
  """The distributed runtime and the ('data', 'networks') mesh, after checking that the batch splits over it.

  `devices`: the mesh's devices (default: every device of the run; e.g. a compile-only target's, which needs no
  distributed runtime).
  """
  if devices is None:
    sharding.maybe_initialize_distributed(config)
  devices = list(jax.devices() if devices is None else devices)
  mesh = sharding.create_mesh(devices, check_network_parallelism(config, len(devices)))
  check_batch_divides(config, sharding.data_size(mesh))
  return mesh


def resolve_eval_batch(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """The eval batch rounded up to a multiple of the device count (eval batches are padded and masked, so any size
  gives the same result)."""
  unit = num_devices * jax.process_count() // math.gcd(num_devices, jax.process_count())
  return -(-config.eval_batch_size // unit) * unit


def resolve_config(config: ml_collections.ConfigDict, info: data_lib.DatasetInfo,
                   num_devices: int) -> ml_collections.ConfigDict:
  """A copy of `config` with what the run derives filled in: num_classes (0 = the dataset's) and the eval batch."""
  resolved = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
  if resolved.num_classes != info.num_classes:
    resolved.num_classes = int(info.num_classes)
  eval_batch = resolve_eval_batch(config, num_devices)
  if eval_batch != config.eval_batch_size:
    logging.info('eval_batch_size %d rounded up to %d, a multiple of the %d devices (padded batches are masked).',
                 config.eval_batch_size, eval_batch, num_devices)
    resolved.eval_batch_size = eval_batch
  return ml_collections.ConfigDict(resolved.to_dict())


def build(config: ml_collections.ConfigDict, devices: list[Any] | None = None) -> RunSetup:
  """Validates and resolves `config` and builds the mesh, dataset description, method, model and abstract state.

  Reads no workdir and writes nothing; compiles nothing but the (cheap) shape evaluation of the initialisation.
  `devices`: the mesh's devices (default: every device of the run; scripts/aot_compile.py passes a compile-only
  target's).

  Raises:
    errors.UserError: a bad config value, an indivisible batch, or a dataset that cannot be read as configured.
  """
  config_checks.validate_config(config)
  run_record.setup_compilation_cache(config.get('jax_cache_dir'))  # Before anything compiles.
  mesh = create_mesh(config, devices)
  info = data_lib.get_dataset_info(config)
  config = resolve_config(config, info, mesh.devices.size)
  steps_per_epoch = info.num_train_examples // config.batch_size
  if steps_per_epoch < 1:
    raise config_checks.ConfigError(
        f'config.batch_size={config.batch_size} is larger than the training set ({info.num_train_examples} '
        'examples); lower it.')
  method = methods.get_method(config)
  model = train_state_lib.create_model(config, method=method)
  init_rng = jax.random.key(config.seed)

  def init_fn():
    return train_state_lib.create_train_state(config, model, init_rng, steps_per_epoch, method=method)

  abstract_state = sharding.abstract_with_sharding(jax.eval_shape(init_fn), mesh)
  return RunSetup(config, method, mesh, info, model, steps_per_epoch, init_fn, abstract_state)


def ensure_setup(config_or_setup: ml_collections.ConfigDict | RunSetup) -> RunSetup:
  """`config_or_setup` itself when it is a built `RunSetup` (entry points build one once), else `build(config)`."""
  return config_or_setup if isinstance(config_or_setup, RunSetup) else build(config_or_setup)
