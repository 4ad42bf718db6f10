"""Likelihood scoring of responses with the l/L ELBO (docs/method.md, "ELBO estimators").

`score_answers` follows the reference evaluation: per example, `mc_num` samples in rounds of
`batch_size` rows, each round one stratified sweep of the masking level l over 1..L, the prompt
never masked, the estimate a sum over answer tokens. Examples of different lengths are padded to
a few bucket lengths (padding is hidden from attention and never scored) and scored many at a
time, with one compiled function per bucket.

The sweep is the reference's, except that the offsets j L / b are rounded before the random start
is added: the reference rounds k + j L / b half to even, which ties x.5 to the even level and
biases the estimate (L = 4, b = 16 uses levels 1..4 3, 5, 3, 5 times in 16); shifting a uniform
start keeps every level equally likely, so the estimate is unbiased for the ELBO.

`score_answers_and_draws` also returns every draw, [N, mc_num / batch_size rounds, batch_size rows],
from which `eval.mc_error` gives the estimate's standard error.

Every example draws from fold_in(key, example_id) and round r from fold_in(that, r), so its
estimate does not depend on which other examples share its forward pass or how long they are.
That also needs the per-position mask draws of one row to be the same at every padded length,
which JAX's partitionable threefry (the default) gives: uniform(key, (n,)) is a prefix of
uniform(key, (m,)) for n < m.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax import diffusion as D
from llada_jax import model as model_lib, placement as placement_lib, sampling
from llada_jax.model import LogitsFn, ModelConfig

Array = jax.Array

# Tokens (rows x length, CFG's second pass included) per forward pass when examples are batched.
DEFAULT_MAX_TOKENS_PER_FORWARD = 1 << 14


def guided_logits_fn(logits_fn: LogitsFn, prompt_mask: Array, cfg_scale, mask_id: int) -> LogitsFn:
  """Unsupervised classifier-free guidance (`sampling.guide`) around `logits_fn`.

  The unconditional pass is the same input with the prompt (`prompt_mask`, broadcastable to the
  tokens) replaced by mask tokens. Both passes go through the model as one batch of 2B rows.
  """

  def fn(params, tokens, **kwargs):
    un_tokens = jnp.where(prompt_mask, jnp.asarray(mask_id, tokens.dtype), tokens)
    both = jnp.concatenate([tokens, un_tokens], axis=0)
    doubled = {k: None if v is None else jnp.concatenate([v, v], axis=0) for k, v in kwargs.items()}
    cond, un = jnp.split(logits_fn(params, both, **doubled), 2, axis=0)
    return sampling.guide(cond, un, cfg_scale)

  return fn


@functools.lru_cache(maxsize=8)
def _model_logits_fn(model_cfg: ModelConfig) -> LogitsFn:
  # One function object per config, so the jitted scorer is not recompiled on every call.
  return model_lib.logits_fn(model_cfg)


def _score_chunk_fn(params, tokens, prompt_lengths, lengths, keys, cfg_scale, *, logits_fn, mask_id, n_rows,
                    n_rounds, guided):
  """Mean over `n_rounds` stratified rounds of `n_rows` samples: ELBO estimates [E], and the draws
  they average [E, n_rounds, n_rows]."""
  e, t = tokens.shape
  answer = D.answer_mask(prompt_lengths, lengths, t)
  key_mask = D.valid_mask(lengths, t)
  config = D.ELBOConfig(n_timesteps=n_rows, stratified=True)
  fn = logits_fn
  if guided:
    prompt = jnp.arange(t)[None, :] < prompt_lengths[:, None]
    prompt_rows = jnp.broadcast_to(prompt[:, None, :], (e, n_rows, t)).reshape(e * n_rows, t)
    fn = guided_logits_fn(logits_fn, prompt_rows, cfg_scale, mask_id)

  def one_round(total, r):
    round_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, r)
    masks, weights = D.sample_batch_elbo_masks(round_keys, answer, config)
    estimate, draws = D.elbo_from_masks(fn, params, tokens, masks, weights, mask_id=mask_id, key_mask_bl=key_mask)
    return total + estimate, draws

  # The mean is summed round by round as before the draws were returned too, so it stays bit for bit.
  total, draws = jax.lax.scan(one_round, jnp.zeros((e,), jnp.float32), jnp.arange(n_rounds))
  return total / n_rounds, jnp.moveaxis(draws, 0, 1)


_score_chunk = jax.jit(_score_chunk_fn, static_argnames=("logits_fn", "mask_id", "n_rows", "n_rounds", "guided"))


@functools.lru_cache(maxsize=32)
def _scorer_on_mesh(placement: placement_lib.Placement, key_impl, **static):
  """`_score_chunk` jitted for one bucket's static parameters on `placement`'s mesh. Keys come as
  raw data: that is what splits over the devices of every process."""
  fn = functools.partial(_score_chunk_fn, **static)

  def on_mesh(params, tokens, prompt_lengths, lengths, key_data, cfg_scale):
    keys = jax.random.wrap_key_data(key_data, impl=key_impl)
    return fn(params, tokens, prompt_lengths, lengths, keys, cfg_scale)

  return placement_lib.jit(on_mesh, placement)


def _score_rows(params, tokens, prompt_lengths, lengths, keys, cfg_scale, placement,
                static) -> tuple[np.ndarray, np.ndarray]:
  """ELBO estimates of one chunk's rows and their draws; on a mesh the rows are split over its batch
  shards."""
  if placement is None:
    scores, draws = _score_chunk(params, jnp.asarray(tokens), jnp.asarray(prompt_lengths), jnp.asarray(lengths),
                                 keys, jnp.float32(cfg_scale), **static)
    return np.asarray(scores, np.float64), np.asarray(draws, np.float64)
  fn = _scorer_on_mesh(placement, jax.random.key_impl(keys), **static)
  placed = placement_lib.put_batch(placement, [tokens, prompt_lengths, lengths])
  # A NumPy scalar is an input every process holds alike; a one-device array would not span the mesh.
  scores, draws = fn(params, *placed, placement_lib.put_keys(placement, keys), np.float32(cfg_scale))
  rows = tokens.shape[0]
  return np.asarray(scores, np.float64)[:rows], np.asarray(draws, np.float64)[:rows]


def bucket_length(n: int) -> int:
  """Padded length for a sequence of n tokens: powers of two up to 512, then multiples of 256."""
  if n <= 512:
    return max(16, 1 << max(0, n - 1).bit_length())
  return -(-n // 256) * 256


def _pow2_floor(n: int) -> int:
  return 1 << (max(1, n).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class _Bucket:
  length: int
  single_token: bool  # every draw of a one-token answer is the same: one row suffices


def _check_ids(ids: np.ndarray, what: str, i: int, model_cfg: ModelConfig) -> None:
  bad = ids[(ids < 0) | (ids >= model_cfg.vocab_size)]
  if bad.size:
    raise ValueError(f"{what}[{i}] holds token id {int(bad[0])}; expected ids in [0, {model_cfg.vocab_size})")
  if (ids == model_cfg.mask_token_id).any():
    raise ValueError(f"{what}[{i}] holds the mask token id {model_cfg.mask_token_id}; expected real tokens")


def check_budget(mc_num: int, batch_size: int, cfg_scale: float = 0.0) -> None:
  if batch_size < 1 or mc_num < batch_size or mc_num % batch_size:
    raise ValueError(f"mc_num={mc_num} with batch_size={batch_size}: expected mc_num to be a positive "
                     f"multiple of batch_size (each round of batch_size rows is one stratified sweep)")
  if not 0 <= cfg_scale < math.inf:
    raise ValueError(f"cfg_scale={cfg_scale}: expected a finite w >= 0 (0 = no guidance)")


def score_answers(params, model_cfg: ModelConfig, prompts: Sequence[Sequence[int]],
                  answers: Sequence[Sequence[int]], key: Array, **kwargs) -> np.ndarray:
  """ELBO estimates of log p(answer | prompt), a sum over answer tokens, one per example [N].

  mc_num: samples per example, a multiple of `batch_size`; each round of `batch_size` rows is one
    stratified sweep of l (`ELBOConfig(n_timesteps=batch_size, stratified=True)`). A one-token
    answer is scored exactly with a single row, which every draw would equal.
  cfg_scale: w > 0 applies unsupervised classifier-free guidance (the unconditional pass masks
    the prompt).
  example_ids: the ids folded into `key` per example (default 0..N-1); equal ids give equal
    draws, e.g. to share noise between the choices of one question.
  logits_fn: defaults to the model's; any `(params, tokens, *, key_mask) -> logits`.
  placement: run on its mesh with the examples split over its batch shards (`llada_jax.placement`);
    the estimates equal the default device's up to float rounding of the sharded model.
  """
  return score_answers_and_draws(params, model_cfg, prompts, answers, key, **kwargs)[0]


def _checked_ids(prompts, answers, model_cfg) -> tuple[list[np.ndarray], list[np.ndarray]]:
  prompt_arrays, answer_arrays = [], []
  for i, (p, a) in enumerate(zip(prompts, answers)):
    p, a = np.asarray(p, np.int64).reshape(-1), np.asarray(a, np.int64).reshape(-1)
    _check_ids(p, "prompts", i, model_cfg)
    _check_ids(a, "answers", i, model_cfg)
    if a.size == 0:
      raise ValueError(f"answers[{i}] is empty; expected at least one token to score")
    prompt_arrays.append(p)
    answer_arrays.append(a)
  return prompt_arrays, answer_arrays


def _chunk_arrays(filled, prompt_arrays, answer_arrays, length, pad_id):
  """(tokens, prompt lengths, lengths) of the examples `filled`, padded to `length`."""
  tokens = np.full((len(filled), length), pad_id, np.int32)
  prompt_lengths = np.zeros((len(filled),), np.int32)
  lengths = np.zeros((len(filled),), np.int32)
  for row, i in enumerate(filled):
    seq = np.concatenate([prompt_arrays[i], answer_arrays[i]])
    tokens[row, :seq.size] = seq
    prompt_lengths[row], lengths[row] = prompt_arrays[i].size, seq.size
  return tokens, prompt_lengths, lengths


def score_answers_and_draws(params, model_cfg: ModelConfig, prompts: Sequence[Sequence[int]],
                            answers: Sequence[Sequence[int]], key: Array, *, mc_num: int = 128,
                            batch_size: int = 16, cfg_scale: float = 0.0,
                            example_ids: Sequence[int] | None = None, logits_fn: LogitsFn | None = None,
                            max_tokens_per_forward: int = DEFAULT_MAX_TOKENS_PER_FORWARD,
                            placement: placement_lib.Placement | None = None) -> tuple[np.ndarray, np.ndarray]:
  """`score_answers`' estimates [N] and the draws they average, [N, mc_num / batch_size, batch_size]
  (a one-token answer's exact value in every place). `eval.mc_error.standard_error(draws)` is the
  estimates' standard error."""
  if len(prompts) != len(answers):
    raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers; expected one answer per prompt")
  check_budget(mc_num, batch_size, cfg_scale)
  n = len(prompts)
  example_ids = np.asarray(list(range(n) if example_ids is None else example_ids), np.int64)
  if example_ids.shape != (n,):
    raise ValueError(f"{len(example_ids)} example_ids for {n} examples; expected one per example")
  out, out_draws = np.zeros((n,), np.float64), np.zeros((n, mc_num // batch_size, batch_size), np.float64)
  if n == 0:
    return out, out_draws
  if placement is not None:
    params = placement_lib.put_params(params, None if logits_fn else model_cfg, placement)
  logits_fn = logits_fn or _model_logits_fn(model_cfg)
  guided = cfg_scale > 0
  prompt_arrays, answer_arrays = _checked_ids(prompts, answers, model_cfg)

  buckets: dict[_Bucket, list[int]] = {}
  for i, (p, a) in enumerate(zip(prompt_arrays, answer_arrays)):
    buckets.setdefault(_Bucket(bucket_length(p.size + a.size), a.size == 1), []).append(i)

  for bucket, members in sorted(buckets.items(), key=lambda kv: (kv[0].length, kv[0].single_token)):
    n_rows, n_rounds = (1, 1) if bucket.single_token else (batch_size, mc_num // batch_size)
    per_example = n_rows * bucket.length * (2 if guided else 1)
    chunk = max(1, min(_pow2_floor(max_tokens_per_forward // per_example), _pow2_ceil(len(members))))
    static = dict(logits_fn=logits_fn, mask_id=model_cfg.mask_token_id, n_rows=n_rows, n_rounds=n_rounds,
                  guided=guided)
    for start in range(0, len(members), chunk):
      idx = members[start:start + chunk]
      # A short last chunk is filled with copies of its first example, so shapes stay fixed.
      filled = idx + [idx[0]] * (chunk - len(idx))
      arrays = _chunk_arrays(filled, prompt_arrays, answer_arrays, bucket.length, model_cfg.eos_token_id)
      keys = D.example_keys(key, jnp.asarray(example_ids[filled], jnp.uint32))
      scores, draws = _score_rows(params, *arrays, keys, cfg_scale, placement, static)
      out[idx] = scores[:len(idx)]
      out_draws[idx] = draws[:len(idx)]  # a one-token answer's [1, 1] broadcasts to every draw
  return out, out_draws
