"""Device meshes, logical-axis rules, placing state and batches, multi-host start-up.

The model names its axes logically (`batch, length, embed, heads, head_dim, mlp, vocab, layers`);
a config maps those names onto the mesh axes `data`, `fsdp`, `tensor`. Rules are tried in order
and a mesh axis is used at most once per array, so `embed -> fsdp` shards parameters while an
activation `[batch, length, embed]`, whose batch already took `fsdp`, keeps `embed` whole.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP over `fsdp`, Megatron-style tensor parallelism over `tensor`, batch over `data` x `fsdp`.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
    ("lora", None),  # LoRA ranks are small: adapters shard along their kernel's other axes only
)


def _resolve_shape(sizes: Mapping[str, int], n_devices: int, where: str) -> tuple[int, ...]:
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  free = [i for i, s in enumerate(shape) if s == -1]
  if len(free) > 1:
    raise ValueError(f"{where}: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"{where}: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
  known = math.prod(s for s in shape if s != -1)
  if free:
    if n_devices % known:
      raise ValueError(f"{where}: {n_devices} devices are not divisible by the fixed axes "
                       f"{dict(zip(MESH_AXES, shape))}")
    shape[free[0]] = n_devices // known
  if math.prod(shape) != n_devices:
    raise ValueError(f"{where}: mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                     f"{n_devices} are available")
  return tuple(shape)


def make_mesh(mesh_config: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh. `dcn_data` > 1 adds a data-parallel dimension across slices.

  `mesh_config` holds `data`, `fsdp`, `tensor` (one of them may be -1: the remaining devices) and
  optionally `dcn_data` (slices, for multi-slice TPU; the other axes then describe one slice).
  """
  devices = list(devices if devices is not None else jax.devices())
  dcn_data = int(mesh_config.get("dcn_data", 1) or 1)
  if dcn_data > 1:
    if len(devices) % dcn_data:
      raise ValueError(f"mesh.dcn_data={dcn_data} does not divide the {len(devices)} devices")
    ici = _resolve_shape(mesh_config, len(devices) // dcn_data, "mesh (per slice)")
    array = mesh_utils.create_hybrid_device_mesh(ici, (dcn_data, 1, 1), devices)
  else:
    shape = _resolve_shape(mesh_config, len(devices), "mesh")
    try:
      array = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
      array = np.asarray(devices).reshape(shape)  # platforms without a topology-aware layout
  return Mesh(array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(rules) -> tuple:
  """Normalises rules from a config (lists from the command line, tuples from files)."""
  out = []
  for i, rule in enumerate(rules):
    if len(rule) != 2:
      raise ValueError(f"sharding_rules[{i}]={rule!r}: expected (logical_name, mesh_axis or list or None)")
    name, target = rule
    if isinstance(target, (list, tuple)):
      target = tuple(target)
      bad = [t for t in target if t not in MESH_AXES]
    else:
      bad = [target] if target is not None and target not in MESH_AXES else []
    if bad:
      raise ValueError(f"sharding_rules[{i}]={rule!r}: unknown mesh axis {bad}; expected {MESH_AXES}")
    out.append((name, target))
  return tuple(out)


def logical_to_shardings(logical_specs, mesh: Mesh, rules):
  """A pytree of logical PartitionSpecs -> NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def check_divisible(abstract_tree, shardings, what: str = "parameter") -> None:
  """Every dimension that `shardings` split has a size its mesh axes divide; else a ValueError that
  names the first array and axis that do not (restoring onto an uneven split fails with neither)."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  for (path, leaf), sh in zip(leaves, jax.tree_util.tree_leaves(shardings)):
    for dim, axes in enumerate(sh.spec):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      split = math.prod(sh.mesh.shape[a] for a in axes)
      if split > 1 and leaf.shape[dim] % split:
        on = " x ".join(f"{a}={sh.mesh.shape[a]}" for a in axes)
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        raise ValueError(f"{what} {name} has size {leaf.shape[dim]} along dimension {dim}, which the mesh's "
                         f"{on} does not divide; expected mesh axis sizes that divide the model's dimensions")


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Leading (batch) dimension split like the model's `batch` logical axis; the rest replicated."""
  spec = nn.logical_to_mesh_axes(("batch",), rules)
  return NamedSharding(mesh, P(*spec))


def batch_shards(batch_sh: NamedSharding) -> int:
  """How many pieces the batch dimension is split into (a global batch must divide evenly)."""
  axes = batch_sh.spec[0] if len(batch_sh.spec) else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return math.prod(batch_sh.mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding, *, whole: bool = False) -> dict:
  """Each process's rows -> global jax.Arrays split along the batch dimension.

  Processes hold consecutive blocks of the global batch in process order, as the data pipelines
  shard by process index. `whole`: every process holds the whole, identical batch (generation and
  evaluation read the same inputs everywhere) and each device takes its own rows of it.
  """
  def put(v):
    v = np.asarray(v)
    return jax.make_array_from_process_local_data(sharding, v, v.shape if whole else None)

  return {k: put(v) for k, v in local_batch.items()}


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules):
  """Inside a trace: the model's activation constraints (`nn.with_logical_constraint`) resolve
  against `mesh` with `rules`; without this they are no-ops. The abstract mesh is entered (a
  concrete `jax.set_mesh` is not allowed under jit), so callers need no context of their own."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


DISTRIBUTED_MODES = (False, True, "auto")


def maybe_initialize_distributed(cfg: Mapping[str, Any]) -> None:
  """`jax.distributed.initialize` when the config asks for it (before any other JAX call).

  cfg.initialize: False, True, or "auto" (on Cloud TPU and under SLURM, JAX finds the coordinator
  itself). Explicit coordinator_address / num_processes / process_id serve localhost runs and
  clusters without auto-detection.
  """
  mode = cfg.get("initialize", False)
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f"config.distributed.initialize={mode!r}: expected one of {DISTRIBUTED_MODES}")
  if not mode:
    return
  kwargs = {}
  for field in ("coordinator_address", "num_processes", "process_id", "local_device_ids"):
    value = cfg.get(field)
    if value not in (None, "", -1):
      kwargs[field] = value
  if mode == "auto" and not kwargs:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
