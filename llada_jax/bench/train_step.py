"""The `train_step` section: the training step exactly as `llada_jax.train` builds it
(`llada_jax.training.build.build`, sharded on the default devices, state donated) for pretrain, SFT
and VRPO at each n, the VRPO reference online or precomputed: tokens/s, achieved FLOP/s (the analytic
count of `llada_jax.training.objectives.step_flops`), MFU against the measured ceiling of the same
dtype (also as `MFU 6N`, counting the embedding like the reference PyTorch figures do), peak memory
of the compiled step."""

from __future__ import annotations

import dataclasses
import time
import types
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags

from llada_jax import configs
from llada_jax import model as model_lib
from llada_jax import optim
from llada_jax.bench import ceiling, core, sizes, timing

# Compiler options of the timed train steps; the tests lower them for speed.
COMPILER_OPTIONS: dict[str, Any] | None = None

OBJECTIVES = ("pretrain", "sft", "vrpo")
REFERENCES = ("online", "precomputed")

core.define_list("objectives", OBJECTIVES, "comma-separated among pretrain,sft,vrpo")
core.define_list("vrpo_n", [1, 4, 8], "VRPO budgets n = n_t (n_yt = 1)", item=int)
core.define_list("reference", REFERENCES,
                 "VRPO reference ELBOs: online (the step runs the reference) and/or precomputed (in the batch)")
flags.DEFINE_float("sft_weight", 0.0, "VRPO's SFT term (the paper's recipe: 0.05)", flag_values=core.FLAGS)
flags.DEFINE_integer("grad_accum_steps", 0,
                     "micro-batches per step (0: the fewest that keep each within --max_micro_batch_tokens)",
                     flag_values=core.FLAGS)
flags.DEFINE_integer("max_micro_batch_tokens", 8192,
                     "tokens through the policy per micro-batch when --grad_accum_steps=0 (VRPO at n = 8 on the "
                     "ref35m size needs 22 GB in one piece)", flag_values=core.FLAGS)


def grad_accum_steps(args, objective: str, size: sizes.Size, n: int, shards: int) -> int:
  """`--grad_accum_steps`, or the fewest micro-batches (dividing the batch evenly over the batch
  shards) whose policy tokens stay within `--max_micro_batch_tokens`."""
  if args.grad_accum_steps:
    return args.grad_accum_steps
  copies = 2 * n if objective == "vrpo" else 1
  b = size.batch_size
  fitting = [a for a in range(1, b + 1) if b % a == 0 and (b // a) % shards == 0]
  for a in fitting:
    if copies * (b // a) * size.seq_len <= args.max_micro_batch_tokens:
      return a
  return fitting[-1] if fitting else 1


def train_config(objective: str, cfg: model_lib.ModelConfig, size: sizes.Size, args, n: int, precomputed: bool,
                  accum: int = 1):
  config = configs.base_config()
  config.workdir = "unused-by-bench"  # nothing is written; validation wants one
  config.objective = objective
  config.model = ml_collections.ConfigDict(dataclasses.asdict(cfg))
  config.data.seq_len, config.data.global_batch_size = size.seq_len, size.batch_size
  config.grad_accum_steps = accum
  config.optimizer = optim.default_optimizer_config(objective)
  config.vrpo.n_timesteps, config.vrpo.masks_per_timestep = n, 1
  config.vrpo.sft_weight = args.sft_weight
  config.vrpo.precompute_reference = precomputed
  return config


def train_batch(objective: str, cfg: model_lib.ModelConfig, size: sizes.Size, seed: int) -> dict[str, np.ndarray]:
  """A random batch as the pipelines shape it: prompts of a quarter of the row, answers to the end or less."""
  rng = np.random.default_rng(seed)
  b, l = size.batch_size, size.seq_len
  if objective == "pretrain":
    return {"tokens": core.random_tokens(rng, cfg, (b, l))}
  prompt_lengths = np.full((b,), max(1, l // 4), np.int32)
  ids = np.arange(b, dtype=np.int32)
  if objective == "sft":
    return {"tokens": core.random_tokens(rng, cfg, (b, l)), "prompt_lengths": prompt_lengths, "example_id": ids}
  return {"chosen": core.random_tokens(rng, cfg, (b, l)), "rejected": core.random_tokens(rng, cfg, (b, l)),
          "prompt_lengths": prompt_lengths, "chosen_lengths": rng.integers(l // 2, l + 1, (b,)).astype(np.int32),
          "rejected_lengths": rng.integers(l // 2, l + 1, (b,)).astype(np.int32), "example_id": ids}


def _step_flops(objective, cfg: model_lib.ModelConfig, size: sizes.Size,
                count_embedding: bool = False) -> tuple[int, int]:
  """(analytic FLOPs, tokens through the policy) of one step, as training counts them."""
  from llada_jax.training import objectives  # noqa: PLC0415

  b, l = size.batch_size, size.seq_len
  flops = objectives.step_flops(objective, cfg, batch_size=b, seq_len=l, count_embedding=count_embedding)
  v = objective.vrpo_config
  if v is None:
    return flops, b * l
  return flops, 2 * v.n_timesteps * v.masks_per_timestep * b * l + (b * l if v.sft_weight > 0 else 0)


def _variants(args) -> list[tuple[str, int, str]]:
  """(objective, n, reference) of every timed step, in table order."""
  unknown = [o for o in args.objectives if o not in OBJECTIVES]
  if unknown or not args.objectives:
    raise ValueError(f"--objectives={','.join(args.objectives)}: expected a subset of pretrain,sft,vrpo")
  bad_ref = [r for r in args.reference if r not in REFERENCES]
  if bad_ref or not args.reference:
    raise ValueError(f"--reference={','.join(args.reference)}: expected a subset of online,precomputed")
  if "vrpo" in args.objectives and (not args.vrpo_n or min(args.vrpo_n) < 1):
    raise ValueError(f"--vrpo_n={args.vrpo_n}: expected positive integers")
  out = []
  for objective in args.objectives:
    if objective == "vrpo":
      out += [("vrpo", n, ref) for n in args.vrpo_n for ref in args.reference]
    else:
      out.append((objective, 1, "-"))
  return out


def compile_step(jitted, *example_args):
  start = time.perf_counter()
  compiled = jitted.lower(*example_args).compile(compiler_options=COMPILER_OPTIONS)
  seconds = time.perf_counter() - start
  memory = None
  try:
    stats = compiled.memory_analysis()
    if stats is not None:
      memory = int(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
                   + stats.temp_size_in_bytes)
  except (AttributeError, NotImplementedError):  # not every backend reports it
    pass
  return compiled, seconds, memory


def check_micro_batching(args: types.SimpleNamespace) -> None:
  """The micro-batching flags every section with training steps takes."""
  if args.grad_accum_steps < 0 or args.max_micro_batch_tokens < 1:
    raise ValueError(f"--grad_accum_steps={args.grad_accum_steps}, --max_micro_batch_tokens="
                     f"{args.max_micro_batch_tokens}: expected a count >= 0 (0: automatic) and a positive budget")


def _check_train_step(args: types.SimpleNamespace) -> None:
  _variants(args)
  check_micro_batching(args)
  sizes.check_sizes(args)


def time_steps(compiled, state, batch, root_key, reference_params, args):
  """(timed seconds, warm-up seconds, last metrics) of consecutive steps, each fed the last one's state."""
  holder = [state]

  def call():
    holder[0], step_metrics = compiled(holder[0], batch, root_key, reference_params)
    return holder[0], step_metrics

  times, warm, (_, step_metrics) = timing.time_calls(call, repeats=args.repeats, warmup=args.warmup)
  return times, warm, step_metrics


def micro_batches(args, objective_name: str, size_name: str, n: int) -> int:
  """Micro-batches of one step, checked to split the batch over the default mesh's batch shards."""
  from llada_jax import sharding  # noqa: PLC0415

  size = sizes.SIZES[size_name]
  base = configs.base_config()
  mesh = sharding.make_mesh(base.mesh)
  shards = sharding.batch_shards(sharding.batch_sharding(mesh, sharding.rules_from_config(base.sharding_rules)))
  accum = grad_accum_steps(args, objective_name, size, n, shards)
  if size.batch_size % accum or (size.batch_size // accum) % shards:
    raise ValueError(f"--size={size_name}: batch {size.batch_size} in {accum} micro-batches does not split "
                     f"over the {shards} batch shards of the default mesh")
  return accum


def _precompute_reference(program, accum: int, reference_params, local, root_key):
  """(the batch with the reference ELBOs in it, seconds the reference pass took)."""
  from llada_jax import sharding  # noqa: PLC0415
  from llada_jax.training import reference_elbo, step as step_lib  # noqa: PLC0415

  fn = jax.jit(step_lib.with_activation_rules(
      reference_elbo.reference_elbo_fn(program.objective.loss_fn, micro_batches=accum), program.mesh, program.rules))
  pair = sharding.global_batch({k: local[k] for k in reference_elbo.PAIR_KEYS}, program.batch_sharding)
  ref_times, _, (chosen, rejected) = timing.time_calls(lambda: fn(reference_params, pair, root_key, 0), repeats=1)
  local = {**local, reference_elbo.REFERENCE_CHOSEN: np.asarray(chosen),
           reference_elbo.REFERENCE_REJECTED: np.asarray(rejected)}
  return local, ref_times[0]


def _time_variant(ctx: core.Context, size_name: str, dtype: str, cfg: model_lib.ModelConfig, objective_name: str,
                  n: int, reference: str) -> core.Result:
  """One timed step: built as training builds it, compiled apart, then run `--repeats` times."""
  from llada_jax import sharding  # noqa: PLC0415
  from llada_jax.training import build as build_lib  # noqa: PLC0415

  args, size = ctx.args, sizes.SIZES[size_name]
  accum = micro_batches(args, objective_name, size_name, n)
  program = build_lib.build(train_config(objective_name, cfg, size, args, n, reference == "precomputed", accum))
  objective = program.objective
  state = program.create_state(jax.random.key(args.seed))
  local = train_batch(objective_name, cfg, size, args.seed)
  reference_params = None
  if objective.needs_reference or objective.reference_in_batch:
    # A reference near the policy, placed like it.
    reference_params = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x * 0.99, p),
                               out_shardings=program.state_shardings.params)(state.params)
  root_key = jax.random.key(args.seed)
  extra = {}
  if objective.reference_in_batch:
    local, extra["reference_precompute_s"] = _precompute_reference(program, accum, reference_params, local, root_key)
    reference_params = None  # the step never sees them
  batch = sharding.global_batch(local, program.batch_sharding)
  compiled, compile_s, memory = compile_step(program.step, state, batch, root_key, reference_params)
  times, warm, step_metrics = time_steps(compiled, state, batch, root_key, reference_params, args)
  state = reference_params = None  # donated, or no longer needed: free before the next variant
  settings = {"size": size_name, "dtype": dtype, "objective": objective_name, "n": n if objective_name == "vrpo"
              else None, "reference": None if reference == "-" else reference, "seq_len": size.seq_len,
              "batch_size": size.batch_size, "num_params": cfg.num_params(), "remat": cfg.remat,
              "scan_layers": cfg.scan_layers, "attention_impl": cfg.attention_impl,
              "grad_accum_steps": accum,
              "sft_weight": args.sft_weight if objective_name == "vrpo" else None}
  name = f"{size_name}/{dtype}/{objective_name}" + (f"/n{n}/{reference}" if objective_name == "vrpo" else "")
  result = core.Result("train_step", name, settings, times, warm)
  flops, model_tokens = _step_flops(objective, cfg, size)
  flops_6n, _ = _step_flops(objective, cfg, size, count_embedding=True)
  rows = size.batch_size * (2 if objective_name == "vrpo" else 1)
  ceiling_flops = ctx.ceilings.flops_per_s(dtype)
  result.metrics = {
      "tokens_per_s": rows * size.seq_len / result.median_s,
      "model_tokens_per_s": model_tokens / result.median_s,
      "steps_per_s": 1 / result.median_s,
      **ceiling.rates(flops, result.median_s, ceiling_flops, dtype),
      # The reference PyTorch figures' count (6 x all parameters): their MFU, like for like.
      "mfu_6n": ceiling.rates(flops_6n, result.median_s, ceiling_flops, dtype)["mfu"],
      "compile_s": compile_s,
      "peak_gb": None if memory is None else memory / 1e9,
      "loss": float(step_metrics["loss"]),
      **extra,
  }
  return result


@core.register("train_step", check=_check_train_step, columns=(
    core.Column("size", "size"),
    core.Column("dtype", "dtype"),
    core.Column("objective", "objective"),
    core.Column("n", "n"),
    core.Column("reference", "reference"),
    core.Column("accum", "grad_accum_steps"),
    core.Column("tokens/s", "tokens_per_s", "{:.1f}"),
    core.Column("model tok/s", "model_tokens_per_s", "{:.1f}"),
    core.Column("s/step", "median_s", "{:.3f}"),
    core.Column("iqr s", "iqr_s", "{:.3f}"),
    core.Column("GFLOP/s", "achieved_gflops_per_s", "{:.1f}"),
    core.Column("MFU", "mfu", "{:.1%}"),
    core.Column("MFU 6N", "mfu_6n", "{:.1%}"),
    core.Column("MFU peak", "mfu_datasheet", "{:.1%}"),
    core.Column("vs online", "step_time_vs_online", "{:.2f}x"),
    core.Column("ref s/step", "reference_precompute_s", "{:.3f}"),
    core.Column("peak GB", "peak_gb", "{:.2f}"),
    core.Column("compile s", "compile_s", "{:.1f}"),
))
def bench_train_step(ctx: core.Context) -> list[core.Result]:
  """The training step exactly as llada_jax.train builds it (sharded on the default devices, state
  donated), per size, compute dtype and objective; VRPO online and with precomputed reference ELBOs."""
  args = ctx.args
  _check_train_step(args)
  variants = _variants(args)
  results = []
  for size_name in args.size:
    for dtype in args.dtype:
      cfg = sizes.size_model_config(ctx, size_name, dtype)
      online_time = {}
      for objective_name, n, reference in variants:
        result = _time_variant(ctx, size_name, dtype, cfg, objective_name, n, reference)
        if objective_name == "vrpo":
          if reference == "online":
            online_time[n] = result.median_s
          result.metrics["step_time_vs_online"] = (result.median_s / online_time[n] if n in online_time else None)
        results.append(result)
        print(f"train_step {result.name}: {result.median_s:.3f} s/step, {result.metrics['mfu']:.1%} MFU", flush=True)
  return results
