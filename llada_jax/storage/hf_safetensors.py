"""safetensors files read and written tensor by tensor, and a meter of the tensor bytes held at once.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} and the raw little-endian bytes. Reading never loads a whole file: a header is read
alone, and each tensor on its own when asked for. Writing plans the header first and then streams
the tensors one at a time, converting each in pieces.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import stat
import sys
import weakref
from typing import Callable, Mapping, Sequence

import ml_dtypes
import numpy as np

_WRITE_CHUNK_BYTES = 64 << 20  # a tensor is converted and written in pieces of this size


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message names the file, tensor or field."""


_ST_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(ml_dtypes.bfloat16)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER_BYTES = 100 << 20


@dataclasses.dataclass(frozen=True)
class TensorEntry:
  """Where one tensor lies in a safetensors file."""

  file: pathlib.Path
  name: str
  dtype: str  # safetensors name: F32, BF16, ...
  shape: tuple[int, ...]
  offset: int  # from the start of the file
  nbytes: int


def decode_error(error: UnicodeDecodeError | json.JSONDecodeError) -> str:
  """Where a text file failed to decode, without quoting its bytes."""
  if isinstance(error, UnicodeDecodeError):
    return f"not UTF-8 text at byte {error.start}"
  return f"{error.msg} at line {error.lineno} column {error.colno}"


def file_inside(root: pathlib.Path, name: str, *, where: str, allow_outside_links: bool = False
                ) -> pathlib.Path | None:
  """`root / name` once it is known to be a regular file inside `root`; None if nothing is there.

  `name` must be relative and free of `..`, and the file it names, links followed, must lie inside
  `root` unless `allow_outside_links` (a hub cache links every file to a blob elsewhere): a
  checkpoint directory must not make the converter read files it was not given. Errors start with
  `where` (the file or index entry that named the path) and never quote a file's contents.
  """
  if "\0" in name:
    raise ConversionError(f"{where} contains a NUL character; expected a file name inside {root}")
  if os.path.isabs(name):
    raise ConversionError(f"{where} is an absolute path; expected a file name inside {root}")
  if ".." in pathlib.PurePath(name).parts:
    raise ConversionError(f"{where} leads out of {root} through '..'; expected a file name inside it")
  path = root / name
  if not os.path.lexists(path):
    return None
  try:
    real, real_root = path.resolve(), root.resolve()
    mode = os.stat(path).st_mode if path.exists() else None
  except (OSError, RuntimeError) as e:  # a loop of links, a path through a file
    raise ConversionError(f"{where} cannot be resolved ({getattr(e, 'strerror', None) or e}); expected a "
                          f"regular file inside {root}") from None
  if not allow_outside_links and real != real_root and real_root not in real.parents:
    raise ConversionError(f"{where} is a link to {real}, outside {root}; expected a file inside it "
                          "(--allow_outside_links follows links out of the directory)")
  if mode is None:
    return None  # a dangling link: missing, as the caller reports it
  if not stat.S_ISREG(mode):
    raise ConversionError(f"{where} is not a regular file (a directory, pipe or device); expected a regular file")
  return path


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
  """The tensors of a safetensors file (header only; no tensor data is read)."""
  path = pathlib.Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    prefix = f.read(8)
    n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if not 0 < n <= min(size - 8, _MAX_HEADER_BYTES):
      # Neither the length field nor any other byte is quoted: the file may hold anything.
      raise ConversionError(f"{path}: not a safetensors file (its header length does not fit the file's "
                            f"{size} bytes); expected an 8-byte header length, a JSON header and the tensor data")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ConversionError(f"{path}: not a safetensors file (header is not JSON: {decode_error(e)})") from None
  if not isinstance(header, dict):
    raise ConversionError(f"{path}: not a safetensors file (header is not a JSON object)")
  data_start, data_size = 8 + n, size - 8 - n
  entries = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise ConversionError(f"{path}: tensor '{name}' has a malformed header entry; expected an object with "
                            "'dtype', 'shape' (a list of integers) and 'data_offsets' [start, end]") from None
    if dtype not in _ST_DTYPES:
      raise ConversionError(f"{path}: tensor '{name}' has dtype {dtype}; expected one of {sorted(_ST_DTYPES)}")
    nbytes = math.prod(shape) * _ST_DTYPES[dtype].itemsize
    if not (0 <= start <= end <= data_size and end - start == nbytes):
      raise ConversionError(f"{path}: tensor '{name}' has data_offsets [{start}, {end}], which do not hold "
                            f"{shape} {dtype} ({nbytes} bytes) inside the file's {data_size} data bytes "
                            "(truncated or corrupt file?)")
    entries[name] = TensorEntry(path, name, dtype, shape, data_start + start, nbytes)
  return entries


def read_tensor(entry: TensorEntry) -> np.ndarray:
  """One tensor, read from disk into a new array of its stored dtype."""
  if sys.byteorder != "little":
    raise NotImplementedError("reading safetensors needs a little-endian host")
  dtype = _ST_DTYPES[entry.dtype]
  count = math.prod(entry.shape)
  array = np.fromfile(entry.file, dtype=dtype, count=count, offset=entry.offset)
  if array.size != count:
    raise ConversionError(f"{entry.file}: tensor '{entry.name}' is truncated")
  return array.reshape(entry.shape)


def write_safetensors(path: str | os.PathLike, specs: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
                      tensor: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None) -> int:
  """Writes a safetensors file whose tensors come one at a time from `tensor(name)`.

  The header is built from `specs` (name, dtype, shape) before any data is asked for, so only the
  tensor being written (and a converted piece of it) is in memory. Returns the data bytes written.
  """
  header, offset = {}, 0
  for name, dtype, shape in specs:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data then starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for name, dtype, shape in specs:
      array = tensor(name)
      if tuple(array.shape) != tuple(shape):
        raise ValueError(f"tensor '{name}' has shape {array.shape}; the planned header says {shape}")
      _write_array(f, array, np.dtype(dtype))
      del array  # before the next tensor is read
  return offset


def _write_array(f, array: np.ndarray, dtype: np.dtype) -> None:
  """Row blocks, each cast and made contiguous on its own: no full-size copy of `array`."""
  if array.ndim == 0 or array.size == 0:
    np.ascontiguousarray(array, dtype=dtype).tofile(f)
    return
  row_bytes = max(1, array[0].size * dtype.itemsize)
  step = max(1, _WRITE_CHUNK_BYTES // row_bytes)
  for i in range(0, array.shape[0], step):
    np.ascontiguousarray(array[i:i + step], dtype=dtype).tofile(f)


class HeldBytes:
  """Bytes of tensor data the converter holds at once: arrays it read or converted and still references.

  An array counts from `hold(array)` until it is garbage collected; `peak` is the largest total.
  """

  def __init__(self):
    self.current = 0
    self.peak = 0

  def hold(self, array: np.ndarray) -> np.ndarray:
    # Views made later point at the array that owns the buffer, not at `array`: watch the owner.
    owner = array
    while isinstance(owner.base, np.ndarray):
      owner = owner.base
    self.current += owner.nbytes
    self.peak = max(self.peak, self.current)
    weakref.finalize(owner, self._release, owner.nbytes)
    return array

  def _release(self, nbytes: int) -> None:
    self.current -= nbytes



def hold(meter: HeldBytes | None, array: np.ndarray) -> np.ndarray:
  """Counts a newly allocated array (views of it are not counted again)."""
  if meter is not None:
    meter.hold(array)
  return array
