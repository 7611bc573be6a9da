"""The config a workdir was trained with: its `config.json` over the defaults, for `--mode eval` and `--mode export`.

main.py uses it when `--config` is not given, so these two are the same command (flags still apply on top):
  python main.py --workdir runs/r32 --mode eval --config.data_dir ~/tensorflow_datasets
  python main.py --config configs/saved.py:runs/r32 --workdir runs/r32 --mode eval \
      --config.data_dir ~/tensorflow_datasets

Expected: the config of the run in runs/r32 exactly as it trained (model, method, dataset, normalisation, ...).
"""

import json
import os

from configs.default import get_config as get_default_config

CONFIG_FILE = 'config.json'  # Written by ffsd_jax.run_record.write_config at every start.


def get_config(workdir: str):
  """The defaults (every key keeps its type for `--config.KEY` overrides) updated with WORKDIR/config.json."""
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path) as f:
    saved = json.load(f)
  config = get_default_config()
  for key, value in saved.items():
    if key in config:
      is_tuple = isinstance(config[key], tuple) and isinstance(value, list)
      config[key] = tuple(value) if is_tuple else value
    else:  # A key of another version: kept as saved (validation names it if it is not understood).
      with config.unlocked():
        config[key] = value
  return config
