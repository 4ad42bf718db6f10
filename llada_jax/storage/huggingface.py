"""Hugging Face LLaDA checkpoints <-> llada_jax run directories, both ways, streaming.

The command line is `python -m llada_jax.convert import|export`; the pieces are in `hf_safetensors`
(the file format), `hf_names` (tensor names and layouts) and `hf_config` (config.json).

Import reads a Hugging Face LLaDA directory (`config.json`, `model.safetensors` or shards listed in
`model.safetensors.index.json`, optionally `tokenizer.json`) and writes a run directory that
`checkpoint.load_model`, `generate`, `evaluate` and training's `checkpoint.init_from` /
`reference_from` read like a training run: `RUN_DIR/checkpoints/0/` (an Orbax checkpoint with
`state.params` and the run metadata, written through the same item handlers as
`checkpoint.CheckpointManager`) and `RUN_DIR/tokenizer.json`. The ModelConfig is derived from
config.json; configurations the llada_jax model cannot reproduce (biases, LayerNorm, no RoPE,
tied weights, ...) are refused with the field named. Export writes the Hugging Face layout back:
PyTorch `[out, in]` weights in shards of at most `max_shard_size`, the index and a config.json
for the reference `modeling_llada.py` (`copy_from` copies its Python files and the tokenizer); a LoRA
run's export is its merged model, and `peft` writes and reads its adapters in the PEFT layout.

Memory: tensors are read one at a time, never a whole shard or model. Import hands Orbax lazy
leaves; a custom type handler writes them one after the other, each read, converted and written
part by part (a scanned leaf layer by layer, into storage chunks that never span two layers), so
one tensor is held at a time. Export restores one parameter leaf at a time from Orbax (with
`scan_layers`, a leaf stacks all layers of one tensor kind) and streams it into a shard file whose
header was planned up front, converting 64 MB at a time; no shard is buffered. Tensorstore adds its
own encode/decode buffers for the leaf in flight (native memory): peak RSS grew by about 3x the
largest tensor on import and 1.5-3x on export, the same for a model twice the size.

Both directions write into a temporary directory beside the destination and rename it at the end:
a failed conversion leaves nothing that looks like a finished run or checkpoint. The destination
must be new or empty; with `overwrite` an existing one is moved aside only once the new one is
complete. Import reads only regular files inside the Hugging Face directory: index entries with
`..` or an absolute path are refused, and so are links that lead out of it unless
`allow_outside_links` (a hub cache's snapshot links every file to a blob elsewhere).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from llada_jax import model as model_lib
# Also the public API of the conversion: everything a caller needs is importable from here.
from llada_jax.storage.hf_config import (CONFIG_FILE, PARAM_DTYPES, hf_config_from_model, model_config_from_hf,
                                         read_hf_config)
from llada_jax.storage.hf_names import TensorMap, tensor_maps
from llada_jax.storage.hf_safetensors import (ConversionError, HeldBytes, TensorEntry, decode_error, file_inside, hold,
                                              read_header, read_tensor, write_safetensors)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_MAX_SHARD_SIZE = "5GB"

_ORBAX_CHUNK_BYTES = 64 << 20  # import: storage chunks, so tensorstore encodes a large leaf piece by piece


# ---------------------------------------------------------------------------------------------
# Reading a Hugging Face directory


def _inside(hf_dir: pathlib.Path, name: str, allow_outside_links: bool) -> pathlib.Path | None:
  """A file of `hf_dir` by its fixed name (`file_inside`)."""
  return file_inside(hf_dir, name, where=os.fspath(hf_dir / name), allow_outside_links=allow_outside_links)


def find_weights(hf_dir: str | os.PathLike, *, allow_outside_links: bool = False) -> dict[str, TensorEntry]:
  """Every tensor of the checkpoint in `hf_dir` (one file, or the shards its index lists).

  Every file read lies inside `hf_dir` (`file_inside`; `allow_outside_links` follows links out of it).
  """
  hf_dir = pathlib.Path(hf_dir)
  index_path = _inside(hf_dir, INDEX_FILE, allow_outside_links)
  single = _inside(hf_dir, SINGLE_FILE, allow_outside_links)
  if index_path is not None:
    try:
      weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ConversionError(f"{index_path}: expected JSON with a 'weight_map' object ({decode_error(e)})") from None
    except (KeyError, TypeError):
      raise ConversionError(f"{index_path}: expected JSON with a 'weight_map' object") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise ConversionError(f"{index_path}: field 'weight_map' must map tensor names to file names")
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
      by_file.setdefault(file, []).append(name)
    entries: dict[str, TensorEntry] = {}
    for file, names in sorted(by_file.items()):
      where = f"{index_path}: shard {file!r} (listed for tensor {names[0]!r})"
      path = file_inside(hf_dir, file, where=where, allow_outside_links=allow_outside_links)
      if path is None:
        raise FileNotFoundError(f"{where} does not exist in {hf_dir}; expected every shard the index lists")
      header = read_header(path)
      for name in names:
        if name not in header:
          raise ConversionError(f"{index_path}: tensor '{name}' is listed in '{file}', which does not hold it")
      for name, entry in header.items():
        if name in entries:
          raise ConversionError(f"{path}: tensor '{name}' is also in {entries[name].file.name}; expected each "
                                "tensor in one shard")
        entries[name] = entry
    return entries
  if single is not None:
    return read_header(single)
  shards = sorted(hf_dir.glob("*.safetensors"))
  if shards:
    raise FileNotFoundError(f"{hf_dir}: has {shards[0].name} but no {INDEX_FILE}; expected the index that lists "
                            f"the shards, or a single {SINGLE_FILE}")
  if list(hf_dir.glob("*.bin")):
    raise FileNotFoundError(f"{hf_dir}: only PyTorch .bin weights found; expected {SINGLE_FILE} or {INDEX_FILE} "
                            "(save the model with safe_serialization=True)")
  raise FileNotFoundError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}; expected a Hugging Face LLaDA checkpoint")


def _match(maps: Sequence[TensorMap], entries: Mapping[str, TensorEntry], cfg, where) -> None:
  """Every expected tensor present once with its shape, and nothing else."""
  expected = {m.hf_name: m for m in maps}
  missing = [m.hf_name for m in maps if m.hf_name not in entries]
  if missing:
    raise ConversionError(f"{where}: tensor '{missing[0]}' is missing ({len(missing)} of the {len(maps)} tensors "
                          f"config.json implies are missing)")
  unexpected = sorted(set(entries) - set(expected))
  if unexpected:
    e = entries[unexpected[0]]
    raise ConversionError(f"{e.file}: unexpected tensor '{e.name}' ({len(unexpected)} in all); a LLaDA checkpoint "
                          f"with this config.json (n_layers={cfg.n_layers}, no biases, untied head) has no such tensor")
  for m in maps:
    e = entries[m.hf_name]
    if e.shape != m.hf_shape:
      raise ConversionError(f"{e.file}: tensor '{e.name}' has shape {list(e.shape)}; expected {list(m.hf_shape)} "
                            f"from config.json (d_model={cfg.d_model}, n_heads={cfg.n_heads}, "
                            f"n_kv_heads={cfg.kv_heads}, mlp_hidden_size={cfg.mlp_hidden_size}, "
                            f"embedding_size={cfg.vocab_size})")


# ---------------------------------------------------------------------------------------------
# Import: lazy leaves that Orbax writes one at a time


class _LazyLeaf:
  """A parameter not read yet: Orbax sees its shape and dtype; the handler below asks for its parts.

  `parts()` yields (index, array) pairs that tile the leaf: the whole leaf at index (), or, for a
  scanned leaf (`stacked`), one layer at a time at index (layer,).
  """

  def __init__(self, shape, dtype, parts: Callable[[], Iterator[tuple[tuple[int, ...], np.ndarray]]],
               stacked: bool):
    self.shape, self.dtype, self.parts, self.stacked = tuple(shape), np.dtype(dtype), parts, stacked

  @property
  def ndim(self):
    return len(self.shape)

  @property
  def size(self):
    return math.prod(self.shape)

  @property
  def nbytes(self):
    return self.size * self.dtype.itemsize


def _lazy_registry():
  import orbax.checkpoint as ocp  # noqa: PLC0415
  import tensorstore as ts  # noqa: PLC0415

  class LazyLeafHandler(ocp.type_handlers.NumpyHandler):
    """Writes `_LazyLeaf`s as numpy arrays (Orbax's 'np.ndarray' type), strictly one part at a time.

    The stock handler copies every array and writes them all concurrently. Here leaves are written
    one after the other and each is read part by part (a scanned leaf layer by layer, into chunks
    that never span two layers), so only one tensor is in memory at a time.
    """

    def __init__(self):
      super().__init__(deepcopy_host_arrays=False)

    async def _background_serialize(self, values, infos, args=None):
      args = args or [ocp.SaveArgs()] * len(values)
      for leaf, info, arg in zip(values, infos, args):
        arg = dataclasses.replace(arg, chunk_byte_size=arg.chunk_byte_size or _ORBAX_CHUNK_BYTES,
                                  shard_axes=(0,) if leaf.stacked else arg.shard_axes)
        await super()._background_serialize([leaf], [info], [arg])

    async def _open_and_write(self, value, tspec, ts_context):
      store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
      for index, part in value.parts():
        await (store[index] if index else store).write(part, can_reference_source_data_indefinitely=True)
        del part

  th = ocp.type_handlers
  return th.create_type_handler_registry(
      (_LazyLeaf, LazyLeafHandler()), (int, th.ScalarHandler()), (np.number, th.ScalarHandler()))


def _lazy_params(maps: Sequence[TensorMap], entries: Mapping[str, TensorEntry], cfg, meter):
  """The parameter tree of `cfg` with a `_LazyLeaf` per leaf (a scanned leaf has L parts)."""
  dtype = np.dtype(cfg.weight_dtype)
  by_leaf: dict[tuple[str, ...], list[TensorMap]] = {}
  for m in maps:
    by_leaf.setdefault(m.param_path, []).append(m)

  def convert(m: TensorMap) -> np.ndarray:
    hf = hold(meter, read_tensor(entries[m.hf_name]))
    if hf.dtype != dtype:
      hf = hold(meter, hf.astype(dtype))
    return m.to_flax(hf)

  def parts(ms: list[TensorMap]):
    for m in ms:
      yield (() if m.layer is None else (m.layer,)), convert(m)

  tree: dict[str, Any] = {}
  for path, ms in by_leaf.items():
    stacked = ms[0].layer is not None
    shape = (len(ms),) + ms[0].flax_shape if stacked else ms[0].flax_shape
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = _LazyLeaf(shape, dtype, lambda ms=ms: parts(ms), stacked)
  return tree


def _run_metadata(cfg, run_dir: pathlib.Path, tokenizer_path: str, hf_dir: pathlib.Path, hf_config) -> dict:
  from llada_jax import configs  # noqa: PLC0415

  config = configs.base_config().to_dict()
  config["model"] = dataclasses.asdict(cfg)
  config["workdir"] = os.fspath(run_dir)
  config["data"]["tokenizer"] = tokenizer_path
  return {"config": config, "huggingface": {"source": os.fspath(hf_dir), "config": dict(hf_config)}}


def check_destination(dest: pathlib.Path, *, overwrite: bool = False,
                      sources: Sequence[str | os.PathLike | None] = ()) -> None:
  """Raises ValueError unless a conversion may write the directory `dest`.

  `dest` must be new or an empty directory, or with `overwrite` a directory to replace; it must not
  be a file or a link, nor hold one of `sources` (replacing it would delete the input), and the
  directory it goes in must be writable.
  """
  if dest.is_symlink():
    raise ValueError(f"{dest} is a symbolic link; expected a directory path (give the directory it points to)")
  if dest.exists() and not dest.is_dir():
    raise ValueError(f"{dest} is a file; expected a directory (new, empty or, with --overwrite, replaced)")
  ancestor = dest.parent
  while not ancestor.exists() and ancestor != ancestor.parent:
    ancestor = ancestor.parent
  if not ancestor.is_dir():
    raise ValueError(f"{ancestor} is a file; expected a directory to hold {dest}")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise ValueError(f"{ancestor} is not writable; expected a directory where {dest} can be written")
  real = dest.resolve()
  for source in (pathlib.Path(s) for s in sources if s is not None):
    if real == source.resolve() or real in source.resolve().parents:
      raise ValueError(f"{dest} holds the input {source}; expected a destination apart from the input")
  if dest.is_dir() and any(dest.iterdir()) and not overwrite:
    raise ValueError(f"{dest} already exists and is not empty; expected a new directory (--overwrite replaces it)")


def _staging_dir(dest: pathlib.Path, overwrite: bool) -> pathlib.Path:
  check_destination(dest, overwrite=overwrite)  # again: time has passed since the caller checked
  dest.parent.mkdir(parents=True, exist_ok=True)
  return pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))


def _commit(staging: pathlib.Path, dest: pathlib.Path, overwrite: bool) -> None:
  """Renames the finished `staging` to `dest`; an old `dest` is deleted only once the new one is in place."""
  if not dest.exists():
    os.rename(staging, dest)
    return
  if not any(dest.iterdir()):
    dest.rmdir()
    os.rename(staging, dest)
    return
  if not overwrite:
    raise ValueError(f"{dest} already exists and is not empty; expected a new directory (--overwrite replaces it)")
  old = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
  try:
    os.rename(dest, old)  # onto the empty directory just made
  except BaseException:
    old.rmdir()
    raise
  try:
    os.rename(staging, dest)
  except BaseException:
    os.rename(old, dest)
    raise
  shutil.rmtree(old, ignore_errors=True)


def _tokenizer_sources(hf_dir: pathlib.Path, tokenizer, allow_outside_links: bool) -> list[pathlib.Path]:
  """The tokenizer files import copies, tokenizer.json first; [] without a tokenizer.

  The default tokenizer and its companions are files of `hf_dir`, checked like the weights; those
  beside a `tokenizer` the caller named are the caller's choice.
  """
  from llada_jax.data import tokenizer as tok_lib  # noqa: PLC0415

  if tokenizer:
    first = pathlib.Path(tokenizer)
    return [first] + [first.parent / n for n in TOKENIZER_FILES[1:] if (first.parent / n).is_file()]
  first = _inside(hf_dir, tok_lib.HF_TOKENIZER_FILE, allow_outside_links)
  if first is None:
    return []
  return [first] + [p for p in (_inside(hf_dir, n, allow_outside_links) for n in TOKENIZER_FILES[1:]) if p]


def import_checkpoint(hf_dir: str | os.PathLike, run_dir: str | os.PathLike, *, param_dtype: str = "float32",
                      scan_layers: bool = False, tokenizer: str | os.PathLike | None = None,
                      meter: HeldBytes | None = None, overwrite: bool = False,
                      allow_outside_links: bool = False) -> model_lib.ModelConfig:
  """Converts a Hugging Face LLaDA directory into a llada_jax run directory; returns its ModelConfig.

  `tokenizer`: a tokenizer.json to use and copy (default: `hf_dir/tokenizer.json` if present).
  Everything is checked (destination, config, files, tensor names and shapes) before anything is
  written. `overwrite` replaces an existing run directory once the new one is complete;
  `allow_outside_links` reads files of `hf_dir` that are links to elsewhere.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from llada_jax.storage import checkpoint as ckpt_lib  # noqa: PLC0415
  from llada_jax.data import tokenizer as tok_lib  # noqa: PLC0415

  hf_dir, run_dir = pathlib.Path(hf_dir), pathlib.Path(run_dir).absolute()
  if not hf_dir.is_dir():
    raise FileNotFoundError(f"{hf_dir}: not a directory; expected a Hugging Face LLaDA checkpoint directory")
  check_destination(run_dir, overwrite=overwrite, sources=(hf_dir,))
  _inside(hf_dir, CONFIG_FILE, allow_outside_links)
  hf_config = read_hf_config(hf_dir)
  tok_files = _tokenizer_sources(hf_dir, tokenizer, allow_outside_links)
  tok = tok_lib.HuggingFaceTokenizer(tok_files[0]) if tok_files else None
  cfg = model_config_from_hf(hf_config, where=os.fspath(hf_dir / CONFIG_FILE), tokenizer=tok,
                             param_dtype=param_dtype, scan_layers=scan_layers)
  if tok is not None:
    tok_lib.check_vocab(tok, cfg.vocab_size)
  maps = tensor_maps(cfg)
  entries = find_weights(hf_dir, allow_outside_links=allow_outside_links)
  _match(maps, entries, cfg, hf_dir)
  params = _lazy_params(maps, entries, cfg, meter)

  staging = _staging_dir(run_dir, overwrite)
  try:
    for i, source in enumerate(tok_files):  # the first is copied as tokenizer.json whatever its name
      shutil.copyfile(source, staging / (source.name if i else tok_lib.HF_TOKENIZER_FILE))
    tokenizer_dest = os.fspath(run_dir / tok_lib.HF_TOKENIZER_FILE) if tok_files else ""
    metadata = _run_metadata(cfg, run_dir, tokenizer_dest, hf_dir.absolute(), hf_config)
    handlers = ckpt_lib._item_handlers(  # pylint: disable=protected-access
        ocp.PyTreeCheckpointHandler(type_handler_registry=_lazy_registry()))
    manager = ocp.CheckpointManager(
        staging / "checkpoints", item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True))
    try:
      manager.save(0, args=ocp.args.Composite(**{
          ckpt_lib.STATE: ocp.args.PyTreeSave({"params": params}),
          ckpt_lib.RUN_METADATA: ocp.args.JsonSave(metadata)}))
      manager.wait_until_finished()
    finally:
      manager.close()
    _commit(staging, run_dir, overwrite)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return cfg


# ---------------------------------------------------------------------------------------------
# Export


def parse_size(size: str | int) -> int:
  """'5GB' -> 5 * 10**9, '2GiB' -> 2 * 2**30, '1000' -> 1000 (Hugging Face's convention)."""
  if isinstance(size, int):
    value = size
  else:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
      raise ValueError(f"max_shard_size={size!r}: expected a size such as 5GB, 500MB, 2GiB or a number of bytes")
    unit = (match.group(2) or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    value = int(float(match.group(1)) * scale)
  if value <= 0:
    raise ValueError(f"max_shard_size={size!r}: expected a positive size")
  return value


def _checkpoint_dir(path: pathlib.Path) -> pathlib.Path:
  return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def _plan_shards(specs: Sequence[tuple[str, np.dtype, tuple[int, ...]]], max_bytes: int) -> list[list]:
  """Greedy, in order; a tensor larger than max_bytes gets a shard of its own."""
  shards, size = [[]], 0
  for spec in specs:
    nbytes = math.prod(spec[2]) * np.dtype(spec[1]).itemsize
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += nbytes
  return shards


class _LeafReader:
  """Restores single parameter leaves from an Orbax checkpoint, keeping only the last one."""

  def __init__(self, directory: pathlib.Path, step: int | None, meter: HeldBytes | None):
    import orbax.checkpoint as ocp  # noqa: PLC0415
    from llada_jax.storage import checkpoint as ckpt_lib  # noqa: PLC0415

    self._ocp, self._state, self._meter = ocp, ckpt_lib.STATE, meter
    self._manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_handlers=ckpt_lib._item_handlers(ocp.PyTreeCheckpointHandler()))  # pylint: disable=protected-access
    self.step = ckpt_lib.resolve_step(self._manager, step, directory, "to export")
    self.where = f"checkpoint step {self.step} in {directory}"
    self._path, self._array = None, None

  def stored_params(self) -> dict[tuple[str, ...], tuple[int, ...]]:
    tree = self._manager.item_metadata(self.step)[self._state]
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, Mapping) or not isinstance(tree.get("params"), Mapping):
      raise ConversionError(f"{self.where} has no 'params' in its state")
    out = {}

    def walk(node, prefix):
      if isinstance(node, Mapping):
        for k, v in node.items():
          walk(v, prefix + (str(k),))
      elif node is not None:
        out[prefix] = tuple(getattr(node, "shape", ()))

    walk(tree["params"], ())
    return out

  def get(self, path: tuple[str, ...]) -> np.ndarray:
    if path != self._path:
      self._path, self._array = None, None  # released before the next leaf is read
      ocp = self._ocp
      item, args = {}, {}
      node_i, node_a = item.setdefault("params", {}), args.setdefault("params", {})
      for key in path[:-1]:
        node_i, node_a = node_i.setdefault(key, {}), node_a.setdefault(key, {})
      node_i[path[-1]], node_a[path[-1]] = 0, ocp.RestoreArgs(restore_type=np.ndarray)
      restored = self._manager.restore(self.step, args=ocp.args.Composite(**{
          self._state: ocp.args.PyTreeRestore(item, restore_args=args, partial_restore=True)}))[self._state]
      array = restored["params"]
      for key in path:
        array = array[key]
      self._path, self._array = path, hold(self._meter, np.asarray(array))
    return self._array

  def close(self):
    self._path, self._array = None, None
    self._manager.close()


def _params_reader(directory: pathlib.Path, step: int, metadata: Mapping, meter: HeldBytes | None):
  """(leaf reader, ModelConfig, config.json whose other fields export keeps) of the checkpoint at `step`.

  A LoRA run's reader serves its base with the adapters folded in, leaf by leaf (`peft.MergedReader`).
  """
  config = metadata.get("config") or {}
  if "model" not in config:
    raise ConversionError(f"checkpoint step {step} in {directory}: its run metadata has no config.model")
  cfg = model_lib.ModelConfig.from_dict(config["model"])
  hf_base = (metadata.get("huggingface") or {}).get("config")
  if not cfg.lora_rank:
    return _LeafReader(directory, step, meter), cfg, hf_base
  from llada_jax import lora  # noqa: PLC0415
  from llada_jax.storage import peft  # noqa: PLC0415

  reader = peft.MergedReader(directory, step, cfg, config, meter)
  return reader, lora.base_config(cfg), hf_base or reader.base_hf_config


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, step: int | None = None,
                      dtype: str = "float32", max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                      copy_from: str | os.PathLike | None = None, meter: HeldBytes | None = None,
                      overwrite: bool = False) -> dict:
  """Writes a llada_jax checkpoint (a run dir or its checkpoints/ dir) in the Hugging Face LLaDA layout.

  A LoRA run is written as its merged model (`peft.export_adapters` writes the adapters alone).
  `overwrite` replaces an existing `out_dir` once the new one is complete. Returns a summary: the
  files written, their tensors and the total size.
  """
  from llada_jax.storage import checkpoint as ckpt_lib  # noqa: PLC0415

  if dtype not in PARAM_DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {PARAM_DTYPES}")
  max_bytes = parse_size(max_shard_size)
  source = pathlib.Path(checkpoint)
  if not source.is_dir():
    raise FileNotFoundError(f"{source}: not a directory; expected a llada_jax run directory")
  directory = _checkpoint_dir(source)
  out_dir = pathlib.Path(out_dir).absolute()
  if copy_from is not None and not pathlib.Path(copy_from).is_dir():
    raise FileNotFoundError(f"--copy_from {copy_from}: not a directory")
  check_destination(out_dir, overwrite=overwrite, sources=(source, copy_from))

  with ckpt_lib.CheckpointManager(directory, read_only=True) as manager:
    found = manager.resolve_step(step)
    metadata = manager.read_metadata(found)
  reader, cfg, hf_base = _params_reader(directory, found, metadata, meter)
  out_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
  try:
    maps = tensor_maps(cfg, layer_major=not cfg.scan_layers)
    stored = reader.stored_params()
    for m in maps:
      shape = m.flax_shape if m.layer is None else (cfg.n_layers,) + m.flax_shape
      if m.param_path not in stored:
        raise ConversionError(f"{reader.where}: parameter 'params.{'.'.join(m.param_path)}' is missing")
      if stored[m.param_path] != shape:
        raise ConversionError(f"{reader.where}: parameter 'params.{'.'.join(m.param_path)}' has shape "
                              f"{list(stored[m.param_path])}; expected {list(shape)} from the run's model config")
    by_name = {m.hf_name: m for m in maps}

    def tensor(name):
      m = by_name[name]
      leaf = reader.get(m.param_path)
      return m.to_hf(leaf if m.layer is None else leaf[m.layer])

    shards = _plan_shards([(m.hf_name, out_dtype, m.hf_shape) for m in maps], max_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    staging = _staging_dir(out_dir, overwrite)
    try:
      total = 0
      for file, specs in zip(names, shards):
        total += write_safetensors(staging / file, specs, tensor, metadata={"format": "pt"})
      if len(shards) > 1:
        weight_map = {spec[0]: file for file, specs in zip(names, shards) for spec in specs}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
      hf_config = hf_config_from_model(cfg, torch_dtype=dtype, base=hf_base)
      if copy_from is not None:
        _copy_support_files(pathlib.Path(copy_from), staging)
      (staging / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
      _commit(staging, out_dir, overwrite)
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
  finally:
    reader.close()
  return {"files": names, "total_size": total, "tensors": len(maps), "step": found, "dtype": dtype}


def _copy_support_files(source: pathlib.Path, dest: pathlib.Path) -> list[str]:
  """The reference model code, tokenizer and generation config beside the weights (not weights or config.json)."""
  copied = []
  for path in sorted(source.iterdir()):
    weights = path.suffix in (".safetensors", ".bin") or path.name in (INDEX_FILE, CONFIG_FILE)
    if path.is_file() and not weights and (path.suffix in (".py", ".json", ".model", ".txt", ".md")):
      shutil.copyfile(path, dest / path.name)
      copied.append(path.name)
  return copied

