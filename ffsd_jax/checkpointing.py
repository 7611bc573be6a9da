"""Orbax checkpoints: the train state, the data-iterator state, the loop state and the config.

Two managers live in the workdir:
- `checkpoints/`: the latest checkpoints (every `config.checkpoint_every_steps`, at the end and on SIGTERM), of which
  `config.keep_checkpoints` are kept; a run in a workdir that has one resumes from it.
- `checkpoints_best/`: one checkpoint, the train state at the epoch with the best leader top-1 (what the reference
  reports and deploys, reference §10).

Each checkpoint holds four items: `state` (StandardSave of the whole `TrainState`), `data_iterator` (JSON: every
process's iterator state, keyed by process index), `loop` (JSON: metric sums of the unfinished logging window, best
leader top-1 so far) and `config` (JSON). Before any restore the saved config's architecture is compared with the
current one, and a checkpoint that cannot be read fails with a message; nothing is ever deleted or overwritten on
those paths (saving only happens after a successful restore or in an empty folder).
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

LATEST_DIR = 'checkpoints'
BEST_DIR = 'checkpoints_best'
ITEM_NAMES = ('state', 'data_iterator', 'loop', 'config')
# Config keys that must match between a checkpoint and the run restoring it (they fix the parameter tree).
ARCHITECTURE_KEYS = ('model', 'method', 'num_students', 'num_classes')


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used: another architecture, or truncated / corrupt files."""


def create_manager(workdir: str, *, best: bool = False, max_to_keep: int = 2,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """The manager of the latest (or, with `best=True`, the best-leader) checkpoints under `workdir`.

  Saves are asynchronous: `save` returns once the arrays are copied off the devices and the files are written in
  the background; `wait_until_finished` (called before exit) blocks on them.
  """
  directory = os.path.join(os.path.abspath(workdir), BEST_DIR if best else LATEST_DIR)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=1 if best else max_to_keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=True,
      # Both managers may save the same step (an epoch end with a new best leader); on multi-host runs their
      # barriers are keyed by step, so each manager needs its own prefix.
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix='best' if best else 'latest'))
  return ocp.CheckpointManager(directory, options=options, item_names=ITEM_NAMES)


def _to_json_compatible(value: Any) -> Any:
  """Converts a config dict's tuples and NumPy scalars so that JSON round trips compare equal."""
  if isinstance(value, dict):
    return {k: _to_json_compatible(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json_compatible(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as a JSON-compatible dict (tuples become lists)."""
  return _to_json_compatible(config.to_dict())


def gather_iterator_states(local_state: dict[str, Any]) -> dict[str, Any]:
  """Every process's data-iterator state, keyed by process index (JSON items are written by process 0 only)."""
  if jax.process_count() == 1:
    return {'0': local_state}
  encoded = np.frombuffer(json.dumps(local_state).encode(), dtype=np.uint8)
  lengths = multihost_utils.process_allgather(np.array([encoded.size], np.int32))
  padded = np.zeros((int(np.max(lengths)),), np.uint8)
  padded[:encoded.size] = encoded
  everything = np.asarray(multihost_utils.process_allgather(padded))
  return {str(i): json.loads(everything[i, :int(lengths[i][0])].tobytes().decode())
          for i in range(jax.process_count())}


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, iterator_states: dict[str, Any],
         loop_state: dict[str, Any], config: ml_collections.ConfigDict) -> None:
  """Starts an asynchronous save of one checkpoint at `step` (overwrites nothing: a step is saved once)."""
  if step in manager.all_steps():
    return
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data_iterator=ocp.args.JsonSave(iterator_states),
      loop=ocp.args.JsonSave(_to_json_compatible(loop_state)),
      config=ocp.args.JsonSave(config_to_json(config))), force=True)


def _step_path(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def check_architecture(manager: ocp.CheckpointManager, step: int, config: ml_collections.ConfigDict) -> None:
  """Fails when the checkpoint at `step` was written for another architecture than `config` describes.

  Raises:
    CheckpointError: naming the differing keys, the checkpoint path and the fix.
  """
  path = _step_path(manager, step)
  try:
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'Cannot read the config saved with the checkpoint {path} ({type(e).__name__}: {e}). The checkpoint is '
        'truncated or corrupt; it was left untouched. Move it away (or use another --workdir) to start afresh, '
        'or delete that step folder to resume from an older checkpoint.') from e
  current = config_to_json(config)
  differing = {k: (saved.get(k), current.get(k)) for k in ARCHITECTURE_KEYS if saved.get(k) != current.get(k)}
  if differing:
    details = ', '.join(f'{k}: checkpoint {a!r} vs config {b!r}' for k, (a, b) in differing.items())
    raise CheckpointError(
        f'The checkpoint {path} belongs to another architecture ({details}). It was left untouched. Use another '
        '--workdir for this config, or the config that wrote the checkpoint.')


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            config: ml_collections.ConfigDict) -> tuple[Any, dict[str, Any], dict[str, Any]]:
  """Restores (state, this process's data-iterator state or {}, loop state) from the checkpoint at `step`.

  `abstract_state` is the `jax.eval_shape` train state with shardings: arrays come back in their sharding and the
  optimizer state keeps its structure.

  Raises:
    CheckpointError: another architecture, or files that cannot be read.
  """
  check_architecture(manager, step, config)
  path = _step_path(manager, step)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_iterator=ocp.args.JsonRestore(),
        loop=ocp.args.JsonRestore()))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'Cannot restore the checkpoint {path} ({type(e).__name__}: {str(e)[:500]}). It is truncated, corrupt or '
        'was written by an incompatible version; it was left untouched. Move it away (or use another --workdir) '
        'to start afresh, or delete that step folder to resume from an older checkpoint.') from e
  iterator_states = restored['data_iterator'] or {}
  if iterator_states and len(iterator_states) != jax.process_count():
    raise CheckpointError(
        f'The checkpoint {path} was written by {len(iterator_states)} processes but this run has '
        f'{jax.process_count()}; the data order cannot be resumed exactly. Resume with {len(iterator_states)} '
        'processes.')
  local = iterator_states.get(str(jax.process_index()), {})
  logging.info('Restored checkpoint %s (step %d).', path, step)
  return restored['state'], local, restored['loop'] or {}


def restore_state_only(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                       config: ml_collections.ConfigDict) -> Any:
  """Restores only the train state (eval and export), after the architecture check."""
  check_architecture(manager, step, config)
  try:
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))['state']
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'Cannot restore the checkpoint {_step_path(manager, step)} ({type(e).__name__}: {str(e)[:500]}). It is '
        'truncated or corrupt; it was left untouched.') from e


def checkpoint_path(manager: ocp.CheckpointManager, step: int) -> str:
  """The folder of the checkpoint at `step`."""
  return _step_path(manager, step)
