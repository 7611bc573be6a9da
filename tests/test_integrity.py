"""Integrity of checkpoints and exports: checksum manifests, verified restores, one-line Orbax errors, safe exports."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from ffsd_jax import checkpointing
from ffsd_jax import evaluation
from ffsd_jax import export
from ffsd_jax import train_loop
from test_sharding import REPO_ROOT, fast_compilation, tiny_config  # pylint: disable=unused-import

TOTAL_STEPS = 6  # 4 steps per epoch: checkpoints at 4 and 6, the best one at 4 (the first eval always improves).


@pytest.fixture(scope='module')
def trained(tiny_run) -> pathlib.Path:
  """The session's 6-step run, whose workdir the tests copy before damaging it."""
  assert tiny_run[1]['total_steps'] == TOTAL_STEPS
  return tiny_run[0]


def _copy(trained: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  workdir = tmp_path / 'copy'
  shutil.copytree(trained, workdir)
  return workdir


def _tree_hashes(root: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob('*')) if p.is_file()}


def _flip_bytes(path: pathlib.Path, count: int = 16) -> None:
  """Inverts `count` bytes in the middle of the file (a disk or transfer error inside the data)."""
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
  path.write_bytes(bytes(data))


def _step_dirs(workdir: pathlib.Path) -> list[pathlib.Path]:
  return [p for folder in (checkpointing.LATEST_DIR, checkpointing.BEST_DIR)
          for p in sorted((workdir / folder).iterdir()) if p.name.isdigit()]


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest file of the OCDBT array data (not Orbax's metadata)."""
  return max((step_dir / 'state' / 'ocdbt.process_0' / 'd').iterdir(), key=lambda p: p.stat().st_size)


def test_every_committed_step_has_a_manifest_matching_its_files(trained):
  assert sorted(os.listdir(trained / checkpointing.LATEST_DIR)) == ['4', '6']  # Manifests add no step entries.
  step_dirs = _step_dirs(trained)
  assert [str(p.relative_to(trained)) for p in step_dirs] == [
      'checkpoints/4', 'checkpoints/6', f'{checkpointing.BEST_DIR}/4']
  for step_dir in step_dirs:
    manifest = json.loads((step_dir / checkpointing.MANIFEST_FILE).read_text())
    assert manifest['format'] == checkpointing.MANIFEST_FORMAT and manifest['hash'] == 'sha256'
    assert manifest['step'] == int(step_dir.name)
    files = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob('*')
                   if p.is_file() and p.name != checkpointing.MANIFEST_FILE)
    assert sorted(manifest['files']) == files
    assert 'commit_success.txt' in files and any(f.startswith('state/ocdbt.process_0/d/') for f in files)
    for rel in files:
      data = (step_dir / rel).read_bytes()
      assert manifest['files'][rel] == {'size': len(data), 'digest': hashlib.sha256(data).hexdigest()}, rel
    assert checkpointing.verify_checkpoint(str(step_dir)) is True


@pytest.mark.parametrize('checkpoint', ['latest', 'best'])
def test_flipped_array_bytes_fail_every_restore_naming_the_file(trained, tmp_path, checkpoint):
  workdir = _copy(trained, tmp_path)
  step_dir = workdir / (checkpointing.LATEST_DIR if checkpoint == 'latest' else checkpointing.BEST_DIR) / (
      str(TOTAL_STEPS) if checkpoint == 'latest' else '4')
  damaged = _largest_array_file(step_dir)
  _flip_bytes(damaged)
  before = _tree_hashes(workdir)
  expected = (re.escape(f'The checkpoint {step_dir} is truncated or corrupt: {damaged.relative_to(step_dir)} does '
                        'not match its sha256') + '.*' + re.escape(f'Move the folder {step_dir} away'))
  with pytest.raises(checkpointing.CheckpointError, match=expected):
    evaluation.evaluate(tiny_config(), str(workdir), checkpoint=checkpoint)
  with pytest.raises(checkpointing.CheckpointError, match=expected):
    export.export_leader(tiny_config(), str(workdir), checkpoint=checkpoint)
  if checkpoint == 'latest':  # Resuming refuses a corrupt latest checkpoint (a corrupt best is moved aside instead:
    with pytest.raises(checkpointing.CheckpointError, match=expected):  # test_run_edges.py).
      train_loop.train_and_evaluate(tiny_config(max_steps=TOTAL_STEPS + 2), str(workdir))
  assert _tree_hashes(workdir) == before


def test_corrupt_index_fails_naming_the_file(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  step_dir = workdir / checkpointing.LATEST_DIR / str(TOTAL_STEPS)
  _flip_bytes(step_dir / 'state' / 'manifest.ocdbt', count=8)
  with pytest.raises(checkpointing.CheckpointError, match=re.escape('state/manifest.ocdbt does not match its sha256')):
    evaluation.evaluate(tiny_config(), str(workdir), checkpoint='latest')


def test_manifest_reports_missing_extra_and_truncated_files(trained, tmp_path):
  step_dir = tmp_path / '6'
  shutil.copytree(trained / checkpointing.LATEST_DIR / str(TOTAL_STEPS), step_dir)
  (step_dir / 'state' / 'extra').write_bytes(b'x')
  with pytest.raises(checkpointing.CheckpointError, match=re.escape('state/extra is not listed in ffsd_manifest')):
    checkpointing.verify_checkpoint(str(step_dir))
  (step_dir / 'state' / 'extra').unlink()
  metadata = (step_dir / 'loop' / 'metadata').read_bytes()
  (step_dir / 'loop' / 'metadata').unlink()
  with pytest.raises(checkpointing.CheckpointError, match=re.escape('loop/metadata is missing')):
    checkpointing.verify_checkpoint(str(step_dir))
  (step_dir / 'loop' / 'metadata').write_bytes(metadata[:10])
  with pytest.raises(checkpointing.CheckpointError,
                     match=re.escape(f'loop/metadata has 10 bytes where ffsd_manifest.json records {len(metadata)}')):
    checkpointing.verify_checkpoint(str(step_dir))
  (step_dir / 'loop' / 'metadata').write_bytes(metadata)
  assert checkpointing.verify_checkpoint(str(step_dir)) is True
  # A step verified before is hashed again once a file changed, even at the same size.
  _flip_bytes(step_dir / 'loop' / 'metadata', count=1)
  with pytest.raises(checkpointing.CheckpointError, match=re.escape('loop/metadata does not match its sha256')):
    checkpointing.verify_checkpoint(str(step_dir))
  (step_dir / 'loop' / 'metadata').write_bytes(metadata)
  (step_dir / checkpointing.MANIFEST_FILE).write_text('{"files": ')
  with pytest.raises(checkpointing.CheckpointError, match='its manifest ffsd_manifest.json cannot be read'):
    checkpointing.verify_checkpoint(str(step_dir))


def test_step_without_manifest_restores_with_a_warning(trained, tmp_path, caplog):
  """An older version's step, or one whose run was killed between the commit and the manifest (which may leave the
  manifest's temporary file), restores unverified after one warning line."""
  workdir = _copy(trained, tmp_path)
  verified = evaluation.evaluate(tiny_config(), str(workdir), checkpoint='latest')
  step_dir = workdir / checkpointing.LATEST_DIR / str(TOTAL_STEPS)
  (step_dir / checkpointing.MANIFEST_FILE).rename(step_dir / f'{checkpointing.MANIFEST_FILE}.tmp1234')
  before = _tree_hashes(workdir)
  with caplog.at_level(logging.WARNING):
    assert evaluation.evaluate(tiny_config(), str(workdir), checkpoint='latest') == verified
  warnings = [r.getMessage() for r in caplog.records if 'has no ffsd_manifest.json' in r.getMessage()]
  assert warnings == [f'The checkpoint {step_dir} has no ffsd_manifest.json (written by an older version, or the run '
                      'stopped between its commit and the manifest): restoring it without verifying its files.']
  assert _tree_hashes(workdir) == before  # eval_leader.json rewritten with the same result.


def test_corrupt_index_without_manifest_is_one_clean_error(trained, tmp_path):
  """Orbax's own error, reached when no manifest guards the step, comes out as one CheckpointError line, without the
  flood of 'Event loop is closed' tracebacks from reads still in flight when Orbax closes its event loop."""
  workdir = _copy(trained, tmp_path)
  step_dir = workdir / checkpointing.LATEST_DIR / str(TOTAL_STEPS)
  (step_dir / checkpointing.MANIFEST_FILE).unlink()
  index = step_dir / 'state' / 'manifest.ocdbt'
  data = bytearray(index.read_bytes())
  data[30:50] = bytes(b ^ 0xFF for b in data[30:50])  # Inside the OCDBT manifest header: every array read fails.
  index.write_bytes(bytes(data))
  # configs/smoke.py has the tiny config's architecture (resnet8_tiny, FFSD, 2 students, 10 classes).
  result = subprocess.run(
      [sys.executable, 'main.py', '--config', 'configs/smoke.py', '--workdir', str(workdir), '--mode', 'eval',
       '--checkpoint', 'latest'], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode != 0
  assert 'Event loop is closed' not in result.stderr, result.stderr[-3000:]
  assert result.stderr.count('Traceback (most recent call last)') <= 1, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if 'CheckpointError: ' in line]
  assert len(errors) == 1, result.stderr[-3000:]
  assert f'Cannot restore the checkpoint {step_dir} (ValueError: DATA_LOSS' in errors[0]
  assert 'manifest.ocdbt' in errors[0] and 'tensorstore_spec' not in errors[0]


@pytest.fixture(scope='module')
def exported(trained, tmp_path_factory) -> pathlib.Path:
  return pathlib.Path(export.export_leader(tiny_config(), str(trained), str(tmp_path_factory.mktemp('export')),
                                           checkpoint='latest'))


def test_export_records_the_sha256_of_its_params(exported):
  assert sorted(os.listdir(exported)) == sorted([export.METADATA_FILE, export.PARAMS_FILE, export.PORTABLE_FILE])
  metadata = json.loads((exported / export.METADATA_FILE).read_text())
  params = (exported / export.PARAMS_FILE).read_bytes()
  assert metadata['params_sha256'] == hashlib.sha256(params).hexdigest()
  assert metadata['params_bytes'] == len(params) and metadata['step'] == TOTAL_STEPS


def test_corrupt_leader_msgpack_fails_naming_the_file(exported, tmp_path, caplog):
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  expected_logits = np.asarray(export.load_leader(str(exported))(images))
  damaged = tmp_path / 'damaged'
  shutil.copytree(exported, damaged)
  _flip_bytes(damaged / export.PARAMS_FILE)  # Inside the float data: msgpack alone would load it.
  with pytest.raises(export.ExportError, match=re.escape(
      f'The export file {damaged / export.PARAMS_FILE} (') + r'.*does not match the sha256 recorded in leader\.json'):
    export.load_leader(str(damaged))
  # An export written before the checksum existed: loaded, with a warning.
  old = tmp_path / 'old'
  shutil.copytree(exported, old)
  metadata = json.loads((old / export.METADATA_FILE).read_text())
  del metadata['params_sha256'], metadata['params_bytes']
  (old / export.METADATA_FILE).write_text(json.dumps(metadata))
  with caplog.at_level(logging.WARNING):
    logits = np.asarray(export.load_leader(str(old))(images))
  np.testing.assert_array_equal(logits, expected_logits)
  assert any('records no sha256 of leader.msgpack' in r.getMessage() for r in caplog.records)


def test_failed_export_leaves_the_previous_export_whole(trained, exported, tmp_path, monkeypatch):
  # The previous export: the leader at step 4 (the latest step of a copy without step 6), beside a user's file.
  step4 = _copy(trained, tmp_path)
  shutil.rmtree(step4 / checkpointing.LATEST_DIR / str(TOTAL_STEPS))
  target = tmp_path / 'deployed'
  export.export_leader(tiny_config(), str(step4), str(target), checkpoint='latest')
  (target / 'README.txt').write_text('notes')
  before = _tree_hashes(target)
  assert json.loads((target / export.METADATA_FILE).read_text())['step'] == 4

  def failing_serialise(*args, **kwargs):
    raise RuntimeError('serialiser failed')

  with monkeypatch.context() as patch:
    patch.setattr(export.flax.serialization, 'msgpack_serialize', failing_serialise)
    with pytest.raises(RuntimeError, match='serialiser failed'):
      export.export_leader(tiny_config(), str(trained), str(target), checkpoint='latest')
  assert _tree_hashes(target) == before

  # A full disk while writing leader.json, after the new bytes of every other file were written in full.
  write_synced = export._write_synced  # pylint: disable=protected-access
  calls = []

  def disk_full_on_leader_json(path, data):
    calls.append(path)
    if os.path.basename(path).startswith(export.METADATA_FILE):
      write_synced(path, data[:len(data) // 2])
      raise OSError(errno.ENOSPC, 'No space left on device', path)
    write_synced(path, data)

  with monkeypatch.context() as patch:
    patch.setattr(export, '_write_synced', disk_full_on_leader_json)
    with pytest.raises(OSError, match='No space left'):
      export.export_leader(tiny_config(), str(trained), str(target), checkpoint='latest')
  assert [os.path.basename(p).split('.tmp')[0] for p in calls] == [export.PARAMS_FILE, export.PORTABLE_FILE,
                                                                    export.METADATA_FILE]
  assert _tree_hashes(target) == before
  export.load_leader(str(target))

  # Then a complete export replaces the export's files, and only them.
  export.export_leader(tiny_config(), str(trained), str(target), checkpoint='latest')
  after = _tree_hashes(target)
  assert sorted(after) == sorted(before) and after['README.txt'] == before['README.txt']
  assert after == _tree_hashes(exported) | {'README.txt': before['README.txt']}
  export.load_leader(str(target))


def _save_small_steps(workdir: pathlib.Path, steps: list[int]) -> checkpointing.ocp.CheckpointManager:
  manager = checkpointing.create_manager(str(workdir), max_to_keep=2)
  for step in steps:
    checkpointing.save(manager, step, {'w': np.full((1000,), step, np.float32)}, iterator_states={'0': {}},
                       loop_state={}, config=tiny_config())
  return manager


def test_manifest_is_written_by_the_background_finalize_thread(tmp_path):
  manager = _save_small_steps(tmp_path, [1])
  manifest = tmp_path / checkpointing.LATEST_DIR / '1' / checkpointing.MANIFEST_FILE
  # Without waiting for the save: Orbax's finalize thread writes the manifest right after the commit.
  deadline = time.time() + 20
  while not manifest.exists() and time.time() < deadline:
    time.sleep(0.05)
  assert manifest.exists()
  manager.close()
  assert checkpointing.verify_checkpoint(str(manifest.parent)) is True


def test_manifests_are_written_by_wait_until_finished_without_the_finalize_hook(tmp_path, monkeypatch):
  """Should a later Orbax drop the private `_finalize` hook, the manifests still come at the next save or close."""
  monkeypatch.setattr(checkpointing._ManifestCheckpointManager, '_finalize',  # pylint: disable=protected-access
                      checkpointing.ocp.CheckpointManager._finalize)  # pylint: disable=protected-access
  manager = _save_small_steps(tmp_path, [1, 2, 3])
  manager.close()
  steps = sorted(os.listdir(tmp_path / checkpointing.LATEST_DIR))
  assert steps == ['2', '3']  # max_to_keep=2 deleted step 1, manifest and all.
  for step in steps:
    assert checkpointing.verify_checkpoint(str(tmp_path / checkpointing.LATEST_DIR / step)) is True
