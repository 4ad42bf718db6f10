"""The named sizes (`--size`) and compute dtypes (`--dtype`) that ceiling, train_step, packing, lora and elbo run at."""

from __future__ import annotations

import dataclasses
import types

from llada_jax import model as model_lib
from llada_jax.bench import core


@dataclasses.dataclass(frozen=True)
class Size:
  """A model (preset or alias) and the training shape it is timed at."""

  model: str
  seq_len: int
  batch_size: int  # rows (pretrain, SFT), pairs (VRPO), sequences scored (elbo)


SIZES = {
    "tiny": Size("tiny", 16, 8),  # tests
    "demo": Size("demo", 80, 32),  # the demo recipe's model and sequence length
    "ref35m": Size("reference", 256, 8),  # 35.7M parameters: the reference PyTorch training figures' size
    "1b": Size("llada_1b", 2048, 8),  # 1.34B parameters, 16k tokens a step: for accelerators
}
DTYPES = ("float32", "bfloat16")

core.define_list("size", ["demo", "ref35m"], f"comma-separated among {','.join(SIZES)}: " + "; ".join(
    f"{k} = {v.model} at seq {v.seq_len}, batch {v.batch_size}" for k, v in SIZES.items()), choices=tuple(SIZES))
core.define_list("dtype", DTYPES, "compute dtypes (parameters stay float32); also the ceiling section's",
                 choices=DTYPES)


def size_model_config(ctx: core.Context, size: str, dtype: str) -> model_lib.ModelConfig:
  """The size's model with the `--model.FIELD` overrides, computing in `dtype`."""
  return core.model_config_from_preset(SIZES[size].model, {**ctx.args.model_overrides, "dtype": dtype})


def check_sizes(args: types.SimpleNamespace) -> None:
  """Every size's model takes the `--model.FIELD` overrides."""
  for size in args.size:
    for dtype in args.dtype:
      core.model_config_from_preset(SIZES[size].model, {**args.model_overrides, "dtype": dtype})
