"""Packed rows: several examples in one row, told apart by segment ids (docs/method.md, "Packed rows").

A packed batch (`llada_jax.data.packing`) holds rows [R, L] whose examples sit one after another from
position 0 with segment ids 1, 2, ..., k, then padding (segment id 0), and per-slot arrays [R, K]:
slot s describes segment s + 1 ('example_id', -1 for an empty slot, and 'prompt_lengths'). The model
attends within a segment and restarts positions at each one (`model.attention_mask`,
`model.positions_from_segments`), so an example sees exactly what it would see alone in its own row.

Noise follows the example, not the row: each example draws its timestep from fold_in(key,
example_id) and one uniform per position of its own frame (position 0 = its first token), gathered
into the row. JAX's counter-based uniforms do not depend on the frame's length, so an example draws
the same inside a packed row as alone in a padded row of another length, and a packed batch draws
the same timesteps and masks per example as the unpacked one.

Losses are sums over examples (pretraining: over tokens) divided by a count over the whole step's
batch. When the train step splits a batch into micro-batches it passes that count in
('loss_denominator', `with_denominator`), so the packed step's loss is the mean over the step's
examples, however they fall into rows and micro-batches.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llada_jax import diffusion
from llada_jax.model import LogitsFn, positions_from_segments

Array = jax.Array

DENOMINATOR = "loss_denominator"


# --------------------------------------------------------------------------------------------
# Segment bookkeeping.


def is_packed(batch) -> bool:
  return "segment_ids" in batch or "chosen_segment_ids" in batch


def valid_slots(example_id_rk: Array) -> Array:
  return example_id_rk >= 0


def slot_keys(key: Array, example_id_rk: Array) -> Array:
  """Keys [R, K]: fold_in(key, example_id) per slot (empty slots draw from id 0 and are never used)."""
  ids = jnp.maximum(example_id_rk, 0)
  return jax.vmap(diffusion.example_keys, in_axes=(None, 0))(key, ids)


def slot_values(per_slot_rk: Array, segment_ids_rl: Array) -> Array:
  """Each position's value of its slot: [R, K] -> [R, L] (padding gets slot 0's, to be masked)."""
  index = jnp.clip(segment_ids_rl - 1, 0, per_slot_rk.shape[1] - 1)
  return jnp.take_along_axis(per_slot_rk, index, axis=1)


def frame_values(per_slot_frames: Array, segment_ids_rl: Array) -> Array:
  """Values drawn in each example's own frame, placed in the row.

  per_slot_frames [R, K, ..., F] (F >= the longest segment) -> [R, ..., L], where position i of the
  row takes its slot's value at its position within the segment.
  """
  r, k = per_slot_frames.shape[:2]
  f = per_slot_frames.shape[-1]
  middle = per_slot_frames.shape[2:-1]
  frames = jnp.moveaxis(per_slot_frames, 1, -2).reshape((r,) + middle + (k * f,))
  index = jnp.clip(segment_ids_rl - 1, 0, k - 1) * f + positions_from_segments(segment_ids_rl)
  index = jnp.broadcast_to(index.reshape((r,) + (1,) * len(middle) + index.shape[1:]),
                           (r,) + middle + index.shape[1:])
  return jnp.take_along_axis(frames, index, axis=-1)


def segment_sum(values: Array, segment_ids_rl: Array, num_slots: int) -> Array:
  """Sums over each segment's positions: [R, ..., L] -> [R, ..., K] (padding is left out).

  A matmul against the one-hot slot matrix at full float32 precision (TPUs would otherwise round
  float32 matmul inputs to bfloat16).
  """
  one_hot = jax.nn.one_hot(segment_ids_rl - 1, num_slots, dtype=jnp.float32)  # id 0 -> all zeros
  return jnp.einsum("r...l,rlk->r...k", values.astype(jnp.float32), one_hot, precision=jax.lax.Precision.HIGHEST)


def segment_lengths(segment_ids_rl: Array, num_slots: int) -> Array:
  """Tokens per slot [R, K] (0 for an empty slot)."""
  return (segment_ids_rl[:, :, None] == jnp.arange(1, num_slots + 1)).sum(axis=1).astype(jnp.int32)


def denominator(batch, count: Array) -> Array:
  """The count a loss divides by: the step's (`with_denominator`) if given, else this batch's."""
  if DENOMINATOR in batch:
    return batch[DENOMINATOR][0]
  return jnp.maximum(count, 1).astype(jnp.float32)


def with_denominator(batch, count: Array, micro_batches: int):
  """`batch` carrying count / micro_batches per row: each micro-batch's loss is then its share of the
  step's mean, and the mean of the micro-batch losses the step's mean."""
  rows = jax.tree_util.tree_leaves(batch)[0].shape[0]
  value = jnp.maximum(count, 1).astype(jnp.float32) / micro_batches
  return {**batch, DENOMINATOR: jnp.full((rows,), value, jnp.float32)}


def preference_as_packed(batch):
  """An unpacked preference batch in the packed layout, one pair per row pair (K = 1).

  Padding becomes segment 0. With a bidirectional model the real positions' logits are unchanged:
  their keys were the real tokens before, and are the real tokens of their one segment now.
  """
  if "chosen_segment_ids" in batch:
    return batch
  out = {"example_id": batch["example_id"][:, None], "prompt_lengths": batch["prompt_lengths"][:, None]}
  for side in ("chosen", "rejected"):
    length = batch[side].shape[1]
    out[side] = batch[side]
    out[f"{side}_segment_ids"] = (jnp.arange(length)[None, :] < batch[f"{side}_lengths"][:, None]).astype(jnp.int32)
  for name in ("reference_chosen_elbo", "reference_rejected_elbo"):
    if name in batch:
      out[name] = batch[name][:, None]
  if DENOMINATOR in batch:
    out[DENOMINATOR] = batch[DENOMINATOR]
  return out


# --------------------------------------------------------------------------------------------
# Pretraining and SFT on packed rows.


def pretrain_draws(key: Array, length: int) -> tuple[Array, Array]:
  """One document's timestep and a uniform per position of its frame."""
  k_t, k_mask = jax.random.split(key)
  return jax.random.uniform(k_t), jax.random.uniform(k_mask, (length,))


@dataclasses.dataclass(frozen=True)
class PackedPretrainLoss:
  """Pretraining on packed documents: batch = {'tokens', 'segment_ids', 'example_id' [R, K]}.

  Each document draws t and masks each of its tokens with probability p(t); the loss is the sum over
  masked tokens of CE / p divided by the number of real (non-padding) tokens. A random length cut is
  not applied: documents already come in every length.
  """

  logits_fn: LogitsFn
  mask_id: int
  eps: float = diffusion.DEFAULT_EPS
  adapter_dropout: bool = False

  def __call__(self, params, batch, key):
    tokens, seg = batch["tokens"], batch["segment_ids"]
    length = tokens.shape[1]
    keys = slot_keys(key, batch["example_id"])
    t, u = jax.vmap(jax.vmap(lambda k: pretrain_draws(k, length)))(keys)
    real = seg > 0
    p = slot_values(diffusion.mask_ratio(t, self.eps), seg)
    masked = (frame_values(u, seg) < p) & real
    logits = self.logits_fn(params, diffusion.apply_mask(tokens, masked, self.mask_id), segment_ids=seg,
                            **_dropout(self.adapter_dropout, keys))
    ce = -diffusion.token_log_probs(logits, tokens)
    n_real, n_masked = real.sum(), masked.sum()
    loss = jnp.where(masked, ce / p, 0.0).sum() / denominator(batch, n_real)
    return loss, {
        "loss": loss,
        "masked_token_ce": jnp.where(masked, ce, 0.0).sum() / jnp.maximum(n_masked, 1),
        "masked_fraction": n_masked / jnp.maximum(n_real, 1),
    }


def _dropout(enabled: bool, slot_keys_rk: Array) -> dict:
  """The model's `dropout_keys` argument from the slots' keys, when adapter dropout is on."""
  return {"dropout_keys": diffusion.dropout_keys(slot_keys_rk)} if enabled else {}


def sft_noise(key: Array, tokens: Array, segment_ids: Array, prompt_lengths_rk: Array, example_id_rk: Array, *,
              mask_id: int, eps: float = diffusion.DEFAULT_EPS, prompt_drop_prob: float = 0.0):
  """`diffusion.sft_noise` per example of packed rows: (noisy tokens, masked, p per position, answer)."""
  length = tokens.shape[1]
  t, u, drop = jax.vmap(jax.vmap(lambda k: diffusion.sft_draws(k, length, prompt_drop_prob)))(
      slot_keys(key, example_id_rk))
  real = segment_ids > 0
  prompt = real & (positions_from_segments(segment_ids) < slot_values(prompt_lengths_rk, segment_ids))
  answer = real & ~prompt
  p = slot_values(diffusion.mask_ratio(t, eps), segment_ids)
  masked = (frame_values(u, segment_ids) < p) & answer
  input_masked = masked | (prompt & slot_values(drop, segment_ids))
  return diffusion.apply_mask(tokens, input_masked, mask_id), masked, p, answer


def sft_loss(logits_fn: LogitsFn, params, batch, key, *, mask_id: int, eps: float = diffusion.DEFAULT_EPS,
             prompt_drop_prob: float = 0.0, side: str = "tokens", adapter_dropout: bool = False):
  """SFT on packed rows: the mean over examples of (sum over masked answer tokens of CE / p) / A.

  A counts the example's answer tokens up to and including its one EOS (docs/method.md, "Packed
  rows"). `side` names the rows to read ('tokens', or 'chosen' for VRPO's SFT term).
  """
  tokens = batch[side]
  seg = batch["segment_ids" if side == "tokens" else f"{side}_segment_ids"]
  ids = batch["example_id"]
  noisy, masked, p, answer = sft_noise(key, tokens, seg, batch["prompt_lengths"], ids, mask_id=mask_id, eps=eps,
                                       prompt_drop_prob=prompt_drop_prob)
  logits = logits_fn(params, noisy, segment_ids=seg, **_dropout(adapter_dropout, slot_keys(key, ids)))
  ce = -diffusion.token_log_probs(logits, tokens)
  k = ids.shape[1]
  per_example = segment_sum(jnp.where(masked, ce / p, 0.0), seg, k) / jnp.maximum(segment_sum(answer, seg, k), 1)
  valid = valid_slots(ids)
  loss = jnp.where(valid, per_example, 0.0).sum() / denominator(batch, valid.sum())
  n_masked = masked.sum()
  return loss, {
      "loss": loss,
      "masked_token_ce": jnp.where(masked, ce, 0.0).sum() / jnp.maximum(n_masked, 1),
      "masked_fraction": n_masked / jnp.maximum(answer.sum(), 1),
  }


@dataclasses.dataclass(frozen=True)
class PackedSFTLoss:
  """SFT objective on packed rows; batch = {'tokens', 'segment_ids', 'prompt_lengths', 'example_id'}."""

  logits_fn: LogitsFn
  mask_id: int
  eps: float = diffusion.DEFAULT_EPS
  prompt_drop_prob: float = 0.0
  adapter_dropout: bool = False

  def __call__(self, params, batch, key):
    return sft_loss(self.logits_fn, params, batch, key, mask_id=self.mask_id, eps=self.eps,
                    prompt_drop_prob=self.prompt_drop_prob, adapter_dropout=self.adapter_dropout)


# --------------------------------------------------------------------------------------------
# ELBO estimates per segment.


def elbo_masks(keys_rk: Array, segment_ids: Array, prompt_lengths_rk: Array, config: diffusion.ELBOConfig
               ) -> tuple[Array, Array]:
  """Masks [R, n, L] of the n noised copies of each row, and weights [R, K, n] per example.

  Each example samples its n masks in its own frame, as `diffusion.sample_elbo_masks` does for an
  unpacked row; copy j of a row carries copy j of every example in it.
  """
  length = segment_ids.shape[1]
  k = keys_rk.shape[1]
  frame = jnp.arange(length)
  lengths = segment_lengths(segment_ids, k)
  answer = (frame >= prompt_lengths_rk[..., None]) & (frame < lengths[..., None])  # [R, K, L]
  masks, weights = jax.vmap(diffusion.sample_batch_elbo_masks, in_axes=(0, 0, None))(keys_rk, answer, config)
  return frame_values(masks, segment_ids) & (segment_ids > 0)[:, None, :], weights


def elbo_terms(logits_fn: LogitsFn, params, tokens: Array, segment_ids: Array, masks_rcl: Array, weights_rkc: Array,
               *, mask_id: int, dropout_keys_rck: Array | None = None) -> Array:
  """Per-example terms [R, K, c] of the copies given: weight x sum of masked log-probs.

  The R x c noised rows go through the model as one batch. The ELBO estimate of an example is the
  mean of its n terms. `dropout_keys_rck`: each copy's adapter-dropout keys per slot (training).
  """
  r, c, length = masks_rcl.shape
  noisy = diffusion.apply_mask(jnp.broadcast_to(tokens[:, None], (r, c, length)), masks_rcl, mask_id)
  seg = jnp.broadcast_to(segment_ids[:, None], (r, c, length)).reshape(r * c, length)
  extra = {} if dropout_keys_rck is None else {"dropout_keys": dropout_keys_rck.reshape(r * c, -1)}
  logits = logits_fn(params, noisy.reshape(r * c, length), segment_ids=seg, **extra)
  targets = jnp.broadcast_to(tokens[:, None], (r, c, length)).reshape(r * c, length)
  logp = diffusion.token_log_probs(logits, targets).reshape(r, c, length)
  sums = segment_sum(jnp.where(masks_rcl, logp, 0.0), segment_ids, weights_rkc.shape[1])  # [R, c, K]
  return weights_rkc * jnp.swapaxes(sums, 1, 2)
