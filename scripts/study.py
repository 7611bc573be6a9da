"""Multi-seed studies: train methods × seeds × configs into one workdir tree, then tabulate mean ± std over seeds.

  # Train (one run after the other; rerun the same command to resume; --print only prints the commands):
  python scripts/study.py run --configs configs/cifar100_resnet32.py --methods ffsd,dml,independent --seeds 0,1,2 \
      --root runs/study --config.data_dir ~/tensorflow_datasets
  # Table of finished and running workdirs: markdown on stdout, CSV to a file:
  python scripts/study.py aggregate runs/study --csv runs/study/results.csv

Workdirs are ROOT/<config name>/<method>/seed<k>. A finished workdir (summary.json with step == total_steps, not
preempted) is skipped; any other is resumed by main.py. `--config.KEY=VALUE` overrides go to every run (not method
or seed: the study sets them). A run stopped by Ctrl-C or a preemption is "stopped (resumable)" and stops the
study (after Ctrl-C with exit status 130); rerun the same command to resume. In the tables, – is a value that does
not exist yet (no evaluation) and (n=k) a mean over only the k seeds that have one. An error is one line on stderr
(--verbosity=1 adds the traceback). The logic lives in ffsd_jax/studies.py.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from ffsd_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from ffsd_jax import methods  # pylint: disable=g-import-not-at-top,wrong-import-position
from ffsd_jax import studies  # pylint: disable=g-import-not-at-top,wrong-import-position

MAIN_PY = os.path.join(REPO_ROOT, 'main.py')  # The training entry point every run of a study calls.


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


def _parse_seeds(text: str) -> list[int]:
  try:
    return [int(s) for s in text.split(',') if s.strip()]
  except ValueError:
    raise studies.StudyError(f'--seeds {text!r}: not comma-separated integers; write e.g. --seeds 0,1,2.') from None


def _check_methods(method_names: list[str]) -> None:
  unknown = [m for m in method_names if m not in methods.method_names()]
  if unknown or not method_names:
    raise studies.StudyError(f'--methods: {"unknown method " + ", ".join(unknown) if unknown else "none given"}; '
                             f'choose from {",".join(methods.method_names())}.')


def _final_line(outcome: studies.StudyOutcome) -> str:
  return (f'{len(outcome.done)} ran, {len(outcome.skipped)} already finished, {len(outcome.stopped)} stopped '
          f'(resumable), {len(outcome.failed)} failed, {len(outcome.not_started)} not started')


def _stopped_by_ctrl_c(counts: str = '') -> int:
  """The one line that ends a study stopped by Ctrl-C (on stderr); returns its exit status, 130."""
  print(f'study stopped by Ctrl-C{counts}; rerun the same command to resume: finished runs are skipped, stopped '
        'ones resume from their last checkpoint.', file=sys.stderr, flush=True)
  return errors.EXIT_SIGINT


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
  overrides = _joined_overrides(overrides)
  studies.check_overrides(overrides)
  for path in args.configs:
    if not os.path.isfile(path):
      raise studies.StudyError(f'{path}: no such config file; give configs/*.py files to --configs.')
  seeds = _parse_seeds(args.seeds)
  method_names = [m for m in args.methods.split(',') if m]
  _check_methods(method_names)
  runs = studies.plan_study(args.configs, method_names, seeds, args.root)
  python, main_py = _short_path(sys.executable), _short_path(MAIN_PY)
  if args.print:
    for run in runs:
      status = studies.workdir_status(run.workdir)
      prefix = '# finished: ' if status == studies.FINISHED else ''
      print(prefix + shlex.join(run.command(overrides, python=python, main_py=main_py)))
    return 0
  outcome = studies.run_study(runs, overrides, python=python, main_py=main_py, call=studies.call_main,
                              log=lambda line: print(line, flush=True))
  if outcome.interrupted:
    return _stopped_by_ctrl_c(f' ({_final_line(outcome)})')
  print(f'study: {_final_line(outcome)}.')
  for run in outcome.stopped:
    print(f'  stopped (resumable): {run.workdir}')
  for run in outcome.failed:
    print(f'  failed: {run.workdir}')
  return 1 if outcome.failed or outcome.stopped or outcome.not_started else 0


def _aggregate(args: argparse.Namespace) -> int:
  rows = studies.aggregate(studies.collect_runs(args.paths), finished_only=args.finished_only)
  print(studies.markdown_tables(rows), end='')
  if args.csv:
    print(f'\nCSV: {studies.write_csv(rows, args.csv)}')
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs `study.py run` or `study.py aggregate`; returns the exit status (a user error exits with one line)."""
  parser = studies.ArgumentParser(prog=os.path.basename(__file__), description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
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
  for command in (run, table):
    command.add_argument('--verbosity', type=int, default=0, help='1: show the traceback of an error too')
  args, extra = parser.parse_known_args(argv)
  if extra and args.command != 'run':
    parser.error(f'unrecognized arguments: {" ".join(extra)}')
  with errors.report_errors(verbose=args.verbosity >= 1):
    if args.command == 'aggregate':
      return _aggregate(args)
    try:
      return _run(args, extra)
    except KeyboardInterrupt:
      return _stopped_by_ctrl_c()  # Ctrl-C while this process had the terminal: between runs, or while planning.


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
