"""Files written whole: a failure never leaves half a file, a temporary file, or a damaged earlier one."""

from __future__ import annotations

import json
import os
from typing import Any


def write_text_atomic(path, text: str) -> None:
  """Written to a temporary file beside `path` and renamed over it."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def check_output_file(path, what: str) -> None:
  """Raises ValueError unless `write_text_atomic` can write `path`, so a tool can check before its work.

  `path` must not be a directory or a special file (a pipe or device would be replaced by the
  rename), and the nearest existing directory above it (missing ones are made) must be writable.
  `what` names the path in the message, e.g. the flag that gave it.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise ValueError(f"{what} {path}: is a directory; expected a file path")
  if os.path.exists(path) and not os.path.isfile(path):
    raise ValueError(f"{what} {path}: is a special file (a pipe or device); expected a regular file path")
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent) and parent != os.path.dirname(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"{what} {path}: {parent} is a file; expected a directory to hold the output")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"{what} {path}: directory {parent} is not writable; expected a writable directory")


def write_json_atomic(path, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
