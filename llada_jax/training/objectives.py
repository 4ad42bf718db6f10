"""The training objectives: pretraining, SFT, VRPO and the naive-DPO baseline, as one `Objective`.

Each is a pure loss `(params, batch, key, reference_params) -> (loss, metrics)` over the model's
`LogitsFn` (docs/method.md, "Noising and losses" and "VRPO"); they differ only in the loss and
in the kind of data they read. Arguments are typed: the config is read in `training.build`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from llada_jax import diffusion, metrics, packed as packed_lib, vrpo, vrpo_packed
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
  # `(params, batch, key, reference_params) -> (loss, metrics, grads)` where the objective computes its own
  # gradient (chunked VRPO copies); None: jax.value_and_grad of `loss_fn`.
  value_and_grad: Callable | None = None
  # `batch -> count` the loss divides by (packed rows: examples or real tokens); the step passes the whole
  # batch's count to each micro-batch. None: each micro-batch's mean weighs the same.
  denominator: Callable | None = None


def _count_examples(batch):
  return (batch["example_id"] >= 0).sum()


def _count_tokens(batch):
  return (batch["segment_ids"] > 0).sum()


def make_objective(name: str, model_cfg: model_lib.ModelConfig, *, eps: float = diffusion.DEFAULT_EPS,
                   random_length_prob: float = 0.0, prompt_drop_prob: float = 0.0,
                   vrpo_config: vrpo.VRPOConfig | None = None, precompute_reference: bool = False,
                   packed: bool = False, copy_chunks: int = 1) -> Objective:
  """The objective `name` on the model `model_cfg`.

  `vrpo_config` (VRPO and naive DPO) gives beta, the budget and the estimator; its `eps` is
  replaced by `eps`, so every objective noises with the same floor. `packed`: the batches hold
  packed rows (`llada_jax.packed`). `copy_chunks` > 1 runs VRPO's noised copies in that many groups.
  """
  logits = model_lib.logits_fn(model_cfg)
  mask_id = model_cfg.mask_token_id
  drop = dict(adapter_dropout=model_cfg.lora_dropout > 0)
  if name in ("pretrain", "sft"):
    if name == "pretrain":
      loss = (packed_lib.PackedPretrainLoss(logits, mask_id, eps=eps, **drop) if packed else
              diffusion.PretrainLoss(logits, mask_id, eps=eps, random_length_prob=random_length_prob, **drop))
    else:
      cls = packed_lib.PackedSFTLoss if packed else diffusion.SFTLoss
      loss = cls(logits, mask_id, eps=eps, prompt_drop_prob=prompt_drop_prob, **drop)
    count = (_count_tokens if name == "pretrain" else _count_examples) if packed else None
    return Objective(name, lambda p, b, k, r=None: loss(p, b, k), denominator=count)
  if name in ("vrpo", "naive_dpo"):
    vcfg = dataclasses.replace(vrpo_config or vrpo.VRPOConfig(), eps=eps)
    if name == "naive_dpo":
      vcfg, copy_chunks = vcfg.as_naive_dpo(), 1  # every setting kept but the sampling budget
    common = dict(needs_reference=not precompute_reference, reference_in_batch=precompute_reference, vrpo_config=vcfg)
    if not packed and copy_chunks == 1:
      return Objective(name, vrpo.VRPOLoss(logits, mask_id, vcfg, **drop), **common)
    loss = vrpo_packed.PackedVRPOLoss(logits, mask_id, vcfg, copy_chunks=copy_chunks, **drop)
    return Objective(name, loss, value_and_grad=loss.value_and_grad if copy_chunks > 1 else None,
                     denominator=_count_examples if packed else None, **common)
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
