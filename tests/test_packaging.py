"""Packaging: pyproject.toml against the pinned requirement files, and an installed copy used from another folder."""

import ast
import email.parser
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from conftest import REPO_ROOT


def _normalise(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def _pins(file_name: str) -> dict[str, str]:
  """{normalised name: version} of a requirements file, following `-r` includes; every line must be an exact pin."""
  pins = {}
  for line in (REPO_ROOT / file_name).read_text().splitlines():
    line = line.split('#')[0].strip()
    if not line:
      continue
    if line.startswith('-r '):
      pins.update(_pins(line[3:].strip()))
      continue
    name, version = re.fullmatch(r'([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.]*)', line).groups()
    pins[_normalise(name)] = version
  return pins


def _lower_bounds(requirements: list[str]) -> dict[str, str]:
  """{normalised name: version} of pyproject requirements; each must be exactly `name>=version`."""
  bounds = {}
  for requirement in requirements:
    name, version = re.fullmatch(r'([A-Za-z0-9][A-Za-z0-9._-]*)>=([0-9][0-9A-Za-z.]*)', requirement).groups()
    bounds[_normalise(name)] = version
  return bounds


def _pyproject() -> dict:
  return tomllib.loads((REPO_ROOT / 'pyproject.toml').read_text())['project']


def test_pyproject_dependencies_are_the_requirement_pins_as_lower_bounds():
  project = _pyproject()
  runtime = _pins('requirements.txt')
  assert _lower_bounds(project['dependencies']) == runtime
  extras = {name: _lower_bounds(requirements) for name, requirements in project['optional-dependencies'].items()}
  extra_files = {'plot': 'requirements-plot.txt', 'test': 'requirements-test.txt',
                 'prepare': 'requirements-prepare.txt'}
  assert sorted(extras) == sorted(extra_files)
  for extra, file_name in extra_files.items():
    pins = _pins(file_name)
    assert all(pins[name] == version for name, version in runtime.items()), file_name
    assert extras[extra] == {name: version for name, version in pins.items() if name not in runtime}, extra
  # Test and plotting packages stay out of the runtime set.
  assert not {'pytest', 'matplotlib', 'tensorboard', 'tensorflow-cpu'} & set(runtime)


def _third_party_imports(paths: list[pathlib.Path]) -> set[str]:
  """Top-level module names imported anywhere in `paths` (also inside functions), less the standard library."""
  names = set()
  for path in paths:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names.update(alias.name.split('.')[0] for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names.add(node.module.split('.')[0])
  return {name for name in names if name not in sys.stdlib_module_names and name not in ('ffsd_jax', '__future__')}


def test_runtime_requirements_provide_every_import_of_the_package_and_main():
  imported = _third_party_imports(sorted((REPO_ROOT / 'ffsd_jax').rglob('*.py')) + [REPO_ROOT / 'main.py'])
  providers = importlib.metadata.packages_distributions()
  runtime = set(_pins('requirements.txt'))
  missing = {name: providers.get(name) for name in imported
             if not {_normalise(dist) for dist in providers.get(name, [])} & runtime}
  assert not missing, f'imported by ffsd_jax/main.py but not in requirements.txt: {missing}'


# Imports the whole training, evaluation and export stack, the lazy imports included, with the test and plotting
# packages made unimportable: what requirements.txt installs is enough to run main.py.
_RUNTIME_ONLY = r'''
import importlib, pkgutil, sys

blocked = ('matplotlib', 'tensorboard', 'pytest', 'tensorflow')
attempted = []


class Blocker:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in blocked:
      attempted.append(name)
      raise ImportError(f'{name} is blocked')
    return None


sys.meta_path.insert(0, Blocker())
import ffsd_jax
modules = ['main'] + [m.name for m in pkgutil.walk_packages(ffsd_jax.__path__, 'ffsd_jax.')]
lazy = ['grain', 'tensorflow_datasets', 'clu.parameter_overview', 'orbax.checkpoint', 'PIL.Image',
        'tensorboardX', 'jax._src.export.serialization']  # The last needs flatbuffers (the portable export).
for name in modules + lazy:
  importlib.import_module(name)
print(sorted(set(a.split('.')[0] for a in attempted)))
'''


def test_training_stack_imports_without_test_or_plotting_packages():
  env = {**os.environ, 'PYTHONPATH': str(REPO_ROOT)}
  result = subprocess.run([sys.executable, '-c', _RUNTIME_ONLY], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  # tensorflow_datasets looks for TensorFlow and does without it; nothing else may even try.
  assert result.stdout.strip().splitlines()[-1] in ("[]", "['tensorflow']"), result.stdout


def _can_build_offline() -> bool:
  """setuptools builds wheels by itself from 70.1 on; older ones need the `wheel` package."""
  try:
    version = tuple(int(v) for v in importlib.metadata.version('setuptools').split('.')[:2])
  except importlib.metadata.PackageNotFoundError:
    return False
  return version >= (70, 1) or importlib.util.find_spec('wheel') is not None


@pytest.mark.skipif(not _can_build_offline(), reason='needs setuptools >= 70.1 (pip install -r requirements-test.txt)')
def test_pip_install_then_load_leader_from_another_folder(tmp_path):
  """`pip install .` builds the wheel from pyproject.toml with setuptools and installs it; here into a folder.

  --no-deps --no-build-isolation --no-index --target runs the same PEP 517 build and installs the same wheel as
  `pip install .` into a fresh venv, without a network or a minute of dependency installs; the dependencies the wheel
  declares are compared with pyproject.toml below, and pyproject's with requirements.txt above.
  """
  source = tmp_path / 'source'  # A copy: the build writes build/ and *.egg-info next to pyproject.toml.
  source.mkdir()
  shutil.copy(REPO_ROOT / 'pyproject.toml', source)
  shutil.copy(REPO_ROOT / 'README.md', source)
  shutil.copytree(REPO_ROOT / 'ffsd_jax', source / 'ffsd_jax', ignore=shutil.ignore_patterns('__pycache__'))
  site = tmp_path / 'site'
  result = subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation', '--no-index',
       '--disable-pip-version-check', '--target', str(site), str(source)],
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]

  def modules(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob('*.py') if '__pycache__' not in p.parts)

  assert modules(site / 'ffsd_jax') == modules(REPO_ROOT / 'ffsd_jax')
  project = _pyproject()
  metadata = email.parser.Parser().parsestr(next(site.glob('ffsd_jax-*.dist-info')).joinpath('METADATA').read_text())
  assert metadata['Name'] == 'ffsd-jax' and metadata['Version'] == project['version']
  declared = sorted(r.replace(' ', '') for r in metadata.get_all('Requires-Dist'))
  expected = project['dependencies'] + [f'{r};extra=="{extra}"' for extra, requirements in
                                        project['optional-dependencies'].items() for r in requirements]
  assert declared == sorted(expected)

  # A tiny export, then load_leader from the installed copy in an unrelated folder.
  export_dir = tmp_path / 'export'
  _tiny_export(export_dir)
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  env = {**os.environ, 'PYTHONPATH': str(site)}
  code = ('import json, ffsd_jax, numpy as np; from ffsd_jax.export import load_leader; '
          f'f = load_leader({str(export_dir)!r}); '
          'print(json.dumps([ffsd_jax.__file__, list(f(np.zeros((2, 32, 32, 3), np.uint8)).shape)]))')
  result = subprocess.run([sys.executable, '-c', code], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1]) == [str(site / 'ffsd_jax' / '__init__.py'), [2, 10]]


def _tiny_export(export_dir: pathlib.Path) -> None:
  """An initialised (untrained) resnet8_tiny written as an export folder, without a training run."""
  import flax.serialization  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ffsd_jax import export, models  # pylint: disable=g-import-not-at-top
  variables = models.create_backbone('resnet8_tiny', 10, jnp.float32).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  metadata = {'model': 'resnet8_tiny', 'network': 'leader', 'num_classes': 10, 'image_size': 32,
              'mean_std': [[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]], 'compute_dtype': 'float32', 'dataset': 'synthetic',
              'step': 0, 'checkpoint': ''}
  export._write_export(  # pylint: disable=protected-access
      str(export_dir), flax.serialization.msgpack_serialize(jax.tree.map(jax.device_get, variables)), metadata)
