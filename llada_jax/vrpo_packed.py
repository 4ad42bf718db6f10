"""VRPO on packed rows, and the chunked-copy step (docs/method.md, "Packed rows" and "VRPO").

Batch (packed preferences, `llada_jax.data.packing`): 'chosen', 'rejected', 'chosen_segment_ids',
'rejected_segment_ids' [R, L] and per slot 'prompt_lengths', 'example_id' [R, K]. Slot s of a chosen
row and slot s of the rejected row with the same index hold the two answers of one pair, so every
per-pair quantity is an [R, K] array. An unpacked batch is taken as packed with K = 1.

Each pair draws exactly what `vrpo.VRPOLoss` draws for it: fold_in(fold_in(key, example_id), tag)
per side, with the policy's tags reused by the reference under antithetic sampling.

Chunked copies. A pair's 2 x n noised copies are the step's activation memory. The DPO loss depends
on the policy only through the mean ELBOs, so its gradient is
    sum over pairs of  -sigmoid(-score) * beta / n * sum_j (grad term_j(y_w) - grad term_j(y_l))
with the weight fixed by the score. `value_and_grad` therefore runs the copies in `copy_chunks`
groups twice: forward only, to get every ELBO, the scores and their weights; then forward and
backward per group, accumulating the weighted gradient. It costs one more policy forward pass than
the one-shot step and holds the activations of one group instead of all n copies.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llada_jax import diffusion, packed, vrpo
from llada_jax.model import LogitsFn

Array = jax.Array


def _rows(batch):
  """Chosen rows then rejected rows: tokens and segment ids [2R, L], prompt lengths [2R, K]."""
  tokens = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)
  seg = jnp.concatenate([batch["chosen_segment_ids"], batch["rejected_segment_ids"]], axis=0)
  prompt_lengths = jnp.concatenate([batch["prompt_lengths"]] * 2, axis=0)
  return tokens, seg, prompt_lengths


@dataclasses.dataclass(frozen=True)
class PackedVRPOLoss:
  """`loss_fn(params, batch, key, reference_params) -> (loss, metrics)` on packed (or unpacked) pairs,
  and `value_and_grad(...) -> (loss, metrics, grads)` running the noised copies in `copy_chunks` groups."""

  logits_fn: LogitsFn
  mask_id: int
  config: vrpo.VRPOConfig = vrpo.VRPOConfig()
  copy_chunks: int = 1
  adapter_dropout: bool = False  # the policy's passes draw adapter dropout; the reference's never do

  def __post_init__(self):
    n = self.config.elbo.n_samples
    if self.copy_chunks < 1 or n % self.copy_chunks:
      raise ValueError(f"vrpo.copy_chunks={self.copy_chunks}: expected a divisor of the budget n = {n}")

  def _keys(self, batch, key, tags) -> Array:
    """Per-slot keys [2R, K] of (chosen, rejected): fold_in(fold_in(key, example_id), tag)."""
    ex_keys = packed.slot_keys(key, batch["example_id"])
    return jnp.concatenate([jax.vmap(jax.vmap(jax.random.fold_in, (0, None)), (0, None))(ex_keys, t) for t in tags])

  def masks(self, batch, key, tags) -> tuple[Array, Array]:
    """Masks [2R, n, L] and weights [2R, K, n] of (chosen, rejected) under the two key tags."""
    _, seg, prompt_lengths = _rows(batch)
    return packed.elbo_masks(self._keys(batch, key, tags), seg, prompt_lengths, self.config.elbo)

  def _policy_dropout(self, batch, key) -> Array | None:
    """The policy copies' adapter-dropout keys [2R, n, K] (None when dropout is off)."""
    if not self.adapter_dropout:
      return None
    keys = diffusion.dropout_keys(self._keys(batch, key, (vrpo._CHOSEN, vrpo._REJECTED)))
    return diffusion.copy_keys(keys, jnp.arange(self.config.elbo.n_samples))

  def _terms(self, params, batch, masks, weights, chunk=None, drop=None) -> Array:
    """Summed terms [2R, K] of all copies, or of copy group `chunk` (a traced index)."""
    if chunk is not None:
      size = self.config.elbo.n_samples // self.copy_chunks
      masks = jax.lax.dynamic_slice_in_dim(masks, chunk * size, size, axis=1)
      weights = jax.lax.dynamic_slice_in_dim(weights, chunk * size, size, axis=2)
      if drop is not None:
        drop = jax.lax.dynamic_slice_in_dim(drop, chunk * size, size, axis=1)
    tokens, seg, _ = _rows(batch)
    return packed.elbo_terms(self.logits_fn, params, tokens, seg, masks, weights, mask_id=self.mask_id,
                             dropout_keys_rck=drop).sum(-1)

  def _reference_masks(self, batch, key, policy_masks):
    if self.config.antithetic:
      return policy_masks
    return self.masks(batch, key, (vrpo._REF_CHOSEN, vrpo._REF_REJECTED))

  def _finish(self, batch, policy_sums, reference):
    """Scores, the preference loss and metrics from the summed policy terms [2R, K] and the reference
    ELBOs ([2R, K], or read from the batch)."""
    cfg, n = self.config, self.config.elbo.n_samples
    policy_chosen, policy_rejected = jnp.split(policy_sums / n, 2)
    if "reference_chosen_elbo" in batch:
      ref_chosen, ref_rejected = batch["reference_chosen_elbo"], batch["reference_rejected_elbo"]
    else:
      ref_chosen, ref_rejected = jnp.split(jax.lax.stop_gradient(reference), 2)
    score = vrpo.preference_score(policy_chosen, ref_chosen, policy_rejected, ref_rejected, cfg.beta)
    valid = packed.valid_slots(batch["example_id"])
    denom = packed.denominator(batch, valid.sum())

    def mean(x):
      return jnp.where(valid, x, 0.0).sum() / denom

    chosen_reward = cfg.beta * (policy_chosen - ref_chosen)
    rejected_reward = cfg.beta * (policy_rejected - ref_rejected)
    preference_loss = mean(vrpo.dpo_loss(score))
    metrics = {
        "preference_loss": preference_loss, "score": mean(score), "reward_margin": mean(chosen_reward - rejected_reward),
        "chosen_reward": mean(chosen_reward), "rejected_reward": mean(rejected_reward),
        "preference_accuracy": mean((score > 0).astype(jnp.float32)),
    }
    return preference_loss, metrics, score, valid, denom

  def _sft(self, params, batch, key):
    loss, _ = packed.sft_loss(self.logits_fn, params, batch, jax.random.fold_in(key, vrpo._SFT_TAG),
                              mask_id=self.mask_id, eps=self.config.eps, side="chosen",
                              adapter_dropout=self.adapter_dropout)
    return loss

  def _online_reference(self, batch, key, reference_params, policy_masks, chunked: bool):
    if "reference_chosen_elbo" in batch:
      return None
    if reference_params is None:
      raise ValueError("PackedVRPOLoss needs reference_params, or 'reference_chosen_elbo'/'reference_rejected_elbo' "
                       "in the batch")
    ref_params = jax.lax.stop_gradient(reference_params)
    masks, weights = self._reference_masks(batch, key, policy_masks)
    if not chunked:
      return self._terms(ref_params, batch, masks, weights) / self.config.elbo.n_samples
    total = self._chunk_sum(lambda i: self._terms(ref_params, batch, masks, weights, i))
    return total / self.config.elbo.n_samples

  def _chunk_sum(self, fn):
    def body(acc, i):
      return acc + fn(i), None

    first = fn(0)
    total, _ = jax.lax.scan(body, first, jnp.arange(1, self.copy_chunks))
    return total

  def reference_elbos(self, reference_params, batch, key):
    """B_ref(y_w), B_ref(y_l) per pair ([R, K], or [B] for an unpacked batch), on the step's own masks."""
    was_packed = "chosen_segment_ids" in batch
    batch = packed.preference_as_packed(batch)
    policy_masks = self.masks(batch, key, (vrpo._CHOSEN, vrpo._REJECTED))
    reference = self._online_reference(batch, key, reference_params, policy_masks, chunked=self.copy_chunks > 1)
    chosen, rejected = jnp.split(reference, 2)
    return (chosen, rejected) if was_packed else (chosen[:, 0], rejected[:, 0])

  def __call__(self, params, batch, key, reference_params=None):
    """The one-shot loss: every noised copy in one forward (and backward) pass."""
    batch = packed.preference_as_packed(batch)
    policy_masks = self.masks(batch, key, (vrpo._CHOSEN, vrpo._REJECTED))
    reference = self._online_reference(batch, key, reference_params, policy_masks, chunked=False)
    policy_sums = self._terms(params, batch, *policy_masks, drop=self._policy_dropout(batch, key))
    loss, metrics, *_ = self._finish(batch, policy_sums, reference)
    if self.config.sft_weight:
      metrics["sft_loss"] = self._sft(params, batch, key)
      loss = loss + self.config.sft_weight * metrics["sft_loss"]
    metrics["loss"] = loss
    return loss, metrics

  def value_and_grad(self, params, batch, key, reference_params=None, to_params=None):
    """(loss, metrics, grads) equal to `jax.value_and_grad(self)`, the copies run in `copy_chunks` groups.

    `to_params` maps the differentiated `params` to the model's (LoRA: the adapters onto the base)."""
    cfg, n = self.config, self.config.elbo.n_samples
    to_params = to_params or (lambda p: p)
    batch = packed.preference_as_packed(batch)
    policy_masks = self.masks(batch, key, (vrpo._CHOSEN, vrpo._REJECTED))
    reference = self._online_reference(batch, key, reference_params, policy_masks, chunked=True)
    frozen = to_params(jax.lax.stop_gradient(params))
    drop = self._policy_dropout(batch, key)
    policy_sums = self._chunk_sum(lambda i: self._terms(frozen, batch, *policy_masks, i, drop))
    loss, metrics, score, valid, denom = self._finish(batch, policy_sums, reference)
    # d(preference loss)/d(summed terms of a side): -sigmoid(-score) beta / n over the step's pairs.
    d_chosen = jnp.where(valid, -jax.nn.sigmoid(-score) * cfg.beta / (n * denom), 0.0)
    d_sums = jax.lax.stop_gradient(jnp.concatenate([d_chosen, -d_chosen]))

    def chunk_grads(grads, i):
      g = jax.grad(lambda p: (d_sums * self._terms(to_params(p), batch, *policy_masks, i, drop)).sum())(params)
      return jax.tree_util.tree_map(jnp.add, grads, g), None

    grads, _ = jax.lax.scan(chunk_grads, jax.tree_util.tree_map(jnp.zeros_like, params), jnp.arange(self.copy_chunks))
    if cfg.sft_weight:
      sft, sft_grads = jax.value_and_grad(lambda p: self._sft(to_params(p), batch, key))(params)
      metrics["sft_loss"] = sft
      loss = loss + cfg.sft_weight * sft
      grads = jax.tree_util.tree_map(lambda g, s: g + cfg.sft_weight * s, grads, sft_grads)
    metrics["loss"] = loss
    return loss, metrics, grads
