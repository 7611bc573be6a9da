"""The portable leader: a `jax.export` function that a process without ffsd_jax loads and runs (README, Export)."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ffsd_jax import export
from ffsd_jax import portable
from test_sharding import tiny_config

BATCH_SIZES = (3, 8)  # Two sizes through one file: the batch dimension is symbolic.

# Run with `python -I` (no PYTHONPATH, no user site, no script folder on sys.path) in a folder outside the
# repository; argv[2:] are the PYTHONPATH entries that hold no ffsd_jax (where jax itself comes from PYTHONPATH, as in
# scripts/gpu_check.sh). The finder makes any import of ffsd_jax or flax fail and records it, so "never imports" holds
# even where ffsd_jax is installed into the interpreter's site-packages.
_CHILD = r'''
import importlib.util, json, sys

sys.path.extend(sys.argv[2:])

attempted = []


class Blocker:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('ffsd_jax', 'flax'):
      attempted.append(name)
      raise ImportError(f'{name} is blocked in this process')
    return None


sys.meta_path.insert(0, Blocker())
import numpy as np

spec = importlib.util.spec_from_file_location('portable', 'portable.py')
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
leader = module.load_portable_leader(sys.argv[1])
images = np.load('images.npz')
np.savez('logits.npz', **{name: np.asarray(leader(images[name])) for name in images.files})
print(json.dumps({'attempted': attempted,
                  'loaded': sorted(m for m in sys.modules if m.split('.')[0] in ('ffsd_jax', 'flax')),
                  'sys_path_has_cwd': any(p in ('', '.') for p in sys.path)}))
'''


@pytest.fixture(scope='module')
def exported(tiny_run, tmp_path_factory) -> pathlib.Path:
  workdir, _ = tiny_run
  return pathlib.Path(export.export_leader(tiny_config(), str(workdir), str(tmp_path_factory.mktemp('export')),
                                           checkpoint='latest'))


def test_export_writes_the_portable_leader_with_its_checksum_and_signature(exported):
  assert sorted(os.listdir(exported)) == sorted([export.METADATA_FILE, export.PARAMS_FILE, export.PORTABLE_FILE])
  metadata = json.loads((exported / export.METADATA_FILE).read_text())
  blob = (exported / export.PORTABLE_FILE).read_bytes()
  assert metadata['files'] == {export.PORTABLE_FILE: {'sha256': hashlib.sha256(blob).hexdigest(), 'bytes': len(blob)}}
  signature = dict(metadata['portable'])
  assert signature.pop('jax_version') and signature.pop('calling_convention_version') >= 9
  assert signature == {
      'file': export.PORTABLE_FILE,
      'format': 'jax.export (serialized StableHLO; load with jax.export.deserialize)',
      'platforms': ['cpu', 'cuda', 'tpu'],
      'input': {'dtype': 'uint8', 'shape': ['b', 32, 32, 3]},
      'output': {'dtype': 'float32', 'shape': ['b', 10]},
  }
  # The same leader exports to the same bytes from another call site (no caller frames in the debug locations).
  metadata, variables = export.read_export(str(exported))  # pylint: disable=protected-access
  assert export.portable_leader(variables, metadata)[0] == blob
  # The loader's own copy of the names must follow export.py's.
  assert (portable.PORTABLE_FILE, portable.METADATA_FILE) == (export.PORTABLE_FILE, export.METADATA_FILE)


def test_portable_leader_runs_without_ffsd_jax_and_matches_load_leader(exported, tmp_path):
  rng = np.random.default_rng(7)
  images = {f'n{n}': rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in BATCH_SIZES}
  np.savez(tmp_path / 'images.npz', **images)
  shutil.copy(portable.__file__, tmp_path / 'portable.py')  # As a user copies it next to their code.
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  paths = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p and not os.path.exists(
      os.path.join(p, 'ffsd_jax'))]
  result = subprocess.run([sys.executable, '-I', '-c', _CHILD, str(exported), *paths], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report == {'attempted': [], 'loaded': [], 'sys_path_has_cwd': False}
  logits = np.load(tmp_path / 'logits.npz')
  leader = export.load_leader(str(exported))
  for name, batch in images.items():
    expected = np.asarray(leader(batch))
    assert logits[name].dtype == np.float32 and logits[name].shape == expected.shape == (len(batch), 10)
    np.testing.assert_allclose(logits[name], expected, rtol=0, atol=1e-5)


def test_portable_loader_rejects_a_corrupt_file_and_wrong_images(exported, tmp_path):
  damaged = tmp_path / 'damaged'
  shutil.copytree(exported, damaged)
  blob = bytearray((damaged / export.PORTABLE_FILE).read_bytes())
  blob[len(blob) // 2] ^= 0xFF
  (damaged / export.PORTABLE_FILE).write_bytes(bytes(blob))
  with pytest.raises(ValueError, match=r'leader\.jax_export \(\d+ bytes\) does not match the sha256 recorded in'):
    portable.load_portable_leader(str(damaged))
  leader = portable.load_portable_leader(str(exported / export.PORTABLE_FILE))  # The file alone, unverified.
  with pytest.raises(ValueError,
                     match=r'Expected uint8 images of shape \(N, 32, 32, 3\), got float32 \(2, 32, 32, 3\)'):
    leader(np.zeros((2, 32, 32, 3), np.float32))
