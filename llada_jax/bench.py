"""Benchmarks: wall time and derived rates of the framework's hot paths, as a table and JSON.

  python -m llada_jax.bench [--only ceiling,train_step,elbo,sampling] [--size demo,ref35m] \\
      [--dtype float32,bfloat16] [--model PRESET | --checkpoint RUN_DIR] [--model.FIELD=VALUE ...] \\
      [--repeats 5] [--warmup 1] [--output bench.json]

Sections (`--only a,b`, run in that order; default: all, ceiling first) each time their own calls:

  ceiling     a large jitted matmul per compute dtype (float32 accumulation) and memory bandwidth:
              what MFU is measured against, in the same process.
  train_step  the training step exactly as llada_jax.train builds it (sharded on the default
              devices, state donated) for pretrain, SFT and VRPO at each n, the VRPO reference online
              or precomputed: tokens/s, achieved FLOP/s (llada_jax.metrics' analytic count), MFU
              against the measured ceiling of the same dtype (also as `MFU 6N`, counting the
              embedding like the reference PyTorch figures do), peak memory of the compiled step.
  elbo        likelihood scoring (llada_jax.eval.likelihood): sequences/s at each mc_num.
  sampling    every sampler variant (exact, prefix, dual, threshold, dual+threshold) at the given
              sizes: generated tokens/s, seconds per call, forward passes, speed-up vs exact; with a
              checkpoint and `--task_data`, also each variant's accuracy on the demo task.

train_step and elbo run at the named `--size`s (a model preset and the sequence length and batch
it is timed at) in each `--dtype`. sampling runs a trained run (`--checkpoint`) or a preset of
configs/models.py with random weights (`--model`, default `reference` = `ref35m`: the size of the
reference PyTorch figures, d_model 512, 8 layers, 8 heads, MLP 1536, vocab 8192). `--model.FIELD`
overrides apply to every model. Every timed call blocks on its output; the first `--warmup` calls
(compilation) are timed apart and excluded.

The JSON report: {"command", "argv", "created", "environment" (jax, backend, device_kind, ...),
"model" (source, num_params, config; sampling's), "ceilings" (matmul FLOP/s per dtype), "settings"
(every flag), "results": [{"section", "name", "settings", "timing" (median_s, min_s, max_s, iqr_s,
times_s, warmup_s), "metrics"}]}.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import functools
import os
import platform
import shlex
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llada_jax import cli, config_lib
from llada_jax import metrics as metrics_lib
from llada_jax import model as model_lib
from llada_jax import optim

PROG = "python -m llada_jax.bench"

# Not a preset of configs/models.py: the size at which the reference generate.py was timed.
_REFERENCE_SIZE = ("demo", dict(d_model=512, n_layers=8, n_heads=8, mlp_hidden_size=1536, vocab_size=8192))
MODEL_ALIASES = {"reference": _REFERENCE_SIZE, "ref35m": _REFERENCE_SIZE}


# --------------------------------------------------------------------------------------------
# Measurement.


@dataclasses.dataclass
class Result:
  """One measured configuration of a section: what ran, how long each timed call took, derived rates."""

  section: str
  name: str
  settings: dict[str, Any]
  times_s: list[float]
  warmup_s: list[float] = dataclasses.field(default_factory=list)  # compilation included
  metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def median_s(self) -> float:
    return float(np.median(self.times_s))

  def timing(self) -> dict[str, Any]:
    q1, q3 = np.percentile(self.times_s, [25, 75])
    return {"median_s": self.median_s, "min_s": float(min(self.times_s)), "max_s": float(max(self.times_s)),
            "iqr_s": float(q3 - q1), "times_s": list(self.times_s), "warmup_s": list(self.warmup_s)}

  def to_dict(self) -> dict[str, Any]:
    return {"section": self.section, "name": self.name, "settings": self.settings, "timing": self.timing(),
            "metrics": self.metrics}

  def flat(self) -> dict[str, Any]:
    """Settings, timing and metrics in one mapping, for the table."""
    return {**self.settings, **self.timing(), **self.metrics}


def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> tuple[list[float], list[float], Any]:
  """(timed seconds, warm-up seconds, last output) of `fn()`, each call blocked on until done.

  JAX dispatches asynchronously, so without the block a call would be timed as its dispatch only.
  """
  def once():
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out

  warm, out = [], None
  for _ in range(warmup):
    seconds, out = once()
    warm.append(seconds)
  times = []
  for _ in range(repeats):
    seconds, out = once()
    times.append(seconds)
  return times, warm, out


# --------------------------------------------------------------------------------------------
# The model under test.


@dataclasses.dataclass
class BenchModel:
  config: model_lib.ModelConfig
  params: Any
  source: str  # "checkpoint:DIR" or "random:PRESET"
  run_config: dict | None = None  # the training run's config, with a checkpoint

  def describe(self) -> dict[str, Any]:
    return {"source": self.source, "num_params": self.config.num_params(),
            "config": dataclasses.asdict(self.config)}


def parse_value(text: str) -> Any:
  """A Python literal (`512`, `1e-5`, `None`, `True`), else the string itself (`bfloat16`)."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_overrides(text: str | None) -> dict[str, Any]:
  """`d_model=512,n_layers=8` -> {"d_model": 512, "n_layers": 8}."""
  out = {}
  for item in filter(None, (s.strip() for s in (text or "").split(","))):
    field, sep, value = item.partition("=")
    if not sep or not field.strip():
      # argparse shows this message as is (a ValueError would become "invalid value").
      raise argparse.ArgumentTypeError(f"{item!r} is not FIELD=VALUE")
    out[field.strip()] = parse_value(value.strip())
  return out


def split_model_flags(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
  """Takes `--model.FIELD=VALUE` (or `--model.FIELD VALUE`) out of argv; argparse sees the rest."""
  rest, overrides, i = [], {}, 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--model."):
      field, sep, value = arg[len("--model."):].partition("=")
      if not sep:
        if i + 1 >= len(argv):
          raise ValueError(f"{arg}: expected a value")
        value, i = argv[i + 1], i + 1
      overrides[field] = parse_value(value)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def model_config_from_preset(name: str, overrides: Mapping[str, Any]) -> model_lib.ModelConfig:
  preset, alias_overrides = MODEL_ALIASES.get(name, (name, {}))
  values = {**config_lib.model_preset(preset).to_dict(), **alias_overrides, **overrides}
  return model_lib.ModelConfig.from_dict(values)


def load_bench_model(args: argparse.Namespace) -> BenchModel:
  if args.checkpoint:
    from llada_jax import checkpoint  # noqa: PLC0415 - Orbax only when a run is loaded

    # Only numerics (dtype, attention_impl, ...) can change: the weights fix the architecture.
    cfg, params, run_config = checkpoint.load_model(args.checkpoint, step=args.step,
                                                    overrides=args.model_overrides or None)
    return BenchModel(cfg, params, f"checkpoint:{args.checkpoint}", run_config)
  cfg = model_config_from_preset(args.model or "reference", args.model_overrides)
  # The initialiser takes seconds to compile with full CPU codegen even at the tiny size, and it
  # is not what is timed; unoptimised code still runs it in a fraction of that.
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  init = jax.jit(lambda key: model_lib.init_params(cfg, key), compiler_options=options)
  params = init(jax.random.key(args.seed))
  return BenchModel(cfg, params, f"random:{args.model or 'reference'}")


class Context:
  """What every section sees: the flags, and the model, loaded once on first use."""

  def __init__(self, args: argparse.Namespace):
    self.args = args

  @functools.cached_property
  def model(self) -> BenchModel:
    return load_bench_model(self.args)

  @functools.cached_property
  def ceilings(self) -> "Ceilings":
    return Ceilings(self)

  def loaded_model(self) -> BenchModel | None:
    """The model if a section asked for one (cached_property keeps it in the instance dict)."""
    return self.__dict__.get("model")


# --------------------------------------------------------------------------------------------
# Sections. Each is a function Context -> [Result], its flags and its table columns.


@dataclasses.dataclass(frozen=True)
class Column:
  header: str
  key: str
  fmt: str = "{}"


@dataclasses.dataclass(frozen=True)
class Section:
  run: Callable[[Context], list[Result]]
  add_arguments: Callable[[argparse.ArgumentParser], None]
  columns: tuple[Column, ...]
  check: Callable[[argparse.Namespace], None]  # raises ValueError on bad flags, before anything runs


SECTIONS: dict[str, Section] = {}


def register(name: str, *, add_arguments: Callable[[argparse.ArgumentParser], None],
             columns: Sequence[Column], check: Callable[[argparse.Namespace], None] = lambda args: None):
  def wrap(fn):
    SECTIONS[name] = Section(fn, add_arguments, tuple(columns), check)
    return fn
  return wrap


# ---- sampling --------------------------------------------------------------------------------

def sampler_variants(threshold: float) -> dict[str, dict[str, Any]]:
  """The SamplerConfig fields of each variant; the rest (sizes, temperature) is shared."""
  return {
      "exact": dict(cache="none", threshold=None),
      "prefix": dict(cache="prefix", threshold=None),
      "dual": dict(cache="dual", threshold=None),
      "threshold": dict(cache="none", threshold=threshold),
      "dual+threshold": dict(cache="dual", threshold=threshold),
  }


def _int_list(text: str) -> list[int]:
  return [int(s) for s in text.split(",") if s.strip()]


def _name_list(text: str) -> list[str]:
  return [s.strip() for s in text.split(",") if s.strip()]


def _sampling_arguments(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("sampling")
  g.add_argument("--variants", type=_name_list, default=list(sampler_variants(0.9)),
                 help="comma-separated subset of exact,prefix,dual,threshold,dual+threshold")
  g.add_argument("--prompt_length", type=int, default=64)
  g.add_argument("--gen_length", type=int, default=128)
  g.add_argument("--block_length", type=int, default=32)
  g.add_argument("--steps", type=int, default=128)
  g.add_argument("--batch_sizes", type=_int_list, default=[1, 8], help="comma-separated, e.g. 1,8")
  g.add_argument("--threshold", type=float, default=0.9, help="confidence threshold of the parallel variants")
  g.add_argument("--temperature", type=float, default=0.0)
  g.add_argument("--task_data", default=None,
                 help="demo-task JSONL: with --checkpoint, also report each variant's accuracy, and time "
                      "on its prompts instead of random ids")
  g.add_argument("--num_examples", type=int, default=64, help="examples of --task_data to score")
  g.add_argument("--eval_batch_size", type=int, default=8)
  g.add_argument("--chat_template", action="store_true", help="wrap task prompts in the chat template")
  g.add_argument("--tokenizer", default=None, help="sentencepiece .model, tokenizer.json or a directory with one (default: the run's data.tokenizer)")


def random_prompts(model_cfg: model_lib.ModelConfig, batch: int, length: int, seed: int) -> np.ndarray:
  """Token ids that are none of the special ids, the same for every variant."""
  special = {model_cfg.mask_token_id, model_cfg.eos_token_id, model_cfg.bos_token_id}
  allowed = np.array([i for i in range(model_cfg.vocab_size) if i not in special], np.int32)
  return allowed[np.random.default_rng(seed).integers(0, len(allowed), (batch, length))]


def _load_task(ctx: Context):
  """(tokenizer, examples) for the accuracy columns, or (None, None) without task data."""
  args = ctx.args
  if not args.task_data:
    return None, None
  if not args.checkpoint:
    raise ValueError("--task_data needs --checkpoint: a randomly initialised model has no accuracy to report")
  bench_model = ctx.model
  from llada_jax.data import demo_task, tokenizer as tokenizer_lib  # noqa: PLC0415

  path = args.tokenizer or (bench_model.run_config.get("data") or {}).get("tokenizer")
  if not path:
    raise ValueError(f"{args.checkpoint}: the run config names no data.tokenizer; pass --tokenizer")
  tokenizer = tokenizer_lib.load_tokenizer(path)
  tokenizer_lib.check_vocab(tokenizer, bench_model.config.vocab_size)
  examples = demo_task.read_jsonl(args.task_data)[:args.num_examples]
  if not examples:
    raise ValueError(f"{args.task_data}: no examples")
  for i, ex in enumerate(examples):
    if not isinstance(ex, dict) or not isinstance(ex.get("prompt"), str) or "answer" not in ex:
      raise ValueError(f"{args.task_data}, example {i + 1}: expected a demo-task object with a string "
                       "'prompt' and an 'answer'")
  return tokenizer, examples


def _speed_prompts(ctx: Context, batch: int, tokenizer, examples) -> tuple[np.ndarray, np.ndarray, str]:
  """Prompts [batch, prompt_length] and their lengths: the task's, else random ids.

  The threshold variants' speed depends on how confident the model is, which only in-distribution
  prompts show; the timed shape is prompt_length either way.
  """
  args, model_cfg = ctx.args, ctx.model.config
  if examples is None:
    prompts = random_prompts(model_cfg, batch, args.prompt_length, args.seed)
    return prompts, np.full((batch,), args.prompt_length, np.int32), "random"
  from llada_jax import sampling  # noqa: PLC0415
  from llada_jax.eval.generation import prompt_ids  # noqa: PLC0415

  ids = [prompt_ids(tokenizer, examples[i % len(examples)]["prompt"], args.chat_template) for i in range(batch)]
  longest = max(map(len, ids))
  if longest > args.prompt_length:
    raise ValueError(f"--prompt_length={args.prompt_length}: a task prompt has {longest} tokens; "
                     "expected a length that holds every timed prompt")
  prompts, lengths = sampling.pad_prompts(ids, model_cfg.eos_token_id, length=args.prompt_length)
  return prompts, lengths, "task"


def _accuracy(ctx: Context, sampler_config, tokenizer, examples) -> dict[str, Any]:
  from llada_jax.data import demo_task  # noqa: PLC0415
  from llada_jax.eval.generation import evaluate_generation  # noqa: PLC0415

  bench_model, args = ctx.model, ctx.args
  start = time.perf_counter()
  out = evaluate_generation(bench_model.params, bench_model.config, tokenizer, examples, sampler_config,
                            jax.random.key(args.seed), batch_size=args.eval_batch_size,
                            chat_template=args.chat_template, verifier=demo_task.verify)
  # Compilation included: this is the cost of the score, not a speed measurement.
  return {"accuracy": out["accuracy"], "n_correct": out["n_correct"], "eval_n": out["n"],
          "eval_s": time.perf_counter() - start}


def _sampler_configs(args) -> dict[str, Any]:
  """The SamplerConfig of each chosen variant; bad flags fail here."""
  from llada_jax import sampling  # noqa: PLC0415

  variants = sampler_variants(args.threshold)
  unknown = [v for v in args.variants if v not in variants]
  if unknown or not args.variants:
    raise ValueError(f"--variants={','.join(args.variants)}: expected a subset of {','.join(variants)}")
  if not args.batch_sizes or min(args.batch_sizes) < 1:
    raise ValueError(f"--batch_sizes={args.batch_sizes}: expected positive integers")
  if args.eval_batch_size < 1 or args.num_examples < 1:
    raise ValueError("--eval_batch_size and --num_examples: expected positive integers")
  if args.task_data and not args.checkpoint:
    raise ValueError("--task_data needs --checkpoint: a randomly initialised model has no accuracy to report")
  return {name: sampling.SamplerConfig(
      gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
      temperature=args.temperature, **variants[name]) for name in args.variants}  # bad sizes fail here


def _check_sampling(args) -> None:
  _sampler_configs(args)
  if not args.checkpoint:
    model_config_from_preset(args.model or "reference", args.model_overrides)


@register("sampling", add_arguments=_sampling_arguments, check=_check_sampling, columns=(
    Column("variant", "variant", "{}"),
    Column("batch", "batch_size", "{}"),
    Column("tokens/s", "tokens_per_s", "{:.1f}"),
    Column("s/call", "median_s", "{:.3f}"),
    Column("min s", "min_s", "{:.3f}"),
    Column("max s", "max_s", "{:.3f}"),
    Column("NFE", "nfe", "{}"),
    Column("full", "full_forwards", "{}"),
    Column("speed-up", "speedup_vs_exact", "{:.2f}x"),
    Column("accuracy", "accuracy", "{:.3f}"),
    Column("acc drop", "accuracy_drop_vs_exact", "{:+.3f}"),
))
def bench_sampling(ctx: Context) -> list[Result]:
  """Each sampler variant at each batch size; rows ordered by batch size, then variant."""
  args = ctx.args
  configs = _sampler_configs(args)
  tokenizer, examples = _load_task(ctx)
  accuracy = {}
  if examples:
    accuracy = {name: _accuracy(ctx, config, tokenizer, examples) for name, config in configs.items()}

  results = []
  for batch in args.batch_sizes:
    prompts, lengths, prompt_source = _speed_prompts(ctx, batch, tokenizer, examples)
    # One key per row, derived once, so the timed call does not also derive them.
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(args.seed), np.arange(batch))
    rows = {name: _time_sampler(ctx, config, prompts, lengths, keys) for name, config in configs.items()}
    for name, result in rows.items():
      result.name = f"{name}@b{batch}"
      result.settings = {"variant": name, "batch_size": batch, **result.settings, "prompt_source": prompt_source}
      _compare_with_exact(result, rows.get("exact"), accuracy.get(name), accuracy.get("exact"))
      results.append(result)
  return results


def _time_sampler(ctx: Context, config, prompts, lengths, keys) -> Result:
  from llada_jax import sampling  # noqa: PLC0415

  args, bench_model = ctx.args, ctx.model
  batch = prompts.shape[0]
  call = functools.partial(sampling.sample, bench_model.params, bench_model.config, prompts, lengths, keys, config)
  times, warm, out = time_calls(call, repeats=args.repeats, warmup=args.warmup)
  settings = {"prompt_length": prompts.shape[1], "gen_length": config.gen_length,
              "block_length": config.block_length, "steps": config.steps, "cache": config.cache,
              "threshold": config.threshold, "temperature": config.temperature}
  result = Result("sampling", "", settings, times, warm)
  nfe = int(out.nfe)  # the same in every call: same prompts, same keys
  result.metrics = {
      "tokens_per_s": batch * config.gen_length / result.median_s,
      "s_per_call": result.median_s,
      "nfe": nfe,
      "full_forwards": int(out.full_forwards),
      "tokens_per_forward": config.gen_length / nfe,  # per row: above 1 only with parallel decoding
      "ms_per_forward": 1e3 * result.median_s / nfe,
  }
  return result


def _compare_with_exact(result: Result, exact: Result | None, accuracy: dict | None, exact_accuracy: dict | None):
  """Speed-up from the medians at the same batch size; accuracy and its drop (positive: worse)."""
  result.metrics["speedup_vs_exact"] = exact.median_s / result.median_s if exact else None
  if accuracy is not None:
    result.metrics.update(accuracy)
    drop = None
    if exact_accuracy is not None and accuracy["accuracy"] is not None:
      drop = exact_accuracy["accuracy"] - accuracy["accuracy"]
    result.metrics["accuracy_drop_vs_exact"] = drop


# ---- shared by ceiling, train_step and elbo ----------------------------------------------------

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

# Compiler options of the timed train steps and ELBO scorers; the tests lower them for speed.
COMPILER_OPTIONS: dict[str, Any] | None = None


def _size_list(text: str) -> list[str]:
  names = _name_list(text)
  unknown = [n for n in names if n not in SIZES]
  if unknown or not names:
    raise argparse.ArgumentTypeError(f"--size={text}: expected names among {','.join(SIZES)}")
  return names


def _dtype_list(text: str) -> list[str]:
  names = _name_list(text)
  if not names or any(n not in DTYPES for n in names):
    raise argparse.ArgumentTypeError(f"--dtype={text}: expected names among {','.join(DTYPES)}")
  return names


def size_model_config(ctx: Context, size: str, dtype: str) -> model_lib.ModelConfig:
  """The size's model with the `--model.FIELD` overrides, computing in `dtype`."""
  return model_config_from_preset(SIZES[size].model, {**ctx.args.model_overrides, "dtype": dtype})


def _random_tokens(rng: np.random.Generator, cfg: model_lib.ModelConfig, shape) -> np.ndarray:
  """Token ids above the special ones (presets put them at the start or the end of the vocabulary)."""
  special = {cfg.mask_token_id, cfg.eos_token_id, cfg.bos_token_id}
  allowed = np.array([i for i in range(cfg.vocab_size) if i not in special], np.int32)
  return allowed[rng.integers(0, len(allowed), shape)]


def time_matmul(dtype: str, n: int, *, repeats: int, warmup: int = 1) -> tuple[list[float], list[float]]:
  """(timed, warm-up) seconds of an n x n x n matmul in `dtype` (a model dtype name) on the default device."""
  jdtype = model_lib._DTYPES[dtype]  # noqa: SLF001 - the model's own dtype names
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(jdtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(jdtype)
  # float32 accumulation and output, as the model's matmuls ask for.
  matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  times, warm, _ = time_calls(lambda: matmul(a, b), repeats=repeats, warmup=max(warmup, 1))
  return times, warm


def _time_matmul(ctx: Context, dtype: str) -> Result:
  n, args = ctx.args.matmul_size, ctx.args
  times, warm = time_matmul(dtype, n, repeats=args.repeats, warmup=args.warmup)
  result = Result("ceiling", f"matmul_{dtype}", {"kind": "matmul", "dtype": dtype, "size": n}, times, warm)
  rate = 2 * n ** 3 / result.median_s
  result.metrics = {"flops_per_s": rate, "gflops_per_s": rate / 1e9}
  return result


class Ceilings:
  """Measured matmul FLOP/s per dtype on one device, measured once per run and shared by sections."""

  def __init__(self, ctx: Context):
    self.ctx = ctx
    self.results: dict[str, Result] = {}

  def result(self, dtype: str) -> Result:
    if dtype not in self.results:
      self.results[dtype] = _time_matmul(self.ctx, dtype)
    return self.results[dtype]

  def flops_per_s(self, dtype: str) -> float:
    return self.result(dtype).metrics["flops_per_s"]


def _rates(flops: float, seconds: float, ceiling: float, dtype: str) -> dict[str, float | None]:
  """Achieved FLOP/s per device; MFU against the measured ceiling of the same dtype and, where the
  device's datasheet peak is known (16-bit on TPUs and NVIDIA GPUs), against that peak."""
  per_device = flops / seconds / jax.device_count()
  peak = metrics_lib.peak_flops_per_device(dtype=dtype)
  return {"flops_per_step": flops, "achieved_flops_per_s": per_device, "achieved_gflops_per_s": per_device / 1e9,
          "ceiling_gflops_per_s": ceiling / 1e9, "mfu": per_device / ceiling,
          "mfu_datasheet": per_device / peak if peak else None}


# ---- ceiling -----------------------------------------------------------------------------------

def _ceiling_arguments(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("ceiling")
  g.add_argument("--matmul_size", type=int, default=2048, help="n of the n x n x n matmul")
  g.add_argument("--bandwidth_mb", type=int, default=256, help="MB of float32 read and written by the add")


def _check_ceiling(args) -> None:
  if args.matmul_size < 1 or args.bandwidth_mb < 1:
    raise ValueError(f"--matmul_size={args.matmul_size}, --bandwidth_mb={args.bandwidth_mb}: expected positive sizes")


@register("ceiling", add_arguments=_ceiling_arguments, check=_check_ceiling, columns=(
    Column("kind", "kind"),
    Column("dtype", "dtype"),
    Column("size", "size"),
    Column("GFLOP/s", "gflops_per_s", "{:.1f}"),
    Column("GB/s", "gb_per_s", "{:.2f}"),
    Column("s/call", "median_s", "{:.4f}"),
    Column("min s", "min_s", "{:.4f}"),
    Column("max s", "max_s", "{:.4f}"),
))
def bench_ceiling(ctx: Context) -> list[Result]:
  """What one device can do: matmul FLOP/s per compute dtype and memory bandwidth."""
  args = ctx.args
  results = [ctx.ceilings.result(dtype) for dtype in args.dtype]
  n = args.bandwidth_mb * (1 << 20) // 4
  x = jnp.ones((n,), jnp.float32)
  add = jax.jit(lambda x: x + 1.0)  # reads and writes every byte once
  times, warm, _ = time_calls(lambda: add(x), repeats=args.repeats, warmup=max(args.warmup, 1))
  bandwidth = Result("ceiling", "bandwidth", {"kind": "bandwidth", "dtype": "float32", "size": n}, times, warm)
  moved = 2 * 4 * n
  bandwidth.metrics = {"bytes_moved": moved, "bytes_per_s": moved / bandwidth.median_s,
                       "gb_per_s": moved / bandwidth.median_s / 1e9}
  return results + [bandwidth]


# ---- train_step ----------------------------------------------------------------------------------

def _train_step_arguments(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("train_step, elbo")
  g.add_argument("--size", type=_size_list, default=["demo", "ref35m"],
                 help=f"comma-separated among {','.join(SIZES)}: " + "; ".join(
                     f"{k} = {v.model} at seq {v.seq_len}, batch {v.batch_size}" for k, v in SIZES.items()))
  g.add_argument("--dtype", type=_dtype_list, default=list(DTYPES),
                 help="compute dtypes (parameters stay float32); also the ceiling section's")
  g.add_argument("--objectives", type=_name_list, default=["pretrain", "sft", "vrpo"],
                 help="comma-separated among pretrain,sft,vrpo")
  g.add_argument("--vrpo_n", type=_int_list, default=[1, 4, 8], help="VRPO budgets n = n_t (n_yt = 1)")
  g.add_argument("--reference", type=_name_list, default=["online", "precomputed"],
                 help="VRPO reference ELBOs: online (the step runs the reference) and/or precomputed (in the batch)")
  g.add_argument("--sft_weight", type=float, default=0.0, help="VRPO's SFT term (the paper's recipe: 0.05)")
  g.add_argument("--grad_accum_steps", type=int, default=0,
                 help="micro-batches per step (0: the fewest that keep each within --max_micro_batch_tokens)")
  g.add_argument("--max_micro_batch_tokens", type=int, default=8192,
                 help="tokens through the policy per micro-batch when --grad_accum_steps=0 (VRPO at n = 8 on the "
                      "ref35m size needs 22 GB in one piece)")


def grad_accum_steps(args, objective: str, size: Size, n: int, shards: int) -> int:
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


def _train_config(objective: str, cfg: model_lib.ModelConfig, size: Size, args, n: int, precomputed: bool,
                  accum: int = 1):
  config = config_lib.base_config()
  config.objective = objective
  config.model = ml_collections.ConfigDict(dataclasses.asdict(cfg))
  config.data.seq_len, config.data.global_batch_size = size.seq_len, size.batch_size
  config.grad_accum_steps = accum
  config.optimizer = optim.default_optimizer_config(objective)
  config.vrpo.n_timesteps, config.vrpo.masks_per_timestep = n, 1
  config.vrpo.sft_weight = args.sft_weight
  config.vrpo.precompute_reference = precomputed
  return config


def _train_batch(objective: str, cfg: model_lib.ModelConfig, size: Size, seed: int) -> dict[str, np.ndarray]:
  """A random batch as the pipelines shape it: prompts of a quarter of the row, answers to the end or less."""
  rng = np.random.default_rng(seed)
  b, l = size.batch_size, size.seq_len
  if objective == "pretrain":
    return {"tokens": _random_tokens(rng, cfg, (b, l))}
  prompt_lengths = np.full((b,), max(1, l // 4), np.int32)
  ids = np.arange(b, dtype=np.int32)
  if objective == "sft":
    return {"tokens": _random_tokens(rng, cfg, (b, l)), "prompt_lengths": prompt_lengths, "example_id": ids}
  return {"chosen": _random_tokens(rng, cfg, (b, l)), "rejected": _random_tokens(rng, cfg, (b, l)),
          "prompt_lengths": prompt_lengths, "chosen_lengths": rng.integers(l // 2, l + 1, (b,)).astype(np.int32),
          "rejected_lengths": rng.integers(l // 2, l + 1, (b,)).astype(np.int32), "example_id": ids}


def _step_flops(objective: str, cfg, size: Size, n: int, precomputed: bool, sft_weight: float,
                count_embedding: bool = False) -> tuple[int, int]:
  """(analytic FLOPs, tokens through the policy) of one step, as llada_jax.metrics counts them."""
  b, l = size.batch_size, size.seq_len
  if objective != "vrpo":
    return metrics_lib.lm_step_flops(cfg, batch_size=b, seq_len=l, count_embedding=count_embedding), b * l
  flops = metrics_lib.vrpo_step_flops(cfg, n_pairs=b, seq_len=l, n_timesteps=n, masks_per_timestep=1,
                                      reference_precomputed=precomputed, sft_weight=sft_weight,
                                      count_embedding=count_embedding)
  return flops.total, 2 * n * b * l + (b * l if sft_weight > 0 else 0)


def _variants(args) -> list[tuple[str, int, str]]:
  """(objective, n, reference) of every timed step, in table order."""
  unknown = [o for o in args.objectives if o not in ("pretrain", "sft", "vrpo")]
  if unknown or not args.objectives:
    raise ValueError(f"--objectives={','.join(args.objectives)}: expected a subset of pretrain,sft,vrpo")
  bad_ref = [r for r in args.reference if r not in ("online", "precomputed")]
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


def _compile(jitted, *example_args):
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


def _check_sizes(args) -> None:
  """Every size's model takes the `--model.FIELD` overrides."""
  for size in args.size:
    for dtype in args.dtype:
      model_config_from_preset(SIZES[size].model, {**args.model_overrides, "dtype": dtype})


def _check_train_step(args) -> None:
  _variants(args)
  if args.grad_accum_steps < 0 or args.max_micro_batch_tokens < 1:
    raise ValueError(f"--grad_accum_steps={args.grad_accum_steps}, --max_micro_batch_tokens="
                     f"{args.max_micro_batch_tokens}: expected a count >= 0 (0: automatic) and a positive budget")
  _check_sizes(args)


def _time_steps(compiled, state, batch, root_key, reference_params, args):
  """(timed seconds, warm-up seconds, last metrics) of consecutive steps, each fed the last one's state."""
  holder = [state]

  def call():
    holder[0], step_metrics = compiled(holder[0], batch, root_key, reference_params)
    return holder[0], step_metrics

  times, warm, (_, step_metrics) = time_calls(call, repeats=args.repeats, warmup=args.warmup)
  return times, warm, step_metrics


@register("train_step", add_arguments=_train_step_arguments, check=_check_train_step, columns=(
    Column("size", "size"),
    Column("dtype", "dtype"),
    Column("objective", "objective"),
    Column("n", "n"),
    Column("reference", "reference"),
    Column("accum", "grad_accum_steps"),
    Column("tokens/s", "tokens_per_s", "{:.1f}"),
    Column("model tok/s", "model_tokens_per_s", "{:.1f}"),
    Column("s/step", "median_s", "{:.3f}"),
    Column("iqr s", "iqr_s", "{:.3f}"),
    Column("GFLOP/s", "achieved_gflops_per_s", "{:.1f}"),
    Column("MFU", "mfu", "{:.1%}"),
    Column("MFU 6N", "mfu_6n", "{:.1%}"),
    Column("MFU peak", "mfu_datasheet", "{:.1%}"),
    Column("vs online", "step_time_vs_online", "{:.2f}x"),
    Column("ref s/step", "reference_precompute_s", "{:.3f}"),
    Column("peak GB", "peak_gb", "{:.2f}"),
    Column("compile s", "compile_s", "{:.1f}"),
))
def bench_train_step(ctx: Context) -> list[Result]:
  """The training step exactly as llada_jax.train builds it (sharded on the default devices, state
  donated), per size, compute dtype and objective; VRPO online and with precomputed reference ELBOs."""
  from llada_jax import reference_elbo, sharding, trainer  # noqa: PLC0415

  args = ctx.args
  _check_train_step(args)
  variants = _variants(args)
  results = []
  for size_name in args.size:
    size = SIZES[size_name]
    for dtype in args.dtype:
      cfg = size_model_config(ctx, size_name, dtype)
      online_time = {}
      for objective_name, n, reference in variants:
        precomputed = reference == "precomputed"
        mesh = sharding.make_mesh(config_lib.base_config().mesh)
        rules = sharding.rules_from_config(config_lib.base_config().sharding_rules)
        batch_sh = sharding.batch_sharding(mesh, rules)
        shards = sharding.batch_shards(batch_sh)
        accum = grad_accum_steps(args, objective_name, size, n, shards)
        if size.batch_size % accum or (size.batch_size // accum) % shards:
          raise ValueError(f"--size={size_name}: batch {size.batch_size} in {accum} micro-batches does not split "
                           f"over the {shards} batch shards of the default mesh")
        config = _train_config(objective_name, cfg, size, args, n, precomputed, accum)
        objective = trainer.make_objective(config, cfg)
        tx = optim.make_optimizer(config.optimizer)
        _, state_sh = trainer.state_shardings(cfg, tx, mesh, rules)
        state = trainer.create_train_state(cfg, tx, jax.random.key(args.seed), mesh, rules)
        local = _train_batch(objective_name, cfg, size, args.seed)
        reference_params = None
        if objective.needs_reference or objective.reference_in_batch:
          # A reference near the policy, placed like it.
          reference_params = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x * 0.99, p),
                                     out_shardings=state_sh.params)(state.params)
        root_key = jax.random.key(args.seed)
        extra = {}
        if objective.reference_in_batch:
          fn = jax.jit(trainer.with_activation_rules(
              reference_elbo.reference_elbo_fn(objective.loss_fn, micro_batches=accum), mesh, rules))
          pair = sharding.global_batch({k: local[k] for k in reference_elbo.PAIR_KEYS}, batch_sh)
          ref_times, _, (chosen, rejected) = time_calls(lambda: fn(reference_params, pair, root_key, 0), repeats=1)
          extra["reference_precompute_s"] = ref_times[0]
          local = {**local, reference_elbo.REFERENCE_CHOSEN: np.asarray(chosen),
                   reference_elbo.REFERENCE_REJECTED: np.asarray(rejected)}
          reference_params = None  # the step never sees them
        batch = sharding.global_batch(local, batch_sh)
        step = trainer.jit_train_step(trainer.make_train_step(objective, tx, grad_accum_steps=accum),
                                      state_sh, batch_sh, mesh,
                                      state_sh.params if objective.needs_reference else None, rules=rules)
        compiled, compile_s, memory = _compile(step, state, batch, root_key, reference_params)
        times, warm, step_metrics = _time_steps(compiled, state, batch, root_key, reference_params, args)
        state = reference_params = None  # donated, or no longer needed: free before the next variant
        flops, model_tokens = _step_flops(objective_name, cfg, size, n, precomputed, args.sft_weight)
        flops_6n, _ = _step_flops(objective_name, cfg, size, n, precomputed, args.sft_weight, count_embedding=True)
        settings = {"size": size_name, "dtype": dtype, "objective": objective_name, "n": n if objective_name == "vrpo"
                    else None, "reference": None if reference == "-" else reference, "seq_len": size.seq_len,
                    "batch_size": size.batch_size, "num_params": cfg.num_params(), "remat": cfg.remat,
                    "scan_layers": cfg.scan_layers, "attention_impl": cfg.attention_impl,
                    "grad_accum_steps": accum,
                    "sft_weight": args.sft_weight if objective_name == "vrpo" else None}
        name = f"{size_name}/{dtype}/{objective_name}" + (f"/n{n}/{reference}" if objective_name == "vrpo" else "")
        result = Result("train_step", name, settings, times, warm)
        rows = size.batch_size * (2 if objective_name == "vrpo" else 1)
        ceiling = ctx.ceilings.flops_per_s(dtype)
        result.metrics = {
            "tokens_per_s": rows * size.seq_len / result.median_s,
            "model_tokens_per_s": model_tokens / result.median_s,
            "steps_per_s": 1 / result.median_s,
            **_rates(flops, result.median_s, ceiling, dtype),
            # The reference PyTorch figures' count (6 x all parameters): their MFU, like for like.
            "mfu_6n": _rates(flops_6n, result.median_s, ceiling, dtype)["mfu"],
            "compile_s": compile_s,
            "peak_gb": None if memory is None else memory / 1e9,
            "loss": float(step_metrics["loss"]),
            **extra,
        }
        if objective_name == "vrpo":
          if reference == "online":
            online_time[n] = result.median_s
          result.metrics["step_time_vs_online"] = (result.median_s / online_time[n] if n in online_time else None)
        results.append(result)
        print(f"train_step {name}: {result.median_s:.3f} s/step, {result.metrics['mfu']:.1%} MFU", flush=True)
  return results


# ---- elbo ----------------------------------------------------------------------------------------

def _elbo_arguments(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("elbo")
  g.add_argument("--mc_num", type=_int_list, default=[32],
                 help="Monte Carlo samples per sequence (comma-separated; the reference evaluation uses 128)")
  g.add_argument("--elbo_batch_size", type=int, default=16, help="rows of one stratified round")
  g.add_argument("--elbo_sequences", type=int, default=0,
                 help="sequences scored per call (0: the size's batch size)")


def _check_elbo(args) -> None:
  from llada_jax.eval import likelihood  # noqa: PLC0415

  if not args.mc_num or min(args.mc_num) < 1 or args.elbo_sequences < 0:
    raise ValueError(f"--mc_num={args.mc_num}, --elbo_sequences={args.elbo_sequences}: expected positive integers")
  for mc_num in args.mc_num:
    likelihood.check_budget(mc_num, args.elbo_batch_size)
  _check_sizes(args)


@register("elbo", add_arguments=_elbo_arguments, check=_check_elbo, columns=(
    Column("size", "size"),
    Column("dtype", "dtype"),
    Column("mc_num", "mc_num"),
    Column("seqs", "sequences"),
    Column("length", "padded_length"),
    Column("seqs/s", "sequences_per_s", "{:.2f}"),
    Column("s/call", "median_s", "{:.3f}"),
    Column("iqr s", "iqr_s", "{:.3f}"),
    Column("GFLOP/s", "achieved_gflops_per_s", "{:.1f}"),
    Column("MFU", "mfu", "{:.1%}"),
    Column("MFU peak", "mfu_datasheet", "{:.1%}"),
))
def bench_elbo(ctx: Context) -> list[Result]:
  """ELBO scoring (llada_jax.eval.likelihood.score_answers) of random sequences: prompt a quarter of
  the size's sequence length, answer the rest; sequences/s at each mc_num."""
  from llada_jax.eval import likelihood  # noqa: PLC0415

  args = ctx.args
  _check_elbo(args)
  results = []
  for size_name in args.size:
    size = SIZES[size_name]
    count = args.elbo_sequences or size.batch_size
    prompt_len = max(1, size.seq_len // 4)
    for dtype in args.dtype:
      cfg = size_model_config(ctx, size_name, dtype)
      options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
      params = jax.jit(lambda key: model_lib.init_params(cfg, key), compiler_options=options)(jax.random.key(args.seed))
      rng = np.random.default_rng(args.seed)
      tokens = _random_tokens(rng, cfg, (count, size.seq_len))
      prompts, answers = [list(t[:prompt_len]) for t in tokens], [list(t[prompt_len:]) for t in tokens]
      logits_fn = model_lib.logits_fn(cfg)
      padded = likelihood.bucket_length(size.seq_len)
      for mc_num in args.mc_num:
        call = functools.partial(likelihood.score_answers, params, cfg, prompts, answers, jax.random.key(args.seed),
                                 mc_num=mc_num, batch_size=args.elbo_batch_size, logits_fn=logits_fn)
        times, warm, scores = time_calls(call, repeats=args.repeats, warmup=args.warmup)
        settings = {"size": size_name, "dtype": dtype, "mc_num": mc_num, "sequences": count,
                    "seq_len": size.seq_len, "padded_length": padded, "prompt_length": prompt_len,
                    "batch_size": args.elbo_batch_size, "num_params": cfg.num_params()}
        result = Result("elbo", f"{size_name}/{dtype}/mc{mc_num}", settings, times, warm)
        forward_tokens = count * mc_num * padded
        flops = metrics_lib.forward_flops_per_token(cfg, padded) * forward_tokens
        result.metrics = {"sequences_per_s": count / result.median_s,
                          "forward_tokens_per_s": forward_tokens / result.median_s,
                          **_rates(flops, result.median_s, ctx.ceilings.flops_per_s(dtype), dtype),
                          "mean_elbo": float(np.mean(scores))}
        results.append(result)
  return results


# --------------------------------------------------------------------------------------------
# Reporting.


def format_table(section: str, results: Sequence[Result], markdown: bool = False) -> str:
  """A fixed-width (or markdown) table of one section's results; columns no row has a value for are
  left out."""
  rows = [r.flat() for r in results]
  columns = [c for c in SECTIONS[section].columns if any(row.get(c.key) is not None for row in rows)]

  def cell(column, row):
    value = row.get(column.key)
    return "-" if value is None else column.fmt.format(value)

  cells = [[cell(c, row) for c in columns] for row in rows]
  if markdown:
    return "\n".join([f"[{section}]", "", "| " + " | ".join(c.header for c in columns) + " |",
                      "|" + " --- |" * len(columns)] + ["| " + " | ".join(r) + " |" for r in cells])
  widths = [max([len(c.header)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
  lines = [f"[{section}]", "  ".join(c.header.rjust(w) for c, w in zip(columns, widths))]
  lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
  return "\n".join(lines)


def environment() -> dict[str, Any]:
  device = jax.devices()[0]
  return {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": device.device_kind,
          "device_count": jax.device_count(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "platform": platform.platform()}


write_json = cli.write_json_atomic


# --------------------------------------------------------------------------------------------
# Command line.


# The ceiling first: the sections after it compute MFU against its measurements.
DEFAULT_ORDER = ("ceiling", "train_step", "elbo", "sampling")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                              epilog="Model fields can also be set as --model.FIELD=VALUE.")
  order = [name for name in DEFAULT_ORDER if name in SECTIONS] + [n for n in SECTIONS if n not in DEFAULT_ORDER]
  p.add_argument("--only", type=_name_list, default=order,
                 help=f"comma-separated sections to run, in order (default: all: {','.join(order)})")
  p.add_argument("--checkpoint", default=None, help="a training run's workdir or its checkpoints/ directory")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--model", default=None,
                 help=f"a preset of configs/models.py or {','.join(MODEL_ALIASES)} (the default), randomly "
                      "initialised")
  p.add_argument("--model_overrides", type=parse_overrides, default={},
                 help="FIELD=VALUE,... over the preset (or numerics-only fields of a checkpoint)")
  p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls first (compilation)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", default=None, help="JSON report path")
  p.add_argument("--markdown", action="store_true", help="print the tables as markdown")
  for section in SECTIONS.values():
    section.add_arguments(p)
  return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  rest, dotted = split_model_flags(argv)
  args = _parser().parse_args(rest)
  args.model_overrides = {**args.model_overrides, **dotted}
  unknown = [s for s in args.only if s not in SECTIONS]
  if unknown or not args.only:
    raise ValueError(f"--only={','.join(args.only)}: expected sections among {','.join(SECTIONS)}")
  if args.checkpoint and args.model:
    raise ValueError("--checkpoint and --model: expected one of them (a checkpoint fixes the model)")
  if args.repeats < 1 or args.warmup < 0:
    raise ValueError(f"--repeats={args.repeats}, --warmup={args.warmup}: expected repeats >= 1, warmup >= 0")
  for name in args.only:  # every section's flags, before any section runs
    SECTIONS[name].check(args)
  return args


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
  """Runs the chosen sections and returns the JSON report; prints each section's table."""
  ctx = Context(args)
  results = []
  for name in args.only:
    section_results = SECTIONS[name].run(ctx)
    print(format_table(name, section_results, markdown=args.markdown), flush=True)
    results += section_results
  loaded = ctx.loaded_model()
  return {
      "command": shlex.join([*PROG.split(), *argv]),
      "argv": list(argv),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "environment": environment(),
      "model": loaded.describe() if loaded else None,
      # The matmul FLOP/s that MFU is measured against (only those measured in this run).
      "ceilings": {dtype: r.metrics["flops_per_s"] for dtype, r in ctx.ceilings.results.items()},
      "settings": {k: v for k, v in vars(args).items() if k != "output"},
      "results": [r.to_dict() for r in results],
  }


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    args = parse_args(argv)
    report = run(args, argv)
  except cli.USER_ERRORS as e:
    return cli.fail(e)
  if args.output:
    write_json(args.output, report)
    print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
