"""Demo stage 3: VRPO from the SFT model (policy init and frozen reference) on its own verified
samples. `--config=demo_vrpo:naive_dpo` gives the naive-DPO baseline (n_t = n_yt = 1,
no antithetic sampling) with everything else equal. `--config=demo_vrpo:lora` trains rank-16 LoRA
adapters on every projection instead of the whole model: the SFT model is the frozen base and, with
the adapters off, the reference (docs/method.md, "LoRA").
"""

from llada_jax import optim
from llada_jax.configs import demo_common as common


def get_config(variant: str = "vrpo"):
  if variant not in ("vrpo", "naive_dpo", "lora"):
    raise ValueError(f"demo_vrpo: variant {variant!r}; expected 'vrpo', 'naive_dpo' or 'lora'")
  c = common.base("vrpo" if variant == "lora" else variant, total_steps=16)
  c.data.global_batch_size = 16
  c.optimizer = optim.default_optimizer_config("vrpo")
  c.optimizer.total_steps = c.get_ref("total_steps")
  # 1/25 of the SFT peak (the paper: 1/50). At 5e-5 and 1e-4 VRPO lowered test accuracy by 5-6 points.
  c.optimizer.lr = 2e-5
  c.optimizer.warmup_steps = 6
  c.vrpo.beta = 0.2
  c.vrpo.n_timesteps = 4
  c.vrpo.masks_per_timestep = 1
  c.vrpo.antithetic = True
  c.vrpo.sft_weight = 0.05
  c.checkpoint.every_steps = 8
  c.logging.every_steps = 2
  if variant == "lora":
    c.model.lora_rank, c.model.lora_alpha = 16, 32.0
    # Adapters start at zero and move only the low-rank part: they take a larger step than the full model.
    c.optimizer.lr = 2e-4
  return c
