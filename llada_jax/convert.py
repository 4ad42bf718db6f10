"""Hugging Face LLaDA checkpoints <-> llada_jax run directories, both ways, streaming.

  python -m llada_jax.convert import HF_DIR RUN_DIR [--param_dtype bfloat16] [--scan_layers]
  python -m llada_jax.convert export RUN_DIR HF_DIR [--step N] [--dtype bfloat16] [--max_shard_size 5GB]

Import reads a Hugging Face LLaDA directory (`config.json`, `model.safetensors` or shards listed in
`model.safetensors.index.json`, optionally `tokenizer.json`) and writes a run directory that
`checkpoint.load_model`, `generate`, `evaluate` and training's `checkpoint.init_from` /
`reference_from` read like a training run: `RUN_DIR/checkpoints/0/` (an Orbax checkpoint with
`state.params` and the run metadata, written through the same item handlers as
`checkpoint.CheckpointManager`) and `RUN_DIR/tokenizer.json`. The ModelConfig is derived from
config.json; configurations the llada_jax model cannot reproduce (biases, LayerNorm, no RoPE,
tied weights, ...) are refused with the field named. Export writes the Hugging Face layout back:
PyTorch `[out, in]` weights in shards of at most `--max_shard_size`, the index and a config.json
for the reference `modeling_llada.py` (`--copy_from` copies its Python files and the tokenizer).

Memory: tensors are read one at a time, never a whole shard or model. Import hands Orbax lazy
leaves; a custom type handler writes them one after the other, each read, converted and written
part by part (a scanned leaf layer by layer, into storage chunks that never span two layers), so
one tensor is held at a time. Export restores one parameter leaf at a time from Orbax (with
`scan_layers`, a leaf stacks all layers of one tensor kind) and streams it into a shard file whose
header was planned up front, converting 64 MB at a time; no shard is buffered. Tensorstore adds its
own encode/decode buffers for the leaf in flight (native memory): peak RSS grew by about 3x the
largest tensor on import and 1.5-3x on export, the same for a model twice the size.

Both directions write into a temporary directory beside the destination and rename it at the end:
a failed conversion leaves nothing that looks like a finished run or checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from llada_jax import cli
from llada_jax import model as model_lib

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_MAX_SHARD_SIZE = "5GB"
PARAM_DTYPES = ("float32", "bfloat16")

_PREFIX = "model.transformer."
_WRITE_CHUNK_BYTES = 64 << 20  # export converts and writes a tensor in pieces of this size
_ORBAX_CHUNK_BYTES = 64 << 20  # import: storage chunks, so tensorstore encodes a large leaf piece by piece


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message names the file, tensor or field."""


# ---------------------------------------------------------------------------------------------
# safetensors, read and written tensor by tensor. The format is an 8-byte little-endian header
# length, a JSON header {name: {dtype, shape, data_offsets}} and the raw little-endian bytes.

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


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
  """The tensors of a safetensors file (header only; no tensor data is read)."""
  path = pathlib.Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    prefix = f.read(8)
    n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if not 0 < n <= min(size - 8, _MAX_HEADER_BYTES):
      raise ConversionError(f"{path}: not a safetensors file (header length {n}, file size {size})")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ConversionError(f"{path}: not a safetensors file (header is not JSON: {e})") from e
  if not isinstance(header, dict):
    raise ConversionError(f"{path}: not a safetensors file (header is not a JSON object)")
  data_start, data_size = 8 + n, size - 8 - n
  entries = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
      raise ConversionError(f"{path}: tensor '{name}' has a malformed header entry {info!r}") from e
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


def _hold(meter: HeldBytes | None, array: np.ndarray) -> np.ndarray:
  """Counts a newly allocated array (views of it are not counted again)."""
  if meter is not None:
    meter.hold(array)
  return array


# ---------------------------------------------------------------------------------------------
# Tensor names: Hugging Face `model.transformer.*` <-> the llada_jax parameter tree.

# Per block: (HF name, path under the block, number of leading llada_jax axes that form the HF
# `in` dimension; 0 for a tensor copied as is). Flax kernels are [in, out] with heads split out.
_BLOCK_TENSORS = (
    ("attn_norm.weight", ("attn_norm", "weight"), 0),
    ("q_proj.weight", ("attn", "q_proj"), 1),
    ("k_proj.weight", ("attn", "k_proj"), 1),
    ("v_proj.weight", ("attn", "v_proj"), 1),
    ("attn_out.weight", ("attn", "attn_out"), 2),
    ("ff_norm.weight", ("ff_norm", "weight"), 0),
    ("ff_proj.weight", ("mlp", "ff_proj"), 1),
    ("up_proj.weight", ("mlp", "up_proj"), 1),
    ("ff_out.weight", ("mlp", "ff_out"), 1),
)


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One Hugging Face tensor and the llada_jax parameter (or layer slice of one) it becomes."""

  hf_name: str
  hf_shape: tuple[int, ...]
  param_path: tuple[str, ...]  # a leaf of abstract_params(cfg)
  layer: int | None  # index into the leading layer axis of a scanned leaf
  flax_shape: tuple[int, ...]  # of this tensor (without the layer axis)
  in_axes: int

  def to_flax(self, hf: np.ndarray) -> np.ndarray:
    """[out, in] -> [in..., out...]: a transposed view, reshaped without copying."""
    return hf.reshape(self.flax_shape) if self.in_axes == 0 else hf.T.reshape(self.flax_shape)

  def to_hf(self, flax: np.ndarray) -> np.ndarray:
    if self.in_axes == 0:
      return flax.reshape(self.hf_shape)
    return flax.reshape(math.prod(self.flax_shape[:self.in_axes]), -1).T


def _hf_shape(flax_shape, in_axes):
  if in_axes == 0:
    return tuple(flax_shape)
  return (math.prod(flax_shape[in_axes:]), math.prod(flax_shape[:in_axes]))


def tensor_maps(cfg: model_lib.ModelConfig, *, layer_major: bool = True) -> list[TensorMap]:
  """Every Hugging Face tensor of `cfg`, mapped onto the leaves of `abstract_params(cfg)`.

  Order: embedding, the blocks, final norm, LM head; within the blocks layer by layer
  (`layer_major`) or tensor kind by kind (so a scanned leaf is visited once, for all its layers).
  Raises if the mapping does not cover the parameter tree exactly, so a change to the model's
  parameters cannot be converted silently wrong.
  """
  import jax  # noqa: PLC0415 - keeps `--help` fast

  abstract = model_lib.abstract_params(cfg)
  scanned = "blocks" in abstract
  leaves = {tuple(str(getattr(k, "key", k)) for k in p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}

  def block(layer, name, sub, in_axes):
    path = ("blocks", "block", *sub) if scanned else (f"blocks_{layer}", *sub)
    shape = leaves[path][1:] if scanned else leaves[path]
    return TensorMap(f"{_PREFIX}blocks.{layer}.{name}", _hf_shape(shape, in_axes), path,
                     layer if scanned else None, shape, in_axes)

  def top(name, path, in_axes):
    return TensorMap(_PREFIX + name, _hf_shape(leaves[path], in_axes), path, None, leaves[path], in_axes)

  pairs = [(layer, spec) for layer in range(cfg.n_layers) for spec in _BLOCK_TENSORS]
  if not layer_major:
    pairs.sort(key=lambda p: _BLOCK_TENSORS.index(p[1]))
  maps = ([top("wte.weight", ("wte",), 0)]
          + [block(layer, *spec) for layer, spec in pairs]
          + [top("ln_f.weight", ("ln_f", "weight"), 0), top("ff_out.weight", ("ff_out",), 1)])

  covered = {m.param_path for m in maps}
  if covered != set(leaves):
    raise RuntimeError(f"llada_jax.convert does not map the parameters {sorted(set(leaves) - covered)} "
                       f"(or maps unknown ones {sorted(covered - set(leaves))}); update _BLOCK_TENSORS")
  return maps


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig

# What the reference configuration_llada.ModelConfig uses when config.json leaves a field out:
# a missing field means the reference default, not the LLaDA-8B value.
_REFERENCE_DEFAULTS = {
    "n_kv_heads": None, "multi_query_attention": None, "mlp_ratio": 4, "mlp_hidden_size": None,
    "activation_type": "swiglu", "block_type": "sequential", "block_group_size": 1, "alibi": False,
    "rope": False, "attention_layer_norm": False, "input_emb_norm": False, "layer_norm_type": "default",
    "layer_norm_with_affine": True, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "include_qkv_bias": False,
    "include_bias": False, "bias_for_layer_norm": None, "scale_logits": False, "embedding_size": 50304,
    "weight_tying": True,
}

# (field, accepted value, what to say): configurations the llada_jax model reproduces exactly.
_SUPPORTED = (
    ("block_type", "llama", '"llama" (q/k/v projections, SwiGLU with a separate up_proj)'),
    ("activation_type", "silu", '"silu" (with block_type "llama" this is SwiGLU)'),
    ("layer_norm_type", "rms", '"rms" (RMSNorm)'),
    ("layer_norm_with_affine", True, "true (RMSNorm with a weight)"),
    ("include_bias", False, "false (no biases)"),
    ("include_qkv_bias", False, "false (no biases)"),
    ("bias_for_layer_norm", False, "false or null (no norm biases)"),
    ("attention_layer_norm", False, "false (no QK norm)"),
    ("rope", True, "true (rotary position embedding)"),
    ("alibi", False, "false"),
    ("weight_tying", False, "false (untied LM head)"),
    ("scale_logits", False, "false"),
    ("input_emb_norm", False, "false (no embedding scale)"),
    ("block_group_size", 1, "1"),
)
# Fields that must be absent or null: they change the math and the model has no equivalent.
_MUST_BE_NULL = ("rope_scaling", "clip_qkv")

# config.json of LLaDA-8B; architecture fields are overwritten from the ModelConfig on export.
_LLADA_CONFIG_TEMPLATE = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                 "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096,
    "mlp_hidden_size": 12288, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
    "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "use_cache": False, "vocab_size": 126464,
    "weight_tying": False,
}


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
  path = pathlib.Path(hf_dir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: not found; expected the config.json of a Hugging Face LLaDA checkpoint")
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(config, dict):
    raise ConversionError(f"{path}: expected a JSON object")
  return config


def model_config_from_hf(hf_config: Mapping[str, Any], *, where: str = CONFIG_FILE, tokenizer=None,
                         param_dtype: str = "float32", scan_layers: bool = False) -> model_lib.ModelConfig:
  """The llada_jax ModelConfig of a Hugging Face LLaDA config.json (checked field by field).

  Special ids come from config.json (`mask_token_id`, `eos_token_id`, `bos_token_id`) or else from
  `tokenizer`; where both give one they must agree.
  """
  def get(field):
    return hf_config.get(field, _REFERENCE_DEFAULTS.get(field))

  def fail(field, supported):
    shown = (json.dumps(hf_config[field]) if field in hf_config
             else f"absent (reference default {json.dumps(get(field))})")
    raise ConversionError(f"{where}: field '{field}' is {shown}; llada_jax supports {supported}")

  if "model_type" in hf_config and hf_config["model_type"] != "llada":
    fail("model_type", '"llada"')
  for field, accepted, supported in _SUPPORTED:
    value = get(field)
    if field == "bias_for_layer_norm" and value is None:
      continue  # null: follows include_bias, checked above
    if value is None and accepted is False:
      continue
    if value != accepted or type(value) is not type(accepted):
      fail(field, supported)
  for field in _MUST_BE_NULL:
    if hf_config.get(field) is not None:
      fail(field, "null (absent)")

  def positive_int(field, value=None):
    value = get(field) if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      if field not in hf_config:
        raise ConversionError(f"{where}: field '{field}' is missing; expected a positive integer")
      fail(field, "a positive integer")
    return value

  d, n_heads, n_layers = positive_int("d_model"), positive_int("n_heads"), positive_int("n_layers")
  if d % n_heads:
    fail("n_heads", f"a divisor of d_model={d}")
  if "head_dim" in hf_config and hf_config["head_dim"] not in (None, d // n_heads):
    fail("head_dim", f"null or d_model / n_heads = {d // n_heads}")

  multi_query, n_kv = get("multi_query_attention"), get("n_kv_heads")
  if n_kv is None:
    n_kv = 1 if multi_query else n_heads
  elif multi_query is not None and n_kv != (1 if multi_query else n_heads):
    fail("multi_query_attention", f"null, or a value consistent with n_kv_heads={n_kv}")
  n_kv = positive_int("n_kv_heads", n_kv)
  if n_heads % n_kv:
    fail("n_kv_heads", f"a divisor of n_heads={n_heads}")

  mlp = get("mlp_hidden_size")
  mlp = positive_int("mlp_hidden_size", mlp) if mlp is not None else positive_int("mlp_ratio") * d
  vocab = positive_int("vocab_size")
  embedding = get("embedding_size")
  embedding = vocab if embedding is None else positive_int("embedding_size", embedding)
  if embedding < vocab:
    fail("embedding_size", f"at least vocab_size={vocab} (the embedding rows)")

  floats = {}
  for field in ("rope_theta", "rms_norm_eps"):
    value = get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
      fail(field, "a positive number")
    floats[field] = float(value)

  ids = {}
  for field, tok_attr in (("mask_token_id", "mask_id"), ("eos_token_id", "eos_id"), ("bos_token_id", "bos_id")):
    from_config = hf_config.get(field)
    from_tok = getattr(tokenizer, tok_attr) if tokenizer is not None else None
    if from_config is not None and (isinstance(from_config, bool) or not isinstance(from_config, int)):
      fail(field, "an integer token id")
    if from_config is not None and from_tok is not None and from_config != from_tok:
      raise ConversionError(f"{where}: field '{field}' is {from_config} but the tokenizer {tokenizer.path} "
                            f"gives {from_tok}; expected them to agree")
    value = from_config if from_config is not None else from_tok
    if value is None:
      raise ConversionError(f"{where}: field '{field}' is missing and no tokenizer.json gives it; add it to "
                            "config.json or pass --tokenizer")
    if not 0 <= value < embedding:
      fail(field, f"an id below the embedding size {embedding}")
    ids[field] = value
  if param_dtype not in PARAM_DTYPES:
    raise ValueError(f"param_dtype={param_dtype!r}: expected one of {PARAM_DTYPES}")

  return model_lib.ModelConfig(
      vocab_size=embedding, d_model=d, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
      mlp_hidden_size=mlp, rope_theta=floats["rope_theta"], norm_eps=floats["rms_norm_eps"],
      param_dtype=param_dtype, scan_layers=scan_layers, **ids)


def hf_config_from_model(cfg: model_lib.ModelConfig, *, torch_dtype: str,
                         base: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """config.json for the reference modeling_llada.py.

  `base` (the config.json an imported checkpoint came with) keeps fields llada_jax does not model,
  such as max_sequence_length or a vocab_size below the embedding size; architecture fields always
  come from `cfg`.
  """
  if cfg.resolved_head_dim * cfg.n_heads != cfg.d_model:
    raise ConversionError(f"model.head_dim={cfg.head_dim}: the reference modeling_llada.py needs "
                          f"n_heads * head_dim = d_model ({cfg.n_heads} * {cfg.resolved_head_dim} != {cfg.d_model})")
  out = {**_LLADA_CONFIG_TEMPLATE, **dict(base or {})}
  for field, accepted, _ in _SUPPORTED:
    out[field] = accepted
  vocab = out.get("vocab_size")
  out.update(
      model_type="llada", d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.kv_heads,
      multi_query_attention=None, n_layers=cfg.n_layers, mlp_hidden_size=cfg.mlp_hidden_size,
      embedding_size=cfg.vocab_size,
      vocab_size=vocab if base is not None and isinstance(vocab, int) and vocab <= cfg.vocab_size else cfg.vocab_size,
      rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, mask_token_id=cfg.mask_token_id,
      eos_token_id=cfg.eos_token_id, bos_token_id=cfg.bos_token_id, torch_dtype=torch_dtype)
  if base is None or out.get("pad_token_id") is None:
    out["pad_token_id"] = cfg.eos_token_id  # LLaDA pads with EOS
  for field in _MUST_BE_NULL:
    out.pop(field, None)
  return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# Reading a Hugging Face directory


def find_weights(hf_dir: str | os.PathLike) -> dict[str, TensorEntry]:
  """Every tensor of the checkpoint in `hf_dir` (one file, or the shards its index lists)."""
  hf_dir = pathlib.Path(hf_dir)
  index_path, single = hf_dir / INDEX_FILE, hf_dir / SINGLE_FILE
  if index_path.is_file():
    try:
      weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
      raise ConversionError(f"{index_path}: expected JSON with a 'weight_map' object ({e!r})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise ConversionError(f"{index_path}: field 'weight_map' must map tensor names to file names")
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
      by_file.setdefault(file, []).append(name)
    entries: dict[str, TensorEntry] = {}
    for file, names in sorted(by_file.items()):
      path = hf_dir / file
      if not path.is_file():
        raise FileNotFoundError(f"{index_path}: shard '{file}' (listed for tensor '{names[0]}') does not exist "
                                f"in {hf_dir}")
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
  if single.is_file():
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
    hf = _hold(meter, read_tensor(entries[m.hf_name]))
    if hf.dtype != dtype:
      hf = _hold(meter, hf.astype(dtype))
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
  from llada_jax import config_lib  # noqa: PLC0415

  config = config_lib.base_config().to_dict()
  config["model"] = dataclasses.asdict(cfg)
  config["workdir"] = os.fspath(run_dir)
  config["data"]["tokenizer"] = tokenizer_path
  return {"config": config, "huggingface": {"source": os.fspath(hf_dir), "config": dict(hf_config)}}


def _staging_dir(dest: pathlib.Path) -> pathlib.Path:
  if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
    raise ValueError(f"{dest} already exists and is not empty; expected a new directory (nothing is overwritten)")
  dest.parent.mkdir(parents=True, exist_ok=True)
  return pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))


def _commit(staging: pathlib.Path, dest: pathlib.Path) -> None:
  if dest.exists():
    dest.rmdir()  # empty (checked by _staging_dir)
  os.rename(staging, dest)


def import_checkpoint(hf_dir: str | os.PathLike, run_dir: str | os.PathLike, *, param_dtype: str = "float32",
                      scan_layers: bool = False, tokenizer: str | os.PathLike | None = None,
                      meter: HeldBytes | None = None) -> model_lib.ModelConfig:
  """Converts a Hugging Face LLaDA directory into a llada_jax run directory; returns its ModelConfig.

  `tokenizer`: a tokenizer.json to use and copy (default: `hf_dir/tokenizer.json` if present).
  Everything is checked (config, files, tensor names and shapes) before anything is written.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from llada_jax import checkpoint as ckpt_lib  # noqa: PLC0415
  from llada_jax.data import tokenizer as tok_lib  # noqa: PLC0415

  hf_dir, run_dir = pathlib.Path(hf_dir), pathlib.Path(run_dir).absolute()
  if not hf_dir.is_dir():
    raise FileNotFoundError(f"{hf_dir}: not a directory; expected a Hugging Face LLaDA checkpoint directory")
  hf_config = read_hf_config(hf_dir)
  tok_path = pathlib.Path(tokenizer) if tokenizer else hf_dir / tok_lib.HF_TOKENIZER_FILE
  tok = tok_lib.HuggingFaceTokenizer(tok_path) if tokenizer or tok_path.is_file() else None
  cfg = model_config_from_hf(hf_config, where=os.fspath(hf_dir / CONFIG_FILE), tokenizer=tok,
                             param_dtype=param_dtype, scan_layers=scan_layers)
  if tok is not None:
    tok_lib.check_vocab(tok, cfg.vocab_size)
  maps = tensor_maps(cfg)
  entries = find_weights(hf_dir)
  _match(maps, entries, cfg, hf_dir)
  params = _lazy_params(maps, entries, cfg, meter)

  staging = _staging_dir(run_dir)
  try:
    tokenizer_dest = ""
    if tok is not None:
      for name in TOKENIZER_FILES:
        source = tok_path if name == tok_lib.HF_TOKENIZER_FILE else tok_path.parent / name
        if source.is_file():
          shutil.copyfile(source, staging / name)
      tokenizer_dest = os.fspath(run_dir / tok_lib.HF_TOKENIZER_FILE)
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
    _commit(staging, run_dir)
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
    from llada_jax import checkpoint as ckpt_lib  # noqa: PLC0415

    self._ocp, self._state, self._meter = ocp, ckpt_lib.STATE, meter
    self._manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_handlers=ckpt_lib._item_handlers(ocp.PyTreeCheckpointHandler()))  # pylint: disable=protected-access
    steps = self._manager.all_steps()
    self.step = self._manager.latest_step() if step is None else int(step)
    if self.step is None or self.step not in steps:
      raise FileNotFoundError(f"{directory}: no finished checkpoint{'' if step is None else f' for step {step}'} "
                              f"(available steps: {sorted(steps)})")
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
      self._path, self._array = path, _hold(self._meter, np.asarray(array))
    return self._array

  def close(self):
    self._path, self._array = None, None
    self._manager.close()


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, step: int | None = None,
                      dtype: str = "float32", max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                      copy_from: str | os.PathLike | None = None, meter: HeldBytes | None = None) -> dict:
  """Writes a llada_jax checkpoint (a run dir or its checkpoints/ dir) in the Hugging Face LLaDA layout.

  Returns a summary: the files written, their tensors and the total size.
  """
  from llada_jax import checkpoint as ckpt_lib  # noqa: PLC0415

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

  with ckpt_lib.CheckpointManager(directory, read_only=True) as manager:
    found = manager.latest_step() if step is None else step
    metadata = manager.read_metadata(found)
  config = metadata.get("config") or {}
  if "model" not in config:
    raise ConversionError(f"checkpoint step {found} in {directory}: its run metadata has no config.model")
  cfg = model_lib.ModelConfig.from_dict(config["model"])
  maps = tensor_maps(cfg, layer_major=not cfg.scan_layers)
  out_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)

  reader = _LeafReader(directory, found, meter)
  try:
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
    staging = _staging_dir(out_dir)
    try:
      total = 0
      for file, specs in zip(names, shards):
        total += write_safetensors(staging / file, specs, tensor, metadata={"format": "pt"})
      if len(shards) > 1:
        weight_map = {spec[0]: file for file, specs in zip(names, shards) for spec in specs}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
      hf_config = hf_config_from_model(cfg, torch_dtype=dtype, base=(metadata.get("huggingface") or {}).get("config"))
      if copy_from is not None:
        _copy_support_files(pathlib.Path(copy_from), staging)
      (staging / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
      _commit(staging, out_dir)
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


# ---------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m llada_jax.convert", description=__doc__.split("\n")[0])
  commands = p.add_subparsers(dest="command", required=True)
  imp = commands.add_parser("import", help="Hugging Face LLaDA directory -> llada_jax run directory")
  imp.add_argument("hf_dir", help="directory with config.json and model.safetensors (or shards + index)")
  imp.add_argument("run_dir", help="new run directory to write (must not exist or be empty)")
  imp.add_argument("--param_dtype", choices=PARAM_DTYPES, default="float32",
                   help="dtype of the stored parameters (bfloat16 weights convert to float32 exactly)")
  imp.add_argument("--scan_layers", action="store_true",
                   help="store the blocks stacked, for training configs with model.scan_layers=True")
  imp.add_argument("--tokenizer", default=None, help="tokenizer.json (default: HF_DIR/tokenizer.json if present)")
  exp = commands.add_parser("export", help="llada_jax run directory -> Hugging Face LLaDA directory")
  exp.add_argument("checkpoint", help="a run directory or its checkpoints/ directory")
  exp.add_argument("out_dir", help="new directory to write (must not exist or be empty)")
  exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  exp.add_argument("--dtype", choices=PARAM_DTYPES, default="float32", help="dtype of the written tensors")
  exp.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE,
                   help="largest shard file, e.g. 5GB, 500MB, 2GiB (a larger single tensor gets its own shard)")
  exp.add_argument("--copy_from", default=None,
                   help="a Hugging Face LLaDA directory whose modeling/configuration .py files, tokenizer and "
                        "generation config are copied beside the weights")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.command == "import":
      cfg = import_checkpoint(args.hf_dir, args.run_dir, param_dtype=args.param_dtype,
                              scan_layers=args.scan_layers, tokenizer=args.tokenizer)
      print(f"wrote {args.run_dir}: {cfg.num_params():,} parameters; model config "
            f"{json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if v is not None})}")
    else:
      summary = export_checkpoint(args.checkpoint, args.out_dir, step=args.step, dtype=args.dtype,
                                  max_shard_size=args.max_shard_size, copy_from=args.copy_from)
      print(f"wrote {args.out_dir}: step {summary['step']}, {summary['tensors']} tensors, "
            f"{summary['total_size']:,} bytes ({summary['dtype']}) in {len(summary['files'])} file(s)")
  except cli.USER_ERRORS as e:
    return cli.fail(e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
