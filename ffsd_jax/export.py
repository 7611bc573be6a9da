"""Exporting the leader alone (the deployed network, reference §10) and loading it back in one call.

An export folder holds `leader.msgpack` (the leader backbone's `params` and `batch_stats`, no trans-fusion head,
serialised with `flax.serialization`) and `leader.json` (architecture name, number of classes, image size,
normalisation, compute dtype, the step and the checkpoint it came from).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from absl import logging
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ffsd_jax import models
from ffsd_jax.data.normalization import normalize_images

PARAMS_FILE = 'leader.msgpack'
METADATA_FILE = 'leader.json'


def export_leader(config: ml_collections.ConfigDict, workdir: str, export_dir: str | None = None,
                  checkpoint: str = 'best') -> str:
  """Writes the leader of the best (or latest) checkpoint in `workdir` to `export_dir` (default workdir/export).

  Returns:
    The export folder.
  """
  # Imported here so that `load_leader` (inference) does not pull in the training stack (grain, TFDS, Orbax).
  from ffsd_jax import train_loop  # pylint: disable=g-import-not-at-top
  state, step, path, _, info = train_loop.restore_for_inference(config, workdir, checkpoint)
  export_dir = os.path.abspath(export_dir or os.path.join(workdir, 'export'))
  network = train_loop.deployed_network(config)  # The leader; student_0 for 'dml', which has no leader.
  # Replicated arrays: every process holds a full copy, so read the local one (also on multi-host runs).
  leader = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), train_loop.deployed_variables(state, config))
  metadata = {
      'model': config.model,
      'network': network,
      'num_classes': int(info.num_classes),
      'image_size': int(info.image_size),
      'mean_std': [list(map(float, v)) for v in info.mean_std],
      'compute_dtype': config.compute_dtype,
      'dataset': config.dataset,
      'step': int(step),
      'checkpoint': path,
  }
  if jax.process_index() == 0:
    os.makedirs(export_dir, exist_ok=True)
    with open(os.path.join(export_dir, PARAMS_FILE), 'wb') as f:
      f.write(flax.serialization.msgpack_serialize(leader))
    with open(os.path.join(export_dir, METADATA_FILE), 'w') as f:
      json.dump(metadata, f, indent=2)
    logging.info('Exported the leader (%s, step %d) to %s.', config.model, step, export_dir)
  return export_dir


def load_leader(export_dir: str) -> Callable[[Any], jax.Array]:
  """Loads an export folder; returns a jitted function from uint8 NHWC images to the leader's float32 logits.

  The function normalises the images with the dataset's mean/std and runs the leader backbone in eval mode
  (running batch-norm statistics).
  """
  with open(os.path.join(export_dir, METADATA_FILE)) as f:
    metadata = json.load(f)
  with open(os.path.join(export_dir, PARAMS_FILE), 'rb') as f:
    variables = flax.serialization.msgpack_restore(f.read())
  dtype = jnp.dtype(metadata['compute_dtype'])
  backbone = models.create_backbone(metadata['model'], metadata['num_classes'], dtype)
  mean_std = tuple(tuple(v) for v in metadata['mean_std'])
  size = metadata['image_size']
  variables = jax.device_put(variables)

  @jax.jit
  def predict(variables, images):  # Variables as an argument, not baked into the program as constants.
    logits, _ = backbone.apply(variables, normalize_images(images, mean_std, dtype), train=False)
    return logits.astype(jnp.float32)

  def leader_logits(images) -> jax.Array:
    images = jnp.asarray(images)
    if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f'Expected uint8 images of shape (N, {size}, {size}, 3), got {images.dtype} '
                       f'{tuple(images.shape)}.')
    return predict(variables, images)

  return leader_logits
