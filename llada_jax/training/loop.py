"""The training loop: one loop for pretraining, SFT, VRPO and naive DPO on one CPU, many devices or
many hosts. config -> program (`training.build`) -> data -> sharded state (restored if the workdir
has a checkpoint) -> jitted step -> checkpoints and metrics. Run again, it resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from llada_jax import configs, data as data_lib, lora, metrics as metrics_lib, sharding, wandb_writer
from llada_jax.storage import checkpoint as ckpt_lib, lock as lock_lib, mirrored_writer, remote
from llada_jax.training import build as build_lib, evaluation, objectives, preemption, reference_elbo
from llada_jax.training import state as state_lib


class TrainingError(RuntimeError):
  pass


@dataclasses.dataclass
class RunResult:
  final_step: int
  state: Any
  preempted: bool
  metrics: list


def make_data_iterator(config, model_cfg):
  return iter(make_data(config, model_cfg))


def make_data(config, model_cfg) -> data_lib.Pipeline:
  """The run's input pipeline (`llada_jax.data.make_dataset`), from its config."""
  if not config.data.train_files:
    raise ValueError("config.data.train_files=(): expected at least one text, JSONL, Parquet, Arrow or "
                     "ArrayRecord file or datasets directory")
  if not config.data.tokenizer:
    raise ValueError("config.data.tokenizer='': expected a sentencepiece .model, a tokenizer.json or a directory with one")
  tokenizer = data_lib.load_tokenizer(remote.local_copy(config.data.tokenizer))
  data_lib.check_vocab(tokenizer, model_cfg.vocab_size)
  for field, tok_id in (("mask_token_id", tokenizer.mask_id), ("eos_token_id", tokenizer.eos_id)):
    if getattr(model_cfg, field) != tok_id:
      raise ValueError(f"config.model.{field}={getattr(model_cfg, field)}: the tokenizer "
                       f"{config.data.tokenizer} uses {tok_id}")
  if config.data.global_batch_size % jax.process_count():
    raise ValueError(f"config.data.global_batch_size={config.data.global_batch_size}: expected a multiple of "
                     f"the {jax.process_count()} processes")
  seed = config.seed if config.data.seed < 0 else config.data.seed
  return data_lib.make_dataset(
      objectives.data_kind(config.objective), list(config.data.train_files), tokenizer, seq_len=config.data.seq_len,
      per_process_batch_size=config.data.global_batch_size // jax.process_count(), seed=seed,
      shuffle=config.data.shuffle, num_epochs=None if config.data.num_epochs < 0 else config.data.num_epochs,
      chat_template=config.data.chat_template, on_too_long=config.data.on_too_long, packing=config.data.packing,
      max_segments=config.data.max_segments, packing_bins=config.data.packing_bins)


def _init_step(config) -> int | None:
  """The step of `checkpoint.init_from` to load: None for its latest."""
  return None if config.checkpoint.init_step < 0 else config.checkpoint.init_step


def _initial_state(config, program, manager, data_iterator, root_key):
  """The state to start from: the workdir's newest intact checkpoint, else `init_from`'s weights,
  else random."""
  resumed = _resume(config, program, manager, data_iterator)
  if resumed is not None:
    return resumed
  if config.checkpoint.init_from and not program.model_cfg.lora_rank:  # LoRA: init_from is the frozen base
    params = ckpt_lib.load_params(config.checkpoint.init_from, program.abstract_state.params, step=_init_step(config))
    return program.create_state(root_key, params=params), None
  return program.create_state(jax.random.fold_in(root_key, 0x1A17)), None


def _resume(config, program, manager, data_iterator):
  """(state, step) from the newest intact checkpoint, or None when the workdir has none. A damaged
  step is moved aside and the one before tried (`checkpoint.on_damaged="previous"`) or the run
  stops (`"error"`); nothing is deleted."""
  while (latest := manager.latest_step()) is not None:
    try:
      check_same_run(config, manager.read_metadata(latest).get("config") or {}, f"{manager.directory} step {latest}")
      state = manager.restore(latest, abstract_state=program.abstract_state, data_iterator=data_iterator)
    except ckpt_lib.DamagedCheckpointError as e:
      if config.checkpoint.on_damaged == "error":
        raise ValueError(f"{e} (config.checkpoint.on_damaged='error'; 'previous' resumes from the step before)") from e
      moved = manager.set_aside(latest)
      logging.warning("%s: moved it to %s and resuming from the step before", e, moved)
      continue
    logging.info("Resuming from %s step %d", manager.directory, latest)
    return state, latest
  return None


# Model fields that change numerics or speed, not what the saved arrays are: a resume may change them.
_RESUMABLE_MODEL_FIELDS = ("dtype", "remat", "attention_impl", "attention_interpret", "lora_base_dtype",
                          "lora_dropout")


def check_same_run(config, saved: dict, where: str) -> None:
  """Refuses to continue a checkpoint with another objective, model architecture or data shape
  than it was trained with, unless `checkpoint.allow_config_change`; names every difference."""
  current = json.loads(json.dumps(config.to_dict(), default=list))
  if not saved:
    return
  changed = []
  if saved.get("objective") != current["objective"]:
    changed.append(f"objective {saved.get('objective')!r} -> {current['objective']!r}")
  for field, value in current["model"].items():
    if field not in _RESUMABLE_MODEL_FIELDS and saved.get("model", {}).get(field, value) != value:
      changed.append(f"model.{field} {saved['model'][field]!r} -> {value!r}")
  for field in ("seq_len", "global_batch_size", "packing", "max_segments"):  # the batch's shapes
    old = saved.get("data", {}).get(field, current["data"][field])
    if old != current["data"][field]:
      changed.append(f"data.{field} {old!r} -> {current['data'][field]!r}")
  if not changed:
    return
  if config.checkpoint.allow_config_change:
    logging.warning("Resuming %s with a changed config: %s", where, "; ".join(changed))
    return
  raise ValueError(f"config: {'; '.join(changed)}: expected the config the checkpoint {where} was trained with "
                   "(set config.checkpoint.allow_config_change=True to continue it anyway, or use a new workdir)")


def reference_table_metadata(config, objective: objectives.Objective) -> dict[str, Any]:
  """What a run's precomputed reference ELBOs depend on, read from its config."""
  fields = ("train_files", "tokenizer", "seq_len", "global_batch_size", "shuffle", "num_epochs", "chat_template",
            "on_too_long", "seed")
  if config.data.packing:  # which pairs share a step; left out unpacked, so earlier tables stay valid
    fields += ("packing", "max_segments", "packing_bins")
  data = {k: config.data[k] for k in fields}
  return reference_elbo.run_metadata(
      seed=config.seed, vrpo_config=objective.vrpo_config, reference_from=_reference_source(config),
      reference_step=config.checkpoint.init_step, model=config.model.to_dict(), data=data)


def reference_table_path(config) -> str:
  return config.vrpo.get("reference_elbos_file", "") or f"{config.workdir}/{reference_elbo.DEFAULT_FILENAME}"


def _reference_source(config) -> str:
  return config.checkpoint.reference_from or config.checkpoint.init_from


def lora_base(config, program):
  """A LoRA run's frozen base: `init_from`'s weights (in `model.lora_base_dtype`), or, without
  `init_from`, the model's init from the run's seed (`state.random_base`)."""
  if not config.checkpoint.init_from:
    return state_lib.random_base(program.model_cfg, config.seed, program.mesh, program.rules)
  return ckpt_lib.load_params(config.checkpoint.init_from, program.abstract_frozen, step=_init_step(config))


def _reference(config, program, root_key):
  """(frozen params, precomputed table): what the step's last argument holds (the VRPO reference, or
  a LoRA model's base) and the reference ELBOs computed ahead of time."""
  objective, lora_run = program.objective, program.model_cfg.lora_rank > 0
  if not (objective.needs_reference or objective.reference_in_batch or lora_run):
    return None, None
  frozen = lora_base(config, program) if lora_run else None
  if lora_run and not objective.reference_in_batch:
    return frozen, None
  source = _reference_source(config)
  if not source and not lora_run:
    raise ValueError(f"config.checkpoint.reference_from='': objective {config.objective!r} needs reference "
                     "weights (set checkpoint.init_from or checkpoint.reference_from)")
  shardings = program.state_shardings.params

  def load():
    return ckpt_lib.load_params(source, program.abstract_state.params, step=_init_step(config))

  if lora_run:  # the reference is the base with the adapters off
    shardings = lora.combine(program.reference_shardings, shardings)
    zeros = jax.jit(lambda: jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), program.abstract_state.params),
                    out_shardings=program.state_shardings.params)

    def load():  # noqa: F811 - the LoRA reference replaces the checkpoint one
      return lora.combine(frozen, zeros())

  if objective.needs_reference:
    return load(), None
  table = reference_elbo.load_or_compute(  # the step never sees the reference weights
      reference_table_path(config), reference_table_metadata(config, objective), objective.loss_fn,
      total_steps=config.total_steps, root_key=root_key, batch_sharding=program.batch_sharding,
      reference_shardings=shardings, micro_batches=program.grad_accum_steps, rules=program.rules,
      make_batches=lambda: make_data_iterator(config, program.model_cfg), load_reference=load)
  return frozen, table


def run(config: ml_collections.ConfigDict, *, data_iterator=None, stop_after: int | None = None,
        final_save: bool = True, on_progress: Callable[[int, int], None] | None = None) -> RunResult:
  """Trains until config.total_steps; resumable. The workdir is locked for the run: a second run
  in it is refused (`storage.lock`).

  `stop_after` ends this call after that many steps and `final_save=False` skips the closing
  checkpoint: together they stand in for a run killed right after an interval checkpoint.
  `on_progress(step, total_steps)` is called at the start and at each log step, when the steps
  before it have finished (not merely been dispatched).
  """
  configs.validate(config)
  sharding.maybe_initialize_distributed(config.distributed)  # before anything asks JAX for devices
  lock = lock_lib.DirectoryLock(config.workdir, "a training run") if jax.process_index() == 0 else None
  if lock is not None:
    lock.acquire()
  try:
    return _train(config, data_iterator=data_iterator, stop_after=stop_after, final_save=final_save,
                  on_progress=on_progress)
  finally:
    if lock is not None:
      lock.release()


def _check_weight_sources(config) -> None:
  """Missing initial or reference weights are reported before anything is written."""
  for field in ("init_from", "reference_from"):
    path = config.checkpoint[field]
    if path and not remote.is_remote(path) and not os.path.isdir(path):
      raise FileNotFoundError(f"config.checkpoint.{field}={path!r}: no such directory; expected a run's "
                              "checkpoints/ directory (or its workdir)")


def _train(config, *, data_iterator, stop_after, final_save, on_progress) -> RunResult:
  _check_weight_sources(config)
  program = build_lib.build(config)
  pipeline = None
  if data_iterator is None:
    pipeline = make_data(config, program.model_cfg)
    data_iterator = iter(pipeline)
  manager = ckpt_lib.CheckpointManager(
      f"{config.workdir}/checkpoints", save_interval_steps=config.checkpoint.every_steps,
      max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save,
      metadata={"config": config.to_dict()})
  root_key = jax.random.key(config.seed)
  state, latest = _initial_state(config, program, manager, data_iterator, root_key)
  reference_params, reference_table = _reference(config, program, root_key)
  evaluator = evaluation.make_evaluator(config, program)  # reads its files now: bad ones stop the run here

  writer = mirrored_writer.metric_writer(config.workdir, wandb=wandb_writer.settings_from_config(config.logging))
  if latest is None:
    writer.write_config(config.to_dict())
  if pipeline is not None:  # what the data kept, skipped, cut or split: once per (re)start
    writer.write_scalars(int(jax.device_get(state.step)), {f"data/{k}": v for k, v in pipeline.stats.items()})
  start = int(jax.device_get(state.step))
  end = config.total_steps if stop_after is None else min(config.total_steps, start + stop_after)
  watcher = preemption.PreemptionWatcher()
  progress = _progress_bar(config, start, end)
  log = _MetricLog(writer, program, start)
  preempted, evaluated = False, None
  if on_progress is not None:
    on_progress(start, config.total_steps)
  try:
    for step in range(start, end):
      try:
        local = next(data_iterator)
      except StopIteration:
        logging.info("Data exhausted at step %d", step)
        break
      if reference_table is not None:
        local = reference_table.attach(local, step)
      batch = sharding.global_batch(local, program.batch_sharding)
      state, step_metrics = program.step(state, batch, root_key, reference_params)
      done = step + 1
      if pipeline is not None:
        step_metrics = {**step_metrics, **{f"data/{k}": v for k, v in pipeline.batch_stats(local).items()}}
      log.add(done, step_metrics)  # fetched at log time: no device sync per step
      manager.save(done, state, data_iterator=data_iterator)
      if progress is not None:
        progress.update(1)
      if done % config.logging.every_steps == 0 or done == end:
        rows = log.flush(done, step_metrics)
        _check_nonfinite(state, config, done, manager)
        if progress is not None and rows:
          progress.set_postfix(loss=f"{rows[-1]['loss']:.4f}")
        if on_progress is not None:
          on_progress(done, config.total_steps)
      if evaluator is not None and done % evaluator.settings.every_steps == 0:
        evaluated = _evaluate(evaluator, state, reference_params, done, writer, log)
      if watcher.should_stop(done):
        logging.warning("Preemption signal: saving step %d and stopping", done)
        manager.save(done, state, data_iterator=data_iterator, force=True)
        preempted = True
        break
    final = int(jax.device_get(state.step))
    if final_save or preempted:
      manager.save(final, state, data_iterator=data_iterator, force=True)
    log.flush(None, None)
    if evaluator is not None and final_save and not preempted and evaluated != final:  # the end of training
      _evaluate(evaluator, state, reference_params, final, writer, log)
  finally:
    watcher.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if progress is not None:
      progress.close()
  return RunResult(final_step=final, state=state, preempted=preempted, metrics=log.history)


def _evaluate(evaluator, state, frozen, step, writer, log) -> int:
  """Writes the eval/* metrics of `state` at `step`; the time it takes is left out of throughput."""
  start = time.perf_counter()
  values = evaluator(state.params, frozen)
  writer.write_scalars(step, values)
  log.history.append({**values, "step": step})
  log.t_last += time.perf_counter() - start
  logging.info("step %d: %s", step, json.dumps({k: round(v, 6) for k, v in values.items()}))
  return step


class _MetricLog:
  """Step metrics held on device until a log step, then fetched at once and written."""

  def __init__(self, writer, program: build_lib.TrainProgram, start: int):
    self.writer, self.history, self.pending = writer, [], []
    self.flops, self.tokens = program.flops_per_step, program.tokens_per_step
    self.peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, program.model_cfg.dtype)
    self.t_last, self.step_last = time.perf_counter(), start

  def add(self, step: int, step_metrics) -> None:
    self.pending.append((step, step_metrics))

  def flush(self, step: int | None, step_metrics) -> list:
    """Writes what is pending; with `step`, throughput over the steps since the last flush."""
    steps, seconds = 0, 0.0
    if step is not None:
      jax.block_until_ready(step_metrics)  # steps run asynchronously: time them when finished
      now = time.perf_counter()
      steps, seconds = step - self.step_last, now - self.t_last
      self.t_last, self.step_last = now, step
    rows = _flush_metrics(self.pending, self.writer, steps=steps, seconds=seconds, flops=self.flops,
                          tokens=self.tokens, peak=self.peak)
    self.pending = []
    self.history.extend(rows)
    return rows


def _progress_bar(config, start, end):
  if not config.logging.progress_bar or jax.process_index() != 0:
    return None
  try:
    import tqdm  # noqa: PLC0415
  except ImportError:
    return None
  return tqdm.tqdm(total=end - start, initial=0, desc=config.objective, dynamic_ncols=True)


def _flush_metrics(pending, writer, *, steps, seconds, flops, tokens, peak):
  """One device_get for everything since the last log; throughput over the interval."""
  if not pending:
    return []
  fetched = jax.device_get([m for _, m in pending])
  rows = []
  for (step, _), values in zip(pending, fetched):
    row = {k: float(np.asarray(v)) for k, v in values.items()}
    row["step"] = step
    rows.append(row)
  if steps and seconds > 0:
    rows[-1].update(metrics_lib.throughput(steps=steps, wall_time_s=seconds, tokens_per_step=tokens,
                                           flops_per_step=flops, n_devices=jax.device_count(),
                                           peak_flops_per_device=peak))
  for row in rows:
    writer.write_scalars(row["step"], {k: v for k, v in row.items() if k != "step"})
  last = rows[-1]
  logging.info("step %d: %s", last["step"], json.dumps({k: round(v, 6) for k, v in last.items() if k != "step" and v is not None}))
  return rows


def _check_nonfinite(state, config, step, manager):
  worst = int(jax.device_get(state.max_nonfinite_in_a_row))
  if worst >= config.max_nonfinite_in_a_row:
    manager.wait_until_finished()
    raise TrainingError(
        f"step {step}: {worst} updates in a row had a non-finite loss or gradient and were skipped "
        f"(config.max_nonfinite_in_a_row={config.max_nonfinite_in_a_row}); the parameters are those of the last "
        f"good step. Lower config.optimizer.lr, check the data, or raise the limit.")
