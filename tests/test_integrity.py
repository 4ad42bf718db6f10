"""Checkpoint fingerprints: exact, independent of sharding, and changed by any damage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from llada_jax.storage import integrity


def _tree(rng):
  return {"w": jnp.asarray(rng.normal(size=(16, 24)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(24,)), jnp.bfloat16),
          "count": jnp.asarray(7, jnp.int32), "flag": jnp.asarray([True, False]),
          "wide": jnp.asarray(rng.normal(size=(3,)), jnp.float32).astype(jnp.float16)}


def _reference(x) -> list[int]:
  """The fingerprint computed in NumPy with Python integers (no wrap-around until the end)."""
  x = np.asarray(x)
  if x.dtype == np.bool_:
    u = x.astype(np.uint64)
  else:
    u = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint64)
  flat = [int(v) for v in u.reshape(-1)]
  return [sum(flat) % 2**32, sum(v * (2 * i + 1) for i, v in enumerate(flat)) % 2**32]


def test_fingerprints_match_an_integer_reference():
  tree = _tree(np.random.default_rng(0))
  prints = integrity.fingerprints(tree)["leaves"]
  for path, leaf in zip(integrity.leaf_paths(tree), jax.tree_util.tree_leaves(tree)):
    assert prints[path][2:] == _reference(leaf), path
    assert prints[path][:2] == [str(leaf.dtype), list(leaf.shape)]


def test_fingerprints_do_not_depend_on_sharding():
  mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 24)), jnp.float32)
  sharded = jax.device_put(x, NamedSharding(mesh, P("a", "b")))
  assert len(sharded.addressable_shards) == 8
  assert integrity.fingerprints({"x": sharded}) == integrity.fingerprints({"x": x})


@pytest.mark.parametrize("damage", ["one_element", "swap", "one_bit"])
def test_any_change_is_detected(damage):
  x = np.random.default_rng(2).normal(size=(8, 8)).astype(np.float32)
  saved = integrity.fingerprints({"x": jnp.asarray(x)})
  y = x.copy()
  if damage == "one_element":
    y[3, 4] = 2.4e38  # finite, so only the fingerprint can tell
  elif damage == "swap":
    y[0, 0], y[7, 7] = x[7, 7], x[0, 0]
  else:
    y.view(np.uint32)[5, 5] ^= 1
  with pytest.raises(integrity.DamagedCheckpointError, match="'x' does not hold the values"):
    integrity.check({"x": jnp.asarray(y)}, saved, "step 3")
  integrity.check({"x": jnp.asarray(x)}, saved, "step 3")  # intact: no error


def test_non_finite_values_are_refused_even_without_fingerprints():
  with pytest.raises(integrity.DamagedCheckpointError, match="'p.w' holds non-finite values"):
    integrity.check({"w": jnp.asarray([1.0, np.nan])}, None, "step 1", prefix="p.")


def test_a_leaf_restored_into_another_dtype_is_only_checked_for_finiteness():
  saved = integrity.fingerprints({"x": jnp.ones((4,), jnp.float32)})
  integrity.check({"x": jnp.ones((4,), jnp.bfloat16)}, saved, "step 1")
