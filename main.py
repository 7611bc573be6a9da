"""FFSD in JAX: train, evaluate the deployed network (the leader), or export it.

  python main.py --config configs/cifar100_resnet32.py --workdir /tmp/ffsd_r32            # train (resumes if possible)
  python main.py --workdir /tmp/ffsd_r32 --mode eval [--checkpoint latest]                 # the workdir's own config
  python main.py --workdir /tmp/ffsd_r32 --mode export [--format pytorch]
  python main.py --config configs/cifar100_resnet32.py --workdir /tmp/eval --mode eval --export_dir DIR  # an export

`--mode eval/export` read the config the run trained with (WORKDIR/config.json, through configs/saved.py) when no
--config is given; --config.KEY=VALUE flags apply on top. A bad flag, an unknown --config.KEY, a missing config file
or an invalid config value stops before anything is compiled or written, with one line per problem on stderr and exit
status 2 (ffsd_jax/config_checks.py); every other error a user can fix (data, workdir, checkpoints) is one line with
exit status 1, the traceback only with --verbosity=1 (ffsd_jax/errors.py). Ctrl-C saves and exits with 130.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ffsd_jax import config_checks
from ffsd_jax import errors
from ffsd_jax import evaluation
from ffsd_jax import export
from ffsd_jax import official
from ffsd_jax import run_record
from ffsd_jax import run_setup
from ffsd_jax import train_loop

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py); for --mode eval/export the default is the config the '
    'workdir was trained with (configs/saved.py:WORKDIR).', lock_config=True)
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
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  verbose = flags.FLAGS.verbosity >= 1
  logging.set_verbosity(max(flags.FLAGS.verbosity, logging.INFO))
  logging.get_absl_handler().addFilter(run_record.QuietOrbaxFilter(verbose))
  config = _CONFIG.value  # Loaded and validated by _parse_flags before main() runs.
  workdir, mode = _WORKDIR.value, _MODE.value
  with errors.report_errors(verbose):
    setup = run_setup.build(config)  # The config resolved once; the method object and dataset built once.
    if mode == 'train':
      summary = train_loop.train_and_evaluate(setup, workdir)
      if summary['stopped_by'] == 'SIGINT':
        sys.exit(errors.EXIT_SIGINT)  # The shell's convention for a run ended by Ctrl-C (after saving).
    elif mode == 'eval':
      evaluation.evaluate(setup, workdir, checkpoint=_CHECKPOINT.value, export_dir=_EXPORT_DIR.value)
    elif _FORMAT.value == 'pytorch':
      official.export_official_from_workdir(
          setup, workdir, checkpoint=_CHECKPOINT.value,
          out_path=os.path.join(_EXPORT_DIR.value, 'modelleader_best') if _EXPORT_DIR.value else None)
    else:
      export.export_leader(setup, workdir, export_dir=_EXPORT_DIR.value, checkpoint=_CHECKPOINT.value)


def _parse_flags(argv: list[str]) -> list[str]:
  """config_checks.parse_flags, with the workdir's own config for --mode eval/export when --config is not given."""
  return config_checks.parse_flags(config_checks.with_saved_config(
      argv, saved_config_file=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'saved.py')))


if __name__ == '__main__':
  run_record.quiet_startup_noise()  # Before JAX probes its backends (the flags parser may already start them).
  app.run(main, flags_parser=_parse_flags)
