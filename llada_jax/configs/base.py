"""The training config: one ml_collections ConfigDict with every field a run can set.

Recipes (`llada_jax/configs/*.py`, or any user file) start from `base_config()` and change what
they need; the command line overrides single fields (`--config.optimizer.lr=1e-4`). The config is
locked, so a mistyped key is an error that names it. It is read in one place,
`llada_jax.training.build`; library modules below it take typed arguments.
"""

from __future__ import annotations

import glob
import os

import ml_collections

from llada_jax import optim, sharding, wandb_writer
from llada_jax.configs import models
from llada_jax.data.sources import ON_TOO_LONG
from llada_jax.diffusion import ESTIMATORS as ELBO_ESTIMATORS

OBJECTIVES = ("pretrain", "sft", "vrpo", "naive_dpo")
# What a resume does when the latest checkpoint fails its integrity check (storage.checkpoint):
# "previous" moves it aside and resumes from the newest intact step; "error" stops the run.
ON_DAMAGED = ("previous", "error")


def logging_config() -> ml_collections.ConfigDict:
  """Metrics every N steps to metrics.jsonl, TensorBoard and optionally Weights & Biases."""
  lg = ml_collections.ConfigDict()
  lg.every_steps = 10
  lg.progress_bar = True
  # Weights & Biases (needs `pip install 'llada_jax[wandb]'`). The W&B run id is kept in the workdir, so
  # a resumed run continues the same W&B run.
  lg.wandb = False
  lg.wandb_project = "llada_jax"
  lg.wandb_entity = ""  # "": the account's default
  lg.wandb_mode = ""  # online | offline | disabled; "": WANDB_MODE, else online
  lg.wandb_run_name = ""  # "": the workdir's name
  lg.wandb_tags = ()
  return lg


def eval_config() -> ml_collections.ConfigDict:
  """Evaluation during training (llada_jax.training.evaluation; docs/usage.md, "Evaluation during
  training"): validation ELBOs and, with `task`, greedy generation accuracy, logged as eval/*."""
  e = ml_collections.ConfigDict()
  e.every_steps = 0  # 0: off; else every this many steps and at the end of the run
  e.validation_files = ()  # held-out files in the format of data.train_files for the objective
  e.max_examples = 64  # the first examples of the validation and task files
  e.mc_num = 16  # Monte Carlo samples per answer
  e.mc_batch_size = 4  # rows per stratified round; mc_num / mc_batch_size rounds give the standard error
  e.seed = 0  # evaluation keys: the same at every evaluation, apart from the training keys
  e.task = ""  # "", "demo" or "gsm8k": generation accuracy on task_data
  e.task_data = ""  # the task's JSONL file
  e.gen_length = 64
  e.steps = 0  # sampling steps; 0: gen_length
  e.block_length = 32
  e.batch_size = 8  # prompts per sampler call
  return e


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = ""  # checkpoints, metrics.jsonl, tensorboard/; required
  c.seed = 0
  c.objective = "pretrain"  # one of OBJECTIVES
  c.total_steps = 100
  c.grad_accum_steps = 1  # micro-batches per step (the global batch is split into them)
  c.max_nonfinite_in_a_row = 10  # stop after this many skipped (non-finite) updates in a row

  c.model = models.get_config("tiny")

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.eps = 1e-3
  c.diffusion.random_length_prob = 0.01  # pretraining: cut a batch to a random length
  c.diffusion.prompt_drop_prob = 0.0  # SFT: mask the whole prompt, for classifier-free guidance

  c.vrpo = ml_collections.ConfigDict()
  c.vrpo.beta = 0.2
  c.vrpo.n_timesteps = 8
  c.vrpo.masks_per_timestep = 1
  c.vrpo.antithetic = True
  c.vrpo.estimator = "l_over_L"
  c.vrpo.stratified = False
  c.vrpo.sft_weight = 0.05
  # Reference ELBOs computed once before training with the step's own keys (llada_jax.reference_elbo):
  # the step then runs the policy only and holds no reference weights.
  c.vrpo.precompute_reference = False
  c.vrpo.reference_elbos_file = ""  # "" = WORKDIR/reference_elbos.npz
  # Run each pair's 2 x n noised copies in this many groups (a divisor of n): activation memory of
  # one group for one extra policy forward pass (llada_jax.vrpo_packed).
  c.vrpo.copy_chunks = 1

  c.data = ml_collections.ConfigDict()
  c.data.train_files = ()  # text / JSONL / ArrayRecord files (tuple of paths or globs)
  c.data.tokenizer = ""  # sentencepiece .model, Hugging Face tokenizer.json, or a directory with one
  c.data.seq_len = 64
  c.data.global_batch_size = 8
  c.data.shuffle = True
  c.data.num_epochs = -1  # -1: repeat forever
  c.data.chat_template = True
  c.data.on_too_long = "error"  # error | truncate | skip
  c.data.seed = -1  # -1: use `seed`
  # Several examples per row with segment ids and block-diagonal attention (docs/method.md, "Packed rows").
  c.data.packing = False
  c.data.max_segments = 16  # the most examples one packed row holds
  c.data.packing_bins = 0  # rows packed at a time; 0: automatic (llada_jax.data.packing.default_bins)

  c.optimizer = optim.default_optimizer_config("pretrain")
  c.optimizer.total_steps = c.get_ref("total_steps")  # one source of truth for the schedule's length

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1))
  c.sharding_rules = tuple(sharding.DEFAULT_RULES)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True
  c.checkpoint.init_from = ""  # a run's checkpoint dir: initial policy weights (params only)
  c.checkpoint.init_step = -1  # -1: its latest step
  c.checkpoint.reference_from = ""  # VRPO reference weights; "" = the same as init_from
  c.checkpoint.on_damaged = "previous"  # one of ON_DAMAGED
  # A resume with another objective, model architecture or data shape than the checkpoint's is
  # refused unless this is True (docs/usage.md, "Resuming").
  c.checkpoint.allow_config_change = False

  c.eval = eval_config()

  c.logging = logging_config()

  c.distributed = ml_collections.ConfigDict()
  # False, True or "auto" (TPU pods, SLURM: JAX finds the coordinator itself). Typed `object` so the
  # command line takes any of the three: --config.distributed.initialize=auto.
  c.distributed.initialize = ml_collections.FieldReference(False, field_type=object)
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = -1
  c.distributed.process_id = -1
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks that need more than a type: errors name the field and what was expected."""
  def fail(field, expected):
    value = eval(f"config.{field}", {"config": config})  # noqa: S307 - fixed field names only
    raise ValueError(f"config.{field}={value!r}: expected {expected}")

  if not config.workdir:
    fail("workdir", "a directory (local or gs://) for checkpoints and metrics")
  if config.objective not in OBJECTIVES:
    fail("objective", f"one of {OBJECTIVES}")
  if config.total_steps < 1:
    fail("total_steps", "a positive integer")
  if config.max_nonfinite_in_a_row < 1:
    fail("max_nonfinite_in_a_row", "a positive integer (skipped updates in a row before the run stops)")
  if config.grad_accum_steps < 1:
    fail("grad_accum_steps", "a positive integer")
  if config.data.global_batch_size < 1:
    fail("data.global_batch_size", "a positive number of rows (pairs for preference objectives) per step")
  if config.data.global_batch_size % config.grad_accum_steps:
    fail("data.global_batch_size", f"a multiple of grad_accum_steps={config.grad_accum_steps}")
  if config.data.seq_len < 2:
    fail("data.seq_len", "at least 2")
  if config.data.on_too_long not in ON_TOO_LONG:
    fail("data.on_too_long", f"one of {ON_TOO_LONG}")
  _validate_packing(config, fail)
  if not 0 < config.diffusion.eps < 1:
    fail("diffusion.eps", "a number in (0, 1): the smallest masking probability")
  for field in ("random_length_prob", "prompt_drop_prob"):
    if not 0 <= config.diffusion[field] <= 1:
      fail(f"diffusion.{field}", "a probability in [0, 1]")
  _validate_vrpo(config, fail)
  if config.checkpoint.every_steps < 1:
    fail("checkpoint.every_steps", "a positive integer")
  if config.checkpoint.max_to_keep is not None and config.checkpoint.max_to_keep < 1:
    fail("checkpoint.max_to_keep", "a positive integer")
  if config.checkpoint.on_damaged not in ON_DAMAGED:
    fail("checkpoint.on_damaged", f"one of {ON_DAMAGED}")
  _validate_eval(config, fail)
  _validate_logging(config, fail)
  if config.distributed.initialize not in sharding.DISTRIBUTED_MODES:
    fail("distributed.initialize", f"one of {sharding.DISTRIBUTED_MODES}")


def _validate_packing(config, fail) -> None:
  if config.data.max_segments < 1:
    fail("data.max_segments", "a positive integer (examples per packed row)")
  if config.data.packing_bins < 0:
    fail("data.packing_bins", "an integer >= 0 (0: automatic)")
  if not config.data.packing:
    return
  if config.objective == "pretrain" and config.diffusion.random_length_prob > 0:
    fail("diffusion.random_length_prob", "0 with data.packing=True (packed documents already come in every length)")


def _validate_vrpo(config, fail) -> None:
  v = config.vrpo
  if not v.beta > 0:
    fail("vrpo.beta", "a positive number (the DPO temperature)")
  for field in ("n_timesteps", "masks_per_timestep"):
    if v[field] < 1:
      fail(f"vrpo.{field}", "a positive integer")
  if v.sft_weight < 0:
    fail("vrpo.sft_weight", "a number >= 0")
  if v.estimator not in ELBO_ESTIMATORS:
    fail("vrpo.estimator", f"one of {ELBO_ESTIMATORS}")
  n = v.n_timesteps * v.masks_per_timestep  # naive DPO runs one copy per answer and ignores copy_chunks
  if v.copy_chunks < 1 or (config.objective == "vrpo" and n % v.copy_chunks):
    fail("vrpo.copy_chunks", f"a divisor of the budget n = {n} (noised copies per answer)")


def _validate_logging(config, fail) -> None:
  lg = config.logging
  if lg.every_steps < 1:
    fail("logging.every_steps", "a positive integer")
  if lg.wandb_mode not in wandb_writer.MODES:
    fail("logging.wandb_mode", f"one of {wandb_writer.MODES} ('': WANDB_MODE, else online)")
  if lg.wandb and not lg.wandb_project:
    fail("logging.wandb_project", "a W&B project name with logging.wandb=True")
  # Before the run starts: a missing optional package must not stop it after compiling and loading.
  if lg.wandb and not wandb_writer.is_installed():
    fail("logging.wandb", f"False, or the wandb package installed ({wandb_writer.INSTALL_HINT})")


EVAL_TASKS = ("", "demo", "gsm8k")


def _missing(path: str) -> bool:
  """A local path (or glob) that names no file; remote paths are checked when read."""
  if not path or "://" in path:
    return not path
  return not (glob.glob(path) if glob.has_magic(path) else os.path.isfile(path))


def _validate_eval(config, fail) -> None:
  e = config.eval
  if e.every_steps < 0:
    fail("eval.every_steps", "an integer >= 0 (0: no evaluation during training)")
  for field in ("max_examples", "mc_batch_size", "gen_length", "block_length", "batch_size"):
    if e[field] < 1:
      fail(f"eval.{field}", "a positive integer")
  if e.mc_num < 1 or e.mc_num % e.mc_batch_size:
    fail("eval.mc_num", f"a positive multiple of eval.mc_batch_size={e.mc_batch_size} (Monte Carlo samples)")
  if e.steps < 0:
    fail("eval.steps", "an integer >= 0 (0: gen_length)")
  if e.task not in EVAL_TASKS:
    fail("eval.task", f"one of {EVAL_TASKS}")
  if e.task and not e.task_data:
    fail("eval.task_data", f"the JSONL file of eval.task={e.task!r}")
  blocks = e.gen_length // min(e.block_length, e.gen_length)
  if e.task and e.gen_length % min(e.block_length, e.gen_length):
    fail("eval.block_length", f"a divisor of eval.gen_length={e.gen_length}")
  if e.task and (e.steps or e.gen_length) % blocks:
    fail("eval.steps", f"a multiple of the {blocks} blocks of eval.gen_length / eval.block_length (0: gen_length)")
  if e.every_steps == 0:
    return
  if not e.validation_files and not e.task:
    fail("eval.validation_files", "at least one held-out file with eval.every_steps > 0 (or an eval.task)")
  for path in e.validation_files:
    if _missing(path):
      fail("eval.validation_files", f"existing files; no file {path!r}")
  if e.task and _missing(e.task_data):
    fail("eval.task_data", "an existing JSONL file")
