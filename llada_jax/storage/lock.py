"""One writer per output directory: a lock file that names its holder.

A training run's workdir (and a conversion's target) is written by one program at a time. The
lock is a file created exclusively (`O_CREAT | O_EXCL`, atomic on local and network file systems)
holding the holder's host, process id and start time. A second writer is refused with that
holder named. A lock left by a process that died (same host, process gone) is stale: it is taken
over with a warning, so a run killed with `kill -9` restarts without a manual step. On a remote
(gs://) path there is no exclusive create: the lock is written and read back, which catches
runs started apart in time but not two started in the same instant.
"""

from __future__ import annotations

import json
import os
import socket
import time

from absl import logging
from etils import epath

from llada_jax.storage import remote

LOCK_NAME = ".llada_jax.lock"


class LockedError(RuntimeError):
  """Another live program holds the directory."""


def _holder() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def _describe(holder: dict) -> str:
  return f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"


class DirectoryLock:
  """`with DirectoryLock(path, what):` holds `path/.llada_jax.lock` for the block.

  `name` picks another lock file in `directory`: a tool that writes a new directory `target`
  locks `DirectoryLock(target.parent, ..., name=f".{target.name}.lock")`, so the lock never lands
  inside its output.
  """

  def __init__(self, directory, what: str = "this run", *, name: str = LOCK_NAME):
    self.directory = epath.Path(directory)
    self.path = self.directory / name
    self.what = what
    self._held = False

  @classmethod
  def for_output(cls, target, what: str) -> "DirectoryLock":
    """The lock of an output path (a directory or file a tool writes), kept beside it."""
    target = epath.Path(target)
    return cls(target.parent, what, name=f".{target.name}.lock")

  def acquire(self) -> "DirectoryLock":
    if self.path.name != LOCK_NAME and not self.directory.is_dir():
      # An output whose parent is not there yet: the tool's own checks report a bad path, and
      # nothing else can be writing beside it.
      return self
    self.directory.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # a second try after removing a stale lock
      if self._create():
        self._held = True
        return self
      holder = self._read()
      if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) and not _alive(
          holder["pid"]):
        logging.warning("%s: taking over a stale lock of %s, which no longer runs", self.path, _describe(holder))
        self.path.unlink(missing_ok=True)
        continue
      target = self.directory if self.path.name == LOCK_NAME else self.directory / self.path.name[1:-len(".lock")]
      raise LockedError(f"{target} is in use by {_describe(holder)}; expected one writer at a time "
                        f"({self.what}): wait for it to finish, use another path, or delete {self.path} if "
                        "that process is gone")
    raise LockedError(f"{self.path}: could not take the lock")

  def _create(self) -> bool:
    text = json.dumps(_holder())
    if remote.is_remote(os.fspath(self.path)):
      if self.path.exists():
        return False
      self.path.write_text(text)
      return self._read().get("pid") == os.getpid()
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True

  def _read(self) -> dict:
    try:
      holder = json.loads(self.path.read_text())
    except (OSError, ValueError):
      return {}
    return holder if isinstance(holder, dict) else {}

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    try:
      if self._read().get("pid") == os.getpid():
        self.path.unlink(missing_ok=True)
    except OSError as e:  # a directory gone read-only: the lock stays, and is stale once this process ends
      logging.warning("%s: could not remove the lock: %s", self.path, e)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
