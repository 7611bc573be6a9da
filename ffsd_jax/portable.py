"""Loads the portable leader of an ffsd_jax export (`leader.jax_export`) with jax and numpy alone.

This file imports nothing from ffsd_jax, flax or the training stack: copy it next to your own code. The export is a
serialized `jax.export` function (StableHLO with the weights inside) from uint8 NHWC images, any batch size, to
float32 logits, normalisation included. It runs on the platforms listed in `leader.json` (`portable.platforms`:
cpu, cuda, tpu) with a jax at least as new as the one that exported it (`portable.jax_version`).

  from portable import load_portable_leader
  leader = load_portable_leader('runs/r32_ffsd/export')
  logits = leader(images)  # uint8 (N, 32, 32, 3) -> float32 (N, 100)

Without this file, the five lines that matter:

  import jax, numpy as np
  with open('runs/r32_ffsd/export/leader.jax_export', 'rb') as f:
    leader = jax.export.deserialize(bytearray(f.read()))
  logits = leader.call(np.zeros((8, 32, 32, 3), np.uint8))
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import jax
import numpy as np

PORTABLE_FILE = 'leader.jax_export'
METADATA_FILE = 'leader.json'


def load_portable_leader(path: str) -> Callable[[Any], jax.Array]:
  """Loads an export folder (or a `leader.jax_export` file); returns a jitted function from images to logits.

  In a folder, the file is checked against the sha256 that `leader.json` records, so a corrupt or half-written file
  fails here instead of giving wrong logits.

  Args:
    path: the export folder, or the `leader.jax_export` file itself (then unverified).

  Returns:
    A function from uint8 images (N, H, W, 3) to float32 logits (N, K).

  Raises:
    ValueError: the file does not match the sha256 in `leader.json`.
  """
  file_path = os.path.join(path, PORTABLE_FILE) if os.path.isdir(path) else path
  with open(file_path, 'rb') as f:
    blob = f.read()
  metadata_path = os.path.join(os.path.dirname(file_path), METADATA_FILE)
  if os.path.isdir(path) and os.path.exists(metadata_path):
    with open(metadata_path, 'rb') as f:
      expected = json.loads(f.read()).get('files', {}).get(os.path.basename(file_path), {}).get('sha256')
    if expected is not None and hashlib.sha256(blob).hexdigest() != expected:
      raise ValueError(f'{file_path} ({len(blob)} bytes) does not match the sha256 recorded in {metadata_path}: it is '
                       'corrupt or was not written completely. Export the leader again.')
  exported = jax.export.deserialize(bytearray(blob))
  expected_shape = tuple(exported.in_avals[0].shape[1:])
  call = jax.jit(exported.call)  # One compilation per batch size, as for any jitted function.

  def leader_logits(images: Any) -> jax.Array:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected_shape:
      raise ValueError(f'Expected uint8 images of shape (N, {", ".join(map(str, expected_shape))}), got '
                       f'{images.dtype} {images.shape}.')
    return call(images)

  return leader_logits
