"""LLaDA-8B supervised fine-tuning, the paper's recipe (docs/method.md, "Recipes"), on TPU pods or GPU nodes.

  --config=llada_8b_sft:v5p     FSDP over every chip of a v5p slice (the default)
  --config=llada_8b_sft:h100x8  8-GPU nodes: FSDP within a node, data parallel across nodes

Recipe: global batch 256, AdamW (weight decay 0.1), lr 2.5e-5 after 50 warmup steps, constant,
then linear to 2.5e-6 over the last 10% of steps; 3 epochs. `total_steps` is the paper's 4.5M
pairs x 3 epochs / 256; for another data set set it to ceil(pairs x 3 / (256 x examples per row)).
Rows of 4096 tokens (LLaDA's pretraining length) packed with several examples each (`data.packing`):
each example attends only within its own segment, its answer ends with one EOS, and the loss
averages over examples (docs/method.md, "Packed rows"). `data.global_batch_size` counts rows, so a
step holds at least 256 examples; `data/examples_per_row` in the metrics gives the rate of your
data. bfloat16 compute on float32 weights, full rematerialisation, scanned layers. Set `data.train_files`, `data.tokenizer` (the LLaDA tokenizer.json), `checkpoint.init_from`
(converted LLaDA-8B-Base weights) and `workdir` (gs:// works) on the command line; see launch/README.md.
"""

import math

from llada_jax import optim
from llada_jax.configs import base, models

VARIANTS = ("v5p", "h100x8")

# LLaDA SFT: 4.5M pairs, 3 epochs, global batch 256.
SFT_PAIRS, SFT_EPOCHS, SFT_BATCH = 4_500_000, 3, 256


def apply_platform(c, variant: str, config_file: str):
  """Model numerics and the mesh for a platform variant; shared with llada_8b_vrpo."""
  if variant not in VARIANTS:
    raise ValueError(f"{config_file}: variant {variant!r}; expected one of {VARIANTS}")
  c.model = models.get_config("llada_8b")
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"  # float32 master weights and Adam moments
  c.model.remat = "full"
  c.model.scan_layers = True
  c.model.attention_impl = "xla"
  if variant == "v5p":
    # One slice: every chip on `fsdp` (ICI all-gathers are cheap). Multi-slice: add
    # --config.mesh.dcn_data=<slices>; the other axes then describe one slice.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.dcn_data = 1, -1, 1, 1
  else:
    # One process per GPU, 8 per node, numbered node by node: the inner `fsdp` axis of 8 stays on
    # NVLink, `data` crosses nodes (gradients all-reduced once a step over InfiniBand).
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.dcn_data = -1, 8, 1, 1
  return c


def get_config(variant: str = "v5p"):
  c = base.base_config()
  apply_platform(c, variant, "llada_8b_sft")
  c.objective = "sft"
  c.total_steps = math.ceil(SFT_PAIRS * SFT_EPOCHS / SFT_BATCH)  # 52,735
  c.data.seq_len = 4096
  c.data.packing = True
  c.data.max_segments = 32
  c.data.global_batch_size = SFT_BATCH
  # Packed rows per epoch are known only once packed, and differ between hosts: the data repeats and
  # total_steps ends the run.
  c.data.num_epochs = -1
  c.data.chat_template = True
  c.data.on_too_long = "skip"  # a few over-long dialogues should not stop a 4.5M-pair run
  c.diffusion.prompt_drop_prob = 0.0
  c.optimizer = optim.default_optimizer_config("sft")  # lr 2.5e-5, warmup 50, final 2.5e-6, wd 0.1
  c.optimizer.total_steps = c.get_ref("total_steps")
  c.checkpoint.every_steps = 1000
  c.checkpoint.max_to_keep = 3
  c.logging.every_steps = 10
  c.logging.progress_bar = False
  return c
