"""The `lora` section: the SFT and VRPO training steps with LoRA adapters against full fine-tuning,
built as `llada_jax.train` builds them, on the same batch: step time, peak memory of the compiled
step, trainable parameters.

Variants per size, compute dtype and objective:

  full        every parameter trained (AdamW state for all of them); VRPO holds a reference copy
  lora        rank `--lora_rank` adapters on every projection, the float32 base frozen and passed to
              the step; VRPO's reference is that base with the adapters off (no second model)
  lora_bf16   the same with the frozen base stored in bfloat16 (`model.lora_base_dtype`)

The variants of one objective are compiled first, then timed in turn, one call of each per round, so
their ratios hold when the machine's load changes during the run. Peak memory is the compiled
step's arguments + outputs - donated aliases + temporaries (`compile_step`), which is what a device
must hold: on CPU it is XLA's plan, not a measurement of the process.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import jax
from absl import flags

from llada_jax import model as model_lib
from llada_jax.bench import core, sizes, timing, train_step

OBJECTIVES = ("sft", "vrpo")
VARIANTS = ("full", "lora", "lora_bf16")

core.define_list("lora_objectives", OBJECTIVES, "comma-separated among sft,vrpo", choices=OBJECTIVES)
core.define_list("lora_variants", VARIANTS, f"comma-separated among {','.join(VARIANTS)}", choices=VARIANTS)
flags.DEFINE_integer("lora_rank", 16, "adapter rank of the lora section (alpha = 2 x rank)", flag_values=core.FLAGS)
flags.DEFINE_integer("lora_vrpo_n", 8, "VRPO budget n = n_t (n_yt = 1) of the lora section", flag_values=core.FLAGS)


def _check_lora(args: types.SimpleNamespace) -> None:
  if not args.lora_objectives or any(o not in OBJECTIVES for o in args.lora_objectives):
    raise ValueError(f"--lora_objectives={','.join(args.lora_objectives)}: expected a subset of sft,vrpo")
  if not args.lora_variants or any(v not in VARIANTS for v in args.lora_variants):
    raise ValueError(f"--lora_variants={','.join(args.lora_variants)}: expected a subset of {','.join(VARIANTS)}")
  if args.lora_rank < 1 or args.lora_vrpo_n < 1:
    raise ValueError(f"--lora_rank={args.lora_rank}, --lora_vrpo_n={args.lora_vrpo_n}: expected positive integers")
  train_step.check_micro_batching(args)
  sizes.check_sizes(args)
  for size_name in args.size:
    for objective in args.lora_objectives:
      train_step.micro_batches(args, objective, size_name, args.lora_vrpo_n)


def variant_config(cfg: model_lib.ModelConfig, variant: str, rank: int) -> model_lib.ModelConfig:
  """The model of one variant: `cfg` itself (full), or with rank-`rank` adapters (alpha 2 rank)."""
  if variant == "full":
    return cfg
  return dataclasses.replace(cfg, lora_rank=rank, lora_alpha=2.0 * rank,
                             lora_base_dtype="bfloat16" if variant == "lora_bf16" else "")


def _frozen(program, seed: int, params):
  """The step's frozen argument: the LoRA base, the VRPO reference (near the policy), or None."""
  from llada_jax.training import state as state_lib  # noqa: PLC0415

  if program.model_cfg.lora_rank:
    return state_lib.random_base(program.model_cfg, seed, program.mesh, program.rules)
  if program.objective.needs_reference:
    return jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x * 0.99, p),
                   out_shardings=program.state_shardings.params)(params)
  return None


def _count(tree) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(tree))


def _prepare(ctx: core.Context, size_name: str, cfg: model_lib.ModelConfig, objective: str, variant: str):
  """(name, settings, call, compile seconds, peak bytes) of one variant's step, compiled apart."""
  from llada_jax import sharding  # noqa: PLC0415
  from llada_jax.training import build as build_lib  # noqa: PLC0415

  args, size = ctx.args, sizes.SIZES[size_name]
  n = args.lora_vrpo_n if objective == "vrpo" else 1
  accum = train_step.micro_batches(args, objective, size_name, n)
  step_cfg = variant_config(cfg, variant, args.lora_rank)
  program = build_lib.build(train_step.train_config(objective, step_cfg, size, args, n, False, accum))
  state = program.create_state(jax.random.key(args.seed))
  frozen = _frozen(program, args.seed, state.params)
  root_key = jax.random.key(args.seed)
  batch = sharding.global_batch(train_step.train_batch(objective, cfg, size, args.seed), program.batch_sharding)
  compiled, compile_s, memory = train_step.compile_step(program.step, state, batch, root_key, frozen)
  holder = [state]

  def call():
    holder[0], step_metrics = compiled(holder[0], batch, root_key, frozen)  # the state is donated
    return step_metrics

  settings = {"size": size_name, "dtype": cfg.dtype, "objective": objective, "variant": variant,
              "n": n if objective == "vrpo" else None, "rank": step_cfg.lora_rank or None,
              "base_dtype": step_cfg.lora_base_dtype or step_cfg.param_dtype, "seq_len": size.seq_len,
              "batch_size": size.batch_size, "grad_accum_steps": accum, "num_params": cfg.num_params(),
              "trainable_params": _count(state.params), "frozen_params": _count(frozen) if frozen else 0}
  name = f"{size_name}/{cfg.dtype}/{objective}" + (f"/n{n}" if objective == "vrpo" else "") + f"/{variant}"
  return name, settings, call, compile_s, memory


def _bench_objective(ctx: core.Context, size_name: str, cfg: model_lib.ModelConfig, objective: str
                     ) -> list[core.Result]:
  args, size = ctx.args, sizes.SIZES[size_name]
  prepared = []
  for variant in args.lora_variants:
    prepared.append(_prepare(ctx, size_name, cfg, objective, variant))
    print(f"lora {prepared[-1][0]}: compiled in {prepared[-1][3]:.1f} s", flush=True)
  timed = timing.time_interleaved([p[2] for p in prepared], repeats=args.repeats, warmup=args.warmup)
  rows = size.batch_size * (2 if objective == "vrpo" else 1)
  results = []
  for (name, settings, _, compile_s, memory), (times, warm, step_metrics) in zip(prepared, timed):
    result = core.Result("lora", name, settings, times, warm)
    result.metrics = {"tokens_per_s": rows * size.seq_len / result.median_s, "compile_s": compile_s,
                      "peak_gb": None if memory is None else memory / 1e9, "loss": float(step_metrics["loss"])}
    results.append(result)
  full = next((r for r in results if r.settings["variant"] == "full"), None)
  for result in results:
    if full is not None:
      result.metrics["time_vs_full"] = result.median_s / full.median_s
      if result.metrics["peak_gb"] and full.metrics["peak_gb"]:
        result.metrics["memory_vs_full"] = result.metrics["peak_gb"] / full.metrics["peak_gb"]
    print(f"lora {result.name}: {result.median_s:.3f} s/step, peak {result.metrics['peak_gb']} GB", flush=True)
  return results


@core.register("lora", check=_check_lora, columns=(
    core.Column("size", "size"),
    core.Column("dtype", "dtype"),
    core.Column("objective", "objective"),
    core.Column("n", "n"),
    core.Column("variant", "variant"),
    core.Column("base", "base_dtype"),
    core.Column("trainable", "trainable_params", "{:,}"),
    core.Column("accum", "grad_accum_steps"),
    core.Column("s/step", "median_s", "{:.3f}"),
    core.Column("iqr s", "iqr_s", "{:.3f}"),
    core.Column("tokens/s", "tokens_per_s", "{:.1f}"),
    core.Column("time vs full", "time_vs_full", "{:.2f}x"),
    core.Column("peak GB", "peak_gb", "{:.3f}"),
    core.Column("memory vs full", "memory_vs_full", "{:.2f}x"),
    core.Column("compile s", "compile_s", "{:.1f}"),
))
def bench_lora(ctx: core.Context) -> list[core.Result]:
  """LoRA SFT and VRPO steps against full fine-tuning, per size and compute dtype."""
  args = ctx.args
  _check_lora(args)
  results: list[Any] = []
  for size_name in args.size:
    for dtype in args.dtype:
      cfg = sizes.size_model_config(ctx, size_name, dtype)
      for objective in args.lora_objectives:
        results += _bench_objective(ctx, size_name, cfg, objective)
  return results
