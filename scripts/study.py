"""Multi-seed studies: train methods × seeds × configs into one workdir tree, then tabulate mean ± std over seeds.

  # Train (one run after the other; rerun the same command to resume; --print only prints the commands):
  python scripts/study.py run --configs configs/cifar100_resnet32.py --methods ffsd,dml,independent --seeds 0,1,2 \
      --root runs/study --config.data_dir ~/tensorflow_datasets
  # Table of finished and running workdirs: markdown on stdout, CSV to a file:
  python scripts/study.py aggregate runs/study --csv runs/study/results.csv

Workdirs are ROOT/<config name>/<method>/seed<k>. A finished workdir (summary.json with step == total_steps, not
preempted) is skipped; any other is resumed by main.py. `--config.KEY=VALUE` overrides go to every run (not method
or seed: the study sets them). The logic lives in ffsd_jax/studies.py.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from ffsd_jax import methods  # pylint: disable=g-import-not-at-top,wrong-import-position
from ffsd_jax import studies  # pylint: disable=g-import-not-at-top,wrong-import-position


def _short_path(path: str) -> str:
  """`path` relative to the current folder when it lies inside it (readable printed commands)."""
  relative = os.path.relpath(path)
  return path if relative.startswith('..') else relative


def _joined_overrides(extra: list[str]) -> list[str]:
  """`--config.KEY VALUE` pairs as `--config.KEY=VALUE` (main.py accepts both; the study passes one form)."""
  overrides, i = [], 0
  while i < len(extra):
    if '=' not in extra[i] and i + 1 < len(extra) and not extra[i + 1].startswith('--'):
      overrides.append(f'{extra[i]}={extra[i + 1]}')
      i += 2
    else:
      overrides.append(extra[i])
      i += 1
  return overrides


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
  overrides = _joined_overrides(overrides)
  studies.check_overrides(overrides)
  for path in args.configs:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: no such config file.')
  seeds = [int(s) for s in args.seeds.split(',') if s]
  method_names = [m for m in args.methods.split(',') if m]
  runs = studies.plan_study(args.configs, method_names, seeds, args.root)
  python, main_py = _short_path(sys.executable), _short_path(os.path.join(REPO_ROOT, 'main.py'))
  if args.print:
    for run in runs:
      status = studies.workdir_status(run.workdir)
      prefix = '# finished: ' if status == studies.FINISHED else ''
      print(prefix + shlex.join(run.command(overrides, python=python, main_py=main_py)))
    return 0
  outcome = studies.run_study(runs, overrides, python=python, main_py=main_py,
                              log=lambda line: print(line, flush=True))
  print(f'study: {len(outcome["done"])} ran, {len(outcome["skipped"])} already finished, '
        f'{len(outcome["failed"])} failed, {len(outcome["not_started"])} not started.')
  for run in outcome['failed']:
    print(f'  failed: {run.workdir}')
  return 1 if outcome['failed'] or outcome['not_started'] else 0


def _aggregate(args: argparse.Namespace) -> int:
  rows = studies.aggregate(studies.collect_runs(args.paths), finished_only=args.finished_only)
  print(studies.markdown_tables(rows), end='')
  if args.csv:
    print(f'\nCSV: {studies.write_csv(rows, args.csv)}')
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)
  commands = parser.add_subparsers(dest='command', required=True)
  run = commands.add_parser('run', allow_abbrev=False, help='train (or --print the commands of) a study',
                            description='Unknown --config.KEY=VALUE arguments are passed to every main.py run.')
  run.add_argument('--configs', nargs='+', required=True, help='config files (configs/*.py)')
  run.add_argument('--methods', default=','.join(methods.method_names()),
                   help='comma-separated methods (default: every registered method)')
  run.add_argument('--seeds', default='0,1,2', help='comma-separated seeds')
  run.add_argument('--root', required=True, help='study root: ROOT/<config name>/<method>/seed<k>')
  run.add_argument('--print', action='store_true', help='print the commands instead of running them')
  table = commands.add_parser('aggregate', allow_abbrev=False, help='tabulate the runs under study roots or workdirs')
  table.add_argument('paths', nargs='+', help='study roots or workdirs; label=path sets the method of its runs')
  table.add_argument('--csv', help='also write the table to this CSV file')
  table.add_argument('--finished_only', action='store_true', help='leave out runs that are not finished')
  args, extra = parser.parse_known_args(argv)
  if extra and args.command != 'run':
    parser.error(f'unrecognized arguments: {" ".join(extra)}')
  try:
    return _run(args, extra) if args.command == 'run' else _aggregate(args)
  except (ValueError, FileNotFoundError) as error:
    print(f'{type(error).__name__}: {error}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
