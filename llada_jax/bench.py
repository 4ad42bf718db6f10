"""Benchmarks: wall time and derived rates of the framework's hot paths, as a table and JSON.

  python -m llada_jax.bench [--only sampling] [--model PRESET | --checkpoint RUN_DIR] \\
      [--model.FIELD=VALUE ...] [--model_overrides FIELD=VALUE,...] [--repeats 5] [--warmup 1] \\
      [--output bench.json]

Sections (`--only a,b`; default: all) each time their own calls:

  sampling   every sampler variant (exact, prefix, dual, threshold, dual+threshold) at the given
             sizes: generated tokens/s, seconds per call, forward passes, speed-up vs exact; with a
             checkpoint and `--task_data`, also each variant's accuracy on the demo task.

The model is a trained run (`--checkpoint`) or a preset of configs/models.py with random weights
(`--model`, default `reference`: the size of the reference PyTorch figures, d_model 512, 8 layers,
8 heads, MLP 1536, vocab 8192), so speed can be measured without training. Every timed call blocks
on its output; the first `--warmup` calls (compilation) are timed apart and excluded.

The JSON report: {"command", "argv", "created", "environment" (jax, backend, device_kind, ...),
"model" (source, num_params, config), "settings" (every flag), "results": [{"section", "name",
"settings", "timing" (median_s, min_s, max_s, iqr_s, times_s, warmup_s), "metrics"}]}.
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
import numpy as np

from llada_jax import cli, config_lib
from llada_jax import model as model_lib

PROG = "python -m llada_jax.bench"

# Not a preset of configs/models.py: the size at which the reference generate.py was timed.
MODEL_ALIASES = {
    "reference": ("demo", dict(d_model=512, n_layers=8, n_heads=8, mlp_hidden_size=1536, vocab_size=8192)),
}


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

  def loaded_model(self) -> BenchModel | None:
    """The model if a section asked for one (cached_property keeps it in the instance dict)."""
    return self.__dict__.get("model")


# --------------------------------------------------------------------------------------------
# Sections. Each is a function Context -> [Result], its flags and its table columns; new ones
# (matmul, train_step, elbo) register beside `sampling`.


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


SECTIONS: dict[str, Section] = {}


def register(name: str, *, add_arguments: Callable[[argparse.ArgumentParser], None],
             columns: Sequence[Column]):
  def wrap(fn):
    SECTIONS[name] = Section(fn, add_arguments, tuple(columns))
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
  g.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the run's data.tokenizer)")


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


@register("sampling", add_arguments=_sampling_arguments, columns=(
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
  from llada_jax import sampling  # noqa: PLC0415

  args = ctx.args
  variants = sampler_variants(args.threshold)
  unknown = [v for v in args.variants if v not in variants]
  if unknown or not args.variants:
    raise ValueError(f"--variants={','.join(args.variants)}: expected a subset of {','.join(variants)}")
  if not args.batch_sizes or min(args.batch_sizes) < 1:
    raise ValueError(f"--batch_sizes={args.batch_sizes}: expected positive integers")
  if args.eval_batch_size < 1 or args.num_examples < 1:
    raise ValueError("--eval_batch_size and --num_examples: expected positive integers")
  configs = {name: sampling.SamplerConfig(
      gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
      temperature=args.temperature, **variants[name]) for name in args.variants}  # bad sizes fail here

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


# --------------------------------------------------------------------------------------------
# Reporting.


def format_table(section: str, results: Sequence[Result]) -> str:
  """A fixed-width table of one section's results; columns no row has a value for are left out."""
  rows = [r.flat() for r in results]
  columns = [c for c in SECTIONS[section].columns if any(row.get(c.key) is not None for row in rows)]

  def cell(column, row):
    value = row.get(column.key)
    return "-" if value is None else column.fmt.format(value)

  cells = [[cell(c, row) for c in columns] for row in rows]
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


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                              epilog="Model fields can also be set as --model.FIELD=VALUE.")
  p.add_argument("--only", type=_name_list, default=list(SECTIONS),
                 help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})")
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
  return args


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
  """Runs the chosen sections and returns the JSON report; prints each section's table."""
  ctx = Context(args)
  results = []
  for name in args.only:
    section_results = SECTIONS[name].run(ctx)
    print(format_table(name, section_results), flush=True)
    results += section_results
  loaded = ctx.loaded_model()
  return {
      "command": shlex.join([*PROG.split(), *argv]),
      "argv": list(argv),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "environment": environment(),
      "model": loaded.describe() if loaded else None,
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
