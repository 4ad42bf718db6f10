"""VRPO reference ELBOs computed ahead of time (`config.vrpo.precompute_reference = True`).

The frozen reference's estimates B_ref(y_w), B_ref(y_l) depend on the data and on the keys, never
on the policy. Every key is derived: the train step's key is fold_in(root, step) and each example
draws from fold_in(step key, example_id) (`vrpo.VRPOLoss`). So all the reference ELBOs of a run
can be computed before it, with exactly the keys the step will use, and handed to the step in the
batch ('reference_chosen_elbo', 'reference_rejected_elbo'). The step then runs the policy only and
never holds, shards or reads the reference weights.

The draws depend on the step as well as on the example (an example met again in a later epoch
gets new masks), so the table is keyed by (step, example_id). It is built by replaying the run's
data pipeline, which is deterministic (seeded shuffle, epochs, global batch), over the steps
[0, total_steps): step s holds the examples of the s-th global batch. Which process or micro-batch
an example lands in does not matter, since its draws depend only on (step, example_id).

The cost is the online step's reference forward pass, paid once before training and without
gradients, so a table serves every run that changes only the policy side (learning rate, beta,
sft_weight). The file (`.npz`: steps, example_ids, chosen, rejected, and a JSON `metadata` of
everything the values depend on) is reused when its metadata match the run, refused with the
differing fields named when they do not, and never overwritten.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from llada_jax import sharding, vrpo, vrpo_packed
from llada_jax.training import objectives, step as step_lib

REFERENCE_CHOSEN = "reference_chosen_elbo"
REFERENCE_REJECTED = "reference_rejected_elbo"
PAIR_KEYS = ("chosen", "rejected", "prompt_lengths", "chosen_lengths", "rejected_lengths", "example_id")
PACKED_PAIR_KEYS = ("chosen", "rejected", "chosen_segment_ids", "rejected_segment_ids", "prompt_lengths", "example_id")
FORMAT = 1
DEFAULT_FILENAME = "reference_elbos.npz"
# Model fields that change speed or memory, not the values: a table stays valid across them.
_NUMERICS_FREE_FIELDS = ("remat", "scan_layers")


def _codes(steps, example_ids) -> np.ndarray:
  """One sortable int64 per (step, example_id)."""
  steps = np.asarray(steps, np.int64)
  ids = np.asarray(example_ids, np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= 1 << 32):
    raise ValueError(f"example_id values in [{ids.min()}, {ids.max()}]: expected ids in [0, 2**32)")
  return (steps << 32) | ids


@dataclasses.dataclass(frozen=True)
class ReferenceELBOs:
  """The reference ELBOs of a run, one per (step, example_id), with what they were computed for."""

  steps: np.ndarray  # int64 [N]
  example_ids: np.ndarray  # int64 [N]
  chosen: np.ndarray  # float32 [N]: B_ref(y_w)
  rejected: np.ndarray  # float32 [N]: B_ref(y_l)
  metadata: dict[str, Any]
  source: str = "<memory>"  # the file, for error messages

  def __post_init__(self):
    n = len(self.steps)
    if not all(len(a) == n for a in (self.example_ids, self.chosen, self.rejected)):
      raise ValueError(f"{self.source}: steps, example_ids, chosen and rejected: expected arrays of one length")
    codes = _codes(self.steps, self.example_ids)
    # An example twice in one global batch (a batch across an epoch boundary) had the same keys:
    # its entries are equal, and the first is kept.
    codes, first = np.unique(codes, return_index=True)
    object.__setattr__(self, "_sorted_codes", codes)
    object.__setattr__(self, "_rows", first)

  def __len__(self) -> int:
    return len(self._sorted_codes)

  def lookup(self, step: int, example_ids) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) float32 for the given examples of `step`, shaped like `example_ids`; empty slots
    of packed rows (id -1) get 0."""
    shape = np.shape(example_ids)
    all_ids = np.asarray(example_ids).reshape(-1)
    valid = all_ids >= 0
    chosen, rejected = self._lookup_valid(step, all_ids[valid])
    out = []
    for values in (chosen, rejected):
      full = np.zeros(all_ids.shape, np.float32)
      full[valid] = values
      out.append(full.reshape(shape))
    return out[0], out[1]

  def _lookup_valid(self, step: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    want = _codes(np.full(ids.shape, step), ids)
    at = np.minimum(np.searchsorted(self._sorted_codes, want), max(len(self._sorted_codes) - 1, 0))
    found = self._sorted_codes[at] == want if len(self._sorted_codes) else np.zeros(ids.shape, bool)
    if not found.all():
      missing = int(ids[~found][0])
      raise ValueError(f"{self.source}: no reference ELBO for step {step}, example_id {missing} (the table holds "
                       f"{len(self)} entries for steps [0, {self.metadata.get('steps')})); expected a table computed "
                       "for this run's data, seed and batch size: delete the file to recompute it")
    rows = self._rows[at]
    return self.chosen[rows].astype(np.float32), self.rejected[rows].astype(np.float32)

  def attach(self, batch: Mapping[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    """The batch of `step` with its reference ELBOs added under the keys `vrpo.VRPOLoss` reads."""
    chosen, rejected = self.lookup(step, batch["example_id"])
    return {**batch, REFERENCE_CHOSEN: chosen, REFERENCE_REJECTED: rejected}

  def save(self, path) -> None:
    """Written to a temporary file and renamed: an interrupted save leaves no partial table."""
    path = epath.Path(path)
    buffer = io.BytesIO()
    np.savez(buffer, steps=self.steps.astype(np.int64), example_ids=self.example_ids.astype(np.int64),
             chosen=self.chosen.astype(np.float32), rejected=self.rejected.astype(np.float32),
             metadata=np.asarray(json.dumps(self.metadata, sort_keys=True)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp"
    tmp.write_bytes(buffer.getvalue())
    tmp.rename(path)

  @classmethod
  def load(cls, path) -> "ReferenceELBOs":
    path = epath.Path(path)
    try:
      with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as f:
        arrays = {k: f[k] for k in ("steps", "example_ids", "chosen", "rejected", "metadata")}
    except (KeyError, ValueError, OSError) as e:
      raise ValueError(f"{path}: expected a reference-ELBO table (.npz with steps, example_ids, chosen, rejected, "
                       f"metadata): {e}") from e
    metadata = json.loads(str(arrays.pop("metadata")))
    return cls(**{k: np.asarray(v) for k, v in arrays.items()}, metadata=metadata, source=str(path))


# --------------------------------------------------------------------------------------------
# Computing a table.


def reference_elbo_fn(loss: vrpo.VRPOLoss, *, micro_batches: int = 1) -> Callable:
  """`(reference_params, batch, root_key, step) -> (chosen [B], rejected [B])`, the step's own draws.

  With `micro_batches` > 1 the batch is evaluated in that many pieces, split as the train step
  splits it; the values do not change (each example draws from its own key).
  """

  def fn(reference_params, batch, root_key, step):
    key = step_lib.step_key(root_key, step)
    if micro_batches == 1:
      return loss.reference_elbos(reference_params, batch, key)
    micro = step_lib.split_micro_batches(batch, micro_batches)
    chosen, rejected = jax.lax.map(lambda mb: loss.reference_elbos(reference_params, mb, key), micro)
    # Undo the split: micro-batch a held rows a, a + n, a + 2n, ...
    return tuple(jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:]) for x in (chosen, rejected))

  return fn


def _gather(x) -> np.ndarray:
  """A global array as a NumPy array on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def compute(loss: vrpo.VRPOLoss, reference_params, batches: Iterable[Mapping[str, np.ndarray]], root_key, *,
            batch_sharding, reference_shardings=None, num_steps: int, micro_batches: int = 1,
            rules=None, metadata: Mapping[str, Any] | None = None) -> ReferenceELBOs:
  """The reference ELBOs of steps 0, 1, ..., num_steps - 1, the s-th batch of `batches` being step s's.

  `batches` yields each process's rows of the global batch, as the training loop reads them;
  iteration stops early when they run out (so does training). Every process gets the whole table.
  With the logical-axis `rules`, activations are constrained as in the train step.
  """
  if isinstance(loss, objectives.Objective):
    loss = loss.loss_fn
  if not isinstance(loss, (vrpo.VRPOLoss, vrpo_packed.PackedVRPOLoss)):
    raise ValueError(f"reference ELBOs: expected a VRPO loss, got {type(loss).__name__}")
  replicated = sharding.replicated(batch_sharding.mesh)
  fn = reference_elbo_fn(loss, micro_batches=micro_batches)
  if rules is not None:
    fn = step_lib.with_activation_rules(fn, batch_sharding.mesh, rules)
  fn = jax.jit(fn,
               in_shardings=(reference_shardings, batch_sharding, replicated, replicated),
               out_shardings=(batch_sharding, batch_sharding))
  steps, ids, chosen, rejected = [], [], [], []
  iterator = iter(batches)
  exhausted = False
  start = time.perf_counter()
  for step in range(num_steps):
    try:
      local = next(iterator)
    except StopIteration:
      exhausted = True
      break
    keys = PACKED_PAIR_KEYS if "chosen_segment_ids" in local else PAIR_KEYS
    batch = sharding.global_batch({k: local[k] for k in keys}, batch_sharding)
    c, r = fn(reference_params, batch, root_key, jnp.int32(step))
    batch_ids = _gather(batch["example_id"]).reshape(-1)
    real = batch_ids >= 0  # packed rows' empty slots have none
    ids.append(batch_ids[real].astype(np.int64))
    steps.append(np.full(int(real.sum()), step, np.int64))
    chosen.append(_gather(c).reshape(-1)[real])
    rejected.append(_gather(r).reshape(-1)[real])
    if (step + 1) % 100 == 0:
      logging.info("Reference ELBOs: %d of %d steps (%.0f s)", step + 1, num_steps, time.perf_counter() - start)
  done = len(steps)
  meta = {**(metadata or {}), "steps": done, "exhausted": exhausted}
  cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros((0,), dtype)  # noqa: E731
  return ReferenceELBOs(cat(steps, np.int64), cat(ids, np.int64), cat(chosen, np.float32),
                        cat(rejected, np.float32), meta)


# --------------------------------------------------------------------------------------------
# A training run's table.


def run_metadata(*, seed: int, vrpo_config: vrpo.VRPOConfig, reference_from: str, reference_step: int,
                 model: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
  """Everything a run's reference ELBOs depend on (not the policy side: lr, beta, sft_weight).

  `model` holds the model config's fields, `data` the data settings that fix which examples each
  step reads (files, tokenizer, shape, order, epochs, seed).
  """
  v = vrpo_config
  meta = {
      "format": FORMAT,
      "seed": seed,
      "estimator": {"n_timesteps": v.n_timesteps, "masks_per_timestep": v.masks_per_timestep,
                    "antithetic": v.antithetic, "estimator": v.estimator, "stratified": v.stratified, "eps": v.eps},
      "reference": {"from": reference_from, "step": reference_step},
      "model": {k: val for k, val in model.items() if k not in _NUMERICS_FREE_FIELDS},
      "data": dict(data),
  }
  return json.loads(json.dumps(meta, default=list))  # tuples -> lists, as read back from the file


def _differences(saved: Mapping, wanted: Mapping, prefix: str = "") -> list[str]:
  out = []
  for key in sorted(set(saved) | set(wanted)):
    a, b = saved.get(key), wanted.get(key)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out += _differences(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}: file {a!r}, run {b!r}")
  return out


def check_matches(table: ReferenceELBOs, metadata: Mapping[str, Any], *, total_steps: int) -> None:
  """Raises ValueError unless `table` was computed for the run `metadata` describes and covers
  its `total_steps` steps."""
  saved = {k: v for k, v in table.metadata.items() if k not in ("steps", "exhausted")}
  diffs = _differences(saved, metadata)
  if diffs:
    raise ValueError(f"{table.source}: the reference ELBOs were computed for another run ({'; '.join(diffs)}); "
                     "expected a table for this run: delete it, or set config.vrpo.reference_elbos_file to a new path")
  covered = int(table.metadata.get("steps", 0))
  if covered < total_steps and not table.metadata.get("exhausted"):
    raise ValueError(f"{table.source}: the table covers steps [0, {covered}), the run needs "
                     f"config.total_steps={total_steps}; expected a table for the whole run: delete it to recompute")


def load_or_compute(path, metadata: Mapping[str, Any], loss: vrpo.VRPOLoss, *, total_steps: int, root_key,
                    batch_sharding, reference_shardings, micro_batches: int = 1, rules=None,
                    make_batches: Callable[[], Iterable], load_reference: Callable[[], Any]) -> ReferenceELBOs:
  """The run's table: read from `path` if there (and checked against `metadata`), else computed
  and saved by process 0.

  `make_batches()` is a fresh data iterator positioned at step 0; `load_reference()` the reference
  parameters, placed on `reference_shardings`. Neither is called when the file exists.
  """
  path = epath.Path(path)
  if path.exists():
    table = ReferenceELBOs.load(path)
    check_matches(table, metadata, total_steps=total_steps)
    logging.info("Reference ELBOs: %d entries read from %s", len(table), path)
    return table
  start = time.perf_counter()
  reference_params = load_reference()
  table = compute(loss, reference_params, make_batches(), root_key, batch_sharding=batch_sharding,
                  reference_shardings=reference_shardings, num_steps=total_steps, micro_batches=micro_batches,
                  rules=rules, metadata=metadata)
  del reference_params
  table = dataclasses.replace(table, source=str(path))
  if jax.process_index() == 0:
    table.save(path)
  logging.info("Reference ELBOs: %d entries for %d steps computed in %.1f s, saved to %s", len(table),
               table.metadata["steps"], time.perf_counter() - start, path)
  return table
