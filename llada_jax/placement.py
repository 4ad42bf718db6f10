"""Where generation and evaluation run: parameters sharded over a mesh, batches split over its data shards.

A `Placement` is a mesh and its logical-axis rules, as training uses them (`llada_jax.sharding`).
The samplers and the likelihood scorer take an optional one; without it they run on the default
device. With it:

  * parameters carry the NamedShardings their logical axes give (`param_shardings`);
  * every batch input is split along its rows over the mesh's batch shards (`data` x `fsdp` with the
    default rules), padded to a multiple of them with copies of its last row, which never change
    another row's result and are dropped from the outputs;
  * the model runs under the mesh's activation rules (`jit`), and outputs come back replicated, so
    every process of a multi-host run can read them.

Every process passes the same whole batch (each reads the same prompts); each device keeps its rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from llada_jax import sharding


@dataclasses.dataclass(frozen=True)
class Placement:
  """A mesh and the logical-axis rules that map the model's axis names onto it. Hashable: it is part
  of the key under which a sampler or scorer is compiled."""

  mesh: Mesh
  rules: tuple = tuple(sharding.DEFAULT_RULES)

  @property
  def batch_sharding(self) -> NamedSharding:
    return sharding.batch_sharding(self.mesh, self.rules)

  @property
  def shards(self) -> int:
    """How many pieces a batch is split into: batches are padded to a multiple of it."""
    return sharding.batch_shards(self.batch_sharding)

  @property
  def replicated(self) -> NamedSharding:
    return sharding.replicated(self.mesh)


def make_placement(mesh_config: Mapping[str, Any], rules=sharding.DEFAULT_RULES,
                   devices: Sequence[jax.Device] | None = None) -> Placement:
  """A placement from a config's `mesh` (data/fsdp/tensor sizes, one may be -1) and `sharding_rules`."""
  return Placement(sharding.make_mesh(mesh_config, devices), sharding.rules_from_config(rules))


def for_run(run_config: Mapping[str, Any], requested: Mapping[str, int] | None = None,
            devices: Sequence[jax.Device] | None = None) -> Placement:
  """The placement generation and evaluation use for a training run.

  `requested` (mesh axis sizes, e.g. from command-line flags) wins; without it the run's own mesh is
  used when it fits these devices (a run trained on 64 devices does not fit 8), else every device
  goes on `data`. The run's sharding rules are used either way.
  """
  rules = run_config.get("sharding_rules") or sharding.DEFAULT_RULES
  if requested:
    return make_placement(requested, rules, devices)
  own = run_config.get("mesh")
  if own:
    try:
      return make_placement(own, rules, devices)
    except ValueError:
      pass  # the run's mesh needs other devices than these
  return make_placement({"data": -1}, rules, devices)


# --------------------------------------------------------------------------------------------
# Parameters.


@functools.lru_cache(maxsize=16)
def param_shardings(model_cfg, placement: Placement):
  """NamedShardings of the model's parameters on `placement`, from their logical axes."""
  from llada_jax import model as model_lib  # noqa: PLC0415 - the model imports nothing from here

  return sharding.logical_to_shardings(model_lib.logical_axes(model_cfg), placement.mesh, placement.rules)


def put_params(params, model_cfg, placement: Placement):
  """`params` on `placement`: as their logical axes say when the tree is the model's (no copy when
  they are placed already, as `checkpoint.load_model(mesh=...)` places them), replicated otherwise
  (a custom logits function's parameters)."""
  if model_cfg is not None:
    shardings = param_shardings(model_cfg, placement)
    if jax.tree_util.tree_structure(shardings) == jax.tree_util.tree_structure(params):
      return jax.device_put(params, shardings)
  return jax.device_put(params, placement.replicated)


# --------------------------------------------------------------------------------------------
# Batches.


def padded_size(n: int, shards: int) -> int:
  """n rounded up to a multiple of the batch shards."""
  return -(-n // shards) * shards


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """x with copies of its last row appended up to `rows` rows: valid inputs whose results are dropped."""
  x = np.asarray(x)
  if x.shape[0] == rows:
    return x
  return np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)], axis=0)


def put_batch(placement: Placement, arrays: Sequence[np.ndarray]) -> list[jax.Array]:
  """Host arrays with a common leading batch dimension -> global arrays split along it, each padded
  to a multiple of the batch shards first."""
  rows = padded_size(np.shape(arrays[0])[0], placement.shards)
  batch = {str(i): pad_rows(a, rows) for i, a in enumerate(arrays)}
  placed = sharding.global_batch(batch, placement.batch_sharding, whole=True)
  return [placed[str(i)] for i in range(len(arrays))]


def put_keys(placement: Placement, keys: jax.Array) -> jax.Array:
  """A batch of typed PRNG keys as placed raw key data (re-wrap with `jax.random.wrap_key_data`
  and the keys' `jax.random.key_impl` inside the computation)."""
  return put_batch(placement, [np.asarray(jax.random.key_data(keys))])[0]


# --------------------------------------------------------------------------------------------
# Computations.


def jit(fn: Callable, placement: Placement, **jit_kwargs) -> Callable:
  """`fn` jitted under the mesh's activation rules, its outputs replicated over the mesh (readable
  by every process). Inputs keep the shardings they were placed with."""

  def traced(*args):
    with sharding.activation_rules(placement.mesh, placement.rules):
      return fn(*args)

  return jax.jit(traced, out_shardings=placement.replicated, **jit_kwargs)
