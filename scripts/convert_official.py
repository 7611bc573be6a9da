"""Converts official FFSD (SJLeo/FFSD, PyTorch) leader checkpoints to ffsd_jax exports, and back.

Official -> ffsd_jax (writes the folder `--mode export` writes; `load_leader(DIR)` and evaluation work on it):
  python scripts/convert_official.py --config configs/cifar100_resnet32.py --checkpoint modelleader_best.pth --out DIR

ffsd_jax -> official (writes OUT.pth and OUT.safetensors, the official trainer's {'weight', 'epoch', 'cfg', 'index'}):
  python scripts/convert_official.py --to_official --workdir runs/r32 --out OUT   # the config runs/r32 trained with
  python scripts/convert_official.py --to_official --export DIR --out OUT   # backbone only: an export has no head

Neither direction needs torch. Override config keys as for main.py (e.g. --config.num_classes=10). On success it prints
one line naming what it wrote. Nothing is written when anything fails; the error, one line on stderr, names the key,
the global or the file at fault (exit status 2 for a bad command line or config, 1 otherwise; --verbosity=1 adds the
traceback).
"""

from __future__ import annotations

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ffsd_jax import config_checks  # pylint: disable=g-import-not-at-top,wrong-import-position
from ffsd_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from ffsd_jax import official  # pylint: disable=g-import-not-at-top,wrong-import-position
from ffsd_jax import run_record  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', lock_config=True)
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Official checkpoint (.pth or .safetensors) to convert.')
_OUT = flags.DEFINE_string('out', None, 'Output: an export folder, or with --to_official the base path OUT.')
_TO_OFFICIAL = flags.DEFINE_bool('to_official', False, 'Convert a project checkpoint or export to the official format.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'With --to_official: a training workdir (leader + trans-fusion head).')
_EXPORT = flags.DEFINE_string('export', None, 'With --to_official: a project export folder (backbone only).')
_WHICH = flags.DEFINE_enum('which', 'best', ['best', 'latest'], 'With --workdir: which checkpoint.')


_SAVED_CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'saved.py')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flags; with a --config, main.py's checks of it. Every failure is one line on stderr and exit status 2.

  `--to_official --workdir W` without --config reads the config the run trained with (W/config.json).
  """
  workdir = config_checks.flag_value(argv, 'workdir')
  if config_checks.flag_value(argv, 'config') is None and workdir and '--to_official' in argv:
    argv = argv[:1] + [config_checks.saved_config_flag(workdir, _SAVED_CONFIG_FILE)] + argv[1:]
  if any(re.match(r'-{1,2}config([=.]|$)', arg) for arg in argv[1:]):
    return config_checks.parse_flags(argv)
  # No config (--to_official --export needs none): config_checks would refuse its absence, so absl parses alone.
  with errors.report_errors():
    try:
      return flags.FLAGS(list(argv))
    except flags.Error as error:
      raise errors.UsageError(f'Flags parsing error: {error}') from error


def convert() -> str:
  """Runs the conversion the flags ask for; returns the line to print: what was written."""
  if not _OUT.value:
    raise errors.UsageError('--out is required.')
  if not _TO_OFFICIAL.value:
    if not _CHECKPOINT.value or _CONFIG.value is None:
      raise errors.UsageError('--checkpoint and --config are required (or pass --to_official).')
    out = official.convert_official_to_export(_CHECKPOINT.value, _CONFIG.value, _OUT.value)
    return f'Wrote the export {out} (from the official checkpoint {_CHECKPOINT.value}).'
  if bool(_WORKDIR.value) == bool(_EXPORT.value):
    raise errors.UsageError('--to_official needs exactly one of --workdir or --export.')
  if _EXPORT.value:
    written = official.export_official_from_export(_EXPORT.value, _OUT.value)
    source = f'the export {_EXPORT.value}'
  else:
    written = official.export_official_from_workdir(_CONFIG.value, _WORKDIR.value, _OUT.value, _WHICH.value)
    source = f'the {_WHICH.value} checkpoint of {_WORKDIR.value}'
  return f'Wrote the official checkpoint {", ".join(written)} (from {source}).'


def main(argv: list[str]) -> None:
  del argv
  if not flags.FLAGS['verbosity'].present:
    # The line printed below is the report: the library's INFO lines (about 30 of Orbax's per restore, the export's
    # own "Wrote ...") would repeat it. Warnings and errors still show; --verbosity=0 brings the INFO lines back.
    logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().addFilter(run_record.QuietOrbaxFilter())
  with errors.report_errors(verbose=flags.FLAGS.verbosity >= 1):
    print(convert())


if __name__ == '__main__':
  run_record.quiet_startup_noise()
  app.run(main, flags_parser=parse_flags)
