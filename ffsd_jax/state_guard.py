"""The state guard: no checkpoint of a non-finite train state is ever written, and none is ever resumed from.

The logged metrics are averages of the loss terms; they can stay finite while a batch-norm running variance is already
inf or a weight 1e31 away from overflowing into NaN. So before every save (and after every restore) every floating
leaf of `params`, `batch_stats` and `opt_state` is checked on the device: one jitted program reduces each leaf to a
single "all finite" bit, and only those bits (one per leaf) are copied to the host.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ffsd_jax import errors


class NonFiniteStateError(errors.UserError, FloatingPointError):
  """The train state holds NaN or inf values."""


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def _guarded_leaves(state: Any) -> tuple[list[str], list[jax.Array]]:
  """(paths, leaves) of the floating-point leaves of params, batch_stats and opt_state."""
  paths, leaves = [], []
  for group in ('params', 'batch_stats', 'opt_state'):
    for path, leaf in jax.tree_util.tree_leaves_with_path(getattr(state, group)):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        paths.append(f"{group}/{jax.tree_util.keystr(path, simple=True, separator='/')}")
        leaves.append(leaf)
  return paths, leaves


def nonfinite_leaves(state: Any) -> list[str]:
  """Paths of the leaves of params, batch_stats and opt_state that hold NaN or inf (empty when all are finite)."""
  paths, leaves = _guarded_leaves(state)
  if not leaves:
    return []
  # The flags come back replicated; every process reads its local copy (also on multi-host runs).
  flags = np.asarray(_finite_flags(leaves).addressable_data(0))
  return [path for path, finite in zip(paths, flags) if not finite]


def check_state_finite(state: Any, *, what: str, advice: str) -> None:
  """Raises `NonFiniteStateError` naming the first non-finite leaf of `state` (and how many there are).

  Args:
    state: a `TrainState`.
    what: what the state is, for the message (e.g. 'The train state at step 9').
    advice: what happened to the checkpoints and what to do, appended to the message.
  """
  bad = nonfinite_leaves(state)
  if bad:
    others = f' and {len(bad) - 1} more leaves' if len(bad) > 1 else ''
    raise NonFiniteStateError(f'{what} holds NaN or inf values in {bad[0]}{others}. {advice}')
