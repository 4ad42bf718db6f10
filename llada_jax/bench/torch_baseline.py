"""The `torch_baseline` section: the JAX pretraining step beside the same step written in plain
PyTorch (`llada_jax.bench.torch_model`), in one process, on the same batch and the same initial
weights: tokens/s of each, JAX/PyTorch, and MFU of both against the `ceiling` section's XLA matmul.
Beside each row, the n x n x n matmul (`--matmul_size`) of its own framework: how much of a gap is
the matrix library's.

The JAX step is built as `llada_jax.train` builds it (the masked diffusion loss, clipping at the
recipe's grad_clip, AdamW; a constant learning rate for both). PyTorch runs eagerly (no
torch.compile) with its AdamW (the fused CPU kernel where it has one) and
`torch.set_num_threads(os.cpu_count())`. Neither cuts the batch to a random length
(diffusion.random_length_prob = 0), so both do the same work every step. The two steps are timed in
turn, one call of each per round, so their ratio holds when the machine's load changes during the
run.

Opt-in (`--only torch_baseline`): it needs the `torch` extra.
"""

from __future__ import annotations

import importlib.util
import os
import types
from typing import Any

import jax
import numpy as np

from llada_jax import model as model_lib
from llada_jax.bench import ceiling, core, sizes, timing, train_step


def _check(args: types.SimpleNamespace) -> None:
  if importlib.util.find_spec("torch") is None:
    raise ValueError("the torch_baseline section needs PyTorch: pip install 'llada_jax[torch]'")
  train_step.check_micro_batching(args)
  sizes.check_sizes(args)
  for size_name in args.size:
    train_step.micro_batches(args, "pretrain", size_name, 1)


def _jax_step(ctx: core.Context, size_name: str, cfg: model_lib.ModelConfig, accum: int):
  """(call, compile seconds, initial params as NumPy, optimizer config, diffusion eps, objective) of the
  JAX step."""
  from llada_jax import sharding  # noqa: PLC0415
  from llada_jax.training import build as build_lib  # noqa: PLC0415

  args, size = ctx.args, sizes.SIZES[size_name]
  config = train_step.train_config("pretrain", cfg, size, args, 1, False, accum)
  config.diffusion.random_length_prob = 0.0  # the PyTorch step never cuts the batch either
  # The recipe's warmup would hold the learning rate near 0 for these few steps: a constant one, as
  # PyTorch's, lets the two losses be compared (the schedule adds no work).
  config.optimizer.schedule, config.optimizer.warmup_steps = "constant", 0
  program = build_lib.build(config)
  state = program.create_state(jax.random.key(args.seed))
  params = jax.tree_util.tree_map(np.array, state.params)  # copied before the step donates them
  batch = sharding.global_batch(train_step.train_batch("pretrain", cfg, size, args.seed), program.batch_sharding)
  root_key = jax.random.key(args.seed)
  compiled, compile_s, _ = train_step.compile_step(program.step, state, batch, root_key, None)
  holder = [state]

  def call():
    holder[0], step_metrics = compiled(holder[0], batch, root_key, None)  # the state is donated
    return step_metrics

  return call, compile_s, params, dict(config.optimizer), config.diffusion.eps, program.objective


def _torch_step(ctx: core.Context, size_name: str, cfg: model_lib.ModelConfig, accum: int, params,
                opt_cfg: dict[str, Any], eps: float):
  """(call, AdamW implementation) of the PyTorch step from the JAX step's initial weights and batch."""
  import torch  # noqa: PLC0415 - the optional extra

  from llada_jax.bench import torch_model  # noqa: PLC0415

  args, size = ctx.args, sizes.SIZES[size_name]
  module = torch_model.LLaDA(cfg)
  module.load_state_dict(torch_model.state_dict_from_flax(cfg, params), strict=True)
  optimizer, impl = torch_model.adamw(module, opt_cfg)
  tokens = torch.from_numpy(train_step.train_batch("pretrain", cfg, size, args.seed)["tokens"]).long()
  generator = torch.Generator().manual_seed(args.seed)

  def call():
    return {"loss": torch_model.train_step(module, optimizer, tokens, mask_id=cfg.mask_token_id, eps=eps,
                                           grad_clip=opt_cfg["grad_clip"] or 0.0, micro_batches=accum,
                                           generator=generator)}

  return call, impl


def _torch_matmul_flops(dtype: str, n: int, repeats: int) -> float:
  """FLOP/s of torch's n x n x n matmul in `dtype`: beside the `ceiling` section's XLA matmul, it tells how
  much of a gap between the steps is the matrix library's."""
  import torch  # noqa: PLC0415

  from llada_jax.bench import torch_model  # noqa: PLC0415

  generator = torch.Generator().manual_seed(0)
  a, b = (torch.randn(n, n, generator=generator).to(torch_model.DTYPES[dtype]) for _ in range(2))
  times, _, _ = timing.time_calls(lambda: torch.mm(a, b), repeats=repeats, warmup=1)
  return 2 * n ** 3 / float(np.median(times))


def _bench_size(ctx: core.Context, size_name: str, dtype: str) -> list[core.Result]:
  import torch  # noqa: PLC0415

  args, size = ctx.args, sizes.SIZES[size_name]
  cfg = sizes.size_model_config(ctx, size_name, dtype)
  accum = train_step.micro_batches(args, "pretrain", size_name, 1)
  jax_call, compile_s, params, opt_cfg, eps, objective = _jax_step(ctx, size_name, cfg, accum)
  torch_call, impl = _torch_step(ctx, size_name, cfg, accum, params, opt_cfg, eps)
  print(f"torch_baseline {size_name}/{dtype}: JAX step compiled in {compile_s:.1f} s", flush=True)
  timed = timing.time_interleaved([jax_call, torch_call], repeats=args.repeats, warmup=args.warmup)
  flops, _ = train_step._step_flops(objective, cfg, size)  # noqa: SLF001 - the same count train_step reports
  ceiling_flops = ctx.ceilings.flops_per_s(dtype)
  matmul = {"jax": ceiling_flops, "torch": _torch_matmul_flops(dtype, args.matmul_size, args.repeats)}
  common = {"size": size_name, "dtype": dtype, "objective": "pretrain", "seq_len": size.seq_len,
            "batch_size": size.batch_size, "num_params": cfg.num_params(), "grad_accum_steps": accum,
            "torch_version": torch.__version__, "torch_threads": torch.get_num_threads()}
  results = []
  for framework, extra, (times, warm, step_metrics) in (("jax", {"compile_s": compile_s}, timed[0]),
                                                         ("torch", {}, timed[1])):
    settings = {**common, "framework": framework, "adamw": impl if framework == "torch" else "optax"}
    result = core.Result("torch_baseline", f"{size_name}/{dtype}/pretrain/{framework}", settings, times, warm)
    result.metrics = {"tokens_per_s": size.batch_size * size.seq_len / result.median_s,
                      **ceiling.rates(flops, result.median_s, ceiling_flops, dtype),
                      "matmul_gflops_per_s": matmul[framework] / 1e9, "loss": float(step_metrics["loss"]), **extra}
    results.append(result)
  ratio = results[0].metrics["tokens_per_s"] / results[1].metrics["tokens_per_s"]
  for result in results:
    result.metrics["jax_vs_torch"] = ratio
  print(f"torch_baseline {size_name}/{dtype}: JAX {results[0].metrics['tokens_per_s']:.0f} tokens/s, PyTorch "
        f"{results[1].metrics['tokens_per_s']:.0f} tokens/s, JAX/PyTorch {ratio:.2f}x", flush=True)
  return results


@core.register("torch_baseline", check=_check, columns=(
    core.Column("size", "size"),
    core.Column("dtype", "dtype"),
    core.Column("framework", "framework"),
    core.Column("adamw", "adamw"),
    core.Column("accum", "grad_accum_steps"),
    core.Column("tokens/s", "tokens_per_s", "{:.1f}"),
    core.Column("s/step", "median_s", "{:.3f}"),
    core.Column("iqr s", "iqr_s", "{:.3f}"),
    core.Column("MFU", "mfu", "{:.1%}"),
    core.Column("matmul GFLOP/s", "matmul_gflops_per_s", "{:.1f}"),
    core.Column("JAX/PyTorch", "jax_vs_torch", "{:.2f}x"),
    core.Column("loss", "loss", "{:.3f}"),
    core.Column("threads", "torch_threads"),
    core.Column("compile s", "compile_s", "{:.1f}"),
))
def bench_torch_baseline(ctx: core.Context) -> list[core.Result]:
  """The JAX pretraining step beside the same step in PyTorch, per size and compute dtype."""
  import torch  # noqa: PLC0415

  _check(ctx.args)
  # Every core, as XLA's CPU backend uses them (torch's default can be fewer in a container).
  torch.set_num_threads(os.cpu_count() or 1)
  results: list[core.Result] = []
  for size_name in ctx.args.size:
    for dtype in ctx.args.dtype:
      results += _bench_size(ctx, size_name, dtype)
  return results
