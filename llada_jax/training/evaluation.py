"""Evaluation during training: validation ELBOs and, optionally, generation accuracy, every
`eval.every_steps` steps and at the end of a run, logged as `eval/*` beside the training metrics.

Evaluation only reads the parameters and draws no key from the training stream: its keys derive
from `eval.seed` alone, so every evaluation of a run scores the same examples with the same masks
(successive values differ by the parameters only), and a run with evaluation on trains bit for bit
as one with it off.

The ELBOs are `eval.likelihood.score_answers` estimates, run on the training mesh (`placement`).
The `eval.mc_num` samples per answer are spent in R = mc_num / mc_batch_size independent rounds,
each one stratified sweep of `mc_batch_size` rows. A statistic that is linear in the ELBOs is
computed per round; its mean over the rounds is logged with the standard error std / sqrt(R) beside
it as `*_se` (left out when R = 1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import logging

from llada_jax import lora, placement as placement_lib
from llada_jax.data import pipelines, tokenizer as tok_lib
from llada_jax.storage import checkpoint as ckpt_lib, remote
from llada_jax.training import objectives

TASKS = ("demo", "gsm8k")
_KEY_TAG = 0xE7A1  # folded into key(eval.seed): evaluation keys never equal a training step's key
_GEN_TAG = 1  # generation draws from fold_in(eval key, _GEN_TAG); the ELBO rounds from tag 0


@dataclasses.dataclass(frozen=True)
class ValidationSet:
  """The scored examples: prompt and answer token ids. Pretraining rows have empty prompts;
  preference pairs list their chosen answers in `answers` and their rejected ones in `rejected`."""

  kind: str  # pretrain | sft | preference
  prompts: tuple
  answers: tuple
  rejected: tuple = ()

  def __len__(self) -> int:
    return len(self.answers)


def load_validation(kind: str, files: Sequence[str], tokenizer, *, seq_len: int, chat_template: bool,
                    on_too_long: str, max_examples: int) -> ValidationSet:
  """The first `max_examples` examples of `files`, read by the training pipeline's own source (the
  same parsing, chat template and length rule as `data.train_files`)."""
  kind = pipelines.canonical_kind(kind)
  source = pipelines.make_source(kind, list(files), tokenizer, seq_len=seq_len, chat_template=chat_template,
                                 on_too_long=on_too_long)
  n = min(len(source), max_examples)
  if kind == "pretrain":  # rows of seq_len tokens, every one scored
    rows = [np.asarray(source[i]["tokens"]) for i in range(n)]
    return ValidationSet(kind, tuple(r[:0] for r in rows), tuple(rows))
  # SFT and preference: the answer is the response and its EOS, not the padding after it.
  examples = [source.example(i) for i in range(n)]
  split = [int(ex["prompt_lengths"]) for ex in examples]
  if kind == "sft":
    return ValidationSet(kind, tuple(ex["tokens"][:p] for ex, p in zip(examples, split)),
                         tuple(ex["tokens"][p:] for ex, p in zip(examples, split)))
  return ValidationSet(kind, tuple(ex["chosen"][:p] for ex, p in zip(examples, split)),
                       tuple(ex["chosen"][p:] for ex, p in zip(examples, split)),
                       tuple(ex["rejected"][p:] for ex, p in zip(examples, split)))


def eval_key(seed: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), _KEY_TAG)


def round_elbos(params, model_cfg, prompts, answers, key, *, mc_num: int, mc_batch_size: int,
                placement=None) -> np.ndarray:
  """ELBO estimates [R, N] of R = mc_num / mc_batch_size independent rounds; round r scores with
  fold_in(key, r), so equal keys, prompts and answers give equal masks for any parameters (a
  policy and its reference share their noise)."""
  from llada_jax.eval import likelihood  # noqa: PLC0415 - only runs that evaluate load the scorer

  rounds = mc_num // mc_batch_size
  return np.stack([
      likelihood.score_answers(params, model_cfg, prompts, answers, jax.random.fold_in(key, r),
                               mc_num=mc_batch_size, batch_size=mc_batch_size, placement=placement)
      for r in range(rounds)])


def mean_and_se(per_round: np.ndarray, name: str) -> dict[str, float]:
  """`name`: the mean of a per-round statistic [R]; `name_se`: its standard error (R > 1 only)."""
  out = {name: float(np.mean(per_round))}
  if per_round.shape[0] > 1:
    out[f"{name}_se"] = float(np.std(per_round, ddof=1) / math.sqrt(per_round.shape[0]))
  return out


def elbo_metrics(elbos: np.ndarray, answers: Sequence, prefix: str) -> dict[str, float]:
  """Per-example mean ELBO and the NLL bound per answer token, -sum ELBO / sum tokens, of [R, N]."""
  tokens = sum(len(a) for a in answers)
  return {**mean_and_se(elbos.mean(axis=1), f"{prefix}elbo"),
          **mean_and_se(-elbos.sum(axis=1) / tokens, f"{prefix}nll_per_token")}


def preference_metrics(policy: np.ndarray, reference: np.ndarray | None, data: ValidationSet,
                       beta: float) -> dict[str, float]:
  """Chosen and rejected ELBOs ([R, 2N]: chosen, then rejected); with a reference, the VRPO reward
  margin beta [(B(y_w) - B_ref(y_w)) - (B(y_l) - B_ref(y_l))] and the share of pairs it ranks right."""
  n = len(data)
  out = {**elbo_metrics(policy[:, :n], data.answers, "chosen_"),
         **elbo_metrics(policy[:, n:], data.rejected, "rejected_")}
  if reference is None:
    return out
  diff = policy - reference
  margin = beta * (diff[:, :n] - diff[:, n:])  # [R, N]
  out.update(mean_and_se(margin.mean(axis=1), "reward_margin"))
  out["preference_accuracy"] = float((margin.mean(axis=0) > 0).mean())
  return out


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """The `eval.*` fields, typed (`settings_from_config`)."""

  every_steps: int
  seed: int
  max_examples: int
  mc_num: int
  mc_batch_size: int
  validation_files: tuple = ()
  task: str = ""
  task_data: str = ""
  sampler: Any = None  # sampling.SamplerConfig when `task` is set
  gen_batch_size: int = 8


def sampler_config(gen_length: int, steps: int, block_length: int, eot_token_id=None):
  """Greedy sampling (temperature 0, low-confidence remasking): the accuracy depends on the
  parameters only. `steps` 0 means one token per step."""
  from llada_jax import sampling  # noqa: PLC0415 - only generation tasks need the sampler

  return sampling.SamplerConfig(gen_length=gen_length, block_length=min(block_length, gen_length),
                                steps=steps or gen_length, temperature=0.0, eot_token_id=eot_token_id)


def settings_from_config(config) -> EvalSettings:
  e = config.eval
  sampler = sampler_config(e.gen_length, e.steps, e.block_length) if e.task else None
  return EvalSettings(every_steps=e.every_steps, seed=e.seed, max_examples=e.max_examples, mc_num=e.mc_num,
                      mc_batch_size=e.mc_batch_size, validation_files=tuple(e.validation_files), task=e.task,
                      task_data=e.task_data, sampler=sampler, gen_batch_size=e.batch_size)


def is_due(settings: EvalSettings, step: int, end: int) -> bool:
  """Every `every_steps` steps, and at the last step of the run."""
  return settings.every_steps > 0 and (step % settings.every_steps == 0 or step == end)


class Evaluator:
  """Scores a run's parameters on its validation set and task; holds nothing the training reads.

  `policy(params, frozen)` gives the model's full parameters from the state's and the step's
  frozen argument (a LoRA base); `reference(params, frozen)` the preference objectives' reference
  parameters or None. The reference's ELBOs are computed once and kept: its weights do not change.
  """

  def __init__(self, settings: EvalSettings, *, model_cfg, placement, validation: ValidationSet | None,
               policy: Callable, reference: Callable, beta: float, tokenizer=None, chat_template: bool = False):
    self.settings, self.model_cfg, self.placement = settings, model_cfg, placement
    self.validation, self.policy, self.reference, self.beta = validation, policy, reference, beta
    self.tokenizer, self.chat_template = tokenizer, chat_template
    self.examples = None
    if settings.task:
      from llada_jax.eval import tasks as tasks_lib  # noqa: PLC0415
      self.examples = tasks_lib.load_task(settings.task, settings.task_data, settings.max_examples)
    self._reference_elbos = None

  def __call__(self, params, frozen) -> dict[str, float]:
    """The `eval/*` metrics of `params` (the state's) with the step's frozen argument."""
    key = eval_key(self.settings.seed)
    out = {}
    if self.validation is not None:
      out.update(self._validation(params, frozen, jax.random.fold_in(key, 0)))
    if self.examples is not None:
      out.update(self._generation(params, frozen, jax.random.fold_in(key, _GEN_TAG)))
    return {f"eval/{k}": v for k, v in out.items()}

  def _elbos(self, params, key):
    data = self.validation
    prompts = data.prompts + data.prompts if data.kind == "preference" else data.prompts
    answers = data.answers + data.rejected
    return round_elbos(params, self.model_cfg, prompts, answers, key, mc_num=self.settings.mc_num,
                       mc_batch_size=self.settings.mc_batch_size, placement=self.placement)

  def _validation(self, params, frozen, key) -> dict[str, float]:
    data = self.validation
    policy = self._elbos(self.policy(params, frozen), key)
    out = {"examples": float(len(data))}
    if data.kind != "preference":
      return {**out, **elbo_metrics(policy, data.answers, "")}
    if self._reference_elbos is None:
      reference_params = self.reference(params, frozen)
      if reference_params is not None:
        self._reference_elbos = self._elbos(reference_params, key)
        del reference_params
    return {**out, **preference_metrics(policy, self._reference_elbos, data, self.beta)}

  def _generation(self, params, frozen, key) -> dict[str, float]:
    from llada_jax.eval import tasks as tasks_lib  # noqa: PLC0415

    sampler = dataclasses.replace(self.settings.sampler, eot_token_id=self.tokenizer.eot_id)
    result = tasks_lib.run_generation(self.policy(params, frozen), self.model_cfg, self.tokenizer, self.examples,
                                      sampler, key, task=self.settings.task, batch_size=self.settings.gen_batch_size,
                                      chat_template=self.chat_template, placement=self.placement)
    return {f"{self.settings.task}_{k}": float(v) for k, v in result["metrics"].items()
            if k != "n" and v is not None}


def _parameter_views(config, program) -> tuple[Callable, Callable]:
  """(policy, reference) functions of (state params, the step's frozen argument)."""
  objective = program.objective
  preference = objective.vrpo_config is not None
  if program.model_cfg.lora_rank > 0:  # the frozen argument is the base; the reference is it alone
    return (lambda p, f: lora.combine(f, p),
            (lambda p, f: lora.combine(f, lora.switched_off(p))) if preference else (lambda p, f: None))
  if objective.needs_reference:
    return (lambda p, f: p), (lambda p, f: f)
  if objective.reference_in_batch:  # the step holds no reference: load it once, for its ELBOs only
    source = config.checkpoint.reference_from or config.checkpoint.init_from
    step = None if config.checkpoint.init_step < 0 else config.checkpoint.init_step
    return (lambda p, f: p), (lambda p, f: ckpt_lib.load_params(source, program.abstract_state.params, step=step))
  return (lambda p, f: p), (lambda p, f: None)


def make_evaluator(config, program) -> Evaluator | None:
  """The run's evaluator, or None when `eval.every_steps` is 0. Reads the validation and task files
  now, so a bad file stops the run before its first step."""
  settings = settings_from_config(config)
  if settings.every_steps <= 0:
    return None
  tokenizer = tok_lib.load_tokenizer(remote.local_copy(config.data.tokenizer))
  chat_template = config.objective != "pretrain" and bool(config.data.chat_template)
  validation = None
  if settings.validation_files:
    validation = load_validation(objectives.data_kind(config.objective), settings.validation_files, tokenizer,
                                 seq_len=config.data.seq_len, chat_template=config.data.chat_template,
                                 on_too_long=config.data.on_too_long, max_examples=settings.max_examples)
    logging.info("Evaluation every %d steps on %d validation examples", settings.every_steps, len(validation))
  policy, reference = _parameter_views(config, program)
  vcfg = program.objective.vrpo_config
  return Evaluator(settings, model_cfg=program.model_cfg,
                   placement=placement_lib.Placement(program.mesh, program.rules), validation=validation,
                   policy=policy, reference=reference, beta=vcfg.beta if vcfg else 0.0, tokenizer=tokenizer,
                   chat_template=chat_template)
