"""What the demo recipe's stages share: the model, the data shape and the logging.

The demo (`python -m llada_jax.demo`) fills in the data and tokenizer paths and the workdirs; run a
stage alone with `--config=demo_sft --config.workdir=... --config.data.train_files=... --config.data.tokenizer=...`.
"""

from llada_jax.configs import models
from llada_jax.configs.base import base_config

SEQ_LEN = 64  # the easy level: prompt <= 29 tokens + worked solution <= 24 tokens, then EOS


def base(objective: str, total_steps: int):
  c = base_config()
  c.objective = objective
  c.total_steps = total_steps
  c.model = models.get_config("demo")
  c.model.vocab_size = 1024  # the demo tokenizer has fewer pieces; ids must fit
  # bfloat16 matmuls (float32 parameters, accumulation, softmax, norms and logits): faster than float32
  # on CPUs with native bfloat16 dot products, and what accelerators run (docs/numerics.md).
  c.model.dtype = "bfloat16"
  c.data.seq_len = SEQ_LEN
  c.data.chat_template = False  # the task's prompts end with a newline; the answer follows
  c.data.on_too_long = "skip"
  c.diffusion.random_length_prob = 0.0
  c.checkpoint.every_steps = 50
  c.checkpoint.max_to_keep = 1
  c.logging.every_steps = 10
  c.mesh.data = -1
  return c
