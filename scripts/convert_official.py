"""Converts official FFSD (SJLeo/FFSD, PyTorch) leader checkpoints to ffsd_jax exports, and back.

Official -> ffsd_jax (writes the folder `--mode export` writes; `load_leader(DIR)` and evaluation work on it):
  python scripts/convert_official.py --config configs/cifar100_resnet32.py --checkpoint modelleader_best.pth --out DIR

ffsd_jax -> official (writes OUT.pth and OUT.safetensors, the official trainer's {'weight', 'epoch', 'cfg', 'index'}):
  python scripts/convert_official.py --to_official --config configs/cifar100_resnet32.py --workdir runs/r32 --out OUT
  python scripts/convert_official.py --to_official --export DIR --out OUT   # backbone only: an export has no head

Neither direction needs torch. Override config keys as for main.py (e.g. --config.num_classes=10). Nothing is written
when anything fails; the error names the key, the global or the file at fault.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ffsd_jax import official  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', lock_config=True)
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Official checkpoint (.pth or .safetensors) to convert.')
_OUT = flags.DEFINE_string('out', None, 'Output: an export folder, or with --to_official the base path OUT.')
_TO_OFFICIAL = flags.DEFINE_bool('to_official', False, 'Convert a project checkpoint or export to the official format.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'With --to_official: a training workdir (leader + trans-fusion head).')
_EXPORT = flags.DEFINE_string('export', None, 'With --to_official: a project export folder (backbone only).')
_WHICH = flags.DEFINE_enum('which', 'best', ['best', 'latest'], 'With --workdir: which checkpoint.')


def main(argv):
  del argv
  if not _OUT.value:
    raise app.UsageError('--out is required.')
  try:
    if _TO_OFFICIAL.value:
      if bool(_WORKDIR.value) == bool(_EXPORT.value):
        raise app.UsageError('--to_official needs exactly one of --workdir (with --config) or --export.')
      if _EXPORT.value:
        written = official.export_official_from_export(_EXPORT.value, _OUT.value)
      else:
        if _CONFIG.value is None:
          raise app.UsageError('--workdir needs --config.')
        written = official.export_official_from_workdir(_CONFIG.value, _WORKDIR.value, _OUT.value, _WHICH.value)
      print('Wrote ' + ', '.join(written))
    else:
      if not _CHECKPOINT.value or _CONFIG.value is None:
        raise app.UsageError('--checkpoint and --config are required (or pass --to_official).')
      out = official.convert_official_to_export(_CHECKPOINT.value, _CONFIG.value, _OUT.value)
      print(f'Wrote {out}')
  except (official.OfficialFormatError, FileNotFoundError, IsADirectoryError) as e:
    print(f'convert_official: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
