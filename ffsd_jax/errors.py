"""Errors a researcher can fix, and how the command-line entry points report them: one line, no traceback.

Every error whose message names the problem and the fix derives from `UserError` (a bad config, an unreadable
dataset, a corrupt checkpoint, a held workdir, ...). `main.py` and every `scripts/*.py` run their work under
`report_errors`, which prints such an error (and an `OSError` naming a path: a read-only or full folder, a file where a
folder should be) as one line on stderr and exits with the error's status; `--verbosity=1` shows the traceback too.
Anything else is a bug and keeps its traceback.

This module imports nothing of ffsd_jax, so every module can use it.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from typing import Iterator

# Exit statuses of main.py and the scripts (documented in docs/reliability.md).
EXIT_FAILURE = 1  # A run that cannot go on: bad data, a corrupt checkpoint, a held workdir, a full disk, ...
EXIT_USAGE = 2  # A bad command line or config value: nothing was compiled or written.
EXIT_SIGINT = 130  # Stopped by Ctrl-C after saving (the shell's convention).


class UserError(Exception):
  """An error whose message says what is wrong and how to fix it; reported as one line, without a traceback."""

  exit_code = EXIT_FAILURE


class UsageError(UserError):
  """A bad command line (a missing or contradictory flag): nothing was read or written."""

  exit_code = EXIT_USAGE


class DataError(UserError, ValueError):
  """A dataset that cannot be read as configured: missing or unprepared, bad images, a class mismatch."""


class WorkdirError(UserError, OSError):
  """A workdir that cannot be used: a file, read-only, or on a full disk."""


def one_line(text: object) -> str:
  """`text` with every run of white space (newlines included) folded into one space."""
  return ' '.join(str(text).split())


def describe_os_error(error: OSError, path: str | None = None) -> str:
  """One line for an OSError, naming the path (`path`, else the error's own) and, for the common cases, the fix."""
  path = path if path is not None else (error.filename if error.filename is not None else '')
  reason = error.strerror or one_line(error)
  advice = {
      errno.EACCES: 'make it writable or choose another folder',
      errno.EROFS: 'the file system is read-only: choose another folder',
      errno.ENOSPC: 'free some space or choose another folder, then rerun the same command to resume',
      errno.EDQUOT: 'free some space or choose another folder, then rerun the same command to resume',
      errno.ENOTDIR: 'a file stands where a folder is needed: move it away or choose another folder',
      errno.EEXIST: 'a file stands where a folder is needed: move it away or choose another folder',
  }.get(error.errno)
  where = f' ({path})' if path else ''
  return f'{reason}{where}' + (f'; {advice}.' if advice else '.')


def is_reportable(error: BaseException) -> bool:
  """Whether `error` is reported as one line: a `UserError`, or an `OSError` about a path."""
  return isinstance(error, UserError) or (isinstance(error, OSError) and error.filename is not None)


def format_error(error: BaseException) -> str:
  """The one line shown for a reportable error: 'TypeName: message'."""
  if isinstance(error, OSError) and not isinstance(error, UserError):
    return f'{type(error).__name__}: {describe_os_error(error)}'
  return f'{type(error).__name__}: {one_line(error)}'


def exit_code(error: BaseException) -> int:
  """The process exit status for `error` (its class's `exit_code`; 1 for an OSError)."""
  return getattr(error, 'exit_code', EXIT_FAILURE)


def verbose_from_argv(argv: list[str] | None = None) -> bool:
  """Whether the command line asks for tracebacks: --verbosity=N or -v N with N >= 1 (absl's flag)."""
  argv = sys.argv if argv is None else argv
  for i, arg in enumerate(argv):
    value = None
    if arg.startswith(('--verbosity=', '-verbosity=', '-v=')):
      value = arg.split('=', 1)[1]
    elif arg in ('--verbosity', '-verbosity', '-v') and i + 1 < len(argv):
      value = argv[i + 1]
    if value is not None:
      try:
        return int(value) >= 1
      except ValueError:
        return False
  return False


@contextlib.contextmanager
def report_errors(verbose: bool | None = None) -> Iterator[None]:
  """Runs the body; a reportable error becomes one line on stderr and `sys.exit` with its status.

  Args:
    verbose: show the traceback as well (default: `--verbosity` >= 1 on the command line).
  """
  try:
    yield
  except (UserError, OSError) as error:
    if not is_reportable(error):
      raise
    if verbose if verbose is not None else verbose_from_argv():
      import traceback  # pylint: disable=g-import-not-at-top
      traceback.print_exc()
    sys.stderr.write(format_error(error) + '\n')
    sys.stderr.flush()
    sys.exit(exit_code(error))
