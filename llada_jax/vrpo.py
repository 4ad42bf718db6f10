"""VRPO: DPO on ELBO estimates with variance reduction (LLaDA 1.5, docs/method.md, "VRPO").

    score = beta * [(B_theta(y_w) - B_ref(y_w)) - (B_theta(y_l) - B_ref(y_l))]
    loss  = -log sigmoid(score)

Each B is an ELBO estimate with budget n = n_timesteps * masks_per_timestep. Antithetic sampling
gives the policy and the frozen reference the SAME timesteps and masks for a response (they are
derived from the same key), so their estimation noise cancels in the differences; nothing is
shared between y_w and y_l. The naive-DPO baseline is n_t = n_yt = 1 without antithetic sampling.

Batch (preferences): 'chosen', 'rejected' [B, L] int32 (prompt + response + EOS, EOS-padded),
'prompt_lengths', 'chosen_lengths', 'rejected_lengths' (valid tokens) and 'example_id' [B].
Padding beyond the lengths is neither attended to nor scored.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax import diffusion
from llada_jax.model import LogitsFn

Array = jax.Array

# Key tags: fold_in(example_key, tag). The reference reuses the policy's tags when antithetic.
_CHOSEN, _REJECTED, _REF_CHOSEN, _REF_REJECTED = 0, 1, 2, 3
_SFT_TAG = 0x5F7  # folded into the step key for the optional SFT term


def preference_score(policy_chosen: Array, reference_chosen: Array, policy_rejected: Array,
                     reference_rejected: Array, beta: float) -> Array:
  return beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))


def dpo_loss(score: Array) -> Array:
  return -jax.nn.log_sigmoid(score)


# Naive DPO: one timestep, one mask and no antithetic sampling (docs/method.md, "VRPO").
NAIVE_DPO_BUDGET = {"n_timesteps": 1, "masks_per_timestep": 1, "antithetic": False}


@dataclasses.dataclass(frozen=True)
class VRPOConfig:
  beta: float = 0.2
  n_timesteps: int = 8
  masks_per_timestep: int = 1
  antithetic: bool = True
  estimator: str = "l_over_L"
  stratified: bool = False
  sft_weight: float = 0.0  # the paper adds 0.05 x the SFT loss on the chosen responses
  eps: float = diffusion.DEFAULT_EPS

  @property
  def elbo(self) -> diffusion.ELBOConfig:
    return diffusion.ELBOConfig(self.n_timesteps, self.masks_per_timestep, self.estimator, self.stratified,
                                self.eps)

  @classmethod
  def naive_dpo(cls, **overrides) -> "VRPOConfig":
    return cls(**{**NAIVE_DPO_BUDGET, **overrides})

  def as_naive_dpo(self) -> "VRPOConfig":
    """The naive-DPO baseline of this config: every setting kept but the sampling budget."""
    return dataclasses.replace(self, **NAIVE_DPO_BUDGET)


def _pair_inputs(batch):
  """Chosen and rejected stacked into one [2B, L] batch, so each model runs one forward pass."""
  tokens = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)
  prompt_lengths = jnp.concatenate([batch["prompt_lengths"]] * 2, axis=0)
  lengths = jnp.concatenate([batch["chosen_lengths"], batch["rejected_lengths"]], axis=0)
  return tokens, prompt_lengths, lengths


@dataclasses.dataclass(frozen=True)
class VRPOLoss:
  """`loss_fn(params, batch, key, reference_params) -> (loss, metrics)`.

  The reference is never differentiated. If the batch carries 'reference_chosen_elbo' and
  'reference_rejected_elbo' (computed ahead of time with `reference_elbos` and the same key), the
  reference model is not run at all.
  """

  logits_fn: LogitsFn
  mask_id: int
  config: VRPOConfig = VRPOConfig()
  adapter_dropout: bool = False  # the policy's passes draw adapter dropout; the reference's never do

  def _keys(self, key, batch, tags):
    """Per-sequence keys [2B] of (chosen, rejected): fold_in(fold_in(key, example_id), tag)."""
    ex_keys = diffusion.example_keys(key, batch["example_id"])
    return jnp.concatenate([jax.vmap(jax.random.fold_in, (0, None))(ex_keys, t) for t in tags], axis=0)

  def _masks(self, key, batch, tags):
    """Masks [2B, n, L] and weights [2B, n] for (chosen, rejected) from per-example keys."""
    tokens, prompt_lengths, lengths = _pair_inputs(batch)
    answer = diffusion.answer_mask(prompt_lengths, lengths, tokens.shape[1])
    return diffusion.sample_batch_elbo_masks(self._keys(key, batch, tags), answer, self.config.elbo)

  def _elbos(self, params, key, batch, tags, dropout: bool = False):
    tokens, _, lengths = _pair_inputs(batch)
    masks, weights = self._masks(key, batch, tags)
    drop = diffusion.dropout_keys(self._keys(key, batch, tags)) if dropout else None
    estimate, _ = diffusion.elbo_from_masks(self.logits_fn, params, tokens, masks, weights, mask_id=self.mask_id,
                                            key_mask_bl=diffusion.valid_mask(lengths, tokens.shape[1]),
                                            dropout_keys_b=drop)
    return jnp.split(estimate, 2)

  def policy_elbos(self, params, batch, key):
    return self._elbos(params, key, batch, (_CHOSEN, _REJECTED), dropout=self.adapter_dropout)

  def reference_elbos(self, reference_params, batch, key):
    """B_ref(y_w), B_ref(y_l): with antithetic sampling, on the policy's own masks."""
    tags = (_CHOSEN, _REJECTED) if self.config.antithetic else (_REF_CHOSEN, _REF_REJECTED)
    chosen, rejected = self._elbos(jax.lax.stop_gradient(reference_params), key, batch, tags)
    return jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)

  def per_pair(self, params, batch, key, reference_params=None):
    """Per-pair score and DPO loss [B], and the four ELBOs."""
    policy_chosen, policy_rejected = self.policy_elbos(params, batch, key)
    if "reference_chosen_elbo" in batch:
      ref_chosen, ref_rejected = batch["reference_chosen_elbo"], batch["reference_rejected_elbo"]
    elif reference_params is None:
      raise ValueError("VRPOLoss needs reference_params, or 'reference_chosen_elbo'/'reference_rejected_elbo' "
                       "in the batch")
    else:
      ref_chosen, ref_rejected = self.reference_elbos(reference_params, batch, key)
    score = preference_score(policy_chosen, ref_chosen, policy_rejected, ref_rejected, self.config.beta)
    elbos = dict(policy_chosen=policy_chosen, policy_rejected=policy_rejected, reference_chosen=ref_chosen,
                 reference_rejected=ref_rejected)
    return score, dpo_loss(score), elbos

  def __call__(self, params, batch, key, reference_params=None):
    cfg = self.config
    score, losses, elbos = self.per_pair(params, batch, key, reference_params)
    preference_loss = losses.mean()
    chosen_reward = cfg.beta * (elbos["policy_chosen"] - elbos["reference_chosen"])
    rejected_reward = cfg.beta * (elbos["policy_rejected"] - elbos["reference_rejected"])
    metrics = {
        "preference_loss": preference_loss,
        "score": score.mean(),
        "reward_margin": (chosen_reward - rejected_reward).mean(),
        "chosen_reward": chosen_reward.mean(),
        "rejected_reward": rejected_reward.mean(),
        "preference_accuracy": (score > 0).mean(),
    }
    loss = preference_loss
    if cfg.sft_weight:
      sft, _ = diffusion.sft_loss(self.logits_fn, params, batch["chosen"], batch["prompt_lengths"],
                                  jax.random.fold_in(key, _SFT_TAG), mask_id=self.mask_id, eps=cfg.eps,
                                  lengths=batch["chosen_lengths"], example_ids=batch["example_id"],
                                  adapter_dropout=self.adapter_dropout)
      metrics["sft_loss"] = sft
      loss = loss + cfg.sft_weight * sft
    metrics["loss"] = loss
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Variance diagnostics (paper Table 2).


def block0_ffn_up_projection(params) -> Array:
  """The paper's gradient proxy: block 0's FFN up-projection, scanned or not."""
  if "blocks_0" in params:
    return params["blocks_0"]["mlp"]["up_proj"]
  return params["blocks"]["block"]["mlp"]["up_proj"][0]


def variance_diagnostics(loss: VRPOLoss, params, reference_params, batches, key: Array, *, n_repeats: int = 8,
                         grad_proxy: Callable = block0_ffn_up_projection) -> dict:
  """Variance over repeated draws of the preference score, the loss and a gradient proxy.

  For each repeat r the whole set of batches is evaluated with key fold_in(key, r); the data are
  fixed, so all spread comes from the sampled timesteps and masks. Reported:
    score_variance:    mean over pairs of Var_r[score of the pair]
    loss_variance:     mean over batches of Var_r[batch mean DPO loss]
    gradient_variance: mean over batches of sum over proxy entries of Var_r[d batch loss / d entry]
  Variances are unbiased (ddof=1). The SFT term is left out: the quantities are the DPO ones.

  Each pair draws its timesteps and masks from fold_in(key_r, example_id), independently of the
  other pairs, so the variance of a batch mean over B pairs is the sum of the per-pair variances
  over B^2. The loss and gradient variances are estimated that way, from per-pair losses and
  gradients: that uses every pair's spread, B (R - 1) degrees of freedom per batch where the batch
  means give R - 1 (with 8 pairs and 16 repeats, a relative standard error of ~13% instead of
  ~37% when the pairs vary alike), enough to order close settings. The estimates from the batch
  means themselves are reported too (`*_direct`). Needs distinct example_ids within a batch.
  """
  if n_repeats < 2:
    raise ValueError(f"n_repeats={n_repeats}: expected at least 2 to measure a variance")
  for i, batch in enumerate(batches):
    ids = np.asarray(batch["example_id"])
    if len(np.unique(ids)) != len(ids):
      raise ValueError(f"variance_diagnostics: batch {i} repeats an example_id; pairs must draw independently")
  dpo = dataclasses.replace(loss, config=dataclasses.replace(loss.config, sft_weight=0.0))

  @jax.jit
  def evaluate(params, reference_params, batch, key):
    """Per pair: score, DPO loss and gradient proxy, each pair run as a batch of one."""
    def pair_loss(p, pair):
      score, losses, _ = dpo.per_pair(p, jax.tree.map(lambda x: x[None], pair), key, reference_params)
      return losses[0], score[0]

    (losses, scores), grads = jax.vmap(jax.value_and_grad(pair_loss, has_aux=True), in_axes=(None, 0))(params, batch)
    return scores, losses, jax.vmap(grad_proxy)(grads)

  outs = [[jax.tree.map(lambda x: np.asarray(x, np.float64), evaluate(params, reference_params, batch,
                                                                      jax.random.fold_in(key, r)))
           for batch in batches] for r in range(n_repeats)]
  # Per batch (batches may differ in size): scores, losses [repeats, B], gradient proxies [repeats, B, ...].
  scores, losses, grads = zip(*[[np.stack([out[b][field] for out in outs]) for field in range(3)]
                                for b in range(len(batches))])

  def pooled_and_direct(per_batch):
    """Variance of the batch mean (summed over entries), from per-pair variances and from the means."""
    pooled = [x.var(axis=0, ddof=1).sum() / x.shape[1] ** 2 for x in per_batch]
    direct = [x.mean(axis=1).var(axis=0, ddof=1).sum() for x in per_batch]
    return float(np.mean(pooled)), float(np.mean(direct))

  loss_variance, loss_variance_direct = pooled_and_direct(losses)
  gradient_variance, gradient_variance_direct = pooled_and_direct(grads)
  return {
      "score_variance": float(np.concatenate([s.var(axis=0, ddof=1) for s in scores]).mean()),
      "loss_variance": loss_variance,
      "gradient_variance": gradient_variance,
      "loss_variance_direct": loss_variance_direct,
      "gradient_variance_direct": gradient_variance_direct,
      "score_mean": float(np.concatenate([s.ravel() for s in scores]).mean()),
      "loss_mean": float(np.mean([l.mean(axis=1) for l in losses])),
  }
