"""Remote (gs://) paths. Checkpoints and data files go through etils.epath; the tokenizer libraries
and the metric writer need local files, so those are copied down (`local_copy`) or mirrored up
(`storage.mirrored_writer`)."""

from __future__ import annotations

import hashlib
import os
import tempfile

from etils import epath


def is_remote(path) -> bool:
  return "://" in os.fspath(path)


def local_cache(kind: str, remote: str) -> str:
  return os.path.join(tempfile.gettempdir(), "llada_jax", kind, hashlib.sha256(remote.encode()).hexdigest()[:16])


def local_copy(path: str) -> str:
  """A local path as it is; a remote tokenizer file (a directory: its tokenizer.json) copied to local disk."""
  if not is_remote(path):
    return path
  src = epath.Path(path)
  if src.is_dir():
    src = src / "tokenizer.json"
  if not src.is_file():
    raise FileNotFoundError(f"config.data.tokenizer={path!r}: no such file ({src})")
  local = os.path.join(local_cache("files", os.fspath(src)), src.name)
  if not os.path.exists(local):
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.tmp{os.getpid()}"  # several processes per host may copy at once
    with open(tmp, "wb") as f:
      f.write(src.read_bytes())
    os.replace(tmp, local)
  return local
