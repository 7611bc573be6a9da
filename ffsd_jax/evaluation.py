"""Evaluation: every network's test top-1 during training, and the deployed network alone (`--mode eval`).

`run_eval(eval_fn, variables, setup)` runs a jitted eval step over the whole eval split (every example exactly once,
padded batches masked) and returns the host sums; `eval_results` turns them into percentages and mean losses.
`evaluate(config, workdir, ...)` evaluates the deployed network of a checkpoint or of an export folder and writes
`WORKDIR/eval_leader.json`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ffsd_jax import checkpointing
from ffsd_jax import data as data_lib
from ffsd_jax import errors
from ffsd_jax import export
from ffsd_jax import inference
from ffsd_jax import run_setup
from ffsd_jax import sharding
from ffsd_jax import train_step as train_step_lib

EVAL_LEADER_FILE = 'eval_leader.json'

# Jitted once at import: a jit of a fresh lambda inside the eval loop would be traced and compiled at every eval.
_add_sums = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))


def to_host(tree: Any) -> Any:
  """Fetches replicated arrays to NumPy (works on every process: it reads the local copy)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x),
                      tree)


def write_json_atomically(path: str, value: Any) -> None:
  """Writes `value` as JSON to a temporary name and renames it, so a kill or a full disk never leaves half a file."""
  checkpointing.write_file_atomically(path, json.dumps(value, indent=2).encode())


def run_eval(eval_fn: Callable[..., Any], variables: Any, setup: run_setup.RunSetup, split: str = 'test'
             ) -> dict[str, float]:
  """Runs `eval_fn(variables, batch) -> sums` over a whole split; returns the host sums.

  No progress bar: it would interleave with the log lines; the eval's result line gives its duration.

  Args:
    eval_fn: the jitted eval step.
    variables: what `eval_fn` takes first.
    setup: the run's setup.
    split: 'test' (the eval split) or 'validation' (the held-out training examples, config.
      validation_examples_per_class > 0).
  """
  sums = None
  make_batches = data_lib.create_validation_batches if split == 'validation' else data_lib.create_eval_batches
  batches = make_batches(setup.config, global_batch_size=setup.config.eval_batch_size,
                         process_index=jax.process_index(), process_count=jax.process_count())
  for local_batch in batches:
    out = eval_fn(variables, sharding.make_global_batch(local_batch, setup.mesh, sharding.eval_batch_sharding))
    sums = out if sums is None else _add_sums(sums, out)
  return {k: float(v) for k, v in to_host(sums).items()}


def eval_results(sums: dict[str, float], with_top5: bool, prefix: str = 'eval') -> dict[str, float]:
  """Top-1 (and top-5) in percent and the mean cross-entropy for every network in the eval step's sums.

  Names are '<prefix>/top1/<net>', '<prefix>/loss/<net>' (and '<prefix>/top5/<net>'): prefix 'eval' for the test
  split, 'val' for the validation split.
  """
  count = sums['count']
  results = {}
  for name, value in sums.items():
    if name.startswith('correct/'):
      results[f'{prefix}/top1/{name[len("correct/"):]}'] = 100.0 * value / count
    elif name.startswith('cross_entropy/'):
      results[f'{prefix}/loss/{name[len("cross_entropy/"):]}'] = value / count
    elif name.startswith('correct_top5/') and with_top5:
      results[f'{prefix}/top5/{name[len("correct_top5/"):]}'] = 100.0 * value / count
  return results


def _export_variables(setup: run_setup.RunSetup, export_dir: str) -> tuple[Any, int, str]:
  """The deployed network's variables from an export folder (native or converted from an official checkpoint),
  placed on the mesh, with the export's step and folder."""
  metadata, variables = export.read_export(export_dir)
  config, info = setup.config, setup.info
  saved = (metadata.get('model'), metadata.get('num_classes'), metadata.get('image_size'))
  if saved != (config.model, info.num_classes, info.image_size):
    raise export.ExportError(
        f'The export {export_dir} holds a {saved[0]} for {saved[1]} classes at {saved[2]}x{saved[2]}, but the config '
        f'asks for a {config.model} for {info.num_classes} classes at {info.image_size}x{info.image_size}; use the '
        'config the leader was trained (or converted) with.')
  variables = jax.device_put(variables, sharding.replicated_sharding(setup.mesh))
  return variables, int(metadata.get('step', 0)), os.path.abspath(export_dir)


def evaluate(config_or_setup: ml_collections.ConfigDict | run_setup.RunSetup, workdir: str, checkpoint: str = 'best',
             export_dir: str | None = None) -> dict[str, Any]:
  """Evaluates the deployed network alone from the best or latest checkpoint, or from an export folder.

  `export_dir` (e.g. a leader converted from an official checkpoint by scripts/convert_official.py) is evaluated
  with the same step and data as a checkpoint's leader. Writes `workdir/eval_leader.json` with top-1 and top-5
  (percent), the mean cross-entropy, the step and the checkpoint (or export) path.
  """
  setup = run_setup.ensure_setup(config_or_setup)
  if export_dir is None:
    restored = inference.restore_for_inference(setup, workdir, checkpoint)
    variables, step, path = inference.deployed_variables(setup, restored.state), restored.step, restored.checkpoint
  else:
    variables, step, path = _export_variables(setup, export_dir)
  config, mesh = setup.config, setup.mesh
  leader_eval = jax.jit(train_step_lib.make_leader_eval_step(config, setup.info.mean_std),
                        in_shardings=(sharding.replicated_sharding(mesh), sharding.eval_batch_sharding(mesh)),
                        out_shardings=sharding.replicated_sharding(mesh),
                        compiler_options=sharding.step_compiler_options(mesh, config))
  sums = run_eval(leader_eval, variables, setup)
  count = sums['count']
  top1 = [v for k, v in sums.items() if k == 'correct' or k.startswith('correct/')]
  top5 = [v for k, v in sums.items() if k == 'correct_top5' or k.startswith('correct_top5/')]
  loss = [v for k, v in sums.items() if k.startswith('cross_entropy/')]
  result = {'top1': 100.0 * top1[0] / count, 'top5': 100.0 * top5[0] / count if top5 else None,
            'loss': loss[0] / count, 'num_examples': int(count), 'step': int(step), 'checkpoint': path,
            'model': config.model, 'network': setup.deployed_network}
  if jax.process_index() == 0:
    # Shown before writing: a read-only workdir must not lose the result.
    logging.info('%s (%s) from %s: top-1 %.2f%%%s, loss %.4f', setup.deployed_network, config.model, path,
                 result['top1'], f', top-5 {result["top5"]:.2f}%' if top5 else '', result['loss'])
    try:
      os.makedirs(workdir, exist_ok=True)  # Evaluating an export needs no trained workdir.
      write_json_atomically(os.path.join(workdir, EVAL_LEADER_FILE), result)
    except OSError as error:
      logging.warning('Could not write %s (%s); the result is the line above.',
                      os.path.join(workdir, EVAL_LEADER_FILE), errors.describe_os_error(error))
  return result
