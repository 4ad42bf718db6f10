"""LoRA adapters on the model's projections (docs/method.md, "LoRA").

A targeted kernel W of shape [*in, *out] gains A [*in, r] and B [r, *out]; the projection of x becomes

    x W + (alpha / r) (x A) B.

A starts as a truncated normal with std 1/sqrt(fan_in) and B at zero, so at initialisation the
adapter's term is exactly zero and the model is exactly its base. The adapters are ordinary
parameters of the model (`<kernel>_lora_a`, `<kernel>_lora_b` beside the kernel, logical axis
`lora` for r, unsharded), so sharding, scanning and remat treat them like the rest; training splits
them from the frozen base (`split`, `combine`). With the adapters at zero the model computes its base
bit for bit, which is how LoRA-VRPO runs its reference without a second copy of the weights.

Adapter dropout (rate `lora_dropout`, training only) zeroes entries of the adapter's input x before A,
as PEFT does. Its randomness follows the example, not the batch: the objective passes one key per
example (per noised copy), the model folds in each token's position in its example's frame, the layer
and the target. An example therefore draws the same dropout alone in a padded row as inside a packed
one, in any micro-batch, and in each chunk of noised copies.
"""

from __future__ import annotations

import math
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from llada_jax.matmul import contract

Array = jax.Array

TARGETS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"
AXIS = "lora"


def scale(cfg) -> float:
  return cfg.lora_alpha / cfg.lora_rank


def targeted(cfg, name: str) -> bool:
  return cfg.lora_rank > 0 and name in cfg.lora_targets


def declare(module: nn.Module, cfg, p: dict, name: str, in_shape, in_axes, out_shape, out_axes, dtype) -> None:
  """Adds `name`'s adapters to the kernels `p` of a Flax module when the config targets it."""
  if not targeted(cfg, name):
    return
  r = cfg.lora_rank
  std = 1.0 / math.sqrt(math.prod(in_shape))
  init_a = nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)
  p[name + SUFFIX_A] = module.param(name + SUFFIX_A, nn.with_logical_partitioning(init_a, (*in_axes, AXIS)),
                                    (*in_shape, r), dtype)
  p[name + SUFFIX_B] = module.param(name + SUFFIX_B, nn.with_logical_partitioning(nn.initializers.zeros,
                                                                                  (AXIS, *out_axes)),
                                    (r, *out_shape), dtype)


def adapter_specs(spec: str) -> tuple[str, str]:
  """The einsums of x A and (x A) B for a projection `spec` "x,W->y" (r is the rank's index)."""
  operands, out = spec.split("->")
  xs, ws = operands.split(",")
  contracted = "".join(c for c in ws if c in xs)
  produced = "".join(c for c in ws if c in out)
  kept = "".join(c for c in xs if c not in ws)
  return f"{xs},{contracted}r->{kept}r", f"{kept}r,r{produced}->{out}"


def token_keys(keys: Array, segment_ids: Array | None, positions: Array) -> Array:
  """Raw key data [b, t, 2] of each token's dropout stream from per-example keys.

  `keys`: typed keys [b] (one example per row) or [b, K] (packed: slot s is segment s + 1).
  `positions` [b, t]: each token's position in its example's frame.
  """
  if segment_ids is None:
    per_token = jnp.broadcast_to(keys[:, None], positions.shape)
  else:
    slot = jnp.clip(segment_ids - 1, 0, keys.shape[1] - 1)
    per_token = jax.random.wrap_key_data(
        jnp.take_along_axis(jax.random.key_data(keys), slot[..., None], axis=1))
  folded = jax.vmap(jax.vmap(jax.random.fold_in))(per_token, positions)
  return jax.random.key_data(folded)


def dropout(cfg, x: Array, keys_bt: Array, layer_index, name: str) -> Array:
  """x with entries zeroed at rate cfg.lora_dropout (the rest scaled by 1 / keep), drawn per token
  from `keys_bt` (`token_keys`), the layer and the target."""
  keep = 1.0 - cfg.lora_dropout

  def token_mask(data):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(data), layer_index), TARGETS.index(name))
    return jax.random.bernoulli(key, keep, x.shape[2:])

  kept = jax.vmap(jax.vmap(token_mask))(keys_bt)
  return jnp.where(kept, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def project(cfg, p: Mapping[str, Array], name: str, spec: str, x: Array, out_dtype, drop=None) -> Array:
  """`contract(spec, x, p[name])`, plus the adapter's term where `p` holds adapters for `name`.

  `drop`: (token keys [b, t, 2], layer index) to apply adapter dropout, or None."""
  cdt = cfg.compute_dtype
  y = contract(spec, x, p[name].astype(cdt), out_dtype)
  if name + SUFFIX_A not in p:
    return y
  spec_a, spec_b = adapter_specs(spec)
  if drop is not None:
    x = dropout(cfg, x, drop[0], drop[1], name)
  h = contract(spec_a, x, p[name + SUFFIX_A].astype(cdt), cdt)
  return y + (scale(cfg) * contract(spec_b, h, p[name + SUFFIX_B].astype(cdt), jnp.float32)).astype(out_dtype)


# --------------------------------------------------------------------------------------------
# Parameter trees.


def _is_adapter_path(path) -> bool:
  return path[-1].endswith(SUFFIX_A) or path[-1].endswith(SUFFIX_B)


def split(params) -> tuple[dict, dict]:
  """(adapters, base): the adapter leaves and everything else, each as a nested dict."""
  flat = traverse_util.flatten_dict(params)
  adapters = {k: v for k, v in flat.items() if _is_adapter_path(k)}
  base = {k: v for k, v in flat.items() if not _is_adapter_path(k)}
  return traverse_util.unflatten_dict(adapters), traverse_util.unflatten_dict(base)


def combine(base, adapters) -> dict:
  """The model's full parameter tree from the frozen base and the adapters."""
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(base), **traverse_util.flatten_dict(adapters)})


def switched_off(adapters):
  """Adapters whose term is exactly zero: with them the model computes its base."""
  return jax.tree_util.tree_map(jnp.zeros_like, adapters)


def delta(a: Array, b: Array, kernel_shape) -> Array:
  """A B in the kernel's shape, in float32 (without alpha / r). Leading axes that a, b and the kernel
  share (a scanned model's layers) are kept: lead = a.ndim + b.ndim - 2 - kernel.ndim."""
  lead = a.ndim + b.ndim - 2 - len(kernel_shape)
  r = a.shape[-1]
  a2 = a.astype(jnp.float32).reshape(a.shape[:lead] + (-1, r))
  b2 = b.astype(jnp.float32).reshape(b.shape[:lead] + (r, -1))
  return jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(kernel_shape)


def merge(params, cfg) -> dict:
  """The base tree with every adapter folded in: W + (alpha / r) A B, in W's dtype."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, value in flat.items():
    if _is_adapter_path(path):
      continue
    a_path = path[:-1] + (path[-1] + SUFFIX_A,)
    if a_path in flat:
      b = flat[path[:-1] + (path[-1] + SUFFIX_B,)]
      update = scale(cfg) * delta(flat[a_path], b, value.shape)
      value = (value.astype(jnp.float32) + update).astype(value.dtype)
    out[path] = value
  return traverse_util.unflatten_dict(out)


def base_config(cfg):
  """The model config of the base alone (no adapters)."""
  return cfg.replace(lora_rank=0, lora_dropout=0.0)
