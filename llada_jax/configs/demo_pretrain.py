"""Demo stage 1: pretrain the mask predictor on the task's running text (LLaDA's WSD schedule)."""

from llada_jax.configs import demo_common as common


def get_config():
  c = common.base("pretrain", total_steps=600)
  c.data.global_batch_size = 32
  c.optimizer.schedule = "wsd"
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 30
  c.optimizer.decay_start = 0.7
  c.optimizer.decay_lr = 3e-4
  c.optimizer.final_lr = 1e-4
  c.optimizer.weight_decay = 0.1
  return c
