"""The lm-evaluation-harness model `llada_jax`: a trained run scored and sampled as evaluate does.

  python -m llada_jax.harness --model llada_jax --model_args checkpoint=RUN_DIR,mc_num=128,batch_size=16 \\
      --tasks TASK [--apply_chat_template] [--include_path DIR]

What a masked diffusion model answers to lm-eval's three requests:

  loglikelihood          the l/L ELBO estimate of log p(continuation | context) with `mc_num`
                         Monte Carlo samples (`llada_jax.eval.likelihood.score_answers`), a lower
                         bound on the log-likelihood in expectation, not an exact log-probability.
                         is_greedy is False unless check_greedy=true; then it is True when the exact
                         sampler, decoding the continuation's length greedily one token per step
                         (LLaDA's suffix greedy check), writes exactly the continuation's tokens.
  loglikelihood_rolling  the ELBO of the whole text given an empty prompt (a bound, as above); with
                         max_length a longer text is scored in windows (`text.windows`) and summed.
  generate_until         the project's sampler (exact, or fast with cache/threshold), the completion
                         cut at EOS/end of turn, at max_gen_toks tokens, then at the first stop string.

Randomness follows `python -m llada_jax.evaluate`: the root key is jax.random.key(seed) and a request
draws from fold_in(root, doc_id), so choices of one question share their draws and a document's
numbers do not depend on the other requests. Given the same data, settings and batch composition the
numbers equal those of evaluate's runners (llada_jax.eval) on one device exactly.

lm-eval reads is_greedy for `acc` of loglikelihood tasks and `exact_match` of multiple-choice ones.
lm-eval's own --batch_size and --device are not used: batch_size in --model_args sets the rows of a
stratified likelihood round (part of the estimator) and the prompts per sampler call. Without the
data/fsdp/tensor model arguments JAX places the work on its default device; with any of them the
parameters are restored sharded over that mesh and every batch is split over its data x fsdp devices
(`llada_jax.placement`), with the same results up to float rounding of the sharded model.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from llada_jax import placement as placement_lib, sampling
from llada_jax.data import tokenizer as tok_lib
from llada_jax.eval import generation as gen, likelihood
from llada_jax.harness import options as options_lib, text as text_lib
from llada_jax.harness.options import ModelArgsError
from llada_jax.storage import checkpoint as ckpt_lib

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for a task that sets no max_gen_toks
# generation_kwargs the sampler reads; the rest (temperature, do_sample, top_p, ...) come from model_args.
_USED_GEN_KWARGS = ("until", "max_gen_toks")


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _placement(options: options_lib.Options) -> placement_lib.Placement | None:
  """The mesh the data/fsdp/tensor arguments ask for, with the run's sharding rules; None: one device."""
  requested = options_lib.requested_mesh(options)  # before the checkpoint is opened: a bad size fails first
  if requested is None:
    return None
  run_config = ckpt_lib.read_run_config(options.checkpoint, options.step)[1]
  return placement_lib.for_run(run_config, requested)


def load_run(options: options_lib.Options):
  """(model config, params, tokenizer, tokenizer path, placement or None) of the run `options.checkpoint`
  names, the params on the placement's mesh."""
  overrides = {"dtype": options.dtype} if options.dtype else None
  try:
    place = _placement(options)
    mesh = {} if place is None else {"mesh": place.mesh, "rules": place.rules}
    model_cfg, params, run_config = ckpt_lib.load_model(options.checkpoint, step=options.step,
                                                        overrides=overrides, **mesh)
  except ModelArgsError:
    raise
  except (OSError, ValueError) as e:
    raise ModelArgsError(f"model_args checkpoint={options.checkpoint}: {_first_line(e)}") from None
  path = options.tokenizer or (run_config.get("data") or {}).get("tokenizer")
  if not path:
    raise ModelArgsError(f"model_args checkpoint={options.checkpoint}: the run config names no "
                         "data.tokenizer; expected tokenizer=PATH")
  try:
    tokenizer = tok_lib.load_tokenizer(path)
    tok_lib.check_vocab(tokenizer, model_cfg.vocab_size)
  except (OSError, ValueError) as e:
    raise ModelArgsError(f"model_args tokenizer={path}: {_first_line(e)}") from None
  return model_cfg, params, tokenizer, os.fspath(path), place


def variant_key(root: jax.Array, variant: int) -> jax.Array:
  """The root of the `variant`-th extra draw of a document (a repeat, a later window); 0: `root`.

  The ids come down from the top of the uint32 range, which no document index reaches, so these
  roots never equal a document's key fold_in(root, doc_id).
  """
  return root if variant == 0 else jax.random.fold_in(root, (1 << 32) - 1 - variant)


def _agrees(name: str, value: Any, options: options_lib.Options) -> bool:
  """Whether an unused generation kwarg asks for what the sampler does anyway (no warning then)."""
  greedy = options.temperature == 0
  if name == "do_sample":
    return bool(value) != greedy
  if name == "temperature":
    return isinstance(value, (int, float)) and float(value) == options.temperature
  return False


def _doc_ids(requests) -> list[int]:
  return [i if r.doc_id is None else int(r.doc_id) for i, r in enumerate(requests)]


@register_model("llada_jax")
class LLaDAJaxLM(LM):
  """A llada_jax run as an lm-eval model (see the module doc for what each request returns)."""

  def __init__(self, **model_args: Any):
    super().__init__()
    self.options = options_lib.parse(model_args)
    self.model_cfg, self.params, self.tokenizer, self.tokenizer_path, self.placement = load_run(self.options)
    self.root_key = jax.random.key(self.options.seed)
    self._warned: set[str] = set()

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
    # lm-eval always passes its --batch_size (default 1) and --device here; see the module doc.
    batch_size = (additional_config or {}).get("batch_size")
    if batch_size not in (None, 1, "1"):
      log.warning("llada_jax: lm-eval's --batch_size %s is not used; pass batch_size in --model_args",
                  batch_size)
    return cls(**arg_dict)

  def _warn_once(self, key: str, message: str, *args) -> None:
    if key not in self._warned:
      self._warned.add(key)
      log.warning(message, *args)

  # ------------------------------------------------------------------------------ token ids

  def _context_ids(self, context: str) -> list[int]:
    return text_lib.markup_ids(self.tokenizer, context)

  def _answer_ids(self, text: str) -> list[int]:
    return self.tokenizer.encode(text) + ([self.tokenizer.eos_id] if self.options.append_eos else [])

  def _fit(self, prompt: list[int], reserved: int) -> list[int]:
    """`prompt` with its start cut so that it and `reserved` more tokens fit in max_length."""
    limit = self.options.max_length
    if limit is None or len(prompt) + reserved <= limit:
      return prompt
    if reserved >= limit:
      raise ModelArgsError(f"model_args max_length={limit}: {reserved} tokens to score or generate leave no "
                           "room for a prompt; expected a larger max_length")
    self._warn_once("fit", "llada_jax: prompts longer than max_length=%d are cut from the left", limit)
    return prompt[len(prompt) + reserved - limit:]

  # ------------------------------------------------------------------------------ sampling

  def _sample(self, prompts: Sequence[list[int]], keys: jax.Array, config) -> np.ndarray:
    """Generated ids [N, gen_length], in batches of batch_size as evaluate_generation makes them."""
    size = self.options.batch_size
    rows = []
    for start in range(0, len(prompts), size):
      batch = list(prompts[start:start + size])
      batch_keys = keys[start:start + size]
      fill = size - len(batch)  # a short last batch repeats its last prompt: one compiled shape
      batch += batch[-1:] * fill
      batch_keys = jax.numpy.concatenate([batch_keys] + [batch_keys[-1:]] * fill) if fill else batch_keys
      out = sampling.sample_from_ids(self.params, self.model_cfg, batch, batch_keys, config,
                                     placement=self.placement).tokens
      rows.append(np.asarray(out)[:size - fill])
    return np.concatenate(rows)

  @staticmethod
  def _keys(root: jax.Array, doc_ids: Sequence[int]) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(root, np.asarray(doc_ids, np.uint32))

  def _greedy(self, prompts, answers, doc_ids) -> list[bool]:
    """Whether the exact sampler, one token per step at temperature 0, writes each answer."""
    out = [True] * len(answers)
    by_length: dict[int, list[int]] = {}
    for i, a in enumerate(answers):
      if a:
        by_length.setdefault(len(a), []).append(i)
    for length, members in by_length.items():
      config = sampling.SamplerConfig(gen_length=length, block_length=length, steps=length, temperature=0.0,
                                      cfg_scale=self.options.cfg_scale)
      rows = self._sample([prompts[i] for i in members],
                          self._keys(self.root_key, [doc_ids[i] for i in members]), config)
      for i, row in zip(members, rows):
        out[i] = row.tolist() == list(answers[i])
    return out

  # ------------------------------------------------------------------------------ likelihood

  def _scores(self, prompts, answers, doc_ids, key, cfg_scale) -> np.ndarray:
    """ELBO estimates; an empty answer has log-likelihood 0."""
    out = np.zeros((len(answers),), np.float64)
    scored = [i for i, a in enumerate(answers) if a]
    if scored:
      out[scored] = likelihood.score_answers(
          self.params, self.model_cfg, [prompts[i] for i in scored], [answers[i] for i in scored], key,
          mc_num=self.options.mc_num, batch_size=self.options.batch_size, cfg_scale=cfg_scale,
          example_ids=[doc_ids[i] for i in scored], placement=self.placement)
    return out

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    """(ELBO estimate of log p(continuation | context), is_greedy) per request; see the module doc."""
    answers = [self._answer_ids(r.args[1]) for r in requests]
    prompts = [self._fit(self._context_ids(r.args[0]), len(a)) for r, a in zip(requests, answers)]
    doc_ids = _doc_ids(requests)
    scores = self._scores(prompts, answers, doc_ids, self.root_key, self.options.cfg_scale)
    greedy = (self._greedy(prompts, answers, doc_ids) if self.options.check_greedy
              else [not a for a in answers])
    out = [(float(s), bool(g)) for s, g in zip(scores, greedy)]
    for r, o in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood", r.args, o)
    return out

  def loglikelihood_rolling(self, requests) -> list[float]:
    """ELBO of each whole text given an empty prompt (windowed past max_length); a bound, see above."""
    pieces = [text_lib.windows(self._answer_ids(r.args[0]), self.options.max_length) for r in requests]
    doc_ids = _doc_ids(requests)
    totals = np.zeros((len(requests),), np.float64)
    for j in range(max((len(p) for p in pieces), default=0)):
      members = [i for i, p in enumerate(pieces) if len(p) > j]
      # No guidance: the first window has no prompt to guide with (as evaluate's ppl task).
      totals[members] += self._scores([pieces[i][j][0] for i in members], [pieces[i][j][1] for i in members],
                                      [doc_ids[i] for i in members], variant_key(self.root_key, j), 0.0)
    out = [float(t) for t in totals]
    for r, o in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood_rolling", r.args, o)
    return out

  # ------------------------------------------------------------------------------ generation

  def _generation_setup(self, gen_kwargs: dict[str, Any]):
    """(sampler config, max_gen_toks, stop strings) of one request's generation_kwargs."""
    ignored = sorted(k for k, v in gen_kwargs.items() if k not in _USED_GEN_KWARGS and not _agrees(k, v, self.options))
    if ignored:
      self._warn_once("gen_kwargs", "llada_jax: generation_kwargs %s are not used; the sampler follows "
                      "--model_args (temperature=%s)", ignored, self.options.temperature)
    max_gen = gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    if isinstance(max_gen, bool) or not isinstance(max_gen, int) or max_gen < 1:
      raise ValueError(f"generation_kwargs max_gen_toks={max_gen!r}: expected a positive integer")
    gen_length = self.options.gen_length
    if gen_length is None:  # the request's length, rounded up to whole blocks
      block = min(self.options.block_length, max_gen)
      gen_length = -(-max_gen // block) * block
    config = options_lib.sampler_config(self.options, gen_length, self.tokenizer.eot_id)
    return config, max_gen, text_lib.stop_sequences(gen_kwargs.get("until"))

  def generate_until(self, requests) -> list[str]:
    """A completion per request from the project's sampler; see the module doc."""
    setups = [self._generation_setup(dict(r.args[1] or {})) for r in requests]
    prompts = [self._fit(self._context_ids(r.args[0]), s[0].gen_length) for r, s in zip(requests, setups)]
    doc_ids = _doc_ids(requests)
    repeats = text_lib.occurrence_indices([(r.task_name, d, r.idx) for r, d in zip(requests, doc_ids)])
    groups: dict[tuple, list[int]] = {}
    for i, (config, _, _) in enumerate(setups):
      groups.setdefault((config, repeats[i]), []).append(i)
    out = [""] * len(requests)
    for (config, repeat), members in groups.items():
      keys = self._keys(variant_key(self.root_key, repeat), [doc_ids[i] for i in members])
      rows = self._sample([prompts[i] for i in members], keys, config)
      for i, row in zip(members, rows):
        _, max_gen, until = setups[i]
        completion = self.tokenizer.decode(gen.completion_ids(self.tokenizer, row)[:max_gen])
        out[i] = text_lib.cut_at_stops(completion, until)
        self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
    return out

  # ------------------------------------------------------------------------------ chat

  def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    return text_lib.render_chat(chat_history, add_generation_prompt)

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer_path.replace("/", "__")

  def chat_template(self, chat_template: bool | str = False) -> str:
    return text_lib.CHAT_TEMPLATE_JINJA

  def get_model_info(self) -> dict[str, Any]:
    o = self.options
    return {"checkpoint": o.checkpoint, "step": o.step, "tokenizer": self.tokenizer_path,
            "dtype": self.model_cfg.dtype, "seed": o.seed, "mc_num": o.mc_num, "batch_size": o.batch_size,
            "mesh": None if self.placement is None else dict(self.placement.mesh.shape)}
