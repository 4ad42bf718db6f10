"""LLaDA-8B with LoRA adapters: SFT or VRPO without a pod (docs/method.md, "LoRA").

  --config=llada_8b_lora:sft_h100x8    SFT on one 8-GPU node (the default)
  --config=llada_8b_lora:vrpo_h100x8   VRPO on one 8-GPU node
  --config=llada_8b_lora:sft_v5e       SFT on a 64-chip v5e slice (16 GB chips), FSDP over every chip
  --config=llada_8b_lora:vrpo_v6e      ... and likewise sft_v6e, vrpo_v5e (v6e: 32 GB chips)

`grad_accum_steps` gives each device one row (SFT) or row pair (VRPO) per micro-batch on 8 GPUs or
64 chips; on other device counts set it to global_batch_size / devices.

Each is the full recipe (`llada_8b_sft`, `llada_8b_vrpo`: packed 4096-token rows, the same batch,
schedule and VRPO estimator) with rank-16 adapters (alpha 32) on every projection and a bfloat16
base. Only the adapters (and their Adam moments) are trained and stored; the base is
`checkpoint.init_from` (the converted Instruct weights for VRPO, Base for SFT) and, in VRPO, also
the reference, with the adapters off, so no second model is held. The learning rates are the usual
LoRA choice of a larger step than full fine-tuning (not from the paper). `python -m llada_jax.plan`
gives the per-device memory against full fine-tuning (docs/scale-out.md).
"""

from llada_jax.configs import llada_8b_sft, llada_8b_vrpo

VARIANTS = ("sft_h100x8", "vrpo_h100x8", "sft_v5e", "vrpo_v5e", "sft_v6e", "vrpo_v6e")
LORA_RANK, LORA_ALPHA = 16, 32.0
LR = {"sft": 1e-4, "vrpo": 5e-6}


def get_config(variant: str = "sft_h100x8"):
  if variant not in VARIANTS:
    raise ValueError(f"llada_8b_lora: variant {variant!r}; expected one of {VARIANTS}")
  objective, platform = variant.split("_")
  recipe = llada_8b_sft if objective == "sft" else llada_8b_vrpo
  c = recipe.get_config("v5p")  # FSDP over every device: one node, or one slice
  c.model.lora_rank, c.model.lora_alpha = LORA_RANK, LORA_ALPHA
  c.model.lora_base_dtype = "bfloat16"  # frozen: its float32 master copy would only cost memory
  c.optimizer.lr = LR[objective]
  # One row (SFT) or row pair (VRPO) per device and micro-batch: 8 GPUs, or slices of 64 chips.
  devices = 8 if platform == "h100x8" else 64
  c.grad_accum_steps = c.data.global_batch_size // devices
  if objective == "vrpo":
    c.vrpo.copy_chunks = 4 if platform == "h100x8" else 8  # the smaller chips run one copy of a side at a time
  return c
