"""Checkpointing: train state, data-iterator position and run metadata, saved and restored with Orbax.

One step directory holds three items of an Orbax Composite checkpoint:

  state         the train state pytree (params, opt_state, step, ...), sharded arrays
  data          the Grain iterator position (per process), when the loop passes an iterator
  run_metadata  a small JSON dict (the config, versions, ...)

Orbax writes each step into a temporary directory and commits it atomically (a rename locally, a
commit_success.txt file on GCS), so a run killed mid-save leaves nothing that `latest_step` or
`restore` will pick up. Paths go through `etils.epath`, so `gs://` directories work unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from llada_jax.storage import integrity, remote
from llada_jax.storage.integrity import DamagedCheckpointError

try:
  import grain
  _GRAIN_CHECKPOINT = grain.checkpoint
except (ImportError, AttributeError):  # Grain is only needed when a data iterator is passed.
  _GRAIN_CHECKPOINT = None

__all__ = [
    "CheckpointManager",
    "DamagedCheckpointError",
    "load_params",
    "abstract_like",
]

STATE = "state"
DATA = "data"
RUN_METADATA = "run_metadata"
FINGERPRINTS = "fingerprints"  # a run_metadata field: integrity.fingerprints of the saved state


# ---------------------------------------------------------------------------------------------
# Tree paths and validation


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):  # DictKey/FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_keys(path) -> tuple[str, ...]:
  return tuple(_key_name(k) for k in path)


def _path_str(keys: Sequence[str]) -> str:
  return ".".join(keys)


def _flatten_expected(tree) -> dict[str, tuple[int, ...]]:
  """Path -> shape for the leaves of a pytree of arrays / ShapeDtypeStructs."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_str(_path_keys(p)): tuple(np.shape(x)) for p, x in leaves}


def _flatten_stored(tree, prefix=()) -> dict[str, tuple[int, ...] | None]:
  """Path -> shape for the leaves of an Orbax metadata tree (nested dicts and lists).

  Orbax stores namedtuples and dataclasses as dicts keyed by field name and tuples as lists, which
  is exactly how `_path_str` names jax key paths. Empty nodes (optax EmptyState, {}) are None or
  empty containers here and have no leaves in the jax tree, so they are skipped.
  """
  out = {}
  if isinstance(tree, Mapping):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = enumerate(tree)
  else:
    if tree is not None:
      shape = getattr(tree, "shape", None)
      out[_path_str(prefix)] = None if shape is None else tuple(shape)
    return out
  for k, v in items:
    out.update(_flatten_stored(v, prefix + (str(k),)))
  return out


def _first_mismatch(expected: Mapping, found: Mapping) -> str | None:
  """A description of the first path where the expected tree and the stored tree disagree."""
  for path, shape in expected.items():
    if path not in found:
      return f"'{path}' (shape {shape}) is not in the checkpoint"
    if found[path] is not None and tuple(found[path]) != tuple(shape):
      return f"'{path}': expected shape {shape}, found {found[path]}"
  for path, shape in found.items():
    if path not in expected:
      return f"'{path}' (shape {shape}) is in the checkpoint but not in the expected tree"
  return None


def _stored_tree(item_metadata) -> Any:
  return getattr(item_metadata, "tree", item_metadata)


def _first_line(error: Exception, limit: int = 300) -> str:
  """An error from the storage layers in one line (TensorStore's carry whole specs)."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return text if len(text) <= limit else text[:limit] + "..."


def _stored_item(manager: ocp.CheckpointManager, step: int, where: str) -> Any:
  """The stored tree structure of a step's train state; unreadable metadata means a damaged step."""
  try:
    return _stored_tree(manager.item_metadata(step)[STATE])
  except Exception as e:  # noqa: BLE001 - any failure to read it is damage to the step
    raise DamagedCheckpointError(f"{where}: its train-state metadata cannot be read: {_first_line(e)}") from e


def _with_shardings(abstract_tree, what: str):
  """ShapeDtypeStructs with a sharding on every leaf; a single process may omit them."""

  def leaf(x):
    sharding = getattr(x, "sharding", None)
    if sharding is None:
      if jax.process_count() > 1:
        raise ValueError(f"{what}: every leaf needs a sharding in a multi-process run.")
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

  return jax.tree.map(leaf, abstract_tree)


def abstract_like(tree):
  """The restore target for a pytree of arrays: same shapes, dtypes and shardings."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, Mapping):
    return dict(x)
  if isinstance(x, (set, frozenset)):
    return sorted(x)
  return str(x)


def _to_json_dict(metadata: Mapping[str, Any]) -> dict[str, Any]:
  # Done eagerly so a value JSON cannot encode fails here, not in Orbax's background thread.
  return json.loads(json.dumps(dict(metadata), default=_json_default))


def _steps_message(steps: Sequence[int]) -> str:
  return f"available steps: {sorted(steps)}" if steps else "it holds no finished checkpoint"


def resolve_step(manager: ocp.CheckpointManager, step: int | None, directory, purpose: str = "") -> int:
  """Which saved step to read: `step` if it was saved, the latest for None. Every reader of a
  checkpoint (resume, initial weights, generation, export) picks its step here."""
  steps = manager.all_steps()
  if step is None:
    latest = manager.latest_step()
    if latest is None:
      raise FileNotFoundError(f"No checkpoint {purpose + ' ' if purpose else ''}in {directory}: "
                              f"{_steps_message(steps)}.")
    return int(latest)
  if int(step) not in steps:
    raise FileNotFoundError(f"No checkpoint for step {step} in {directory}; {_steps_message(steps)}.")
  return int(step)


# ---------------------------------------------------------------------------------------------
# Checkpoint manager


def _absolute(directory: epath.PathLike) -> epath.Path:
  """An absolute path: Orbax's TensorStore writer refuses relative local paths (`--workdir runs/x`)."""
  text = os.fspath(directory)
  return epath.Path(text if remote.is_remote(text) else os.path.abspath(text))


def _check_writable(directory: epath.Path) -> None:
  """Fails at once, naming the directory, where a save could not write (read-only, full, gone);
  Orbax would otherwise retry in the background and time out with a message that says neither."""
  if remote.is_remote(os.fspath(directory)):
    return
  probe = os.path.join(os.fspath(directory), f".write_probe.{os.getpid()}")
  try:
    os.makedirs(os.fspath(directory), exist_ok=True)
    with open(probe, "wb") as f:
      f.write(b"0")
    os.remove(probe)
  except OSError as e:
    raise OSError(e.errno, f"cannot write checkpoints to {directory}: {e.strerror}") from None


class CheckpointManager:
  """Saves and restores the train state, the data-iterator position and run metadata.

  Args:
    directory: where step directories go; a local path or `gs://...`.
    save_interval_steps: `save` writes when `step % save_interval_steps == 0` (or on `force`, or
      at the step all processes agreed on after a preemption notice).
    max_to_keep: how many of the latest checkpoints to keep (None keeps all).
    async_save: write arrays in a background thread; `save` returns once they are copied off the
      devices. Call `wait_until_finished` (or `close`) before reading them back or exiting.
    metadata: JSON-able run metadata stored with every checkpoint (e.g. `config.to_dict()`).
    read_only: open another run's checkpoints for reading: nothing is created, cleaned or saved.
  """

  def __init__(
      self,
      directory: epath.PathLike,
      *,
      save_interval_steps: int = 1,
      max_to_keep: int | None = None,
      async_save: bool = True,
      metadata: Mapping[str, Any] | None = None,
      read_only: bool = False,
  ):
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}.")
    self.directory = _absolute(directory)
    self._metadata = _to_json_dict(metadata or {})
    policies = ocp.checkpoint_managers
    if read_only:
      if not self.directory.exists():
        raise FileNotFoundError(f"No checkpoint directory at {self.directory}.")
      options = ocp.CheckpointManagerOptions(read_only=True, create=False)
      self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_item_handlers())
      return
    _check_writable(self.directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        # Leftovers of a killed save are never read, but they take space: remove them on start.
        cleanup_tmp_directories=True,
        # Orbax's default also saves on the first call of a fresh run whatever the step; the
        # loop expects pure interval semantics.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_interval_steps),
            policies.PreemptionCheckpointingPolicy(),
        ]),
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_handlers=_item_handlers()
    )

  # -- queries --------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest finished checkpoint step (or one being saved asynchronously), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  # -- save -----------------------------------------------------------------------------------

  def save(
      self,
      step: int,
      state: Any,
      *,
      data_iterator: Any = None,
      metadata: Mapping[str, Any] | None = None,
      force: bool = False,
  ) -> bool:
    """Saves `state` (and the iterator position and metadata) at `step` if the interval says so.

    All processes must call this with the same arguments. `force=True` saves regardless of the
    interval (end of run, preemption). A step that already has a checkpoint is never overwritten:
    the call logs and returns False. Returns whether a checkpoint was started.
    """
    step = int(step)
    if step in self._manager.all_steps():
      if force:
        logging.info("Checkpoint for step %d already exists in %s; not saving again.", step,
                     self.directory)
      return False
    if not force and not self._manager.should_save(step):
      return False
    _check_writable(self.directory)
    # Saved with the state in one atomic commit, so a restore can tell intact arrays from damaged ones.
    sums = {FINGERPRINTS: integrity.fingerprints(state)}
    items = {
        STATE: ocp.args.StandardSave(state),
        RUN_METADATA: ocp.args.JsonSave({**self._metadata, **_to_json_dict(metadata or {}), **sums}),
    }
    if data_iterator is not None:
      # Grain's handler is synchronous: the position is written before `save` returns, so it is
      # the position at this step even though the loop keeps consuming the iterator.
      items[DATA] = _grain_checkpoint().CheckpointSave(data_iterator)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("Saving checkpoint for step %d to %s", step, self.directory)
    return saved

  def wait_until_finished(self) -> None:
    """Blocks until the pending asynchronous save is committed; re-raises its error, if any."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- restore --------------------------------------------------------------------------------

  def resolve_step(self, step: int | None) -> int:
    """`step` if it was saved, the latest saved step for None; FileNotFoundError otherwise."""
    return resolve_step(self._manager, step, self.directory, "to restore")

  def restore(self, step: int | None = None, *, abstract_state: Any, data_iterator: Any = None):
    """Restores the train state saved at `step` (default: the latest) onto `abstract_state`.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s (or arrays) whose shardings say where
    each restored array goes, so a checkpoint saved on one mesh restores onto another. Dtypes are
    cast to the requested ones. If `data_iterator` is given its position is restored in place.
    Returns the state with the structure of `abstract_state`.
    """
    self._manager.wait_until_finished()
    step = self.resolve_step(step)
    where = f"checkpoint step {step} in {self.directory}"
    target = _with_shardings(abstract_state, f"Restoring {where}")
    for item in (STATE, RUN_METADATA):
      if not (self._step_dir(step) / item).exists():
        raise DamagedCheckpointError(f"{where} has no {item.replace('_', ' ')}")
    stored = _stored_item(self._manager, step, where)
    if stored is None:
      raise DamagedCheckpointError(f"{where} has no train state")
    mismatch = _first_mismatch(_flatten_expected(target), _flatten_stored(stored))
    if mismatch:
      raise ValueError(f"The train state in {where} does not match the expected tree: {mismatch}.")
    items = {STATE: ocp.args.StandardRestore(target), RUN_METADATA: ocp.args.JsonRestore()}
    if data_iterator is not None:
      if not (self._step_dir(step) / DATA).exists():
        raise ValueError(f"{where} has no data-iterator state (it was saved without one).")
      items[DATA] = _grain_checkpoint().CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise DamagedCheckpointError(f"Could not restore {where}: {_first_line(e)}") from e
    integrity.check(restored[STATE], dict(restored[RUN_METADATA] or {}).get(FINGERPRINTS), where)
    logging.info("Restored %s", where)
    return restored[STATE]

  def set_aside(self, step: int) -> epath.Path:
    """Moves a damaged step out of the checkpoint directory (to `<directory>.damaged/<step>`), so
    the run resumes from the step before and saves this step again; nothing is deleted."""
    source = self._step_dir(step)
    target = self.directory.parent / f"{self.directory.name}.damaged" / f"{source.name}.{os.getpid()}"
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      source.rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415

      multihost_utils.sync_global_devices(f"llada_jax set aside step {step}")
    self._manager.reload()
    return target

  def read_metadata(self, step: int | None = None) -> dict[str, Any]:
    """The run metadata stored with the checkpoint at `step` (default: the latest)."""
    self._manager.wait_until_finished()
    step = self.resolve_step(step)
    if not (self._step_dir(step) / RUN_METADATA).exists():
      raise DamagedCheckpointError(f"Checkpoint step {step} in {self.directory} has no run metadata.")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{RUN_METADATA: ocp.args.JsonRestore()}))
    except Exception as e:
      raise DamagedCheckpointError(
          f"Could not read the run metadata of step {step} in {self.directory}: {_first_line(e)}") from e
    return {k: v for k, v in dict(restored[RUN_METADATA]).items() if k != FINGERPRINTS}

  def _step_dir(self, step: int) -> epath.Path:
    return ocp.step.build_step_path(self.directory, ocp.step.standard_name_format(), step)


def _grain_checkpoint():
  if _GRAIN_CHECKPOINT is None:
    raise ImportError("Saving or restoring a data iterator needs grain (pip install grain).")
  return _GRAIN_CHECKPOINT


def _item_handlers(state_handler=None) -> dict[str, Any]:
  # Explicit handlers, so metadata and restore work on a fresh manager before any save.
  handlers = {
      STATE: state_handler or ocp.StandardCheckpointHandler(),
      RUN_METADATA: ocp.JsonCheckpointHandler(),
  }
  if _GRAIN_CHECKPOINT is not None:
    handlers[DATA] = _GRAIN_CHECKPOINT.CheckpointHandler()
  return handlers


# ---------------------------------------------------------------------------------------------
# Loading parameters only


def load_params(
    directory: epath.PathLike,
    abstract_params: Any,
    *,
    step: int | None = None,
    params_path: Sequence[str] = ("params",),
):
  """Loads only the parameters from another run's checkpoint, onto `abstract_params`' shardings.

  Used for initial weights (SFT from a pretrained run; VRPO policy and frozen reference from an
  SFT run). The rest of the saved state (optimizer moments, step, ...) is neither read nor needed,
  so its shape does not have to be known. `params_path` locates the parameters inside the saved
  state (`("params",)` for a train state with a `params` field).

  Raises FileNotFoundError if `directory` has no finished checkpoint (or none at `step`), and
  ValueError naming the first mismatching path if the parameter tree or shapes differ.
  """
  directory = _absolute(directory)
  params_path = tuple(str(k) for k in params_path)
  if not directory.exists():
    raise FileNotFoundError(f"No checkpoint directory at {directory}.")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  manager = ocp.CheckpointManager(
      directory, options=options, item_handlers=_item_handlers(ocp.PyTreeCheckpointHandler()))
  try:
    step = resolve_step(manager, step, directory, "to load parameters from")
    where = f"checkpoint step {step} in {directory}"

    node = _stored_item(manager, step, where)
    for depth, key in enumerate(params_path):
      if not isinstance(node, Mapping) or key not in node:
        keys = sorted(node) if isinstance(node, Mapping) else type(node).__name__
        raise ValueError(f"{where} has no '{'.'.join(params_path[:depth + 1])}' "
                         f"(found: {keys}).")
      node = node[key]

    target = _with_shardings(abstract_params, f"Loading parameters from {where}")
    expected = _flatten_expected(target)
    mismatch = _first_mismatch(expected, _flatten_stored(node))
    if mismatch:
      raise ValueError(f"The parameters at '{'.'.join(params_path)}' in {where} do not match "
                       f"the expected tree: {mismatch}.")

    # Partial restore reads only the arrays named in `item`; it works on nested dicts, so the
    # target is re-keyed by path and put back into the caller's structure afterwards.
    flat_target = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
      keys = params_path + _path_keys(path)
      sub = flat_target
      for k in keys[:-1]:
        sub = sub.setdefault(k, {})
      sub[keys[-1]] = leaf
    restore_args = ocp.checkpoint_utils.construct_restore_args(flat_target)
    items = {STATE: ocp.args.PyTreeRestore(flat_target, restore_args=restore_args, partial_restore=True)}
    has_metadata = (ocp.step.build_step_path(directory, ocp.step.standard_name_format(), step) / RUN_METADATA).exists()
    if has_metadata:
      items[RUN_METADATA] = ocp.args.JsonRestore()
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise DamagedCheckpointError(f"Could not load parameters from {where}: {_first_line(e)}") from e
  finally:
    manager.close()
  saved = dict(restored[RUN_METADATA] or {}).get(FINGERPRINTS) if has_metadata else None
  restored = restored[STATE]

  def pick(path, _):
    node = restored
    for k in params_path + _path_keys(path):
      node = node[k]
    return node

  params = jax.tree_util.tree_map_with_path(pick, target)
  integrity.check(params, saved, where, prefix="".join(f"{k}." for k in params_path))
  logging.info("Loaded parameters from %s", where)
  return params


# ---------------------------------------------------------------------------------------------
# A trained model from a run directory


def _checkpoint_dir(path: epath.PathLike) -> epath.Path:
  """A run's workdir or its checkpoints/ directory -> the checkpoints directory."""
  path = epath.Path(path)
  if (path / "checkpoints").exists():
    return path / "checkpoints"
  return path


def read_run_config(path: epath.PathLike, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """(step, run config) of a training run's checkpoint: the latest step for None. `path` is a run's
  workdir or its `checkpoints/` directory. Cheap: no array is read."""
  directory = _checkpoint_dir(path)
  with CheckpointManager(directory, read_only=True) as manager:
    step = manager.resolve_step(step)
    config = manager.read_metadata(step).get("config")
  if not config or "model" not in config:
    raise ValueError(f"Checkpoint step {step} in {directory} has no model config in its run metadata.")
  return step, config


def _param_shardings(model_cfg, mesh, rules):
  """The NamedShardings the parameters' logical axes give on `mesh`; None without a mesh."""
  if mesh is None:
    return None
  from llada_jax import model as model_lib, sharding  # noqa: PLC0415

  return sharding.logical_to_shardings(model_lib.logical_axes(model_cfg), mesh, rules)


def _placed(abstract, shardings):
  """Restore targets carrying `shardings`, so Orbax reads each array straight onto its devices."""
  if shardings is None:
    return abstract
  from llada_jax import sharding  # noqa: PLC0415

  sharding.check_divisible(abstract, shardings)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def load_model(path: epath.PathLike, *, step: int | None = None, overrides: Mapping[str, Any] | None = None,
               mesh: jax.sharding.Mesh | None = None, rules=None):
  """(ModelConfig, params, run config dict) from a training run, for generation and evaluation.

  `path` is a run's workdir or its `checkpoints/` directory. The model config comes from the run
  metadata saved with the checkpoint; `overrides` changes numerics-only fields (e.g. dtype).
  Without `mesh` the parameters land on the default device. With it every array is restored
  directly onto the NamedSharding its logical axes give under `rules` (default: the run's
  `sharding_rules`), never whole on one device first.
  """
  from llada_jax import model as model_lib, sharding  # noqa: PLC0415 - the model is not needed to checkpoint

  directory = _checkpoint_dir(path)
  step, config = read_run_config(directory, step)
  model_cfg = model_lib.ModelConfig.from_dict({**config["model"], **dict(overrides or {})})
  if mesh is not None:
    rules = sharding.rules_from_config(rules or config.get("sharding_rules") or sharding.DEFAULT_RULES)
  if model_cfg.lora_rank:
    return _load_lora_model(directory, step, model_cfg, config, mesh, rules)
  abstract = _placed(model_lib.abstract_params(model_cfg), _param_shardings(model_cfg, mesh, rules))
  return model_cfg, load_params(directory, abstract, step=step), config


def _load_lora_model(directory, step: int, model_cfg, config, mesh, rules):
  """A LoRA run's adapters merged into the base it names (`checkpoint.init_from`, or the seeded init
  it trained on without one): the plain model, as fast as the base. Base and adapters are read
  onto the mesh and merged there, so no device ever holds a whole unsharded model."""
  from llada_jax import lora, model as model_lib  # noqa: PLC0415

  full_sh = _param_shardings(model_cfg, mesh, rules)
  adapters_abstract, base_abstract = lora.split(_placed(model_lib.abstract_params(model_cfg), full_sh))
  base_sh = None if full_sh is None else lora.split(full_sh)[1]
  adapters = load_params(directory, adapters_abstract, step=step)
  source = config.get("checkpoint", {}).get("init_from", "")
  if source:
    base_step = config["checkpoint"].get("init_step", -1)
    base = load_params(_checkpoint_dir(source), base_abstract, step=None if base_step < 0 else base_step)
  else:
    # Jitted as training's `state.random_base` is: the eager init rounds differently in the last bit.
    init = lambda k: lora.split(model_lib.init_params(model_cfg, k))[1]  # noqa: E731
    base = jax.jit(init, out_shardings=base_sh)(jax.random.key(config.get("seed", 0)))

  def merge(base, adapters):
    if model_cfg.lora_base_dtype:  # as training held it
      base = jax.tree_util.tree_map(lambda x: x.astype(model_cfg.lora_base_dtype), base)
    return lora.merge(lora.combine(base, adapters), model_cfg)

  merged_cfg = lora.base_config(model_cfg)
  merged = jax.jit(merge, out_shardings=_param_shardings(merged_cfg, mesh, rules))(base, adapters)
  return merged_cfg, merged, config
