"""Every experiment config loads, names a valid model, and accepts command-line overrides of its optional keys."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from ffsd_jax import methods, models

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# configs/saved.py reads a workdir's config.json (it takes the workdir): tested in test_run_edges.py.
CONFIGS = sorted(p for p in (REPO_ROOT / 'configs').glob('*.py') if p.name not in ('__init__.py', 'saved.py'))


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_loads_with_a_valid_model(path):
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', str(path), flag_values=flag_values, lock_config=True)
  flag_values(['prog'])
  config = flag_values.config
  spec = models.get_spec(config.model)
  assert config.method in methods.method_names()
  assert config.image_size == spec.input_size or config.dataset == 'synthetic'
  assert config.num_classes == {'cifar100': 100, 'cifar10': 10, 'imagenet2012': 1000}.get(config.dataset,
                                                                                          config.num_classes)


def test_optional_keys_can_be_set_from_the_command_line(tmp_path):
  """Keys that default to None are typed placeholders, so `--config.KEY=VALUE` parses (a plain None would not)."""
  overrides = ['--config.data_dir=/data/tfds', '--config.image_folder=/data/folder', '--config.tfds_name=cifar10_jpeg',
               '--config.normalization=cifar10', '--config.data_cache_dir=/cache', '--config.eval_resize_size=36']
  result = subprocess.run(
      [sys.executable, 'main.py', '--config', 'configs/smoke.py', '--workdir', str(tmp_path / 'run'), '--mode',
       'eval', *overrides], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  # The flags parse; evaluation then stops because the workdir holds no checkpoint.
  assert 'Flags parsing error' not in result.stderr, result.stderr[-2000:]
  assert result.returncode != 0 and 'checkpoint' in result.stderr.lower(), result.stderr[-2000:]
