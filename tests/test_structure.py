"""The package's structure: no import circle among the `ffsd_jax` modules, and no function a reader cannot hold in
mind (over 100 lines). Reads the source with `ast`; imports nothing."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'ffsd_jax'
MAX_FUNCTION_LINES = 100


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules() -> dict[str, ast.Module]:
  return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob('*.py'))}


def _imports(name: str, tree: ast.Module, known: set[str], is_package: bool) -> set[str]:
  """The package modules `name` imports, anywhere in its body (function-level imports count too)."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = name.split('.')[:len(name.split('.')) - node.level + (1 if is_package else 0)]
        base = '.'.join(anchor + ([base] if base else []))
      found.add(base)
      found |= {f'{base}.{alias.name}' for alias in node.names}
  # A module importing its own package (`from ffsd_jax.methods import base` inside ffsd_jax/methods/) finds the
  # package already initialising: that edge is not a circle.
  return {m for m in found if m in known and m != name and not name.startswith(m + '.')}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Every strongly connected component of more than one module (iterative Tarjan)."""
  index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]

  def visit(root):
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = counter[0]
    counter[0] += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter[0]
          counter[0] += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1:
          components.append(sorted(component))

  for module in sorted(graph):
    if module not in index:
      visit(module)
  return components


def test_circle_finder_finds_a_planted_circle():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}, 'e': set()}
  assert _circles(graph) == [['a', 'b', 'c']]
  assert _circles({'a': {'b'}, 'b': set()}) == []


def test_no_import_circle_among_the_package_modules():
  modules = _modules()
  graph = {name: _imports(name, tree, set(modules), (PACKAGE.parent / name.replace('.', '/') / '__init__.py').exists())
           for name, tree in modules.items()}
  assert 'ffsd_jax.inference' in graph['ffsd_jax.export']  # Function-level imports are edges too.
  assert _circles(graph) == []


def test_no_function_over_100_lines():
  too_long = []
  for name, tree in _modules().items():
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
          too_long.append(f'{name}.{node.name}: {length} lines')
  assert not too_long, too_long
