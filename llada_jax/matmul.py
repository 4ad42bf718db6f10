"""The one matmul of the model: `contract`, float32 accumulation and explicit gradients.

Every projection, attention product and LoRA adapter product goes through `contract`, so the
numerics (docs/numerics.md) and the remat names are the same everywhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array

# Names the remat policies save or recompute by (`model._REMAT_POLICIES`).
MATMUL, BATCHED_MATMUL = "matmul", "batched_matmul"


def contract(spec: str, x: Array, y: Array, out_dtype) -> Array:
  """`einsum(spec, x, y)` accumulated in float32 and cast to `out_dtype`, gradients likewise.

  Every matmul of the model goes through here. Both gradients are computed as einsums of the same
  form with the cotangent cast to the operands' (compute) dtype: a bfloat16 model's backward
  matmuls then run as bfloat16 matmuls with float32 accumulation, where the default rules would
  give float32 x bfloat16 or bfloat16-output products, which XLA:CPU runs as float32 matmuls with
  converted copies of the operands. The explicit forms also measured faster in float32 on CPU
  than the default transposition of `einsum` (docs/benchmarks.md). Each index of
  `spec` must appear in the output or in both operands. The output is named for the remat policies: a
  matmul with batch dimensions (indices in both operands and the output: attention) or without.
  """
  operands, out = spec.split("->")
  xs, ys = operands.split(",")
  batched = any(i in ys and i in out for i in xs)
  return checkpoint_name(_contract(spec, x, y, out_dtype), BATCHED_MATMUL if batched else MATMUL)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _contract(spec, x, y, out_dtype):
  return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32).astype(out_dtype)


def _contract_fwd(spec, x, y, out_dtype):
  return _contract(spec, x, y, out_dtype), (x, y)


def _contract_bwd(spec, out_dtype, residuals, g):
  x, y = residuals
  operands, out = spec.split("->")
  xs, ys = operands.split(",")
  g = g.astype(x.dtype)
  dx = jnp.einsum(f"{out},{ys}->{xs}", g, y, preferred_element_type=jnp.float32).astype(x.dtype)
  dy = jnp.einsum(f"{xs},{out}->{ys}", x, g, preferred_element_type=jnp.float32).astype(y.dtype)
  return dx, dy


_contract.defvjp(_contract_fwd, _contract_bwd)
