"""Files written whole: a failure never leaves half a file, and never a damaged earlier one."""

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


def write_json_atomic(path, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
