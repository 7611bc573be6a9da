"""Exporting the leader alone (the deployed network, docs/method.md §10) and loading it back in one call.

An export folder holds `leader.msgpack` (the leader backbone's `params` and `batch_stats`, no trans-fusion head,
serialised with `flax.serialization`), `leader.jax_export` (the same network as a serialized `jax.export` function,
weights included: uint8 NHWC images with a symbolic batch size -> float32 logits, normalisation inside, lowered for
CPU, CUDA and TPU; `ffsd_jax/portable.py` loads it with jax and numpy alone) and `leader.json` (architecture name,
number of classes, image size, normalisation, compute dtype, the step and the checkpoint it came from, the size and
sha256 of every other file, and the portable function's signature).

All files are written to temporary names in the export folder, fsynced, and renamed into place, `leader.json` last:
a failure while writing (an exception, a full disk) leaves the previous export as it was, and other files in the
folder are never touched. `load_leader` checks `leader.msgpack` against the sha256 in `leader.json`, so a corrupt
file, or the two renames split by a crash, fails loudly instead of giving wrong logits.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

from absl import logging
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ffsd_jax import errors
from ffsd_jax import models
from ffsd_jax.data.normalization import normalize_images

PARAMS_FILE = 'leader.msgpack'
METADATA_FILE = 'leader.json'
# The portable leader; its name and format are also spelled out in ffsd_jax/portable.py, which must not import this.
PORTABLE_FILE = 'leader.jax_export'
# Lowering needs no device of these kinds (checked on a CPU-only machine with jax 0.10.2); a platform missing here
# makes `Exported.call` fail there, so list every one the deployed leader may meet.
PORTABLE_PLATFORMS = ('cpu', 'cuda', 'tpu')
_TMP_SUFFIX = '.tmp'


class ExportError(errors.UserError, RuntimeError):
  """An export folder that cannot be loaded: a corrupt or mismatched file."""


def _write_synced(path: str, data: bytes) -> None:
  with open(path, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _write_export(export_dir: str, params: bytes, metadata: dict[str, Any],
                  extra_files: dict[str, bytes] | None = None) -> None:
  """Writes all files to temporary names, then renames them into place (`leader.json`, the commit, last).

  `extra_files` (name -> bytes) are written after `leader.msgpack`; `leader.json` records their size and sha256
  under `files`.
  """
  os.makedirs(export_dir, exist_ok=True)
  extra_files = extra_files or {}
  metadata = {**metadata, 'params_sha256': hashlib.sha256(params).hexdigest(), 'params_bytes': len(params)}
  if extra_files:
    metadata['files'] = {name: {'sha256': hashlib.sha256(data).hexdigest(), 'bytes': len(data)}
                         for name, data in extra_files.items()}
  targets = [(os.path.join(export_dir, PARAMS_FILE), params),
             *((os.path.join(export_dir, name), data) for name, data in extra_files.items()),
             (os.path.join(export_dir, METADATA_FILE), json.dumps(metadata, indent=2).encode())]
  temporaries = [f'{path}{_TMP_SUFFIX}{os.getpid()}' for path, _ in targets]
  try:
    for (_, data), tmp in zip(targets, temporaries):
      _write_synced(tmp, data)
    for (path, _), tmp in zip(targets, temporaries):
      os.replace(tmp, path)
  finally:
    for tmp in temporaries:
      if os.path.exists(tmp):
        os.remove(tmp)
  folder = os.open(export_dir, os.O_RDONLY)
  try:
    os.fsync(folder)  # The renames themselves survive a power cut.
  finally:
    os.close(folder)


def export_leader(config_or_setup: ml_collections.ConfigDict | Any, workdir: str, export_dir: str | None = None,
                  checkpoint: str = 'best') -> str:
  """Writes the deployed network (the leader for FFSD) of the best (or latest) checkpoint in `workdir` to
  `export_dir` (default workdir/export).

  Args:
    config_or_setup: the run's config, or its `run_setup.build(config)`.
    workdir: the training run's folder.
    export_dir: where to write (default: workdir/export).
    checkpoint: 'best' or 'latest'.

  Returns:
    The export folder.
  """
  # Imported here so that `load_leader` (inference) does not pull in the training stack (grain, TFDS, Orbax).
  from ffsd_jax import inference  # pylint: disable=g-import-not-at-top
  restored = inference.restore_for_inference(config_or_setup, workdir, checkpoint)
  setup, config, info = restored.setup, restored.setup.config, restored.setup.info
  export_dir = os.path.abspath(export_dir or os.path.join(workdir, 'export'))
  network = setup.deployed_network  # The leader; student_0 for 'dml', which has no leader.
  # Replicated arrays: every process holds a full copy, so read the local one (also on multi-host runs).
  leader = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)),
                        inference.deployed_variables(setup, restored.state))
  metadata = {
      'model': config.model,
      'network': network,
      'num_classes': int(info.num_classes),
      'image_size': int(info.image_size),
      'mean_std': [list(map(float, v)) for v in info.mean_std],
      'compute_dtype': config.compute_dtype,
      'dataset': config.dataset,
      'step': restored.step,
      'checkpoint': restored.checkpoint,
  }
  if jax.process_index() == 0:
    write_leader_export(export_dir, leader, metadata)
    logging.info('Exported %s (%s, method %s, step %d) to %s.', network, config.model, config.method,
                 restored.step, export_dir)
  return export_dir


def write_leader_export(export_dir: str, leader: Any, metadata: dict[str, Any]) -> str:
  """Writes an export folder from the deployed network's host variables (also used for converted checkpoints).

  Args:
    export_dir: the folder (created if needed).
    leader: the backbone's `{'params', 'batch_stats'}` as host arrays.
    metadata: `model`, `network`, `num_classes`, `image_size`, `mean_std`, `compute_dtype`, `dataset`, `step`,
      `checkpoint` and any extra keys; the checksums and the portable signature are added here.

  Returns:
    The export folder.
  """
  leader = jax.tree.map(np.asarray, leader)
  metadata = dict(metadata)
  portable, metadata['portable'] = portable_leader(leader, metadata)
  _write_export(export_dir, flax.serialization.msgpack_serialize(leader), metadata, {PORTABLE_FILE: portable})
  return export_dir


def _leader_apply(metadata: dict[str, Any]) -> Callable[[Any, jax.Array], jax.Array]:
  """`apply(variables, uint8 NHWC images) -> float32 logits` of the backbone described by export metadata."""
  dtype = jnp.dtype(metadata['compute_dtype'])
  backbone = models.create_backbone(metadata['model'], metadata['num_classes'], dtype)
  mean_std = tuple(tuple(v) for v in metadata['mean_std'])

  def apply(variables, images):
    logits, _ = backbone.apply(variables, normalize_images(images, mean_std, dtype), train=False)
    return logits.astype(jnp.float32)

  return apply


def portable_leader(variables: Any, metadata: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
  """Serializes the leader as a `jax.export` function with its weights inside, for `PORTABLE_PLATFORMS`.

  The function maps uint8 images of shape (b, H, W, 3), b symbolic (any batch size, one compilation per size), to
  float32 logits (b, K), normalising inside. Loading it needs jax and numpy only (`ffsd_jax/portable.py`, or
  `jax.export.deserialize(bytearray(blob)).call(images)`), with a jax at least as new as the exporter's.

  Args:
    variables: the backbone's `{'params', 'batch_stats'}` as host arrays.
    metadata: the export metadata (`model`, `num_classes`, `image_size`, `mean_std`, `compute_dtype`).

  Returns:
    (serialized bytes, the signature recorded under `portable` in leader.json).
  """
  apply = _leader_apply(metadata)
  size = metadata['image_size']
  # Closing over the variables makes them constants of the program: one self-contained file.
  leader = jax.jit(lambda images: apply(variables, images))
  images = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f'b, {size}, {size}, 3'), jnp.uint8)
  # Debug locations name only the innermost frame (in ffsd_jax or flax), not the caller's stack: the same checkpoint
  # then exports to the same bytes from any call site.
  full_tracebacks = jax.config.jax_include_full_tracebacks_in_locations
  jax.config.update('jax_include_full_tracebacks_in_locations', False)
  try:
    exported = jax.export.export(leader, platforms=PORTABLE_PLATFORMS)(images)
  finally:
    jax.config.update('jax_include_full_tracebacks_in_locations', full_tracebacks)
  signature = {
      'file': PORTABLE_FILE,
      'format': 'jax.export (serialized StableHLO; load with jax.export.deserialize)',
      'platforms': list(exported.platforms),
      'input': {'dtype': 'uint8', 'shape': ['b', size, size, 3]},
      'output': {'dtype': 'float32', 'shape': ['b', int(metadata['num_classes'])]},
      'calling_convention_version': int(exported.calling_convention_version),
      'jax_version': jax.__version__,
  }
  return bytes(exported.serialize()), signature


def read_export(export_dir: str) -> tuple[dict[str, Any], Any]:
  """The metadata and the variables of an export folder, after checking `leader.msgpack` against its sha256.

  Raises:
    ExportError: naming the file that is unreadable or does not match.
  """
  metadata_path, params_path = os.path.join(export_dir, METADATA_FILE), os.path.join(export_dir, PARAMS_FILE)
  reexport = 'Export the leader again (python main.py --workdir WORKDIR --mode export).'
  if not os.path.isfile(metadata_path):
    raise ExportError(
        f'{export_dir} is not an export folder: it has no {METADATA_FILE}. Write one with `python main.py --workdir '
        'WORKDIR --mode export`, or convert an official checkpoint with scripts/convert_official.py.')
  try:
    with open(metadata_path, 'rb') as f:
      metadata = json.loads(f.read())
    with open(params_path, 'rb') as f:
      params = f.read()
  except ValueError as e:
    raise ExportError(f'The export file {metadata_path} is not valid JSON ({e}). {reexport}') from None
  except OSError as e:
    raise ExportError(f'The export file {e.filename} cannot be read ({e.strerror}). {reexport}') from None
  expected = metadata.get('params_sha256')
  if expected is None:
    logging.warning('%s records no sha256 of %s (an export by an older version): loading it unverified.',
                    metadata_path, PARAMS_FILE)
  elif hashlib.sha256(params).hexdigest() != expected:
    raise ExportError(
        f'The export file {params_path} ({len(params)} bytes) does not match the sha256 recorded in {METADATA_FILE} '
        f'({metadata.get("params_bytes")} bytes): it is corrupt, or an export into {export_dir} was interrupted. '
        f'{reexport}')
  try:
    variables = flax.serialization.msgpack_restore(params)
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(f'The export file {params_path} cannot be read ({type(e).__name__}: {e}). {reexport}') from None
  return metadata, variables


def load_leader(export_dir: str) -> Callable[[Any], jax.Array]:
  """Loads an export folder; returns a jitted function from uint8 NHWC images to the leader's float32 logits.

  The function normalises the images with the dataset's mean/std and runs the leader backbone in eval mode
  (running batch-norm statistics).

  Raises:
    ExportError: `leader.msgpack` does not match the sha256 in `leader.json` (the error names the file).
  """
  metadata, variables = read_export(export_dir)
  size = metadata['image_size']
  variables = jax.device_put(variables)
  # Variables as an argument, not baked into the program as constants.
  predict = jax.jit(_leader_apply(metadata))

  def leader_logits(images) -> jax.Array:
    images = jnp.asarray(images)
    if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f'Expected uint8 images of shape (N, {size}, {size}, 3), got {images.dtype} '
                       f'{tuple(images.shape)}.')
    return predict(variables, images)

  return leader_logits
