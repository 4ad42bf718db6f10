"""LLaDA 1.5: VRPO on LLaDA-8B-Instruct, the paper's recipe (docs/method.md, "Recipes").

  --config=llada_8b_vrpo:v5p     FSDP over every chip of a v5p slice (the default)
  --config=llada_8b_vrpo:h100x8  8-GPU nodes: FSDP over all GPUs of all nodes

Recipe: policy and frozen reference both LLaDA-8B-Instruct; 350K preference pairs, 1 epoch, global
batch 64 pairs; AdamW (weight decay 0.01, betas 0.9/0.95), lr 5e-7 after 15 warmup steps, cosine
decay; beta 0.2; budget n = 8 spent as n_t = 8 timesteps x 1 mask, antithetic sampling, the l/L
estimator; plus 0.05 x the SFT loss on the chosen responses.

Rows: as in the paper, several pairs are packed into each 4096-token row (`data.packing`): the chosen
answers of a row's pairs in one row, their rejected answers in the matching row and slots, each
attending only within its own segment. `data.global_batch_size` counts such row pairs (64), so a
step holds at least 64 pairs; `data/examples_per_row` in the metrics gives the pairs per row of
your data, and total_steps = ceil(pairs / (64 x pairs per row)) is one epoch (the recipe keeps the
paper's 5,469 steps). Pairs longer than a row are skipped and counted. Each pair runs 2 x 8 noised
copies; `vrpo.copy_chunks` runs them in groups, so a step holds the activations of one group
(`python -m llada_jax.plan`, docs/scale-out.md).
Set `data.train_files`, `data.tokenizer`, `checkpoint.init_from` (the Instruct weights; also the
reference) and `workdir` on the command line.
"""

import math

from llada_jax import optim
from llada_jax.configs import base, llada_8b_sft as sft

VRPO_PAIRS, VRPO_EPOCHS, VRPO_BATCH = 350_000, 1, 64


def get_config(variant: str = "v5p"):
  c = base.base_config()
  sft.apply_platform(c, variant, "llada_8b_vrpo")
  if variant == "h100x8":
    # 2 x 8 noised copies per pair leave no room for a node's share of the weights (fsdp=8 needs
    # about 87 GB a GPU): FSDP over all GPUs instead, its all-gathers spread over a long step.
    c.mesh.data, c.mesh.fsdp = 1, -1
  c.objective = "vrpo"
  c.total_steps = math.ceil(VRPO_PAIRS * VRPO_EPOCHS / VRPO_BATCH)  # 5,469
  c.data.seq_len = 4096
  c.data.packing = True
  c.data.max_segments = 16
  c.data.global_batch_size = VRPO_BATCH
  # Packed rows per epoch are known only once packed, and differ between hosts: the data repeats and
  # total_steps ends the run.
  c.data.num_epochs = -1
  c.data.chat_template = True
  c.data.on_too_long = "skip"
  c.vrpo.beta = 0.2
  c.vrpo.n_timesteps = 8
  c.vrpo.masks_per_timestep = 1
  c.vrpo.antithetic = True
  c.vrpo.estimator = "l_over_L"
  c.vrpo.sft_weight = 0.05
  c.vrpo.copy_chunks = 4  # 2 of the 16 copies of each row pair at a time
  c.optimizer = optim.default_optimizer_config("vrpo")  # cosine, lr 5e-7, warmup 15, wd 0.01, betas 0.9/0.95
  c.optimizer.total_steps = c.get_ref("total_steps")
  c.checkpoint.every_steps = 250
  c.checkpoint.max_to_keep = 3
  c.logging.every_steps = 5
  c.logging.progress_bar = False
  return c
