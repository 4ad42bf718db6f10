"""The masked-diffusion objectives (docs/method.md, "Noising and losses" and "ELBO estimators").

Forward process: each token of a sequence is replaced by the mask token independently with
probability p = (1 - eps) t + eps, t ~ U[0, 1). The mask predictor is trained to recover the
masked tokens; its cross-entropy weighted by 1/p bounds the negative log-likelihood (the ELBO).

Everything here is a pure function of (params, batch, key). Randomness is split off the key in a
fixed way so a test, or a second model, can reproduce exactly the masks a loss used.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from llada_jax.model import LogitsFn

Array = jax.Array

DEFAULT_EPS = 1e-3
ESTIMATORS = ("l_over_L", "one_over_t")


# --------------------------------------------------------------------------------------------
# Noising.


def mask_ratio(t: Array, eps: float = DEFAULT_EPS) -> Array:
  """p = (1 - eps) t + eps: keeps the 1/p weight finite as t -> 0."""
  return (1.0 - eps) * t + eps


def bernoulli_mask(key: Array, p_b: Array, maskable_bl: Array) -> Array:
  """Masks each maskable position of row b independently with probability p_b."""
  u = jax.random.uniform(key, maskable_bl.shape)
  return (u < p_b[:, None]) & maskable_bl


def mask_exactly(key: Array, maskable_l: Array, l: Array) -> Array:
  """Masks a uniformly random subset of exactly `l` of the maskable positions (one row).

  Random scores rank the maskable positions; unmaskable ones get a score above every draw so
  they rank last and are never chosen.
  """
  scores = jnp.where(maskable_l, jax.random.uniform(key, maskable_l.shape), 2.0)
  ranks = jnp.argsort(jnp.argsort(scores))
  return ranks < l


def apply_mask(tokens: Array, masked: Array, mask_id: int) -> Array:
  return jnp.where(masked, jnp.asarray(mask_id, tokens.dtype), tokens)


def token_log_probs(logits_btv: Array, targets_bt: Array) -> Array:
  """log softmax(logits)[target] per position, in float32."""
  logits = logits_btv.astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
  return target_logits - jax.nn.logsumexp(logits, axis=-1)


def answer_mask(prompt_lengths_b: Array, lengths_b: Array | None, length: int) -> Array:
  """True on answer positions: at or after the prompt and before `lengths` (valid tokens)."""
  idx = jnp.arange(length)[None, :]
  mask = idx >= prompt_lengths_b[:, None]
  if lengths_b is not None:
    mask &= idx < lengths_b[:, None]
  return mask


def valid_mask(lengths_b: Array | None, length: int) -> Array | None:
  if lengths_b is None:
    return None
  return jnp.arange(length)[None, :] < lengths_b[:, None]


# --------------------------------------------------------------------------------------------
# Pretraining.


class PretrainNoise(NamedTuple):
  noisy_tokens: Array  # [B, L] input to the mask predictor
  masked: Array  # [B, L] bool, positions replaced by the mask token
  p: Array  # [B] mask ratio per sequence
  length: Array  # [] the (possibly cut) sequence length in use
  valid: Array  # [B, L] bool, positions < length


def pretrain_noise(key: Array, tokens: Array, *, mask_id: int, eps: float = DEFAULT_EPS,
                   random_length_prob: float = 0.0) -> PretrainNoise:
  """Forward process for a pretraining batch.

  With probability `random_length_prob` the whole batch is cut to a length U{1..L}. Shapes stay
  static: the cut-off tail is hidden from attention and from the loss, which is exactly the
  truncated batch for a bidirectional model with absolute-from-zero positions.
  """
  b, l = tokens.shape
  k_t, k_mask, k_cut, k_len = jax.random.split(key, 4)
  p = mask_ratio(jax.random.uniform(k_t, (b,)), eps)
  cut = jax.random.bernoulli(k_cut, random_length_prob)
  length = jnp.where(cut, jax.random.randint(k_len, (), 1, l + 1), l)
  valid = jnp.broadcast_to(jnp.arange(l)[None, :] < length, (b, l))
  masked = bernoulli_mask(k_mask, p, valid)
  return PretrainNoise(apply_mask(tokens, masked, mask_id), masked, p, length, valid)


def pretrain_loss_from_logits(logits: Array, tokens: Array, noise: PretrainNoise) -> tuple[Array, dict]:
  """sum over masked (b, i) of CE / p_b, divided by all B * length tokens of the batch."""
  ce = -token_log_probs(logits, tokens)
  weighted = jnp.where(noise.masked, ce / noise.p[:, None], 0.0)
  loss = weighted.sum() / (tokens.shape[0] * noise.length)
  n_masked = noise.masked.sum()
  metrics = {
      "loss": loss,
      "masked_token_ce": jnp.where(noise.masked, ce, 0.0).sum() / jnp.maximum(n_masked, 1),
      "masked_fraction": n_masked / (tokens.shape[0] * noise.length),
  }
  return loss, metrics


@dataclasses.dataclass(frozen=True)
class PretrainLoss:
  """Pretraining objective: `loss_fn(params, batch, key) -> (loss, metrics)`, batch = {'tokens'}."""

  logits_fn: LogitsFn
  mask_id: int
  eps: float = DEFAULT_EPS
  random_length_prob: float = 0.01
  adapter_dropout: bool = False  # pass dropout keys to the model (LoRA with lora_dropout > 0)

  def __call__(self, params, batch, key):
    tokens = batch["tokens"]
    noise = pretrain_noise(key, tokens, mask_id=self.mask_id, eps=self.eps,
                           random_length_prob=self.random_length_prob)
    key_mask = noise.valid if self.random_length_prob > 0 else None
    extra = {}
    if self.adapter_dropout:  # rows of a token stream are not examples: keys per row of the step
      extra["dropout_keys"] = jax.random.split(jax.random.fold_in(key, DROPOUT_TAG), tokens.shape[0])
    logits = self.logits_fn(params, noise.noisy_tokens, key_mask=key_mask, **extra)
    return pretrain_loss_from_logits(logits, tokens, noise)


# --------------------------------------------------------------------------------------------
# Supervised fine-tuning.


class SFTNoise(NamedTuple):
  noisy_tokens: Array  # [B, L]
  masked: Array  # [B, L] bool, masked answer positions (the loss positions)
  p: Array  # [B]
  answer: Array  # [B, L] bool, answer positions (EOS padding included unless `lengths` excludes it)
  valid: Array | None  # [B, L] bool key mask, or None when every position is real


def sft_draws(key: Array, length: int, prompt_drop_prob: float) -> tuple[Array, Array, Array]:
  """One example's SFT draws: timestep t, a uniform per position of its frame, and the prompt drop.

  The uniforms are counter-based, so the first m of them do not depend on `length`: an example
  draws the same alone in a padded row as inside a longer packed one (`llada_jax.packed`).
  """
  k_t, k_mask, k_drop = jax.random.split(key, 3)
  return jax.random.uniform(k_t), jax.random.uniform(k_mask, (length,)), jax.random.bernoulli(k_drop, prompt_drop_prob)


def sft_noise(key: Array, tokens: Array, prompt_lengths: Array, *, mask_id: int, eps: float = DEFAULT_EPS,
              prompt_drop_prob: float = 0.0, lengths: Array | None = None,
              example_ids: Array | None = None) -> SFTNoise:
  """Noise the whole sequence, then put the prompt back: only answer tokens are ever masked.

  With probability `prompt_drop_prob` a row's whole prompt is masked in the input (never in the
  loss), which trains the unconditional model used by classifier-free guidance. With
  `example_ids`, each row draws from fold_in(key, example_id), so its noise does not depend on
  how the batch is split into micro-batches or devices.
  """
  b, l = tokens.shape
  keys = row_keys(key, b, example_ids)
  t, u, drop = jax.vmap(lambda k: sft_draws(k, l, prompt_drop_prob))(keys)
  p = mask_ratio(t, eps)
  answer = answer_mask(prompt_lengths, lengths, l)
  masked = (u < p[:, None]) & answer
  prompt = jnp.arange(l)[None, :] < prompt_lengths[:, None]
  input_masked = masked | (prompt & drop[:, None])
  return SFTNoise(apply_mask(tokens, input_masked, mask_id), masked, p, answer, valid_mask(lengths, l))


def row_keys(key: Array, b: int, example_ids: Array | None) -> Array:
  """One key per row: per example when the rows carry example ids, else split from the step's key."""
  return jax.random.split(key, b) if example_ids is None else example_keys(key, example_ids)


def sft_loss_from_logits(logits: Array, tokens: Array, noise: SFTNoise) -> tuple[Array, dict]:
  """Batch mean of (sum over masked answer tokens of CE / p_b) / A_b, A_b = answer length."""
  ce = -token_log_probs(logits, tokens)
  answer_len = jnp.maximum(noise.answer.sum(axis=1), 1)
  per_row = jnp.where(noise.masked, ce / noise.p[:, None], 0.0).sum(axis=1) / answer_len
  loss = per_row.mean()
  n_masked = noise.masked.sum()
  metrics = {
      "loss": loss,
      "masked_token_ce": jnp.where(noise.masked, ce, 0.0).sum() / jnp.maximum(n_masked, 1),
      "masked_fraction": n_masked / jnp.maximum(noise.answer.sum(), 1),
  }
  return loss, metrics


def sft_loss(logits_fn: LogitsFn, params, tokens, prompt_lengths, key, *, mask_id: int,
             eps: float = DEFAULT_EPS, prompt_drop_prob: float = 0.0, lengths=None, example_ids=None,
             adapter_dropout: bool = False):
  noise = sft_noise(key, tokens, prompt_lengths, mask_id=mask_id, eps=eps, prompt_drop_prob=prompt_drop_prob,
                    lengths=lengths, example_ids=example_ids)
  extra = {}
  if adapter_dropout:
    extra["dropout_keys"] = dropout_keys(row_keys(key, tokens.shape[0], example_ids))
  logits = logits_fn(params, noise.noisy_tokens, key_mask=noise.valid, **extra)
  return sft_loss_from_logits(logits, tokens, noise)


@dataclasses.dataclass(frozen=True)
class SFTLoss:
  """SFT objective; batch = {'tokens', 'prompt_lengths'} (+ optional 'lengths' of valid tokens and
  'example_id' for per-example noise)."""

  logits_fn: LogitsFn
  mask_id: int
  eps: float = DEFAULT_EPS
  prompt_drop_prob: float = 0.0
  adapter_dropout: bool = False

  def __call__(self, params, batch, key):
    return sft_loss(self.logits_fn, params, batch["tokens"], batch["prompt_lengths"], key, mask_id=self.mask_id,
                    eps=self.eps, prompt_drop_prob=self.prompt_drop_prob, lengths=batch.get("lengths"),
                    example_ids=batch.get("example_id"), adapter_dropout=self.adapter_dropout)


# --------------------------------------------------------------------------------------------
# ELBO estimators.


@dataclasses.dataclass(frozen=True)
class ELBOConfig:
  """How a likelihood estimate spends its budget of n = n_timesteps * masks_per_timestep samples.

  estimator: "l_over_L" draws l ~ U{1..L} and masks exactly l answer tokens, weight L/l;
    "one_over_t" draws t, masks each answer token with probability p(t), weight 1/p.
  stratified: draw the n_timesteps levels as one stratified sweep (a random start k, then evenly
    spaced, wrapped into 1..L) instead of independently; only for "l_over_L".
  """

  n_timesteps: int = 1
  masks_per_timestep: int = 1
  estimator: str = "l_over_L"
  stratified: bool = False
  eps: float = DEFAULT_EPS

  def __post_init__(self):
    if self.estimator not in ESTIMATORS:
      raise ValueError(f"elbo.estimator={self.estimator!r}: expected one of {ESTIMATORS}")
    for field in ("n_timesteps", "masks_per_timestep"):
      if int(getattr(self, field)) < 1:
        raise ValueError(f"elbo.{field}={getattr(self, field)!r}: expected an integer >= 1")
    if self.stratified and self.estimator != "l_over_L":
      raise ValueError("elbo.stratified=True needs elbo.estimator='l_over_L'")

  @property
  def n_samples(self) -> int:
    return self.n_timesteps * self.masks_per_timestep


def sample_elbo_masks(key: Array, answer_l: Array, config: ELBOConfig) -> tuple[Array, Array]:
  """Masks [n, L] and weights [n] for one response; n = n_timesteps * masks_per_timestep.

  Sample j uses timestep j // masks_per_timestep. A response with no answer positions gets
  all-False masks and weight 0.
  """
  n_t, n_yt = config.n_timesteps, config.masks_per_timestep
  k_level, k_masks = jax.random.split(key)
  answer_len = answer_l.sum()
  safe_len = jnp.maximum(answer_len, 1)
  mask_keys = jax.random.split(k_masks, n_t * n_yt)

  if config.estimator == "l_over_L":
    if config.stratified:
      # The reference rounds k + j L / n half-to-even, which ties to whichever level is even and so
      # biases the estimate when j L / n hits x.5. Rounding the offset alone (half up) shifts a
      # uniform k by a constant: every level stays uniform, and the estimate unbiased.
      start = jax.random.randint(k_level, (), 1, safe_len + 1)
      offset = jnp.floor(jnp.arange(n_t) * safe_len / n_t + 0.5).astype(jnp.int32)
      levels = (start + offset - 1) % safe_len + 1
    else:
      levels = jax.random.randint(k_level, (n_t,), 1, safe_len + 1)
    levels = jnp.repeat(levels, n_yt)
    masks = jax.vmap(mask_exactly, in_axes=(0, None, 0))(mask_keys, answer_l, levels)
    weights = safe_len / levels
  else:
    p = jnp.repeat(mask_ratio(jax.random.uniform(k_level, (n_t,)), config.eps), n_yt)
    u = jax.vmap(lambda k: jax.random.uniform(k, answer_l.shape))(mask_keys)
    masks = (u < p[:, None]) & answer_l
    weights = 1.0 / p
  weights = jnp.where(answer_len > 0, weights, 0.0).astype(jnp.float32)
  return masks, weights


def sample_batch_elbo_masks(keys_b: Array, answer_bl: Array, config: ELBOConfig) -> tuple[Array, Array]:
  """Per-example keys [B] -> masks [B, n, L], weights [B, n]."""
  return jax.vmap(sample_elbo_masks, in_axes=(0, 0, None))(keys_b, answer_bl, config)


def elbo_from_masks(logits_fn: LogitsFn, params, tokens_bl: Array, masks_bnl: Array, weights_bn: Array, *,
                    mask_id: int, key_mask_bl: Array | None = None,
                    dropout_keys_b: Array | None = None) -> tuple[Array, Array]:
  """ELBO estimates [B] (and the per-sample terms [B, n]) from given masks.

  The B x n noised copies go through the model as ONE batch of B * n rows. `dropout_keys_b`: the
  examples' adapter-dropout keys (training); copy j of an example draws from fold_in(key, j).
  """
  b, n, l = masks_bnl.shape
  noisy = apply_mask(jnp.broadcast_to(tokens_bl[:, None, :], (b, n, l)), masks_bnl, mask_id).reshape(b * n, l)
  key_mask = None
  if key_mask_bl is not None:
    key_mask = jnp.broadcast_to(key_mask_bl[:, None, :], (b, n, l)).reshape(b * n, l)
  extra = {}
  if dropout_keys_b is not None:
    extra["dropout_keys"] = copy_keys(dropout_keys_b, jnp.arange(n)).reshape(b * n)
  logits = logits_fn(params, noisy, key_mask=key_mask, **extra)
  targets = jnp.broadcast_to(tokens_bl[:, None, :], (b, n, l)).reshape(b * n, l)
  logp = token_log_probs(logits, targets).reshape(b, n, l)
  per_sample = weights_bn * jnp.where(masks_bnl, logp, 0.0).sum(axis=-1)
  return per_sample.mean(axis=-1), per_sample


# fold_in(example key, DROPOUT_TAG) seeds an example's adapter dropout (llada_jax.lora): a stream
# apart from its noise, so turning dropout on leaves every timestep and mask as it was.
DROPOUT_TAG = 0x6C6F7261


def dropout_keys(keys: Array) -> Array:
  """Adapter-dropout keys from per-example (or per-slot) keys of any shape."""
  flat = keys.reshape(-1)
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(flat, DROPOUT_TAG).reshape(keys.shape)


def copy_keys(keys_b: Array, copies) -> Array:
  """Keys [B, c] (or [B, c, K] from [B, K]): fold_in(key, j) for each copy index j in `copies`."""
  per_copy = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
  fn = per_copy if keys_b.ndim == 1 else jax.vmap(per_copy, in_axes=(0, None), out_axes=1)
  return jax.vmap(fn, in_axes=(0, None))(keys_b, copies)


def example_keys(key: Array, example_ids_b: Array) -> Array:
  """Per-example keys: fold_in(key, example_id), so an example's draws do not depend on its batch."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, example_ids_b)


def elbo(logits_fn: LogitsFn, params, tokens: Array, prompt_lengths: Array, keys_b: Array, config: ELBOConfig, *,
         mask_id: int, lengths: Array | None = None) -> Array:
  """ELBO estimate of log p(response | prompt) for each row; a sum over answer tokens."""
  l = tokens.shape[1]
  answer = answer_mask(prompt_lengths, lengths, l)
  masks, weights = sample_batch_elbo_masks(keys_b, answer, config)
  estimate, _ = elbo_from_masks(logits_fn, params, tokens, masks, weights, mask_id=mask_id,
                                key_mask_bl=valid_mask(lengths, l))
  return estimate
