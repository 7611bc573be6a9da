"""The stacked layout of a train state: a method's same-architecture networks as one tree with a leading network axis.

With `config.network_parallelism` > 1 the networks named by `Method.stacked_networks` (for FFSD: `student_0 …
student_{m-1}`, `leader`) are held as one tree under the top-level key `networks`, each leaf with a leading axis of
one entry per network in that order, split over the 'networks' mesh axis. Every other top-level key (FFSD's fusion,
trans-fusion head and decoders) keeps its place, replicated. Their optimizer state follows the same layout: the
stacked networks form one optimizer group, `networks`, which is the same optimizer as each network's own group.

Checkpoints and every tool that reads them (eval, export, conversion, `init_leader_from`) use the per-network
("canonical") layout of a 1-device run (docs/architecture.md), so a run resumes on any mesh shape; `NetworkStack`
converts between the two layouts, optimizer state included.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import optax

from ffsd_jax import methods
from ffsd_jax import sharding

STACK_KEY = 'networks'  # The top-level key (and optimizer group) of the stacked networks.
_Key = tuple[str, ...]


def _entry(key: Any) -> str:
  """The name of one key-path entry (dict key, attribute or index)."""
  for field in ('key', 'name', 'idx'):
    if hasattr(key, field):
      return str(getattr(key, field))
  return str(key)


def _split_opt_path(path: tuple[Any, ...]) -> tuple[str, _Key, _Key]:
  """(group, slot, parameter path) of a `multi_transform` state leaf.

  A leaf's path is `.inner_states[group]` + the slot inside that group's optimizer (e.g. `.inner_state[1][0].trace`)
  + the parameter's own path, which starts at the first dict key; scalars such as `count` have no parameter path.
  """
  group = _entry(path[1])
  rest = path[2:]
  first_dict = next((i for i, key in enumerate(rest) if isinstance(key, jax.tree_util.DictKey)), len(rest))
  return group, tuple(_entry(k) for k in rest[:first_dict]), tuple(_entry(k) for k in rest[first_dict:])


def _opt_leaves(opt_state: Any) -> dict[tuple[str, _Key, _Key], Any]:
  return {_split_opt_path(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]}


@dataclasses.dataclass(frozen=True)
class NetworkStack:
  """Converts trees and train states between the canonical and the stacked layout.

  Attributes:
    names: the stacked networks' canonical top-level keys, in stacking order.
    canonical_group: the canonical optimizer group of each stacked network (`Method.param_group`).
  """
  names: tuple[str, ...]
  canonical_group: Mapping[str, str]

  @classmethod
  def for_method(cls, method: methods.Method) -> 'NetworkStack':
    """The stack of `method.stacked_networks()`; they must share one optimizer (a ValueError names them if not)."""
    names = method.stacked_networks()
    if not names:
      raise ValueError(f'Method {method.name!r} cannot stack its networks: {method.network_parallel_refusal}.')
    groups = {name: method.param_group(name) for name in names}
    optimizers = {method.group_optimizer(group) for group in groups.values()}
    if len(optimizers) != 1:
      raise ValueError(f'The stacked networks of method {method.name!r} use different optimizers {optimizers}; '
                       'stacked networks share one.')
    return cls(names, groups)

  def param_group(self, method: methods.Method, top_level_key: str) -> str:
    """The optimizer group of a top-level key of the stacked layout."""
    return STACK_KEY if top_level_key == STACK_KEY else method.param_group(top_level_key)

  def group_optimizer(self, method: methods.Method, group: str) -> methods.GroupOptimizer:
    """The optimizer of a group of the stacked layout (`networks`: the stacked networks' shared one)."""
    return method.group_optimizer(self.canonical_group[self.names[0]] if group == STACK_KEY else group)

  # Parameters and batch statistics.
  def stack(self, tree: Mapping[str, Any]) -> dict[str, Any]:
    """A canonical `params` / `batch_stats` tree in the stacked layout."""
    stacked = {key: value for key, value in tree.items() if key not in self.names}
    stacked[STACK_KEY] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(tree[name] for name in self.names))
    return stacked

  def unstack(self, tree: Mapping[str, Any]) -> dict[str, Any]:
    """A stacked `params` / `batch_stats` tree in the canonical layout."""
    canonical = {key: value for key, value in tree.items() if key != STACK_KEY}
    for index, name in enumerate(self.names):
      canonical[name] = jax.tree.map(lambda leaf, i=index: leaf[i], tree[STACK_KEY])
    return canonical

  # Whole train states.
  def stack_state(self, state: Any, tx: optax.GradientTransformation) -> Any:
    """A canonical train state in the stacked layout, with `tx` (the stacked layout's optimizer)."""

    def value(source, source_groups, group: str, slot: _Key, path: _Key) -> Any:
      if not path:  # A per-group scalar (a step count): every group counts the same steps.
        return source[(group if group in source_groups else self.canonical_group[self.names[0]], slot, ())]
      if path[0] == STACK_KEY:
        return jnp.stack([source[(self.canonical_group[name], slot, (name,) + path[1:])] for name in self.names])
      return source[(group, slot, path)]

    return self._convert(state, tx, self.stack, value)

  def unstack_state(self, state: Any, tx: optax.GradientTransformation) -> Any:
    """A stacked train state in the canonical layout, with `tx` (the canonical optimizer)."""

    def value(source, source_groups, group: str, slot: _Key, path: _Key) -> Any:
      if not path:
        return source[(group if group in source_groups else STACK_KEY, slot, ())]
      if path[0] in self.names:
        return source[(STACK_KEY, slot, (STACK_KEY,) + path[1:])][self.names.index(path[0])]
      return source[(group, slot, path)]

    return self._convert(state, tx, self.unstack, value)

  @staticmethod
  def _convert(state: Any, tx: optax.GradientTransformation, layout: Callable[[Any], Any],
               value: Callable[..., Any]) -> Any:
    """`state` with `layout` applied to its parameters and batch statistics, and its optimizer state rebuilt leaf by
    leaf in `tx`'s structure: `value(source leaves, source groups, group, slot, parameter path)`."""
    params = layout(state.params)
    source = _opt_leaves(state.opt_state)
    source_groups = {group for group, _, _ in source}
    opt_state = jax.tree_util.tree_map_with_path(
        lambda path, _: value(source, source_groups, *_split_opt_path(path)), jax.eval_shape(tx.init, params))
    return state.replace(params=params, batch_stats=layout(state.batch_stats), opt_state=opt_state, tx=tx)


def is_stacked_leaf(path: tuple[Any, ...]) -> bool:
  """Whether a train-state leaf (by key path) belongs to the stacked networks, i.e. has the network axis."""
  names = [_entry(key) for key in path]
  if names[0] in ('params', 'batch_stats'):
    return len(names) > 1 and names[1] == STACK_KEY
  if names[0] == 'opt_state':
    _, _, parameter_path = _split_opt_path(path[1:])
    return bool(parameter_path) and parameter_path[0] == STACK_KEY
  return False


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh) -> Any:
  """The shardings of a stacked train state: stacked leaves split over 'networks' on their leading axis, the rest
  replicated."""
  split, replicated = NamedSharding(mesh, P(sharding.NETWORKS_AXIS)), sharding.replicated_sharding(mesh)
  return jax.tree_util.tree_map_with_path(lambda path, _: split if is_stacked_leaf(path) else replicated,
                                          abstract_state)
