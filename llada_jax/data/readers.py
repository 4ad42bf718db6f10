"""Reading and checking data files line by line: the low-level readers every data module shares.

File formats (chosen by name):
- `*.jsonl`, `*.json`, `*.ndjson`: one JSON object per line; blank lines are ignored.
- `*.array_record*`: pre-tokenized token stream (`sources.write_array_record`).
- `*.parquet`, `*.arrow`, and directories saved by Hugging Face `datasets` (`DIR`, `DIR:SPLIT`):
  records read a batch at a time by `llada_jax.data.columnar`.
- anything else: UTF-8 plain text; documents are separated by blank (or whitespace-only) lines,
  so a file without blank lines is a single document.

Line numbers in errors are 1-based, record indices (columnar formats) 0-based. Files are local
paths or `gs://` URLs.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any, Iterator

from etils import epath

from llada_jax.data.errors import DataError


def is_jsonl(path: str | os.PathLike) -> bool:
  return os.fspath(path).lower().endswith((".jsonl", ".json", ".ndjson"))


def is_array_record(path: str | os.PathLike) -> bool:
  # Sharded outputs are often named like `train.array_record-00001-of-00008`.
  return ".array_record" in os.path.basename(os.fspath(path)).lower()


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def check_exists(path: str | os.PathLike, what: str = "data file") -> None:
  """Raises DataError unless `path` is an existing regular file (a link to one is fine), or a
  directory saved by Hugging Face `datasets` (`DIR`, or `DIR:SPLIT` of a DatasetDict).

  Checked before a file is opened: opening a FIFO blocks until something writes to it, and a
  directory or device fails later with an error that names neither. Remote (gs://) paths are
  only checked to exist, through etils.epath.
  """
  from llada_jax.data import columnar  # noqa: PLC0415 - columnar imports this module

  path = os.fspath(path)
  if "://" in path:
    if not (epath.Path(path).is_file() or columnar.is_dataset(path)):
      raise DataError(f"file not found; expected an existing {what}", path=path)
    return
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    if columnar.is_dataset(path):  # DIR:SPLIT
      return
    raise DataError(f"file not found; expected an existing {what}", path=path) from None
  except OSError as e:  # a path through a file, a loop of links, no permission on a directory
    raise DataError(f"cannot be read ({e.strerror}); expected an existing {what}", path=path) from None
  if stat.S_ISDIR(mode) and columnar.is_dataset(path):
    return
  if not stat.S_ISREG(mode):
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
    raise DataError(f"is {kind}; expected a regular file ({what})", path=path)


def check_utf8(text: str, *, path, line, field) -> None:
  """Raises DataError if `text` holds undecodable bytes (kept as surrogate escapes)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    char = text[e.start]
    if 0xDC80 <= ord(char) <= 0xDCFF:
      what = f"byte 0x{ord(char) - 0xDC00:02x}"
    else:
      what = f"lone surrogate \\u{ord(char):04x}"
    raise DataError(f"text is not valid UTF-8 ({what} at character {e.start}); "
                    "expected UTF-8 text", path=path, line=line, field=field) from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, object) for each non-blank line of a JSONL file."""
  path = os.fspath(path)
  check_exists(path)
  with epath.Path(path).open("rb") as f:  # local or gs://
    for line_number, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      # Undecodable bytes survive as surrogates so the error can name the field holding them.
      text = raw.decode("utf-8", errors="surrogateescape")
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON ({e.msg} at column {e.colno}); expected one JSON "
                        "object per line", path=path, line=line_number) from None
      if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}",
                        path=path, line=line_number)
      yield line_number, obj


def is_record_file(path: str | os.PathLike) -> bool:
  """Whether `path` holds records (dicts): JSONL, Parquet, Arrow or a `datasets` directory."""
  from llada_jax.data import columnar  # noqa: PLC0415

  return is_jsonl(path) or columnar.is_columnar(path)


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
  """(location, record) of each record of a JSONL or columnar file (`is_record_file`).

  The location is the 1-based line number for JSONL and an `errors.Record` (the 0-based record
  index) for columnar formats; passed to DataError as `line=`, it reads `line N` or `record N`.
  """
  from llada_jax.data import columnar  # noqa: PLC0415

  path = os.fspath(path)
  if is_jsonl(path):
    yield from iter_jsonl(path)
    return
  if not columnar.is_columnar(path):
    raise DataError("is not a record file; expected JSONL (.jsonl), Parquet (.parquet), Arrow (.arrow) or a "
                    "directory saved by datasets", path=path)
  check_exists(path)
  yield from columnar.iter_columnar(path)


def get_string(obj: dict, key: str, *, path, line, field: str | None = None) -> str:
  """obj[key], checked to be a non-empty valid UTF-8 string."""
  field = field or key
  if key not in obj:
    raise DataError("missing; expected a non-empty string", path=path, line=line, field=field)
  value = obj[key]
  if not isinstance(value, str):
    raise DataError(f"expected a non-empty string, got {type(value).__name__}",
                    path=path, line=line, field=field)
  if not value:
    raise DataError("empty; expected a non-empty string", path=path, line=line, field=field)
  check_utf8(value, path=path, line=line, field=field)
  return value


def iter_text_documents(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
  """(first line number, document) for the blank-line separated documents of a text file."""
  path = os.fspath(path)
  check_exists(path)
  lines: list[str] = []
  start = 0
  with epath.Path(path).open("rb") as f:  # local or gs://
    for line_number, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"text is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte column "
                        f"{e.start + 1}); expected UTF-8 text", path=path, line=line_number,
                        field="text") from None
      line = line.rstrip("\r\n")
      if line.strip():
        if not lines:
          start = line_number
        lines.append(line)
      elif lines:
        yield start, "\n".join(lines)
        lines = []
  if lines:
    yield start, "\n".join(lines)
