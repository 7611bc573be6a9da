"""FFSD in JAX: train, evaluate the leader, or export it.

  python main.py --config configs/cifar100_resnet32.py --workdir /tmp/ffsd_r32            # train (resumes if possible)
  python main.py --config configs/cifar100_resnet32.py --workdir /tmp/ffsd_r32 --mode eval [--checkpoint latest]
  python main.py --config configs/cifar100_resnet32.py --workdir /tmp/ffsd_r32 --mode export [--format pytorch]
  python main.py --config configs/cifar100_resnet32.py --workdir /tmp/eval --mode eval --export_dir DIR  # an export

A bad flag, an unknown --config.KEY, a missing config file or an invalid config value stops before anything is
compiled or written, with one line per problem on stderr and exit status 2 (ffsd_jax/config_checks.py).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ffsd_jax import config_checks
from ffsd_jax import export
from ffsd_jax import official
from ffsd_jax import run_record
from ffsd_jax import train_loop

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, metrics and exports.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'export'], 'What to do.')
_CHECKPOINT = flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'],
                                'Which checkpoint --mode eval/export reads: the best leader top-1, or the latest.')
_EXPORT_DIR = flags.DEFINE_string(
    'export_dir', None, 'Export folder: where --mode export writes (default: WORKDIR/export); with --mode eval, '
    'evaluate the leader of this export folder (e.g. one converted from an official checkpoint) instead of a '
    'checkpoint.')
_FORMAT = flags.DEFINE_enum('format', 'jax', ['jax', 'pytorch'],
                            '--mode export: jax (leader.msgpack + the portable leader.jax_export) or pytorch (the '
                            "official code's state dict of the leader and its trans-fusion head, .pth and "
                            '.safetensors, in WORKDIR/export/ or --export_dir).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(run_record.QuietOrbaxFilter())
  config = _CONFIG.value  # Loaded and validated by config_checks.parse_flags before main() runs.
  try:
    if _MODE.value == 'train':
      summary = train_loop.train_and_evaluate(config, _WORKDIR.value)
      if summary['stopped_by'] == 'SIGINT':
        sys.exit(130)  # The shell's convention for a run ended by Ctrl-C (after saving).
    elif _MODE.value == 'eval':
      train_loop.evaluate(config, _WORKDIR.value, checkpoint=_CHECKPOINT.value, export_dir=_EXPORT_DIR.value)
    elif _FORMAT.value == 'pytorch':
      official.export_official_from_workdir(
          config, _WORKDIR.value, checkpoint=_CHECKPOINT.value,
          out_path=os.path.join(_EXPORT_DIR.value, 'modelleader_best') if _EXPORT_DIR.value else None)
    else:
      export.export_leader(config, _WORKDIR.value, export_dir=_EXPORT_DIR.value, checkpoint=_CHECKPOINT.value)
  except train_loop.RUN_ERRORS + (export.ExportError, official.OfficialFormatError) as error:
    sys.exit(f'{type(error).__name__}: {error}')


if __name__ == '__main__':
  app.run(main, flags_parser=config_checks.parse_flags)
