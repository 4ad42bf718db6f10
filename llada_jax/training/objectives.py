"""The training objectives: pretraining, SFT, VRPO and the naive-DPO baseline, as one `Objective`.

Each is a pure loss `(params, batch, key, reference_params) -> (loss, metrics)` over the model's
`LogitsFn` (docs/method.md, "Noising and losses" and "VRPO"); they differ only in the loss and
in the kind of data they read. Arguments are typed: the config is read in `training.build`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from llada_jax import diffusion, metrics, vrpo
from llada_jax import model as model_lib

NAMES = ("pretrain", "sft", "vrpo", "naive_dpo")
# The kind of record each objective trains on (`llada_jax.data.pipelines.make_pipeline`).
DATA_KIND = {"pretrain": "pretrain", "sft": "sft", "vrpo": "preference", "naive_dpo": "preference"}


def data_kind(name: str) -> str:
  if name not in DATA_KIND:
    raise ValueError(f"objective {name!r}: expected one of {NAMES}")
  return DATA_KIND[name]


@dataclasses.dataclass(frozen=True)
class Objective:
  """A loss `(params, batch, key, reference_params) -> (loss, metrics)` and what it needs."""

  name: str
  loss_fn: Callable
  needs_reference: bool = False  # the step takes the reference parameters
  reference_in_batch: bool = False  # the batch carries precomputed reference ELBOs (training.reference_elbo)
  vrpo_config: vrpo.VRPOConfig | None = None  # the estimator actually run, for preference objectives


def make_objective(name: str, model_cfg: model_lib.ModelConfig, *, eps: float = diffusion.DEFAULT_EPS,
                   random_length_prob: float = 0.0, prompt_drop_prob: float = 0.0,
                   vrpo_config: vrpo.VRPOConfig | None = None, precompute_reference: bool = False) -> Objective:
  """The objective `name` on the model `model_cfg`.

  `vrpo_config` (VRPO and naive DPO) gives beta, the budget and the estimator; its `eps` is
  replaced by `eps`, so every objective noises with the same floor.
  """
  logits = model_lib.logits_fn(model_cfg)
  mask_id = model_cfg.mask_token_id
  if name == "pretrain":
    loss = diffusion.PretrainLoss(logits, mask_id, eps=eps, random_length_prob=random_length_prob)
    return Objective(name, lambda p, b, k, r=None: loss(p, b, k))
  if name == "sft":
    loss = diffusion.SFTLoss(logits, mask_id, eps=eps, prompt_drop_prob=prompt_drop_prob)
    return Objective(name, lambda p, b, k, r=None: loss(p, b, k))
  if name in ("vrpo", "naive_dpo"):
    vcfg = dataclasses.replace(vrpo_config or vrpo.VRPOConfig(), eps=eps)
    if name == "naive_dpo":
      vcfg = vcfg.as_naive_dpo()  # every setting kept but the sampling budget
    return Objective(name, vrpo.VRPOLoss(logits, mask_id, vcfg), needs_reference=not precompute_reference,
                     reference_in_batch=precompute_reference, vrpo_config=vcfg)
  raise ValueError(f"objective {name!r}: expected one of {NAMES}")


def step_flops(objective: Objective, model_cfg: model_lib.ModelConfig, *, batch_size: int, seq_len: int,
               count_embedding: bool = False) -> int:
  """Analytic model FLOPs of one step (`llada_jax.metrics`): the count MFU is reported with."""
  if objective.vrpo_config is None:
    return metrics.lm_step_flops(model_cfg, batch_size=batch_size, seq_len=seq_len, count_embedding=count_embedding)
  v = objective.vrpo_config
  return metrics.vrpo_step_flops(
      model_cfg, n_pairs=batch_size, seq_len=seq_len, n_timesteps=v.n_timesteps,
      masks_per_timestep=v.masks_per_timestep, sft_weight=v.sft_weight,
      reference_precomputed=objective.reference_in_batch, count_embedding=count_embedding).total
