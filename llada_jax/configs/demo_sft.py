"""Demo stage 2: supervised fine-tuning on worked solutions, from the pretrained weights."""

from llada_jax.configs import demo_common as common


def get_config():
  # Copying the prompt's numbers into the working is learnt only after ~1200 steps (greedy test
  # accuracy 0.23 at 600, 0.36 at 1200, 0.58 at 1800 with 600 pretraining steps): most of the budget goes here.
  c = common.base("sft", total_steps=1800)
  c.data.global_batch_size = 32
  c.optimizer.schedule = "sft"
  c.optimizer.lr = 5e-4
  c.optimizer.warmup_steps = 20
  c.optimizer.final_lr = 5e-5
  c.optimizer.weight_decay = 0.1
  return c
