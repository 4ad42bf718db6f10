"""python -m llada_jax.train --config=configs/NAME.py [--config.key=value ...]

One loop for pretraining, SFT, VRPO and naive DPO on one CPU, many devices, or many hosts:
config -> mesh -> data -> sharded state (restored if the workdir has a checkpoint) -> jitted step
-> checkpoints and metrics. Restarting the same command resumes where the run stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, logging
from etils import epath
from ml_collections import config_flags

from llada_jax import checkpoint as ckpt_lib
from llada_jax import config_lib, metrics as metrics_lib, model as model_lib, optim, sharding, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/NAME.py).",
                                          lock_config=True)


class TrainingError(RuntimeError):
  pass


@dataclasses.dataclass
class RunResult:
  final_step: int
  state: Any
  preempted: bool
  metrics: list


def _data_kind(objective: str) -> str:
  return {"pretrain": "pretrain", "sft": "sft", "vrpo": "preference", "naive_dpo": "preference"}[objective]


def make_data_iterator(config, model_cfg):
  from llada_jax import data as data_lib  # noqa: PLC0415 - keeps `--help` fast

  if not config.data.train_files:
    raise ValueError("config.data.train_files=(): expected at least one text, JSONL or ArrayRecord file")
  if not config.data.tokenizer:
    raise ValueError("config.data.tokenizer='': expected a sentencepiece .model, a tokenizer.json or a directory with one")
  tokenizer = data_lib.load_tokenizer(local_copy(config.data.tokenizer))
  data_lib.check_vocab(tokenizer, model_cfg.vocab_size)
  for field, tok_id in (("mask_token_id", tokenizer.mask_id), ("eos_token_id", tokenizer.eos_id)):
    if getattr(model_cfg, field) != tok_id:
      raise ValueError(f"config.model.{field}={getattr(model_cfg, field)}: the tokenizer "
                       f"{config.data.tokenizer} uses {tok_id}")
  if config.data.global_batch_size % jax.process_count():
    raise ValueError(f"config.data.global_batch_size={config.data.global_batch_size}: expected a multiple of "
                     f"the {jax.process_count()} processes")
  seed = config.seed if config.data.seed < 0 else config.data.seed
  return data_lib.make_pipeline(
      _data_kind(config.objective), list(config.data.train_files), tokenizer, seq_len=config.data.seq_len,
      per_process_batch_size=config.data.global_batch_size // jax.process_count(), seed=seed,
      shuffle=config.data.shuffle, num_epochs=None if config.data.num_epochs < 0 else config.data.num_epochs,
      chat_template=config.data.chat_template, on_too_long=config.data.on_too_long)


# --------------------------------------------------------------------------------------------
# Remote (gs://) paths. Checkpoints and data files go through etils.epath; the tokenizer libraries
# and the metric writer need local files, so those are copied down or mirrored up.


def _is_remote(path) -> bool:
  return "://" in os.fspath(path)


def _local_cache(kind: str, remote: str) -> str:
  return os.path.join(tempfile.gettempdir(), "llada_jax", kind, hashlib.sha256(remote.encode()).hexdigest()[:16])


def local_copy(path: str) -> str:
  """A local path as it is; a remote tokenizer file (a directory: its tokenizer.json) copied to local disk."""
  if not _is_remote(path):
    return path
  src = epath.Path(path)
  if src.is_dir():
    src = src / "tokenizer.json"
  if not src.is_file():
    raise FileNotFoundError(f"config.data.tokenizer={path!r}: no such file ({src})")
  local = os.path.join(_local_cache("files", os.fspath(src)), src.name)
  if not os.path.exists(local):
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.tmp{os.getpid()}"  # several processes per host may copy at once
    with open(tmp, "wb") as f:
      f.write(src.read_bytes())
    os.replace(tmp, local)
  return local


class _MirroredMetricWriter(metrics_lib.MetricWriter):
  """A MetricWriter for a remote workdir: writes a local mirror and copies it up every
  `upload_secs` and on close. A resumed run first fetches the metrics it logged before."""

  _APPENDED = ("metrics.jsonl", "text.jsonl")

  def __init__(self, workdir: str, upload_secs: float = 60.0):
    self.remote = epath.Path(workdir)
    self.upload_secs = upload_secs
    local = _local_cache("metrics", workdir)
    if jax.process_index() == 0:
      os.makedirs(local, exist_ok=True)
      for name in self._APPENDED:
        if not os.path.exists(os.path.join(local, name)) and (self.remote / name).exists():
          with open(os.path.join(local, name), "wb") as f:
            f.write((self.remote / name).read_bytes())
    super().__init__(local)
    self._uploaded = time.monotonic()

  def write_scalars(self, step, scalars):
    super().write_scalars(step, scalars)
    if time.monotonic() - self._uploaded >= self.upload_secs:
      self.upload()

  def upload(self):
    if not self.enabled:
      return
    self.flush()
    for root, _, files in os.walk(self.workdir):
      for name in files:
        src = os.path.join(root, name)
        dst = self.remote / os.path.relpath(src, self.workdir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as f:
          dst.write_bytes(f.read())
    self._uploaded = time.monotonic()

  def close(self):
    super().close()
    self.upload()


def metric_writer(workdir: str) -> metrics_lib.MetricWriter:
  return _MirroredMetricWriter(workdir) if _is_remote(workdir) else metrics_lib.MetricWriter(workdir)


def _load_initial_params(path, step, abstract_state):
  return ckpt_lib.load_params(path, abstract_state.params, step=None if step < 0 else step)


def _flops_per_step(config, model_cfg) -> float:
  b, l = config.data.global_batch_size, config.data.seq_len
  if config.objective in ("pretrain", "sft"):
    return metrics_lib.lm_step_flops(model_cfg, batch_size=b, seq_len=l)
  naive = config.objective == "naive_dpo"
  return metrics_lib.vrpo_step_flops(
      model_cfg, n_pairs=b, seq_len=l, n_timesteps=1 if naive else config.vrpo.n_timesteps,
      masks_per_timestep=1 if naive else config.vrpo.masks_per_timestep, sft_weight=config.vrpo.sft_weight,
      reference_precomputed=bool(config.vrpo.get("precompute_reference", False))).total


def run(config: ml_collections.ConfigDict, *, data_iterator=None, stop_after: int | None = None,
        final_save: bool = True) -> RunResult:
  """Trains until config.total_steps; resumable.

  `stop_after` ends this call after that many steps and `final_save=False` skips the closing
  checkpoint: together they stand in for a run killed right after an interval checkpoint.
  """
  config_lib.validate(config)
  sharding.maybe_initialize_distributed(config.distributed)
  model_cfg = model_lib.ModelConfig.from_dict(config.model)
  objective = trainer.make_objective(config, model_cfg)
  tx = optim.make_optimizer(config.optimizer)

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  abstract_state, state_sh = trainer.state_shardings(model_cfg, tx, mesh, rules)
  batch_sh = sharding.batch_sharding(mesh, rules)
  trainer.checked_batch_shards(config, mesh, batch_sh)

  if data_iterator is None:
    data_iterator = make_data_iterator(config, model_cfg)

  manager = ckpt_lib.CheckpointManager(
      f"{config.workdir}/checkpoints", save_interval_steps=config.checkpoint.every_steps,
      max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save,
      metadata={"config": config.to_dict()})
  root_key = jax.random.key(config.seed)

  latest = manager.latest_step()
  if latest is not None:
    logging.info("Resuming from %s/checkpoints step %d", config.workdir, latest)
    state = manager.restore(latest, abstract_state=abstract_state, data_iterator=data_iterator)
  elif config.checkpoint.init_from:
    params = _load_initial_params(config.checkpoint.init_from, config.checkpoint.init_step, abstract_state)
    state = trainer.create_train_state(model_cfg, tx, root_key, mesh, rules, params=params)
  else:
    state = trainer.create_train_state(model_cfg, tx, jax.random.fold_in(root_key, 0x1A17), mesh, rules)

  reference_params, reference_sh, reference_table = None, None, None
  if objective.needs_reference or objective.reference_in_batch:
    source = config.checkpoint.reference_from or config.checkpoint.init_from
    if not source:
      raise ValueError(f"config.checkpoint.reference_from='': objective {config.objective!r} needs reference "
                       "weights (set checkpoint.init_from or checkpoint.reference_from)")
    load_reference = lambda: _load_initial_params(source, config.checkpoint.init_step, abstract_state)  # noqa: E731
    if objective.reference_in_batch:  # the step never sees the reference weights
      from llada_jax import reference_elbo  # noqa: PLC0415

      reference_table = reference_elbo.load_or_compute(
          config, objective.loss_fn, root_key=root_key, batch_sharding=batch_sh, reference_shardings=state_sh.params,
          make_batches=lambda: make_data_iterator(config, model_cfg), load_reference=load_reference)
    else:
      reference_params = load_reference()
      reference_sh = state_sh.params

  step_fn = trainer.jit_train_step(
      trainer.make_train_step(objective, tx, grad_accum_steps=config.grad_accum_steps),
      state_sh, batch_sh, mesh, reference_sh, rules=rules)

  writer = metric_writer(config.workdir)
  if latest is None:
    writer.write_config(config.to_dict())
  flops = _flops_per_step(config, model_cfg)
  tokens_per_step = config.data.global_batch_size * config.data.seq_len
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, model_cfg.dtype)

  start = int(jax.device_get(state.step))
  end = config.total_steps if stop_after is None else min(config.total_steps, start + stop_after)
  watcher = ckpt_lib.PreemptionWatcher()
  progress = _progress_bar(config, start, end)
  pending, history, preempted = [], [], False
  t_last, step_last = time.perf_counter(), start
  try:
    for step in range(start, end):
      try:
        local = next(data_iterator)
      except StopIteration:
        logging.info("Data exhausted at step %d", step)
        break
      if reference_table is not None:
        local = reference_table.attach(local, step)
      batch = sharding.global_batch(local, batch_sh)
      state, step_metrics = step_fn(state, batch, root_key, reference_params)
      pending.append((step + 1, step_metrics))  # fetched at log time: no device sync per step
      done = step + 1
      manager.save(done, state, data_iterator=data_iterator)
      if progress is not None:
        progress.update(1)

      if done % config.logging.every_steps == 0 or done == end:
        jax.block_until_ready(step_metrics)  # steps run asynchronously: time them when finished
        now = time.perf_counter()
        rows = _flush_metrics(pending, writer, steps=done - step_last, seconds=now - t_last, flops=flops,
                              tokens=tokens_per_step, peak=peak)
        history.extend(rows)
        pending, t_last, step_last = [], now, done
        _check_nonfinite(state, config, done, manager)
        if progress is not None and rows:
          progress.set_postfix(loss=f"{rows[-1]['loss']:.4f}")

      if watcher.should_stop(done):
        logging.warning("Preemption signal: saving step %d and stopping", done)
        manager.save(done, state, data_iterator=data_iterator, force=True)
        preempted = True
        break
    final = int(jax.device_get(state.step))
    if final_save or preempted:
      manager.save(final, state, data_iterator=data_iterator, force=True)
    history.extend(_flush_metrics(pending, writer, steps=0, seconds=0.0, flops=flops, tokens=tokens_per_step,
                                  peak=peak))
  finally:
    watcher.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if progress is not None:
      progress.close()
  return RunResult(final_step=final, state=state, preempted=preempted, metrics=history)


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


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/NAME.py is required")
  result = run(config)
  logging.info("Finished at step %d%s", result.final_step, " (preempted)" if result.preempted else "")


if __name__ == "__main__":
  app.run(main)
