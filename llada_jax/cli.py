"""What the command-line tools share: how a user's mistake is reported, and files written whole."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from llada_jax.data.errors import DataError

# Mistakes in a user's input or flags: reported in one line, exit status 1, no traceback.
USER_ERRORS = (DataError, ValueError, FileNotFoundError, NotImplementedError)


def fail(error: Exception) -> int:
  print(f"error: {error}", file=sys.stderr)
  return 1


def write_text_atomic(path, text: str) -> None:
  """Written to a temporary file and renamed: a failure never leaves half a file."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json_atomic(path, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
