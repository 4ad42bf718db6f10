"""LoRA adapters in the PEFT layout <-> llada_jax LoRA runs, and a LoRA run's merged model.

The command line is `python -m llada_jax.convert export --peft|import-peft` (docs/interop.md, "LoRA
adapters"). A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors`
with one `lora_A` / `lora_B` pair per adapted `nn.Linear` of the reference `modeling_llada.py`:

  base_model.model.model.transformer.blocks.{i}.{module}.lora_A.weight   [r, in_features]
  base_model.model.model.transformer.blocks.{i}.{module}.lora_B.weight   [out_features, r]

flattened like the module's own `[out, in]` weight (`hf_names`), so that the merged weight is
W + (lora_alpha / r) B A. llada_jax keeps A `[*in, r]` and B `[r, *out]` beside the Flax kernel
`[*in, *out]` (`llada_jax.lora`); the conversion is the kernel's own transpose and reshape.

Export reads the adapters of a LoRA run (small) and writes both files. Import checks
`adapter_config.json` and every tensor against a base run and writes a run directory whose
checkpoint holds the adapters and whose run config names the base (`checkpoint.init_from`), as a
LoRA training run's does. `MergedReader` serves the merged model to `huggingface.export_checkpoint`
one parameter at a time: the base leaf is read from its checkpoint and the adapters are folded in
with `lora.merge`, so the merged export streams like the base's.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import pathlib
import re
import shutil
from typing import Any, Mapping, NoReturn

import ml_dtypes
import numpy as np

from llada_jax import lora, model as model_lib
from llada_jax.storage import huggingface
from llada_jax.storage.hf_names import PREFIX, TensorMap, tensor_maps
from llada_jax.storage.hf_safetensors import (ConversionError, decode_error, file_inside, read_header, read_tensor,
                                              write_safetensors)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the wrapped LLaDAModelLM
LAYERS_PATTERN = "blocks"

# adapter_config.json fields whose other values change what the adapters compute, with the value
# (PEFT's default) that llada_jax's x W + (alpha / r) (x A) B reproduces.
_MUST_BE = (
    ("bias", "none", '"none" (no bias adapters)'),
    ("use_rslora", False, "false (scale alpha / r; rsLoRA's alpha / sqrt(r) is not supported)"),
    ("use_dora", False, "false (DoRA's magnitude vectors are not supported)"),
    ("fan_in_fan_out", False, "false (LLaDA's projections are nn.Linear)"),
    ("lora_bias", False, "false (no bias on lora_B)"),
)
# Fields that must be absent, null or empty: per-module ranks, extra trained modules, ...
_MUST_BE_EMPTY = ("rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication", "exclude_modules",
                  "target_parameters", "trainable_token_indices", "alora_invocation_tokens")

_LAYER = re.compile(r"\.blocks\.(\d+)\.")


# ---------------------------------------------------------------------------------------------
# Names and layouts


def adapter_maps(cfg: model_lib.ModelConfig) -> tuple[TensorMap, ...]:
  """The PEFT tensors of a LoRA config's adapters, lora_A then lora_B per adapted module.

  Each is a `TensorMap` onto an adapter leaf (`<kernel>_lora_a` / `_lora_b`): A `[*in, r]` maps to
  `[r, in]` (its `in` axes are the kernel's), B `[r, *out]` to `[out, r]`, so `to_hf` / `to_flax`
  convert them like the kernels. Order: layer by layer unless `scan_layers`.
  """
  return _layout(cfg)[0]


@functools.lru_cache(maxsize=4)
def _layout(cfg: model_lib.ModelConfig):
  """(adapter_maps, the abstract adapters) of `cfg`: tracing the model's init for its shapes is slow,
  and an export or import asks several times."""
  r = cfg.lora_rank
  maps = []
  for m in tensor_maps(lora.base_config(cfg), layer_major=not cfg.scan_layers):
    name = m.param_path[-1]
    if not m.hf_name.startswith(PREFIX + "blocks.") or name not in cfg.lora_targets:
      continue
    module = PEFT_PREFIX + m.hf_name[:-len(".weight")]
    in_shape, out_shape = m.flax_shape[:m.in_axes], m.flax_shape[m.in_axes:]
    parent = m.param_path[:-1]
    maps.append(TensorMap(f"{module}.lora_A.weight", (r, math.prod(in_shape)), parent + (name + lora.SUFFIX_A,),
                          m.layer, in_shape + (r,), len(in_shape)))
    maps.append(TensorMap(f"{module}.lora_B.weight", (math.prod(out_shape), r), parent + (name + lora.SUFFIX_B,),
                          m.layer, (r,) + out_shape, 1))
  abstract = lora.split(model_lib.abstract_params(cfg))[0]
  leaves = {path for path, _ in _flat_items(abstract)}
  if {m.param_path for m in maps} != leaves:  # a new adapted kernel must not be exported without its adapters
    raise RuntimeError(f"llada_jax.storage.peft maps the adapters {sorted({m.param_path for m in maps})}, but the "
                       f"model has {sorted(leaves)}")
  return tuple(maps), abstract


def layer_of(m: TensorMap) -> int:
  return int(_LAYER.search(m.hf_name).group(1))


def target_modules(cfg: model_lib.ModelConfig) -> list[str]:
  return [t for t in lora.TARGETS if t in cfg.lora_targets]


def adapter_config(cfg: model_lib.ModelConfig, base_model: str | None) -> dict[str, Any]:
  """adapter_config.json for the adapters of `cfg`.

  `target_modules` alone would also match the LM head `model.transformer.ff_out` when `ff_out` is
  adapted (PEFT matches name suffixes); `layers_to_transform` with `layers_pattern` "blocks" keeps
  the match to the blocks' modules.
  """
  alpha = cfg.lora_alpha
  return {
      "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "inference_mode": True,
      "r": cfg.lora_rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
      "target_modules": target_modules(cfg), "layers_to_transform": list(range(cfg.n_layers)),
      "layers_pattern": LAYERS_PATTERN, "lora_dropout": float(cfg.lora_dropout), "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False, "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
      "init_lora_weights": True,
  }


# ---------------------------------------------------------------------------------------------
# Reading a LoRA run


def _run_config(directory: pathlib.Path, step: int | None) -> tuple[int, dict]:
  """(step, run metadata) of the checkpoint at `step` (None: the latest) in a checkpoints directory."""
  from llada_jax.storage import checkpoint as ckpt_lib  # noqa: PLC0415

  with ckpt_lib.CheckpointManager(directory, read_only=True) as manager:
    found = manager.resolve_step(step)
    metadata = manager.read_metadata(found)
  if "model" not in (metadata.get("config") or {}):
    raise ConversionError(f"checkpoint step {found} in {directory}: its run metadata has no config.model")
  return found, metadata


def _lora_run(directory: pathlib.Path, step: int | None) -> tuple[int, dict, model_lib.ModelConfig]:
  found, metadata = _run_config(directory, step)
  cfg = model_lib.ModelConfig.from_dict(metadata["config"]["model"])
  if not cfg.lora_rank:
    raise ValueError(f"checkpoint step {found} in {directory}: config.model.lora_rank is 0; expected a LoRA run "
                     "(export without --peft writes a full model)")
  return found, metadata["config"], cfg


def _load_adapters(directory: pathlib.Path, step: int, cfg) -> dict[tuple[str, ...], np.ndarray]:
  """A LoRA run's adapters (its whole `state.params`), flat, as host arrays."""
  from llada_jax.storage import checkpoint as ckpt_lib  # noqa: PLC0415

  adapters = ckpt_lib.load_params(directory, _layout(cfg)[1], step=step)
  return {path: np.asarray(leaf) for path, leaf in _flat_items(adapters)}


def _flat_items(tree, prefix=()):
  if isinstance(tree, Mapping):
    for key, sub in tree.items():
      yield from _flat_items(sub, prefix + (str(key),))
  else:
    yield prefix, tree


def _base_source(config: Mapping[str, Any]) -> tuple[str, int | None]:
  """(the base's checkpoints directory or "" for the seeded init, its step or None for the latest)."""
  ckpt = config.get("checkpoint") or {}
  step = ckpt.get("init_step", -1)
  return ckpt.get("init_from") or "", None if step is None or step < 0 else step


class MergedReader:
  """The merged parameters of a LoRA run, one leaf at a time, for `huggingface.export_checkpoint`.

  Same interface as its `_LeafReader`: `step`, `where`, `stored_params()`, `get(path)`, `close()`.
  The base leaf comes from `checkpoint.init_from` (or the seeded init the run trained on without
  one), is cast to `lora_base_dtype` as training held it, and gets its adapters folded in by
  `lora.merge`: the same numbers as `checkpoint.load_model`.
  """

  def __init__(self, directory: pathlib.Path, step: int, cfg: model_lib.ModelConfig, config: Mapping, meter=None):
    self.step, self._cfg = step, cfg
    self._adapters = _load_adapters(directory, step, cfg)
    source, base_step = _base_source(config)
    self._tree, self._base, self.base_hf_config = None, None, None
    if source:
      base_dir = huggingface._checkpoint_dir(pathlib.Path(source))  # pylint: disable=protected-access
      base_step, base_metadata = _run_config(base_dir, base_step)
      self.base_hf_config = (base_metadata.get("huggingface") or {}).get("config")
      self._base = huggingface._LeafReader(base_dir, base_step, meter)  # pylint: disable=protected-access
      self.where = self._base.where
    else:
      import jax  # noqa: PLC0415

      base = lora.split(model_lib.init_params(cfg, jax.random.key(config.get("seed", 0))))[1]
      self._tree = {path: np.asarray(leaf) for path, leaf in _flat_items(base)}
      self.where = f"the seeded init (seed {config.get('seed', 0)}) of checkpoint step {step} in {directory}"
    self._path, self._array = None, None

  def stored_params(self) -> dict[tuple[str, ...], tuple[int, ...]]:
    if self._base is not None:
      return self._base.stored_params()
    return {path: tuple(leaf.shape) for path, leaf in self._tree.items()}

  def get(self, path: tuple[str, ...]) -> np.ndarray:
    if path != self._path:
      self._path, self._array = None, None  # released before the next leaf is read
      base = self._base.get(path) if self._base is not None else self._tree[path]
      if self._cfg.lora_base_dtype:
        base = base.astype(self._cfg.lora_base_dtype)
      a_path = path[:-1] + (path[-1] + lora.SUFFIX_A,)
      if a_path in self._adapters:
        b_path = path[:-1] + (path[-1] + lora.SUFFIX_B,)
        tree = {"w": base, "w" + lora.SUFFIX_A: self._adapters[a_path], "w" + lora.SUFFIX_B: self._adapters[b_path]}
        base = np.asarray(lora.merge(tree, self._cfg)["w"])
      self._path, self._array = path, base
    return self._array

  def close(self):
    self._path, self._array = None, None
    if self._base is not None:
      self._base.close()


# ---------------------------------------------------------------------------------------------
# Export


def export_adapters(run: str | os.PathLike, out_dir: str | os.PathLike, *, step: int | None = None,
                    dtype: str = "float32", overwrite: bool = False) -> dict:
  """Writes a LoRA run's adapters as a PEFT adapter directory; returns a summary of what was written.

  `overwrite` replaces an existing `out_dir` once the new one is complete.
  """
  if dtype not in huggingface.PARAM_DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {huggingface.PARAM_DTYPES}")
  source = pathlib.Path(run)
  if not source.is_dir():
    raise FileNotFoundError(f"{source}: not a directory; expected a llada_jax LoRA run directory")
  directory = huggingface._checkpoint_dir(source)  # pylint: disable=protected-access
  out_dir = pathlib.Path(out_dir).absolute()
  huggingface.check_destination(out_dir, overwrite=overwrite, sources=(source,))
  found, config, cfg = _lora_run(directory, step)
  adapters = _load_adapters(directory, found, cfg)
  maps = adapter_maps(cfg)
  by_name = {m.hf_name: m for m in maps}
  out_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)

  def tensor(name):
    m = by_name[name]
    leaf = adapters[m.param_path]
    return m.to_hf(leaf if m.layer is None else leaf[m.layer])

  base_model = _base_source(config)[0] or None
  staging = huggingface._staging_dir(out_dir, overwrite)  # pylint: disable=protected-access
  try:
    total = write_safetensors(staging / ADAPTER_WEIGHTS, [(m.hf_name, out_dtype, m.hf_shape) for m in maps], tensor,
                              metadata={"format": "pt"})
    text = json.dumps(adapter_config(cfg, base_model), indent=2) + "\n"
    (staging / ADAPTER_CONFIG).write_text(text, encoding="utf-8")
    huggingface._commit(staging, out_dir, overwrite)  # pylint: disable=protected-access
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return {"files": [ADAPTER_CONFIG, ADAPTER_WEIGHTS], "total_size": total, "tensors": len(maps), "step": found,
          "dtype": dtype, "r": cfg.lora_rank, "target_modules": target_modules(cfg)}


# ---------------------------------------------------------------------------------------------
# Import


def read_adapter_config(peft_dir: pathlib.Path, *, allow_outside_links: bool = False) -> dict[str, Any]:
  where = os.fspath(peft_dir / ADAPTER_CONFIG)
  path = file_inside(peft_dir, ADAPTER_CONFIG, where=where, allow_outside_links=allow_outside_links)
  if path is None:
    raise FileNotFoundError(f"{where}: not found; expected the adapter_config.json of a PEFT LoRA adapter")
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f"{where}: not valid JSON ({decode_error(e)})") from None
  if not isinstance(config, dict):
    raise ConversionError(f"{where}: expected a JSON object")
  return config


def _lora_fields(peft_config: Mapping[str, Any], base_cfg, where: str) -> tuple[dict, list[int]]:
  """(the ModelConfig's lora fields, the layers that have adapters) of a checked adapter_config.json."""

  def fail(field, expected) -> NoReturn:
    shown = json.dumps(peft_config[field]) if field in peft_config else "missing"
    raise ConversionError(f"{where}: field '{field}' is {shown}; expected {expected}")

  if peft_config.get("peft_type") != "LORA":
    fail("peft_type", '"LORA"')
  for field, accepted, expected in _MUST_BE:
    value = peft_config.get(field, accepted)
    if value != accepted or type(value) is not type(accepted):
      fail(field, expected)
  for field in _MUST_BE_EMPTY:
    if peft_config.get(field) not in (None, {}, [], ""):
      fail(field, "null or empty (llada_jax adapts the blocks' projections with one rank and alpha)")
  r, alpha = peft_config.get("r"), peft_config.get("lora_alpha")
  if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
    fail("r", "a positive integer")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    fail("lora_alpha", "a positive number")
  dropout = peft_config.get("lora_dropout", 0.0)
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
    fail("lora_dropout", "a rate in [0, 1)")
  targets = peft_config.get("target_modules")
  names = f"a list of LLaDA's projections {list(lora.TARGETS)}"
  if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
    fail("target_modules", names)
  unknown = [t for t in targets if t not in lora.TARGETS]
  if unknown:
    raise ConversionError(f"{where}: field 'target_modules' names {json.dumps(unknown[0])}; expected {names}")
  layers = peft_config.get("layers_to_transform")
  layers = list(range(base_cfg.n_layers)) if layers in (None, []) else [layers] if isinstance(layers, int) else layers
  if not isinstance(layers, list) or not all(type(i) is int and 0 <= i < base_cfg.n_layers for i in layers):
    fail("layers_to_transform", f"null or layer indices below the base's n_layers={base_cfg.n_layers}")
  if peft_config.get("layers_to_transform") not in (None, []) and peft_config.get("layers_pattern") not in (
      None, "", LAYERS_PATTERN, [LAYERS_PATTERN]):
    fail("layers_pattern", f'null or "{LAYERS_PATTERN}" (LLaDA\'s blocks are model.transformer.blocks.{{i}})')
  fields = dict(lora_rank=r, lora_alpha=float(alpha), lora_dropout=float(dropout),
                lora_targets=tuple(t for t in lora.TARGETS if t in targets))
  return fields, sorted(set(layers))


def _check_tensors(maps, entries, layers, path: pathlib.Path, r: int) -> None:
  """Every tensor of the adapted layers present with its shape, and nothing else."""
  expected = {m.hf_name: m for m in maps if layer_of(m) in layers}
  missing = [name for name in expected if name not in entries]
  if missing:
    raise ConversionError(f"{path}: tensor '{missing[0]}' is missing ({len(missing)} of the {len(expected)} "
                          f"tensors {ADAPTER_CONFIG} implies are missing)")
  unexpected = sorted(set(entries) - set(expected))
  if unexpected:
    raise ConversionError(f"{path}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} in all); expected only "
                          f"lora_A / lora_B of the target_modules in the adapted blocks (LoRA on the embedding, the "
                          f"LM head or biases is not supported)")
  for name, m in expected.items():
    if entries[name].shape != m.hf_shape:
      raise ConversionError(f"{path}: tensor '{name}' has shape {list(entries[name].shape)}; expected "
                            f"{list(m.hf_shape)} (r={r} from {ADAPTER_CONFIG}, the features from the base's model "
                            "config)")


def _adapter_tree(maps, entries, layers, cfg) -> dict:
  """The adapters in the llada_jax layout; layers PEFT left alone get exact zeros (no change)."""
  dtype = np.dtype(cfg.weight_dtype)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for m in maps:
    if m.param_path not in flat:
      shape = m.flax_shape if m.layer is None else (cfg.n_layers,) + m.flax_shape
      flat[m.param_path] = np.zeros(shape, dtype)
    if layer_of(m) in layers:
      value = m.to_flax(read_tensor(entries[m.hf_name]).astype(dtype))
      if m.layer is None:
        flat[m.param_path][...] = value
      else:
        flat[m.param_path][m.layer] = value
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def import_adapters(peft_dir: str | os.PathLike, run_dir: str | os.PathLike, *, base: str | os.PathLike,
                    overwrite: bool = False, allow_outside_links: bool = False) -> model_lib.ModelConfig:
  """Converts a PEFT LoRA adapter directory into a llada_jax LoRA run on `base` (a run directory).

  Everything is checked before anything is written; returns the run's ModelConfig (with its lora fields).
  """
  from llada_jax.storage import checkpoint as ckpt_lib  # noqa: PLC0415

  peft_dir, run_dir, base = pathlib.Path(peft_dir), pathlib.Path(run_dir).absolute(), pathlib.Path(base)
  if not peft_dir.is_dir():
    raise FileNotFoundError(f"{peft_dir}: not a directory; expected a PEFT adapter directory")
  if not base.is_dir():
    raise FileNotFoundError(f"--base {base}: not a directory; expected the llada_jax run directory of the base model")
  huggingface.check_destination(run_dir, overwrite=overwrite, sources=(peft_dir, base))
  peft_config = read_adapter_config(peft_dir, allow_outside_links=allow_outside_links)
  base_dir = huggingface._checkpoint_dir(base).absolute()  # pylint: disable=protected-access
  base_step, base_metadata = _run_config(base_dir, None)
  base_cfg = model_lib.ModelConfig.from_dict(base_metadata["config"]["model"])
  if base_cfg.lora_rank:
    raise ValueError(f"--base {base}: config.model.lora_rank is {base_cfg.lora_rank}; expected a full model, not "
                     "a LoRA run")
  fields, layers = _lora_fields(peft_config, base_cfg, os.fspath(peft_dir / ADAPTER_CONFIG))
  cfg = base_cfg.replace(**fields)
  maps = adapter_maps(cfg)
  where = os.fspath(peft_dir / ADAPTER_WEIGHTS)
  weights = file_inside(peft_dir, ADAPTER_WEIGHTS, where=where, allow_outside_links=allow_outside_links)
  if weights is None:
    hint = " (save it with safe_serialization=True)" if (peft_dir / "adapter_model.bin").exists() else ""
    raise FileNotFoundError(f"{where}: not found; expected the adapter's safetensors weights{hint}")
  entries = read_header(weights)
  _check_tensors(maps, entries, layers, weights, cfg.lora_rank)
  adapters = _adapter_tree(maps, entries, layers, cfg)

  config = copy.deepcopy(base_metadata["config"])
  config["model"] = dataclasses.asdict(cfg)
  config["workdir"] = os.fspath(run_dir)
  config.setdefault("checkpoint", {}).update(init_from=os.fspath(base_dir), init_step=base_step)
  metadata = {"config": config, "peft": {"source": os.fspath(peft_dir.absolute()), "config": peft_config}}
  staging = huggingface._staging_dir(run_dir, overwrite)  # pylint: disable=protected-access
  try:
    with ckpt_lib.CheckpointManager(staging / "checkpoints", async_save=False, metadata=metadata) as manager:
      manager.save(0, {"params": adapters}, force=True)
    huggingface._commit(staging, run_dir, overwrite)  # pylint: disable=protected-access
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return cfg
