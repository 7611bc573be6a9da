"""Online knowledge-distillation methods behind one interface (`base.Method`), selected by `config.method`.

Each method lives in its own module and registers itself with `@register`; `get_method(config)` returns the method
object every other module asks (networks, loss groups and optimizers, objective, evaluated and deployed networks,
extra state). docs/methods.md shows how to add one.
"""

from __future__ import annotations

import ml_collections

from ffsd_jax.methods.base import GroupOptimizer, Method

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
  """Class decorator: makes `cls` selectable as `config.method = cls.name`."""
  if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
    raise ValueError(f'Two methods are registered as {cls.name!r}: {_REGISTRY[cls.name].__module__} and '
                     f'{cls.__module__}.')
  _REGISTRY[cls.name] = cls
  return cls


def method_names() -> tuple[str, ...]:
  """Every registered method name, in registration order."""
  return tuple(_REGISTRY)


def method_class(name: str) -> type[Method]:
  """The registered class of `name`; raises ValueError listing the valid names."""
  if name not in _REGISTRY:
    raise ValueError(f'Unknown method {name!r}; valid choices: {", ".join(_REGISTRY)}. Set config.method.')
  return _REGISTRY[name]


def is_other_methods_key(key: str, method: str | None) -> bool:
  """Whether config key `key` (possibly dotted) is another method's own, named '<name>_...' after a registered method
  other than `method` (e.g. 'mcl_embedding_dim' for an FFSD run): its value does not enter a `method` run."""
  head = key.split('.', 1)[0]
  return any(head.startswith(f'{name}_') for name in _REGISTRY if name != method)


def get_method(config: ml_collections.ConfigDict) -> Method:
  """The method object of `config.method`, built from `config`."""
  return method_class(config.method)(config)


# The built-in methods register themselves on import (order = the order of `method_names()`).
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from ffsd_jax.methods import ffsd, dml, independent, kdcl, one, pcl, okddip, mcl

__all__ = ['GroupOptimizer', 'Method', 'get_method', 'method_class', 'method_names', 'register']
