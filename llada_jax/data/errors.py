"""The one exception type for bad input data."""

from __future__ import annotations

import os


class Record(int):
  """A 0-based record index given where a line number is expected.

  Parsing code shared by line formats (JSONL) and record formats (Parquet, Arrow) passes its location
  as `line=`; a Record there is reported as `record N` instead, so that code needs no second path.
  """

  def __repr__(self):
    return f"Record({int(self)})"


class DataError(ValueError):
  """Bad input data, located by file, line (or record) and field.

  The message reads `path, line N, field 'f': what was wrong; expected ...` so a
  user can open the file at the right place without reading a traceback.
  """

  def __init__(
      self,
      message: str,
      *,
      path: str | os.PathLike | None = None,
      line: int | None = None,
      record: int | None = None,
      field: str | None = None,
  ):
    if isinstance(line, Record):
      line, record = None, int(line)
    self.path = None if path is None else os.fspath(path)
    self.line = line
    self.record = record
    self.field = field
    self.reason = message
    where = []
    if self.path is not None:
      where.append(self.path)
    if line is not None:
      where.append(f"line {line}")
    if record is not None:
      where.append(f"record {record}")
    if field is not None:
      where.append(f"field '{field}'")
    super().__init__(f"{', '.join(where)}: {message}" if where else message)

  def __reduce__(self):
    # Keeps the keyword-only location when the error crosses a process boundary.
    return (
        _rebuild_data_error,
        (self.reason, self.path, self.line, self.record, self.field),
    )


def _rebuild_data_error(message, path, line, record, field):
  return DataError(message, path=path, line=line, record=record, field=field)
