"""Fingerprints of a pytree of arrays, to tell a restored checkpoint from a damaged one.

Each leaf's fingerprint is computed on device from its raw bits: two sums, modulo 2**32, of the
bits read as unsigned integers, the second weighted by odd multipliers of each element's position.
Integer addition modulo 2**32 is exact and associative, so the value does not depend on how the
array is sharded or in what order the devices reduce it: the fingerprint taken before a save
equals the one of the same arrays restored onto another mesh. Any changed element changes the
first sum unless other elements change to cancel it exactly, and the weighted sum catches swaps.
It is not a cryptographic hash: it detects damage (overwritten bytes, truncated files restored as
garbage), not tampering.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = 1


class DamagedCheckpointError(ValueError):
  """A checkpoint that cannot be restored intact (missing items, unreadable or changed arrays)."""


def leaf_paths(tree) -> list[str]:
  return [jax.tree_util.keystr(path, simple=True, separator=".")
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _as_uint32(x: jax.Array) -> jax.Array:
  """The raw bits of `x` as uint32 (one per element for types of 32 bits or fewer)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = x.dtype.itemsize * 8
  if bits == 64:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]: both halves count
  unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """[sum, weighted sum, 1 if every element is finite] as uint32."""
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
  u = _as_uint32(x)
  if u.ndim == 0:
    return jnp.stack([u, u, finite.astype(jnp.uint32)])
  # Row-major position of every element, built from iotas so a sharded array is never reshaped.
  position = jnp.zeros(u.shape, jnp.uint32)
  for axis, stride in enumerate(np.cumprod((u.shape[1:] + (1,))[::-1])[::-1]):
    position = position + jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * jnp.uint32(stride % 2**32)
  weight = position * jnp.uint32(2) + jnp.uint32(1)
  return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * weight, dtype=jnp.uint32), finite.astype(jnp.uint32)])


@jax.jit
def _fingerprints_on_device(leaves):
  return [_leaf_fingerprint(x) for x in leaves]


def _host_value(x: jax.Array) -> np.ndarray:
  """A small result as NumPy on every process (a replicated array's local copy)."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  return np.asarray(x.addressable_data(0))


def _measure(tree) -> tuple[dict[str, list], list[str]]:
  """({path: [dtype, shape, sum, weighted sum]}, paths of leaves with non-finite values): one
  compiled pass over the whole tree."""
  leaves = jax.tree_util.tree_leaves(tree)
  values = _fingerprints_on_device([jnp.asarray(x) for x in leaves])
  prints, non_finite = {}, []
  for path, x, value in zip(leaf_paths(tree), leaves, values):
    a, b, finite = (int(v) for v in _host_value(value))
    prints[path] = [str(jnp.asarray(x).dtype), list(np.shape(x)), a, b]
    if not finite:
      non_finite.append(path)
  return prints, non_finite


def fingerprints(tree) -> dict[str, Any]:
  """{"format", "leaves": {path: [dtype, shape, sum, weighted sum]}} of a pytree of arrays."""
  return {"format": FORMAT, "leaves": _measure(tree)[0]}


def check(tree, saved: Mapping[str, Any] | None, where: str, prefix: str = "") -> None:
  """Raises DamagedCheckpointError unless every leaf of `tree` has the fingerprint saved for it.

  `saved` is what `fingerprints` returned at save time (None: a checkpoint from before
  fingerprints, checked for finiteness only). Leaves restored into another dtype or shape than
  saved are checked for finiteness only. `prefix` is the path of `tree` inside the saved tree.
  """
  prints, non_finite = _measure(tree)
  if saved and saved.get("format") == FORMAT:
    for path, own in prints.items():
      stored = saved["leaves"].get(prefix + path)
      if stored is not None and stored[:2] == own[:2] and stored[2:] != own[2:]:
        raise DamagedCheckpointError(f"{where}: '{prefix + path}' does not hold the values that were saved (its "
                                     "fingerprint differs): the checkpoint files were changed or damaged")
  if non_finite:
    raise DamagedCheckpointError(f"{where}: '{prefix + non_finite[0]}' holds non-finite values")
