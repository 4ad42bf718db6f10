"""Reading records from columnar files: Parquet, Arrow, and directories saved by Hugging Face `datasets`.

Formats (chosen by name, or by what a directory holds):
- `*.parquet`: a Parquet file.
- `*.arrow`: an Arrow IPC stream, as `datasets` writes its `data-*.arrow` shards, or an Arrow IPC file.
- a directory written by `Dataset.save_to_disk`: `state.json` (its `_data_files` give the shards in
  order), `dataset_info.json` and the `data-*.arrow` shards.
- a directory written by `DatasetDict.save_to_disk` (`dataset_dict.json` and one such directory per
  split) needs a split: `DIR:SPLIT`, or the split's directory `DIR/SPLIT`.

Each record is a dict of plain Python values, the same shapes a JSONL line decodes to (a string
column gives str, a `list<int>` column a list of ints, a list of structs a list of dicts), so the
JSONL parsing and its checks apply unchanged. A null column value is an absent field: a table has
every column in every row, so rows of two forms (SFT `prompt`/`response` and `messages`) can share
one table, and a null where a value is needed is reported as that field missing. A record is
located by its 0-based index in the file, or in the dataset across its shards (`dataset[i]`);
errors read `record N`.

Memory: records are converted to Python one record batch at a time (Parquet: at most BATCH_ROWS
rows of one row group; Arrow: each stored batch, memory-mapped when the file is local), so the text of
a file is never all in memory. The sources built from them stay eager: they keep the token ids only.

Reading needs pyarrow alone (`pip install llada_jax[data]`); `datasets` is needed only to write the
directories. Both are imported only when such a file is read.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from etils import epath

from llada_jax.data.errors import DataError, Record
from llada_jax.storage import remote

BATCH_ROWS = 1024  # rows converted to Python at a time: bounds the text held while reading
STATE = "state.json"  # a saved Dataset
DATASET_DICT = "dataset_dict.json"  # a saved DatasetDict
EXTRA = "pip install llada_jax[data]"


def _pyarrow(path: str):
  try:
    import pyarrow  # noqa: PLC0415 - optional dependency, only for these formats
    import pyarrow.ipc  # noqa: F401, PLC0415
    import pyarrow.parquet  # noqa: F401, PLC0415
  except ImportError:
    raise DataError(f"reading Parquet, Arrow and datasets directories needs pyarrow, which is not installed; "
                    f"expected it installed ({EXTRA})", path=path) from None
  return pyarrow


def is_parquet(path: str | os.PathLike) -> bool:
  return os.fspath(path).lower().endswith(".parquet")


def is_arrow(path: str | os.PathLike) -> bool:
  return os.fspath(path).lower().endswith(".arrow")


def split_spec(path: str | os.PathLike) -> tuple[str, str | None]:
  """(directory, split) for `DIR:SPLIT` naming a split of a saved DatasetDict, else (path, None).

  An existing path is taken as it is, so a file whose name holds a colon is still that file.
  """
  path = os.fspath(path)
  head, sep, split = path.rpartition(":")
  if not sep or not head or not split or "/" in split or epath.Path(path).exists():
    return path, None
  if (epath.Path(head) / DATASET_DICT).is_file():
    return head, split
  return path, None


def is_dataset(path: str | os.PathLike) -> bool:
  """Whether `path` is a `datasets` save directory (Dataset or DatasetDict) or `DIR:SPLIT` of one."""
  directory, split = split_spec(path)
  if split is not None:
    return True
  root = epath.Path(directory)
  return root.is_dir() and ((root / STATE).is_file() or (root / DATASET_DICT).is_file())


def is_columnar(path: str | os.PathLike) -> bool:
  return is_parquet(path) or is_arrow(path) or is_dataset(path)


def _one_line(error: Exception) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= 200 else text[:197] + "..."


def _guarded(batches: Iterator, pa, path: str, what: str) -> Iterator:
  """The batches, with a reader's failure (corrupt pages, truncated streams) as a located DataError."""
  while True:
    try:
      batch = next(batches)
    except StopIteration:
      return
    except (pa.ArrowException, OSError, ValueError) as e:
      raise DataError(f"cannot read as {what} ({_one_line(e)})", path=path) from None
    yield batch


def _rows(batch) -> list[dict[str, Any]]:
  """A record batch as dicts without the nulls, converted a column at a time (faster than row by row)."""
  names = batch.schema.names
  if not names:
    return [{} for _ in range(batch.num_rows)]
  columns = [column.to_pylist() for column in batch.columns]
  if not any(column.null_count for column in batch.columns):
    return [dict(zip(names, values)) for values in zip(*columns)]
  return [{k: v for k, v in zip(names, values) if v is not None} for values in zip(*columns)]


def _check_not_empty(path: str, what: str) -> None:
  # pyarrow's own message for an empty file ("magic bytes not found") does not say it is empty.
  if epath.Path(path).stat().length == 0:
    raise DataError(f"is empty; expected a {what} file", path=path)


def _parquet_batches(path: str) -> Iterator:
  pa = _pyarrow(path)
  _check_not_empty(path, "Parquet")
  try:
    f = pa.parquet.ParquetFile(epath.Path(path).open("rb") if remote.is_remote(path) else path)
  except (pa.ArrowException, OSError, ValueError) as e:
    raise DataError(f"cannot read as Parquet ({_one_line(e)}); expected a Parquet file", path=path) from None
  with f:
    # iter_batches reads one row group at a time and cuts it into batches of BATCH_ROWS.
    yield from _guarded(iter(f.iter_batches(batch_size=BATCH_ROWS)), pa, path, "Parquet")


def _arrow_batches(path: str, shown: str | None = None) -> Iterator:
  """The record batches of an Arrow IPC stream or file; errors name `shown` (default `path`)."""
  pa = _pyarrow(path)
  shown = shown or path
  _check_not_empty(path, "Arrow")
  # A memory map lets the OS page the file in and out: nothing is copied until a batch is converted.
  source = epath.Path(path).open("rb") if remote.is_remote(path) else pa.memory_map(path)
  with source:
    try:
      reader = pa.ipc.open_stream(source)
      batches = iter(reader)
    except pa.ArrowInvalid:
      source.seek(0)
      try:
        reader = pa.ipc.open_file(source)
      except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"cannot read as Arrow ({_one_line(e)}); expected an Arrow IPC stream or file",
                        path=shown) from None
      batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    yield from _guarded(batches, pa, shown, "Arrow")


def dataset_files(path: str | os.PathLike) -> list[str]:
  """The Arrow shards of a saved Dataset (or of one split of a DatasetDict, `DIR:SPLIT`), in order."""
  directory, split = split_spec(path)
  root = epath.Path(directory)
  if (root / DATASET_DICT).is_file():
    splits = _read_json(root / DATASET_DICT, path).get("splits") or []
    if split is None:
      raise DataError(f"is a DatasetDict with splits {', '.join(splits)}; expected one split, as "
                      f"{directory}:SPLIT (or {os.path.join(directory, 'SPLIT')})", path=path)
    if split not in splits:
      raise DataError(f"unknown split {split!r}; expected one of {', '.join(splits)}", path=directory)
    root = root / split
  state = _read_json(root / STATE, path)
  files = state.get("_data_files")
  if not isinstance(files, list) or not all(isinstance(f, dict) and "filename" in f for f in files):
    raise DataError(f"{STATE} lists no '_data_files'; expected a directory written by datasets' save_to_disk",
                    path=path)
  return [os.fspath(root / f["filename"]) for f in files]


def _read_json(file: epath.Path, path) -> dict:
  try:
    value = json.loads(file.read_text())
  except FileNotFoundError:
    raise DataError(f"has no {file.name}; expected a directory written by datasets' save_to_disk",
                    path=path) from None
  except (OSError, ValueError) as e:
    raise DataError(f"{file.name} cannot be read ({_one_line(e)}); expected a directory written by "
                    "datasets' save_to_disk", path=path) from None
  if not isinstance(value, dict):
    raise DataError(f"{file.name} holds {type(value).__name__}; expected a JSON object", path=path)
  return value


def iter_columnar(path: str | os.PathLike) -> Iterator[tuple[Record, dict[str, Any]]]:
  """(record index, record) for each row of a Parquet or Arrow file or a saved `datasets` directory."""
  path = os.fspath(path)
  if is_parquet(path):
    batches = _parquet_batches(path)
  elif is_arrow(path):
    batches = _arrow_batches(path)
  else:
    shards = dataset_files(path)
    for shard in shards:  # a missing shard is named, rather than failing inside pyarrow
      if not epath.Path(shard).is_file():
        raise DataError(f"shard {os.path.basename(shard)} listed in {STATE} is missing", path=path)
    batches = (b for shard in shards for b in _arrow_batches(shard, shown=path))
  index = 0
  for batch in batches:
    for row in _rows(batch):
      yield Record(index), row
      index += 1
