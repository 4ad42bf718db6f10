"""The `elbo` section: likelihood scoring (`llada_jax.eval.likelihood`) of random sequences at each
size, dtype and mc_num: sequences/s, achieved FLOP/s and MFU."""

from __future__ import annotations

import functools
import types

import jax
import numpy as np
from absl import flags

from llada_jax import metrics as metrics_lib
from llada_jax import model as model_lib
from llada_jax.bench import ceiling, core, sizes, timing

core.define_list("mc_num", [32], "Monte Carlo samples per sequence (comma-separated; the reference evaluation "
                 "uses 128)", item=int)
flags.DEFINE_integer("elbo_batch_size", 16, "rows of one stratified round", flag_values=core.FLAGS)
flags.DEFINE_integer("elbo_sequences", 0, "sequences scored per call (0: the size's batch size)",
                     flag_values=core.FLAGS)


def _check_elbo(args: types.SimpleNamespace) -> None:
  from llada_jax.eval import likelihood  # noqa: PLC0415

  if not args.mc_num or min(args.mc_num) < 1 or args.elbo_sequences < 0:
    raise ValueError(f"--mc_num={args.mc_num}, --elbo_sequences={args.elbo_sequences}: expected positive integers")
  for mc_num in args.mc_num:
    likelihood.check_budget(mc_num, args.elbo_batch_size)
  sizes.check_sizes(args)


@core.register("elbo", check=_check_elbo, columns=(
    core.Column("size", "size"),
    core.Column("dtype", "dtype"),
    core.Column("mc_num", "mc_num"),
    core.Column("seqs", "sequences"),
    core.Column("length", "padded_length"),
    core.Column("seqs/s", "sequences_per_s", "{:.2f}"),
    core.Column("s/call", "median_s", "{:.3f}"),
    core.Column("iqr s", "iqr_s", "{:.3f}"),
    core.Column("GFLOP/s", "achieved_gflops_per_s", "{:.1f}"),
    core.Column("MFU", "mfu", "{:.1%}"),
    core.Column("MFU peak", "mfu_datasheet", "{:.1%}"),
))
def bench_elbo(ctx: core.Context) -> list[core.Result]:
  """ELBO scoring (llada_jax.eval.likelihood.score_answers) of random sequences: prompt a quarter of
  the size's sequence length, answer the rest; sequences/s at each mc_num."""
  from llada_jax.eval import likelihood  # noqa: PLC0415

  args = ctx.args
  _check_elbo(args)
  results = []
  for size_name in args.size:
    size = sizes.SIZES[size_name]
    count = args.elbo_sequences or size.batch_size
    prompt_len = max(1, size.seq_len // 4)
    for dtype in args.dtype:
      cfg = sizes.size_model_config(ctx, size_name, dtype)
      params = core.init_params(cfg, args.seed)
      rng = np.random.default_rng(args.seed)
      tokens = core.random_tokens(rng, cfg, (count, size.seq_len))
      prompts, answers = [list(t[:prompt_len]) for t in tokens], [list(t[prompt_len:]) for t in tokens]
      logits_fn = model_lib.logits_fn(cfg)
      padded = likelihood.bucket_length(size.seq_len)
      for mc_num in args.mc_num:
        call = functools.partial(likelihood.score_answers, params, cfg, prompts, answers, jax.random.key(args.seed),
                                 mc_num=mc_num, batch_size=args.elbo_batch_size, logits_fn=logits_fn)
        times, warm, scores = timing.time_calls(call, repeats=args.repeats, warmup=args.warmup)
        settings = {"size": size_name, "dtype": dtype, "mc_num": mc_num, "sequences": count,
                    "seq_len": size.seq_len, "padded_length": padded, "prompt_length": prompt_len,
                    "batch_size": args.elbo_batch_size, "num_params": cfg.num_params()}
        result = core.Result("elbo", f"{size_name}/{dtype}/mc{mc_num}", settings, times, warm)
        forward_tokens = count * mc_num * padded
        flops = metrics_lib.forward_flops_per_token(cfg, padded) * forward_tokens
        result.metrics = {"sequences_per_s": count / result.median_s,
                          "forward_tokens_per_s": forward_tokens / result.median_s,
                          **ceiling.rates(flops, result.median_s, ctx.ceilings.flops_per_s(dtype), dtype),
                          "mean_elbo": float(np.mean(scores))}
        results.append(result)
  return results
