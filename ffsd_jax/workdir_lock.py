"""One writer per workdir: an exclusive lock file held for the whole training run.

`WORKDIR/ffsd.lock` holds the holder's host, PID, process start time, command and start time. It is created
atomically (a complete temporary file hard-linked to the lock name, which fails if the name exists, also on NFS), so a
reader never sees half a lock. While the run lives, a heartbeat thread touches the file every `HEARTBEAT_SECONDS`.

A lock is stale, and is taken over with a warning, when
- its holder ran on this host and that process is gone (or the PID now belongs to a process started at another
  time), or
- its heartbeat is older than `stale_after_seconds` (a holder on another host that died without cleaning up).
Otherwise the second run refuses at once with `WorkdirLockedError` naming the holder. Reading a workdir
(`--mode eval/export`) takes no lock.

Only the writing process takes the lock (process 0 on multi-host runs, on the shared file system).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
from typing import Any

from absl import logging

from ffsd_jax import errors

LOCK_FILE = 'ffsd.lock'
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 600.0


class WorkdirLockedError(errors.UserError, RuntimeError):
  """Another live run holds the workdir."""


def _process_start_ticks(pid: int) -> int | None:
  """The start time of `pid` in clock ticks since boot (Linux), to tell a live holder from a reused PID."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      # The command name (field 2) may hold spaces and parentheses: split after its closing parenthesis.
      fields = f.read().rsplit(')', 1)[1].split()
    return int(fields[19])  # Field 22 of stat(5); fields[0] is field 3.
  except (OSError, IndexError, ValueError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Exists, owned by another user.
  return True


def _describe(holder: dict[str, Any]) -> str:
  command = ' '.join(holder.get('command', [])) or '?'
  return (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}, "
          f'command: {command}')


class WorkdirLock:
  """The exclusive writer lock of a workdir. Use as a context manager, or `acquire()` / `release()`."""

  def __init__(self, workdir: str, *, stale_after_seconds: float = STALE_AFTER_SECONDS,
               heartbeat_seconds: float = HEARTBEAT_SECONDS):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self._stale_after = stale_after_seconds
    self._heartbeat_seconds = heartbeat_seconds
    self._identity = {
        'host': socket.gethostname(), 'pid': os.getpid(), 'pid_start_ticks': _process_start_ticks(os.getpid()),
        'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'), 'command': list(sys.argv)}
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None
    self._held = False
    self._created_workdir = False

  def _read_holder(self) -> dict[str, Any] | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # Unreadable: judged by its age alone.

  def _stale_reason(self, holder: dict[str, Any]) -> str | None:
    """Why the lock of `holder` is stale, or None when its holder may still be running."""
    if holder.get('host') == socket.gethostname() and isinstance(holder.get('pid'), int):
      pid = holder['pid']
      if not _pid_alive(pid):
        return f'its process {pid} on this host is gone'
      ticks = _process_start_ticks(pid)
      if ticks is not None and holder.get('pid_start_ticks') is not None and ticks != holder['pid_start_ticks']:
        return f'PID {pid} now belongs to another process'
      return None
    try:
      age = time.time() - os.stat(self.path).st_mtime
    except FileNotFoundError:
      return 'it was just released'
    if age > self._stale_after:
      return f'its heartbeat is {age:.0f} s old (limit {self._stale_after:.0f} s)'
    return None

  def _try_create(self) -> bool:
    """Creates the lock file atomically with our identity; False if it exists."""
    tmp = f'{self.path}.{socket.gethostname()}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      json.dump(self._identity, f)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    finally:
      os.remove(tmp)

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock, taking over a stale one; raises `WorkdirLockedError` when a live run holds it."""
    workdir = os.path.dirname(self.path)
    if not os.path.isdir(workdir):
      os.makedirs(workdir, exist_ok=True)
      self._created_workdir = True
    for _ in range(3):
      if self._try_create():
        self._held = True
        self._start_heartbeat()
        return self
      holder = self._read_holder()
      if holder is None:
        continue  # Released between our attempt and the read: try again.
      reason = self._stale_reason(holder)
      if reason is None:
        raise WorkdirLockedError(
            f'The workdir {os.path.dirname(self.path)} is in use by another run ({_describe(holder)}). Wait for it '
            'to finish or stop it (SIGTERM or Ctrl-C saves a checkpoint), or use another --workdir. If that run is '
            f'known to be dead (e.g. its machine is gone), delete {self.path} and rerun.')
      # Move the stale lock aside under a unique name; of two processes taking over, only one rename succeeds.
      aside = f'{self.path}.stale.{socket.gethostname()}.{os.getpid()}'
      try:
        os.rename(self.path, aside)
      except FileNotFoundError:
        continue
      with open(aside) as f:
        moved = f.read()
      if holder and json.loads(moved or '{}') != holder:
        # Another process replaced the stale lock with a live one in between: put it back and refuse.
        try:
          os.link(aside, self.path)
        finally:
          os.remove(aside)
        raise WorkdirLockedError(f'The workdir {os.path.dirname(self.path)} was just taken by another run.')
      os.remove(aside)
      logging.warning('Took over the stale lock of %s (%s): %s.', os.path.dirname(self.path), _describe(holder),
                      reason)
    raise WorkdirLockedError(f'Could not take the lock {self.path}; another run keeps taking it.')

  def _start_heartbeat(self) -> None:
    def beat():
      while not self._stop.wait(self._heartbeat_seconds):
        try:
          os.utime(self.path)
        except OSError as error:  # A full or flaky disk must not kill the run; the next beat tries again.
          logging.warning('Cannot refresh the workdir lock %s: %s', self.path, error)

    self._heartbeat = threading.Thread(target=beat, name='ffsd-workdir-lock', daemon=True)
    self._heartbeat.start()

  def release(self) -> None:
    """Stops the heartbeat; removes the lock file if it is still ours, and the workdir if it made it and it is empty."""
    if not self._held:
      return
    self._stop.set()
    if self._heartbeat is not None:
      self._heartbeat.join()
    if self._read_holder() == self._identity:
      os.remove(self.path)
    self._held = False
    if self._created_workdir:
      try:
        os.rmdir(os.path.dirname(self.path))  # Only when empty: a run that failed before writing leaves no folder.
      except OSError:
        pass

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()
