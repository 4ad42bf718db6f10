"""The train state, created already sharded over the mesh (never materialised on one device first)."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from llada_jax import model as model_lib, sharding

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any
  nonfinite_in_a_row: Array  # skipped updates since the last good one
  max_nonfinite_in_a_row: Array  # the longest such run so far (read at logging time, no per-step sync)
  nonfinite_total: Array



def _boxed_state_fn(model_cfg, tx):
  def init(key):
    boxed = model_lib.LLaDA(model_cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"]
    zero = jnp.zeros((), jnp.int32)
    # The optimizer state is built on the boxed params, so it inherits their logical axes.
    return TrainState(step=zero, params=boxed, opt_state=tx.init(boxed), nonfinite_in_a_row=zero,
                      max_nonfinite_in_a_row=zero, nonfinite_total=zero)
  return init


def state_shardings(model_cfg, tx, mesh, rules):
  """(abstract state with shardings, NamedSharding pytree) without allocating anything."""
  init = _boxed_state_fn(model_cfg, tx)
  boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.logical_to_shardings(nn.get_partition_spec(boxed), mesh, rules)
  abstract = nn.meta.unbox(boxed)
  abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                    shardings)
  return abstract, shardings


def create_train_state(model_cfg, tx, key, mesh, rules, params=None):
  """A fresh state placed on `mesh`; `params` (already placed) replaces the random init if given."""
  _, shardings = state_shardings(model_cfg, tx, mesh, rules)
  init = _boxed_state_fn(model_cfg, tx)

  if params is None:
    return jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings)(key)

  def from_params(p):
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=p, opt_state=tx.init(p), nonfinite_in_a_row=zero,
                      max_nonfinite_in_a_row=zero, nonfinite_total=zero)

  return jax.jit(from_params, out_shardings=shardings)(params)
