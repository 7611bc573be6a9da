"""A trained run's state for inference: the best (or latest) checkpoint restored, and its deployed network.

Below the training loop, export and the official-format converter, which all read checkpoints through here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections

from ffsd_jax import checkpointing
from ffsd_jax import run_setup
from ffsd_jax import state_guard


class RestoredRun(NamedTuple):
  """A checkpoint's train state with where it came from."""
  state: Any
  step: int
  checkpoint: str  # The step folder.
  setup: run_setup.RunSetup


def deployed_variables(setup: run_setup.RunSetup, state: Any) -> dict[str, Any]:
  """The deployed network's `{'params', 'batch_stats'}` (a complete backbone: the leader for FFSD, student_0 for
  methods without one)."""
  return setup.method.deployed_variables(state.params, state.batch_stats, state.extra_state)


def guard_restored_state(state: Any, path: str) -> None:
  """A restored state must be finite: a checkpoint written before the state guard existed may not be."""
  try:
    state_guard.check_state_finite(state, what=f'The checkpoint {path}', advice='')
  except state_guard.NonFiniteStateError as e:
    raise checkpointing.CheckpointError(
        f'{e}It was left untouched. Move that step folder away to resume from an older checkpoint, or use another '
        '--workdir.') from None


def restore_for_inference(config_or_setup: ml_collections.ConfigDict | run_setup.RunSetup, workdir: str,
                          checkpoint: str = 'best') -> RestoredRun:
  """Restores the train state of the best (or latest) checkpoint in `workdir`.

  Args:
    config_or_setup: the run's config, or its `run_setup.build(config)`.
    workdir: the training run's folder.
    checkpoint: 'best' (the best deployed-network top-1) or 'latest'.

  Raises:
    checkpointing.CheckpointError: no such checkpoint, another architecture, or corrupt files.
  """
  if checkpoint not in ('best', 'latest'):
    raise ValueError(f'Unknown checkpoint {checkpoint!r}; valid choices: best, latest.')
  setup = run_setup.ensure_setup(config_or_setup)
  manager = checkpointing.create_manager(workdir, best=checkpoint == 'best', read_only=True)
  try:
    step = manager.latest_step()
    if step is None:
      raise checkpointing.CheckpointError(
          f'No {checkpoint} checkpoint in {manager.directory}; train first with `python main.py --config ... '
          f'--workdir {workdir}`' + (', or pass --checkpoint=latest.' if checkpoint == 'best' else '.'))
    state = checkpointing.restore_state_only(manager, step, setup.abstract_state, setup.config)
    path = checkpointing.checkpoint_path(manager, step)
  finally:
    manager.close()
  guard_restored_state(state, path)
  return RestoredRun(state, int(step), path, setup)

