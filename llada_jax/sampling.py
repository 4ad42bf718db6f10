"""Reverse-process samplers for the mask predictor (docs/method.md, "Sampler").

The exact sampler is the reference algorithm: the prompt is followed by `gen_length` mask tokens,
filled block by block, left to right, in `steps / num_blocks` steps per block; each step runs the
model on the whole sequence, optionally applies unsupervised classifier-free guidance, picks
x0 = argmax(logits + Gumbel noise at temperature T), scores each pick by its probability (or a
uniform draw), and commits the scheduled number of the best-scored masked positions of the block.

Fast variants (Fast-dLLM), chosen in `SamplerConfig`:

  cache='prefix'  at each block start one full forward pass also returns every layer's keys and
                  values; the block's other steps run only the block and everything after it
                  (queries) against the cached keys/values of the prefix before the block.
  cache='dual'    the same cache, but the other steps run only the current block; the prefix
                  and the suffix after the block both come from the cache.
  threshold=t     confidence-threshold parallel decoding: each step commits every masked token of
                  the block whose confidence is at least t, and at least the most confident one;
                  a block ends as soon as it has no mask left (works with any cache mode).

`refresh_every=r` also recomputes the cache every r-th step of a block (1: every step, which
gives the exact sampler's output through the cached code path).

Batches: prompts are LEFT-padded to a common length P; `prompt_lengths` gives the real lengths.
The padding is excluded from attention with a key mask and positions are shifted so each real
prompt starts at position 0, so a row's completion does not depend on its batch-mates or on P.
Randomness is drawn per row from that row's key (`fold_in(key, row)`, or a batch of keys), per
block and per step, and only for the current block, so it does not depend on P either.

Everything runs in one jitted function with `lax` loops; it is compiled once per batch size,
padded prompt length, `SamplerConfig` and model config. `pad_prompts` buckets prompt lengths
(16, 24, 32, 48, 64, 96, ...) so varied prompts reuse a few compilations. With a `placement` the
parameters are sharded over its mesh and the rows split over its batch shards (`llada_jax.placement`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax import model as model_lib, placement as placement_lib

Array = jax.Array

CACHE_MODES = ("none", "prefix", "dual")
REMASKING = ("low_confidence", "random")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """What to generate and how. Hashable: it is a static argument of the compiled sampler."""

  gen_length: int = 128
  block_length: int = 128  # < gen_length: semi-autoregressive blocks
  steps: int = 128  # in total, over all blocks
  temperature: float = 0.0  # 0: greedy
  remasking: str = "low_confidence"  # or 'random'
  cfg_scale: float = 0.0  # unsupervised classifier-free guidance weight w; 0: off
  suppress_eos: bool = False  # EOS logit set to -inf
  # Subtracted from the confidence of EOS/EoT picks; confidences lie in [0, 1], so any value >= 1
  # ranks those picks after every other one.
  eos_confidence_penalty: float = 0.0
  eot_token_id: int | None = None  # end-of-turn id, penalised with EOS when given
  cache: str = "none"  # one of CACHE_MODES
  refresh_every: int = 0  # with a cache, also recompute it every this many steps; 0: block starts only
  threshold: float | None = None  # confidence-threshold parallel decoding
  record_history: bool = False  # return the tokens after every step (for tests and analysis)

  def __post_init__(self):
    def fail(field, expected):
      raise ValueError(f"sampler.{field}={getattr(self, field)!r}: expected {expected}")

    def is_int(v):
      return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    def is_real(v):
      return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

    for field in ("gen_length", "block_length", "steps"):
      if not is_int(getattr(self, field)) or getattr(self, field) <= 0:
        fail(field, "a positive integer")
    if self.gen_length % self.block_length:
      fail("block_length", f"a divisor of gen_length={self.gen_length}")
    if self.steps % self.num_blocks:
      fail("steps", f"a multiple of the number of blocks gen_length/block_length={self.num_blocks}")
    if not is_real(self.temperature) or not 0 <= self.temperature < math.inf:
      fail("temperature", "a finite number >= 0")
    if self.remasking not in REMASKING:
      fail("remasking", f"one of {REMASKING}")
    if not is_real(self.cfg_scale) or not 0 <= self.cfg_scale < math.inf:
      fail("cfg_scale", "a finite number >= 0")
    if not isinstance(self.suppress_eos, bool):
      fail("suppress_eos", "a bool")
    if not is_real(self.eos_confidence_penalty) or not 0 <= self.eos_confidence_penalty < math.inf:
      fail("eos_confidence_penalty", "a finite number >= 0 (>= 1 ranks EOS/EoT picks last)")
    if self.eot_token_id is not None and (not is_int(self.eot_token_id) or self.eot_token_id < 0):
      fail("eot_token_id", "None or a token id")
    if self.cache not in CACHE_MODES:
      fail("cache", f"one of {CACHE_MODES}")
    if not is_int(self.refresh_every) or self.refresh_every < 0:
      fail("refresh_every", "an integer >= 0 (0: refresh the cache only at block starts)")
    if self.threshold is not None:
      if not is_real(self.threshold) or not 0 < self.threshold <= 1:
        fail("threshold", "None or a confidence in (0, 1]")
      if self.remasking != "low_confidence":
        fail("threshold", "None with remasking='random' (a threshold needs model confidences)")
    if not isinstance(self.record_history, bool):
      fail("record_history", "a bool")

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int:
    return self.steps // self.num_blocks

  @property
  def max_steps_per_block(self) -> int:
    # Threshold decoding commits at least one token per step.
    return self.block_length if self.threshold is not None else self.steps_per_block

  def replace(self, **changes) -> "SamplerConfig":
    return dataclasses.replace(self, **changes)


class SampleOutput(NamedTuple):
  tokens: Array  # int32 [B, gen_length]
  nfe: Array  # int32: model forward passes (a guided pass over the doubled batch counts once)
  full_forwards: Array  # int32: those of them over the whole sequence
  block_steps: Array  # int32 [num_blocks]: steps each block took (the batch's slowest row)
  history: Array | None = None  # int32 [B, num_blocks * max_steps_per_block, gen_length]; -1: no step
  commit_confidence: Array | None = None  # float32 [B, gen_length]: the score each token won with


# --------------------------------------------------------------------------------------------
# The pieces of one step.


def transfer_schedule(block_length: int, steps_per_block: int) -> np.ndarray:
  """Tokens committed at each step of a block: `n // steps`, the remainder one each to the first steps."""
  base, remainder = divmod(block_length, steps_per_block)
  return np.array([base + (i < remainder) for i in range(steps_per_block)], np.int32)


def step_noise(row_key: Array, block, step, block_length: int, vocab_size: int):
  """(uniforms for the Gumbel noise [block_length, vocab], uniforms for 'random' scores [block_length]).

  One row's draws for one step of one block, derived from the row key alone.
  """
  key = jax.random.fold_in(jax.random.fold_in(row_key, block), step)
  gumbel_key, score_key = jax.random.split(key)
  return (jax.random.uniform(gumbel_key, (block_length, vocab_size)),
          jax.random.uniform(score_key, (block_length,)))


def guide(cond_logits: Array, uncond_logits: Array, cfg_scale: float) -> Array:
  """Unsupervised classifier-free guidance: `un + (w + 1) (cond - un)`."""
  return uncond_logits + (cfg_scale + 1.0) * (cond_logits - uncond_logits)


def commit_step(block_tokens: Array, logits: Array, gumbel_u: Array | None, score_u: Array | None,
                num_commit, config: SamplerConfig, *, mask_id: int, eos_id: int):
  """One reverse step on the current block.

  block_tokens int32 [B, l]; logits float32 [B, l, V] (already guided); gumbel_u [B, l, V] when
  temperature > 0; score_u [B, l] for 'random' remasking; num_commit: tokens per row (ignored
  with a threshold). Returns (new block tokens, committed bool [B, l], confidence float32 [B, l]).
  """
  if config.suppress_eos:
    logits = logits.at[..., eos_id].set(-jnp.inf)
  if config.temperature > 0:
    # argmax(exp(l) / (-log u)^T), the reference's Gumbel-max, taken in log space.
    picks = jnp.argmax(logits - config.temperature * jnp.log(-jnp.log(gumbel_u)), axis=-1)
  else:
    picks = jnp.argmax(logits, axis=-1)
  picks = picks.astype(jnp.int32)
  if config.remasking == "low_confidence":
    probs = jax.nn.softmax(logits, axis=-1)
    confidence = jnp.take_along_axis(probs, picks[..., None], axis=-1)[..., 0]
  else:
    confidence = score_u.astype(jnp.float32)
  if config.eos_confidence_penalty:
    is_end = picks == eos_id
    if config.eot_token_id is not None:
      is_end |= picks == config.eot_token_id
    confidence = jnp.where(is_end, confidence - config.eos_confidence_penalty, confidence)

  masked = block_tokens == mask_id
  score = jnp.where(masked, confidence, -jnp.inf)
  # Rank by descending score; ties go to the lower index (stable sort).
  order = jnp.argsort(-score, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)
  if config.threshold is None:
    committed = masked & (rank < num_commit)
  else:
    committed = masked & ((score >= config.threshold) | (rank == 0))
  return jnp.where(committed, picks, block_tokens), committed, confidence


# --------------------------------------------------------------------------------------------
# The model as the sampler sees it: one block's logits, guided, from a full or a span pass.


class _Inputs(NamedTuple):
  key_mask: Array  # bool [B', L]
  positions: Array  # int32 [B', L]
  prompt_region: Array  # bool [B, L]: real prompt tokens


def _model_input(x: Array, inputs: _Inputs, config: SamplerConfig, mask_id: int) -> Array:
  if not config.cfg_scale:
    return x
  uncond = jnp.where(inputs.prompt_region, mask_id, x)  # the unconditional pass masks the prompt
  return jnp.concatenate([x, uncond], axis=0)


def _combine(logits: Array, config: SamplerConfig) -> Array:
  if not config.cfg_scale:
    return logits
  cond, uncond = jnp.split(logits, 2, axis=0)
  return guide(cond, uncond, config.cfg_scale)


def _full_logits(params, model_cfg, config, x, inputs, block_start, mask_id):
  """Block logits from the plain model (the exact sampler)."""
  logits = model_lib.logits_fn(model_cfg)(
      params, _model_input(x, inputs, config, mask_id), key_mask=inputs.key_mask,
      positions=inputs.positions)
  logits = jax.lax.dynamic_slice_in_dim(logits, block_start, config.block_length, axis=1)
  return _combine(logits, config)


def _full_with_cache(params, model_cfg, config, x, inputs, block_start, mask_id):
  logits, cache = model_lib.forward_with_cache(
      model_cfg, params, _model_input(x, inputs, config, mask_id), key_mask=inputs.key_mask,
      positions=inputs.positions, logits_range=(block_start, config.block_length))
  return _combine(logits, config), cache


def _span_logits(params, model_cfg, config, x, inputs, cache, block_start, span_length, mask_id):
  tokens = _model_input(x, inputs, config, mask_id)
  span = jax.lax.dynamic_slice_in_dim(tokens, block_start, span_length, axis=1)
  positions = jax.lax.dynamic_slice_in_dim(inputs.positions, block_start, span_length, axis=1)
  logits = model_lib.forward_span(
      model_cfg, params, span, cache, block_start, key_mask=inputs.key_mask, span_positions=positions,
      num_logits=config.block_length)
  return _combine(logits, config)


# --------------------------------------------------------------------------------------------
# The loops.


class _State(NamedTuple):
  x: Array  # int32 [B, L]
  cache: Any  # KVCache or None
  step: Array  # step within the current block
  nfe: Array
  full_forwards: Array
  block_steps: Array
  history: Any
  commit_confidence: Any


def _prepare_inputs(prompt_lengths, prompt_len: int, length: int, copies: int) -> "_Inputs":
  """Key masks and positions of left-padded prompts (tiled for the guidance copies), and which
  positions hold prompt tokens."""
  idx = jnp.arange(length)
  padding = (prompt_len - prompt_lengths.astype(jnp.int32))[:, None]
  key_mask = idx[None, :] >= padding
  positions = jnp.maximum(idx[None, :] - padding, 0).astype(jnp.int32)
  return _Inputs(jnp.tile(key_mask, (copies, 1)), jnp.tile(positions, (copies, 1)),
                 key_mask & (idx[None, :] < prompt_len))


def _initial_state(x, model_cfg, config: SamplerConfig, *, copies: int) -> "_State":
  """The loop state before the first step: an empty KV cache where the sampler keeps one."""
  batch, length = x.shape
  gen, max_steps = config.gen_length, config.max_steps_per_block
  cache = None
  if config.cache != "none":
    cache_shape = (model_cfg.n_layers, copies * batch, length, model_cfg.kv_heads,
                   model_cfg.resolved_head_dim)
    cache = model_lib.KVCache(jnp.zeros(cache_shape, model_cfg.compute_dtype),
                              jnp.zeros(cache_shape, model_cfg.compute_dtype))
  zero = jnp.zeros((), jnp.int32)
  return _State(
      x=x, cache=cache, step=zero, nfe=zero, full_forwards=zero,
      block_steps=jnp.zeros((config.num_blocks,), jnp.int32),
      history=(jnp.full((batch, config.num_blocks * max_steps, gen), -1, jnp.int32)
               if config.record_history else None),
      commit_confidence=jnp.full((batch, gen), jnp.nan, jnp.float32) if config.record_history else None)


def _sample(params, prompts, prompt_lengths, row_keys, *, model_cfg, config: SamplerConfig) -> SampleOutput:
  mask_id, eos_id = model_cfg.mask_token_id, model_cfg.eos_token_id
  batch, prompt_len = prompts.shape
  gen, block_len = config.gen_length, config.block_length
  length = prompt_len + gen
  max_steps = config.max_steps_per_block
  schedule = jnp.asarray(transfer_schedule(block_len, config.steps_per_block))

  copies = 2 if config.cfg_scale else 1  # guidance runs a prompt-masked copy of every row
  inputs = _prepare_inputs(prompt_lengths, prompt_len, length, copies)
  x = jnp.concatenate([prompts.astype(jnp.int32), jnp.full((batch, gen), mask_id, jnp.int32)], axis=1)

  def block_of(x, start):
    return jax.lax.dynamic_slice_in_dim(x, start, block_len, axis=1)

  def apply_step(state, block, block_start, logits, cache, full):
    gumbel_u, score_u = jax.vmap(
        lambda k: step_noise(k, block, state.step, block_len, model_cfg.vocab_size))(row_keys)
    num_commit = schedule[jnp.minimum(state.step, config.steps_per_block - 1)]
    new_block, committed, confidence = commit_step(
        block_of(state.x, block_start), logits, gumbel_u if config.temperature > 0 else None,
        score_u, num_commit, config, mask_id=mask_id, eos_id=eos_id)
    x = jax.lax.dynamic_update_slice_in_dim(state.x, new_block, block_start, axis=1)
    history, commit_conf = state.history, state.commit_confidence
    if config.record_history:
      at = block * max_steps + state.step
      history = jax.lax.dynamic_update_slice_in_dim(history, x[:, None, prompt_len:], at, axis=1)
      old = jax.lax.dynamic_slice_in_dim(commit_conf, block_start - prompt_len, block_len, axis=1)
      commit_conf = jax.lax.dynamic_update_slice_in_dim(
          commit_conf, jnp.where(committed, confidence, old), block_start - prompt_len, axis=1)
    return state._replace(x=x, cache=cache, step=state.step + 1, nfe=state.nfe + 1,
                          full_forwards=state.full_forwards + jnp.asarray(full, jnp.int32),
                          history=history, commit_confidence=commit_conf)

  def run_block(state, block, span_length):
    block_start = prompt_len + block * block_len
    state = state._replace(step=jnp.zeros((), jnp.int32))

    def full_step(state):
      if config.cache == "none":
        logits, cache = _full_logits(params, model_cfg, config, state.x, inputs, block_start, mask_id), None
      else:
        logits, cache = _full_with_cache(params, model_cfg, config, state.x, inputs, block_start, mask_id)
      return apply_step(state, block, block_start, logits, cache, True)

    def span_step(state):
      logits = _span_logits(params, model_cfg, config, state.x, inputs, state.cache, block_start,
                            span_length, mask_id)
      return apply_step(state, block, block_start, logits, state.cache, False)

    if config.cache == "none" or config.refresh_every == 1:
      body = full_step
    else:
      # Block start: a full pass that fills the cache.
      state = full_step(state)
      if config.refresh_every == 0:
        body = span_step
      else:
        body = lambda s: jax.lax.cond(s.step % config.refresh_every == 0, full_step, span_step, s)

    def not_done(state):
      return (state.step < max_steps) & jnp.any(block_of(state.x, block_start) == mask_id)

    state = jax.lax.while_loop(not_done, body, state)
    return state._replace(block_steps=state.block_steps.at[block].set(state.step))

  state = _initial_state(x, model_cfg, config, copies=copies)

  if config.cache == "prefix":
    # The span (block + suffix) shrinks block by block; shapes are static, so one loop body per block.
    for block in range(config.num_blocks):
      state = run_block(state, block, length - (prompt_len + block * block_len))
  else:
    state = jax.lax.fori_loop(0, config.num_blocks, lambda b, s: run_block(s, b, block_len), state)

  return SampleOutput(tokens=state.x[:, prompt_len:], nfe=state.nfe, full_forwards=state.full_forwards,
                      block_steps=state.block_steps, history=state.history,
                      commit_confidence=state.commit_confidence)


@functools.lru_cache(maxsize=64)
def _compiled(model_cfg, config: SamplerConfig, compiler_options: tuple | None,
              placement: placement_lib.Placement | None = None, key_impl=None):
  fn = functools.partial(_sample, model_cfg=model_cfg, config=config)
  options = dict(compiler_options) if compiler_options else None
  if placement is None:
    return jax.jit(fn, compiler_options=options)

  def on_mesh(params, prompts, prompt_lengths, key_data):
    # Keys travel as raw data: that is what can be split over the devices of every process.
    return fn(params, prompts, prompt_lengths, jax.random.wrap_key_data(key_data, impl=key_impl))

  return placement_lib.jit(on_mesh, placement, compiler_options=options)


def _sample_on_mesh(fn, params, model_cfg, prompts, prompt_lengths, row_keys, placement) -> SampleOutput:
  """`fn` with the batch split over the placement's shards; the padding rows are dropped again.
  They copy the last row, so the batch-wide counts (forward passes, steps per block) are unchanged."""
  n = prompts.shape[0]
  params = placement_lib.put_params(params, model_cfg, placement)
  prompts, prompt_lengths = placement_lib.put_batch(placement, [np.asarray(prompts), np.asarray(prompt_lengths)])
  out = fn(params, prompts, prompt_lengths, placement_lib.put_keys(placement, row_keys))
  per_row = ("tokens", "history", "commit_confidence")
  return out._replace(**{f: getattr(out, f)[:n] for f in per_row if getattr(out, f) is not None})


# --------------------------------------------------------------------------------------------
# Entry points.


def _row_keys(key, batch: int) -> Array:
  """A typed key per row: `fold_in(key, row)` for one key, or the given batch of keys."""
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key.astype(jnp.uint32))
  if key.shape == ():
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(batch))
  if key.shape != (batch,):
    raise ValueError(f"key: expected one PRNG key or one per row ({batch}), got shape {key.shape}")
  return key


def _check_prompts(prompts, prompt_lengths, model_cfg) -> None:
  if prompts.ndim != 2:
    raise ValueError(f"prompts: expected int32 [batch, prompt_length], got shape {prompts.shape}")
  if prompt_lengths.shape != (prompts.shape[0],):
    raise ValueError(f"prompt_lengths: expected shape ({prompts.shape[0]},), got {prompt_lengths.shape}")
  if isinstance(prompts, jax.core.Tracer) or isinstance(prompt_lengths, jax.core.Tracer):
    return
  lengths = np.asarray(prompt_lengths)
  if lengths.min(initial=0) < 0 or lengths.max(initial=0) > prompts.shape[1]:
    raise ValueError(f"prompt_lengths: expected values in [0, {prompts.shape[1]}], got {lengths.tolist()}")
  tokens = np.asarray(prompts)
  real = np.arange(tokens.shape[1])[None, :] >= (tokens.shape[1] - lengths)[:, None]
  # Padding is embedded too (then masked out), so it must be a valid id: an out-of-range gather
  # gives NaNs that reach every row through the masked attention's 0 * NaN.
  bad = (tokens < 0) | (tokens >= model_cfg.vocab_size) | (real & (tokens == model_cfg.mask_token_id))
  if bad.any():
    row, col = map(int, np.argwhere(bad)[0])
    raise ValueError(f"prompts[{row}, {col}] = {int(tokens[row, col])}: expected a token id in "
                     f"[0, {model_cfg.vocab_size}), and not the mask id {model_cfg.mask_token_id} in a prompt")


def sample(params, model_cfg: model_lib.ModelConfig, prompts, prompt_lengths, key,
           config: SamplerConfig, *, compiler_options: Mapping[str, Any] | None = None,
           placement: placement_lib.Placement | None = None) -> SampleOutput:
  """Generates `config.gen_length` tokens after each prompt; also returns the forward-pass counts.

  prompts: int32 [B, P], LEFT-padded (any pad id below vocab_size); prompt_lengths: int32 [B],
  the real lengths. key: one PRNG key (row r uses `fold_in(key, r)`) or one key per row.
  placement: run on its mesh, the rows split over its batch shards (`llada_jax.placement`); every
  row's tokens are those of the default device up to float rounding of the sharded model.
  """
  prompts = jnp.asarray(prompts, jnp.int32)
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
  _check_prompts(prompts, prompt_lengths, model_cfg)
  if config.eot_token_id is not None and config.eot_token_id >= model_cfg.vocab_size:
    raise ValueError(f"sampler.eot_token_id={config.eot_token_id}: expected an id below the model's "
                     f"vocab_size={model_cfg.vocab_size}")
  options = tuple(sorted(compiler_options.items())) if compiler_options else None
  row_keys = _row_keys(key, prompts.shape[0])
  if placement is None:
    return _compiled(model_cfg, config, options)(params, prompts, prompt_lengths, row_keys)
  fn = _compiled(model_cfg, config, options, placement, jax.random.key_impl(row_keys))
  return _sample_on_mesh(fn, params, model_cfg, prompts, prompt_lengths, row_keys, placement)


def generate(params, model_cfg: model_lib.ModelConfig, prompts, prompt_lengths, key,
             config: SamplerConfig, **kwargs) -> Array:
  """int32 [B, gen_length]: `sample(...).tokens`."""
  return sample(params, model_cfg, prompts, prompt_lengths, key, config, **kwargs).tokens


def bucket_length(n: int, minimum: int = 16) -> int:
  """The smallest of minimum * {1, 1.5, 2, 3, 4, 6, ...} that holds n: at most a third is padding."""
  size = minimum
  while True:
    if n <= size:
      return size
    if n <= size * 3 // 2:
      return size * 3 // 2
    size *= 2


def pad_prompts(prompt_ids: Sequence[Sequence[int]], pad_id: int, *, length: int | None = None,
                bucket: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token-id lists: (int32 [B, P], int32 lengths [B]).

  P is `length` if given, else the longest prompt rounded up by `bucket_length` (or not, with
  bucket=False).
  """
  lengths = np.array([len(p) for p in prompt_ids], np.int32)
  if not len(lengths):
    raise ValueError("pad_prompts: expected at least one prompt")
  longest = int(lengths.max())
  if length is None:
    length = bucket_length(longest) if bucket else longest
  if longest > length:
    raise ValueError(f"pad_prompts: a prompt has {longest} tokens, more than length={length}")
  out = np.full((len(lengths), length), pad_id, np.int32)
  for row, ids in enumerate(prompt_ids):
    if len(ids):
      out[row, length - len(ids):] = np.asarray(ids, np.int32)
  return out, lengths


def sample_from_ids(params, model_cfg: model_lib.ModelConfig, prompt_ids: Sequence[Sequence[int]], key,
                    config: SamplerConfig, *, bucket: bool = True, **kwargs) -> SampleOutput:
  """`sample` on token-id lists: pads with EOS to a bucketed length first."""
  prompts, lengths = pad_prompts(prompt_ids, model_cfg.eos_token_id, bucket=bucket)
  return sample(params, model_cfg, prompts, lengths, key, config, **kwargs)
