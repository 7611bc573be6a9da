"""Orbax checkpoints: the train state, the data-iterator state, the loop state and the config.

Two managers live in the workdir:
- `checkpoints/`: the latest checkpoints (every `config.checkpoint_every_steps`, at the end and on SIGTERM), of which
  `config.keep_checkpoints` are kept; a run in a workdir that has one resumes from it.
- `checkpoints_best/`: one checkpoint, the train state at the epoch with the best leader top-1 (what the reference
  reports and deploys, docs/method.md §10).

Each checkpoint holds four items: `state` (StandardSave of the `TrainState`'s arrays by field name), `data_iterator`
(JSON: every process's iterator state, keyed by process index), `loop` (JSON: metric sums of the unfinished logging
window, best leader top-1 so far) and `config` (JSON). Before any restore the saved config's architecture is compared
with the current one, and a checkpoint that cannot be read fails with a message; nothing is ever deleted or overwritten
on those paths (saving only happens after a successful restore or in an empty folder).

Integrity: once Orbax has committed a step (renamed its temporary folder into place), process 0 writes
`<step>/ffsd_manifest.json`, the size and sha256 of every file of the step, in the manager's background finalize
thread. Every restore (`restore`, `restore_state_only`, `check_architecture`) recomputes them first and refuses a step
whose files differ, are missing or were added, naming the file; Orbax alone would restore flipped bytes in array data
as garbage values. A step without a manifest (an older version, or a run killed between the commit and the manifest)
restores with a warning, so a run killed at any instant stays resumable.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import sys
import threading
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ffsd_jax import errors
from ffsd_jax import methods

LATEST_DIR = 'checkpoints'
BEST_DIR = 'checkpoints_best'
ITEM_NAMES = ('state', 'data_iterator', 'loop', 'config')
# Config keys that must match between a checkpoint and the run restoring it (they fix the parameter tree).
# The keys that shape the parameter tree (the shared trunk of ONE / PCL included).
ARCHITECTURE_KEYS = ('model', 'method', 'num_students', 'num_classes', 'one_shared_stages', 'pcl_shared_stages',
                     'okddip_shared_stages', 'mcl_shared_stages', 'mcl_embedding_dim')
MANIFEST_FILE = 'ffsd_manifest.json'
MANIFEST_FORMAT = 'ffsd_jax checkpoint manifest'
# sha256 is the fastest hashlib digest on CPUs with SHA extensions (1.56 GB/s on one thread here, blake2b 1.07 GB/s;
# scripts/benchmark_reliability.py) and the one `sha256sum` checks by hand.
HASH_ALGORITHM = 'sha256'
# Orbax writes this file into a step folder as the last part of its commit, in both of its atomicity modes.
ORBAX_COMMIT_FILE = 'commit_success.txt'
_TMP_SUFFIX = '.tmp'


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint that cannot be used: another architecture, or truncated / corrupt files."""


class ArchitectureError(CheckpointError):
  """A readable checkpoint written for another architecture (model, method, network count, classes)."""


# ----------------------------------------------------------------------------------------------------------------
# Manifests: the size and digest of every file of a committed step.


def _step_files(step_dir: str) -> list[str]:
  """Every file under `step_dir` as a sorted '/'-separated relative path, less the manifest and its temporary files
  (a kill while writing the manifest leaves one; the step then reads as unverified, not corrupt)."""
  files = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, '/')
      if rel == MANIFEST_FILE or rel.startswith(MANIFEST_FILE + _TMP_SUFFIX):
        continue
      files.append(rel)
  return sorted(files)


def _file_digest(path: str, algorithm: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, algorithm).hexdigest()


def _digests(step_dir: str, rel_paths: list[str], algorithm: str) -> dict[str, str]:
  """Digests of the files, hashed on a few threads (hashlib releases the GIL on large buffers, so they overlap)."""
  workers = max(1, min(8, os.cpu_count() or 1, len(rel_paths)))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    digests = pool.map(lambda rel: _file_digest(os.path.join(step_dir, rel), algorithm), rel_paths)
    return dict(zip(rel_paths, digests))


def write_file_atomically(path: str, data: bytes) -> None:
  """Writes `data` to a temporary name beside `path`, fsyncs it and renames it into place (then fsyncs the folder),
  so a kill or a full disk leaves either no file or the whole file."""
  tmp = f'{path}{_TMP_SUFFIX}{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  folder = os.open(os.path.dirname(path) or '.', os.O_RDONLY)
  try:
    os.fsync(folder)
  finally:
    os.close(folder)


def write_manifest(step_dir: str, step: int | None = None) -> str:
  """Writes `step_dir/ffsd_manifest.json` (size and sha256 of every file of the step) atomically.

  Call it only on a committed step: what it records is what every later restore must find.

  Returns:
    The manifest's path.
  """
  rel_paths = _step_files(step_dir)
  digests = _digests(step_dir, rel_paths, HASH_ALGORITHM)
  manifest = {
      'format': MANIFEST_FORMAT, 'version': 1, 'hash': HASH_ALGORITHM, 'step': step,
      'files': {rel: {'size': os.path.getsize(os.path.join(step_dir, rel)), 'digest': digests[rel]}
                for rel in rel_paths}}
  path = os.path.join(step_dir, MANIFEST_FILE)
  write_file_atomically(path, json.dumps(manifest, indent=1, sort_keys=True).encode())
  return path


def _corrupt_message(step_dir: str, problem: str) -> str:
  return (f'The checkpoint {step_dir} is truncated or corrupt: {problem}. Its files were left untouched. Move the '
          f'folder {step_dir} away (a rerun then resumes from the previous checkpoint in {os.path.dirname(step_dir)},'
          ' if there is one), or use another --workdir.')


# Step folders verified in this process, with the stat signature of their files then.
_verified: dict[str, tuple[Any, ...]] = {}


def _stat_signature(step_dir: str, rel_paths: list[str]) -> tuple[Any, ...]:
  stats = [os.stat(os.path.join(step_dir, rel)) for rel in [MANIFEST_FILE, *rel_paths]]
  return tuple((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
               for rel, st in zip([MANIFEST_FILE, *rel_paths], stats))


def verify_checkpoint(step_dir: str) -> bool:
  """Compares the files of a checkpoint step with its manifest, before anything of it is restored.

  A step verified earlier in this process is not hashed again while none of its files changed (same sizes, inodes,
  modification and status-change times): a resume checks the architecture, reads the config, then restores the state
  of the same step.

  Returns:
    True when every file matches; False (after a one-line warning) when the step has no manifest.

  Raises:
    CheckpointError: a file differs, is missing or is not in the manifest (named by its path in the step folder), or
      the manifest cannot be read.
  """
  manifest_path = os.path.join(step_dir, MANIFEST_FILE)
  if not os.path.exists(manifest_path):
    logging.warning('The checkpoint %s has no %s (written by an older version, or the run stopped between its commit '
                    'and the manifest): restoring it without verifying its files.', step_dir, MANIFEST_FILE)
    return False
  try:
    with open(manifest_path, 'rb') as f:
      manifest = json.loads(f.read())
    algorithm = manifest['hash']
    expected = {rel: (int(entry['size']), str(entry['digest'])) for rel, entry in manifest['files'].items()}
    hashlib.new(algorithm)
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointError(_corrupt_message(
        step_dir, f'its manifest {MANIFEST_FILE} cannot be read ({type(e).__name__}: {e})')) from None
  actual = _step_files(step_dir)
  signature = _stat_signature(step_dir, actual)
  if _verified.get(step_dir) == signature:
    return True
  problems = [f'{rel} is missing' for rel in sorted(set(expected) - set(actual))]
  problems += [f'{rel} is not listed in {MANIFEST_FILE}' for rel in actual if rel not in expected]
  to_hash = []
  for rel in actual:
    if rel in expected:
      size = os.path.getsize(os.path.join(step_dir, rel))
      if size != expected[rel][0]:
        problems.append(f'{rel} has {size} bytes where {MANIFEST_FILE} records {expected[rel][0]}')
      else:
        to_hash.append(rel)
  if not problems:  # Sizes first: a truncated file is reported without reading the whole step.
    digests = _digests(step_dir, to_hash, algorithm)
    problems = [f'{rel} does not match its {algorithm} in {MANIFEST_FILE}' for rel in to_hash
                if digests[rel] != expected[rel][1]]
  if problems:
    more = f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''
    raise CheckpointError(_corrupt_message(step_dir, '; '.join(problems[:3]) + more))
  _verified[step_dir] = signature
  return True


# ----------------------------------------------------------------------------------------------------------------
# The manager.


class _ManifestCheckpointManager(ocp.CheckpointManager):
  """A CheckpointManager that writes the manifest of every step it saves, once Orbax has committed the step.

  The manifest is written at the end of Orbax's save-finalize step (`_finalize`, which runs in the background thread of
  asynchronous saves after the step folder is renamed into place); `wait_until_finished` (also called by `save`
  before the next save and by `close`) writes any that is still missing, should a later Orbax rename that hook.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._manifest_lock = threading.Lock()
    self._steps_without_manifest: set[int] = set()

  def save(self, step: int, *args, **kwargs) -> bool:
    saved = super().save(step, *args, **kwargs)
    if saved:
      # Its finalize thread may already have written the manifest: `_write_manifests` skips such steps.
      with self._manifest_lock:
        self._steps_without_manifest.add(step)
    return saved

  def _finalize(self, step: int, *args, **kwargs):  # Orbax's save finalization: commit, then old-step deletion.
    result = super()._finalize(step, *args, **kwargs)
    self._write_manifests([step])
    return result

  def wait_until_finished(self):
    super().wait_until_finished()
    with self._manifest_lock:
      pending = sorted(self._steps_without_manifest)
    self._write_manifests(pending)

  def _write_manifests(self, steps: list[int]) -> None:
    """Writes the manifest of each committed step that lacks one (process 0 only; the files are shared).

    Called once the step's save has finished, committed or failed.
    """
    for step in steps:
      with self._manifest_lock:
        self._steps_without_manifest.discard(step)
      if jax.process_index() != 0:
        continue
      step_dir = _step_path(self, step)
      # Committed: Orbax renamed the temporary folder to the step's name and wrote its commit file; a failed save
      # leaves neither, and such a step must never look verified.
      if (not os.path.isfile(os.path.join(step_dir, ORBAX_COMMIT_FILE))
          or os.path.exists(os.path.join(step_dir, MANIFEST_FILE))):
        continue
      try:
        write_manifest(step_dir, step)
      except Exception as e:  # pylint: disable=broad-except
        # The checkpoint itself is complete (and a failing hook must not fail the save): it restores unverified.
        logging.warning('Could not write the manifest of the checkpoint %s (%s); it will restore unverified.',
                        step_dir, e)


def create_manager(workdir: str, *, best: bool = False, max_to_keep: int = 2,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """The manager of the latest (or, with `best=True`, the best-leader) checkpoints under `workdir`.

  Saves are asynchronous: `save` returns once the arrays are copied off the devices and the files are written in
  the background; `wait_until_finished` (called before exit) blocks on them and on their manifests.
  """
  directory = os.path.join(os.path.abspath(workdir), BEST_DIR if best else LATEST_DIR)
  _drop_closed_loop_reports()  # A failed save (a full disk) abandons writes too: their reports would bury the error.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=1 if best else max_to_keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=True,
      # Both managers may save the same step (an epoch end with a new best leader); on multi-host runs their
      # barriers are keyed by step, so each manager needs its own prefix.
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix='best' if best else 'latest'))
  return _ManifestCheckpointManager(directory, options=options, item_names=ITEM_NAMES)


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


def _state_item(state: Any) -> Any:
  """The train state as the checkpoint's `state` item: its array fields by name.

  `extra_state` is left out when it holds no arrays (every method without extra state), so those checkpoints keep the
  layout of the versions before `TrainState.extra_state` existed and both restore either way. Any other pytree is
  saved as it is.
  """
  if not hasattr(state, 'opt_state'):  # Not a TrainState.
    return state
  item = {'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats, 'opt_state': state.opt_state}
  if jax.tree.leaves(state.extra_state):
    item['extra_state'] = state.extra_state
  return item


def _restore_state_args(abstract_state: Any) -> ocp.args.StandardRestore:
  return ocp.args.StandardRestore(_state_item(abstract_state))


def _state_from_item(restored: Any, abstract_state: Any) -> Any:
  return abstract_state.replace(**restored) if hasattr(abstract_state, 'opt_state') else restored


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, iterator_states: dict[str, Any],
         loop_state: dict[str, Any], config: ml_collections.ConfigDict) -> None:
  """Starts an asynchronous save of one checkpoint at `step` (overwrites nothing: a step is saved once)."""
  if step in manager.all_steps():
    return
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_state_item(state)),
      data_iterator=ocp.args.JsonSave(iterator_states),
      loop=ocp.args.JsonSave(_to_json_compatible(loop_state)),
      config=ocp.args.JsonSave(config_to_json(config))), force=True)


def _step_path(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


# ----------------------------------------------------------------------------------------------------------------
# Restoring.


def _is_closed_loop_report(unraisable: Any) -> bool:
  """Whether an unraisable exception is tensorstore failing to deliver a read result to a closed asyncio loop.

  Orbax runs each restore in a fresh event loop and closes it as soon as one read fails; the reads still in flight
  then complete on tensorstore's threads, whose `loop.call_soon_threadsafe` raises 'Event loop is closed', reported
  through `sys.unraisablehook` (about 200 tracebacks for one corrupt index, burying the real error).
  """
  if unraisable.exc_type is not RuntimeError or str(unraisable.exc_value) != 'Event loop is closed':
    return False
  tb = unraisable.exc_traceback
  return tb is not None and tb.tb_frame.f_code.co_name == 'call_soon_threadsafe'


_closed_loop_reports_dropped = 0


def _drop_closed_loop_reports() -> None:
  """Installs (once per process) a `sys.unraisablehook` that drops exactly those reports, passing on everything else.

  It stays installed: the reports arrive after Orbax has already raised, while the error propagates.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop_reports', False):
    return

  def hook(unraisable):
    global _closed_loop_reports_dropped
    if _is_closed_loop_report(unraisable):
      _closed_loop_reports_dropped += 1
      return
    previous(unraisable)

  hook.drops_closed_loop_reports = True
  sys.unraisablehook = hook


def short_cause(error: BaseException) -> str:
  """The first line of an Orbax / tensorstore error, without the tensorstore spec (kilobytes of JSON)."""
  text = re.split(r'\s*\[tensorstore_spec', str(error))[0].strip().splitlines()
  text = text[0] if text else ''
  return f'{type(error).__name__}: {text[:600]}'


def _orbax_restore(manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite, problem: str) -> Any:
  """`manager.restore`, with any Orbax error turned into one CheckpointError line (`problem` says what to do)."""
  _drop_closed_loop_reports()
  path = _step_path(manager, step)
  try:
    return manager.restore(step, args=args)
  except Exception as e:  # pylint: disable=broad-except
    logging.debug('Orbax could not restore %s.', path, exc_info=True)  # The full chain, with --verbosity=1.
    raise CheckpointError(f'Cannot restore the checkpoint {path} ({short_cause(e)}). {problem}') from None


_UNREADABLE = ('It is truncated, corrupt or was written by an incompatible version; it was left untouched. Move that '
               'step folder away (a rerun then resumes from the previous checkpoint, if there is one), or use another '
               '--workdir.')


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The config saved with the checkpoint at `step` (as `config_to_json` wrote it), after verifying the step's files.

  Raises:
    CheckpointError: a corrupt file, or a config that cannot be read.
  """
  verify_checkpoint(_step_path(manager, step))
  return _orbax_restore(manager, step, ocp.args.Composite(config=ocp.args.JsonRestore()), _UNREADABLE)['config']


def architecture_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{key: (saved, current)} of the ARCHITECTURE_KEYS that differ, less another method's own keys ('<name>_...'):
  those do not shape this method's networks, and a checkpoint written before they existed lacks them."""
  method = current.get('method')
  return {k: (saved.get(k), current.get(k)) for k in ARCHITECTURE_KEYS
          if saved.get(k) != current.get(k) and not (saved.get('method') == method and
                                                     methods.is_other_methods_key(k, method))}


def check_architecture(manager: ocp.CheckpointManager, step: int,
                       config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Verifies the files of the checkpoint at `step`, then fails when it was written for another architecture.

  Returns:
    The config saved with the checkpoint (as `config_to_json` wrote it).

  Raises:
    ArchitectureError: naming the differing keys, the checkpoint path and the fix.
    CheckpointError: naming the corrupt file.
  """
  saved = saved_config(manager, step)
  current = config_to_json(config)
  differing = architecture_differences(saved, current)
  if differing:
    details = ', '.join(f'{k}: checkpoint {a!r} vs config {b!r}' for k, (a, b) in differing.items())
    raise ArchitectureError(
        f'The checkpoint {_step_path(manager, step)} belongs to another architecture ({details}). It was left '
        'untouched. Use another --workdir for this config, or the config that wrote the checkpoint.')
  return saved


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            config: ml_collections.ConfigDict) -> tuple[Any, dict[str, Any], dict[str, Any]]:
  """Restores (state, this process's data-iterator state or {}, loop state) from the checkpoint at `step`.

  `abstract_state` is the `jax.eval_shape` train state with shardings: arrays come back in their sharding and the
  optimizer state keeps its structure. The step's files are verified against its manifest first.

  Raises:
    CheckpointError: a corrupt file, another architecture, or files that cannot be read.
  """
  check_architecture(manager, step, config)
  path = _step_path(manager, step)
  restored = _orbax_restore(manager, step, ocp.args.Composite(
      state=_restore_state_args(abstract_state),
      data_iterator=ocp.args.JsonRestore(),
      loop=ocp.args.JsonRestore()), _UNREADABLE)
  iterator_states = restored['data_iterator'] or {}
  if iterator_states and len(iterator_states) != jax.process_count():
    raise CheckpointError(
        f'The checkpoint {path} was written by {len(iterator_states)} processes but this run has '
        f'{jax.process_count()}; the data order cannot be resumed exactly. Resume with {len(iterator_states)} '
        'processes.')
  local = iterator_states.get(str(jax.process_index()), {})
  logging.info('Restored checkpoint %s (step %d).', path, step)
  return _state_from_item(restored['state'], abstract_state), local, restored['loop'] or {}


def restore_state_only(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                       config: ml_collections.ConfigDict) -> Any:
  """Restores only the train state (eval and export), after verifying the files and the architecture."""
  check_architecture(manager, step, config)
  restored = _orbax_restore(manager, step, ocp.args.Composite(state=_restore_state_args(abstract_state)),
                            _UNREADABLE)['state']
  return _state_from_item(restored, abstract_state)


def checkpoint_path(manager: ocp.CheckpointManager, step: int) -> str:
  """The folder of the checkpoint at `step`."""
  return _step_path(manager, step)
