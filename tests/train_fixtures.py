"""Small data sets, a tokenizer and configs for the training-system tests."""

import json
import pathlib
import random

from llada_jax import configs
from llada_jax.data import tokenizer as tok_lib

WORDS = ("the cat dog sat ran on a mat hat red blue big small one two three four five six seven eight nine "
         "ten plus minus is what answer yes no").split()


def _sentence(rng, n):
  return " ".join(rng.choice(WORDS) for _ in range(n))


def write_corpus(root: pathlib.Path) -> dict:
  """Pretraining text, SFT and preference JSONL, and a sentencepiece model trained on them."""
  root.mkdir(parents=True, exist_ok=True)
  rng = random.Random(0)
  text = root / "pretrain.txt"
  text.write_text("\n\n".join(_sentence(rng, rng.randint(8, 40)) for _ in range(300)) + "\n")
  sft = root / "sft.jsonl"
  with sft.open("w") as f:
    for _ in range(64):
      a, b = rng.randint(0, 9), rng.randint(0, 9)
      f.write(json.dumps({"prompt": f"what is {a} plus {b}", "response": f"the answer is {a + b}"}) + "\n")
  pref = root / "pref.jsonl"
  with pref.open("w") as f:
    for _ in range(64):
      a, b = rng.randint(0, 9), rng.randint(0, 9)
      f.write(json.dumps({"prompt": f"what is {a} plus {b}", "chosen": f"the answer is {a + b}",
                          "rejected": f"the answer is {a + b + rng.randint(1, 3)}"}) + "\n")
  tokenizer = tok_lib.train_sentencepiece([text, sft], root / "tok", vocab_size=320)
  return {"pretrain": str(text), "sft": str(sft), "vrpo": str(pref), "naive_dpo": str(pref),
          "tokenizer": str(root / "tok.model"), "vocab_size": tokenizer.vocab_size}


def make_config(corpus: dict, workdir, objective="pretrain", **overrides):
  c = configs.base_config()
  c.workdir = str(workdir)
  c.objective = objective
  c.seed = 0
  c.model.vocab_size = -(-corpus["vocab_size"] // 8) * 8  # divisible by the tensor axis
  c.model.mask_token_id, c.model.eos_token_id, c.model.bos_token_id = 3, 2, 1
  c.data.train_files = (corpus[objective],)
  c.data.tokenizer = corpus["tokenizer"]
  c.data.seq_len = 48
  c.data.global_batch_size = 8
  c.total_steps = 6
  c.checkpoint.every_steps = 3
  c.checkpoint.async_save = False
  c.logging.every_steps = 2
  c.logging.progress_bar = False
  c.optimizer.schedule = "constant"
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 2
  c.vrpo.n_timesteps = 2
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def train_tiny_sft_run(root: pathlib.Path):
  """A 2-step SFT run under root/run (with its corpus and tokenizer): a checkpoint for CLI tests."""
  from llada_jax.training import loop  # noqa: PLC0415 - only tests that need a checkpoint pay for it

  corpus = write_corpus(root / "corpus")
  config = make_config(corpus, root / "run", "sft", total_steps=2)
  config.checkpoint.every_steps = 2
  loop.run(config)
  return root / "run", corpus
