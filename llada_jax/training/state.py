"""The train state, created already sharded over the mesh (never materialised on one device first)."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from llada_jax import lora, model as model_lib, sharding

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any
  nonfinite_in_a_row: Array  # skipped updates since the last good one
  max_nonfinite_in_a_row: Array  # the longest such run so far (read at logging time, no per-step sync)
  nonfinite_total: Array



def trainable(params, model_cfg):
  """What the optimizer trains: the LoRA adapters when the model has them, else every parameter."""
  return lora.split(params)[0] if model_cfg.lora_rank else params


def _boxed_state_fn(model_cfg, tx):
  def init(key):
    boxed = trainable(model_lib.LLaDA(model_cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"], model_cfg)
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


# --------------------------------------------------------------------------------------------
# The frozen base of a LoRA model.


def base_shardings(model_cfg, mesh, rules):
  """(abstract base parameters with shardings, their NamedShardings), in `lora_base_dtype` if set."""
  boxed = jax.eval_shape(lambda k: model_lib.LLaDA(model_cfg).init(k, jnp.zeros((1, 8), jnp.int32))["params"],
                         jax.random.key(0))
  _, boxed_base = lora.split(boxed)
  shardings = sharding.logical_to_shardings(nn.get_partition_spec(boxed_base), mesh, rules)
  dtype = model_cfg.lora_base_dtype or None
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s), nn.meta.unbox(boxed_base), shardings)
  return abstract, shardings


def random_base(model_cfg, seed: int, mesh, rules):
  """The base a LoRA run without `init_from` trains on: the model's init from key(seed), placed sharded.

  Deterministic, so generation and evaluation rebuild it from the run's config."""
  abstract, shardings = base_shardings(model_cfg, mesh, rules)

  def init(key):
    base = lora.split(model_lib.init_params(model_cfg, key))[1]
    return jax.tree_util.tree_map(lambda x, a: x.astype(a.dtype), base, abstract)

  return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
