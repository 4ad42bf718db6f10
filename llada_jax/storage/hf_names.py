"""Tensor names: Hugging Face `model.transformer.*` <-> the llada_jax parameter tree.

Flax kernels are `[in, out]` with heads split out; Hugging Face (PyTorch) weights are `[out, in]`.
A `TensorMap` says which parameter (or which layer of a scanned one) a Hugging Face tensor becomes
and how its axes are laid out, both ways.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from llada_jax import model as model_lib

PREFIX = "model.transformer."

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
    return TensorMap(f"{PREFIX}blocks.{layer}.{name}", _hf_shape(shape, in_axes), path,
                     layer if scanned else None, shape, in_axes)

  def top(name, path, in_axes):
    return TensorMap(PREFIX + name, _hf_shape(leaves[path], in_axes), path, None, leaves[path], in_axes)

  pairs = [(layer, spec) for layer in range(cfg.n_layers) for spec in _BLOCK_TENSORS]
  if not layer_major:
    pairs.sort(key=lambda p: _BLOCK_TENSORS.index(p[1]))
  maps = ([top("wte.weight", ("wte",), 0)]
          + [block(layer, *spec) for layer, spec in pairs]
          + [top("ln_f.weight", ("ln_f", "weight"), 0), top("ff_out.weight", ("ff_out",), 1)])

  covered = {m.param_path for m in maps}
  if covered != set(leaves):
    raise RuntimeError(f"llada_jax.storage.hf_names does not map the parameters {sorted(set(leaves) - covered)} "
                       f"(or maps unknown ones {sorted(covered - set(leaves))}); update _BLOCK_TENSORS")
  return maps

