"""Demo stage 2: supervised fine-tuning on worked solutions, from the pretrained weights."""

import pathlib

from llada_jax import config_lib

common = config_lib.load_config_module(pathlib.Path(__file__).with_name("demo_common.py"))


def get_config():
  c = common.base("sft", total_steps=600)
  c.data.global_batch_size = 32
  c.optimizer.schedule = "sft"
  c.optimizer.lr = 5e-4
  c.optimizer.warmup_steps = 20
  c.optimizer.final_lr = 5e-5
  c.optimizer.weight_decay = 0.1
  return c
