"""The `sampling` section: every sampler variant (exact, prefix, dual, threshold, dual+threshold) at
the given sizes: generated tokens/s, seconds per call, forward passes, speed-up vs exact; with a
checkpoint and `--task_data`, also each variant's accuracy on the demo task."""

from __future__ import annotations

import functools
import time
import types
from typing import Any

import jax
import numpy as np
from absl import flags

from llada_jax import model as model_lib
from llada_jax.bench import core, timing


def sampler_variants(threshold: float) -> dict[str, dict[str, Any]]:
  """The SamplerConfig fields of each variant; the rest (sizes, temperature) is shared."""
  return {
      "exact": dict(cache="none", threshold=None),
      "prefix": dict(cache="prefix", threshold=None),
      "dual": dict(cache="dual", threshold=None),
      "threshold": dict(cache="none", threshold=threshold),
      "dual+threshold": dict(cache="dual", threshold=threshold),
  }


core.define_list("variants", list(sampler_variants(0.9)),
                 "comma-separated subset of exact,prefix,dual,threshold,dual+threshold")
flags.DEFINE_integer("prompt_length", 64, "prompt tokens per row", flag_values=core.FLAGS)
flags.DEFINE_integer("gen_length", 128, "tokens generated per row", flag_values=core.FLAGS)
flags.DEFINE_integer("block_length", 32, "tokens per semi-autoregressive block", flag_values=core.FLAGS)
flags.DEFINE_integer("steps", 128, "denoising steps in total, over all blocks", flag_values=core.FLAGS)
core.define_list("batch_sizes", [1, 8], "comma-separated, e.g. 1,8", item=int)
flags.DEFINE_float("threshold", 0.9, "confidence threshold of the parallel variants", flag_values=core.FLAGS)
flags.DEFINE_float("temperature", 0.0, "sampling temperature (0: greedy)", flag_values=core.FLAGS)
flags.DEFINE_string("task_data", None, "demo-task JSONL: with --checkpoint, also report each variant's accuracy, "
                    "and time on its prompts instead of random ids", flag_values=core.FLAGS)
flags.DEFINE_integer("num_examples", 64, "examples of --task_data to score", flag_values=core.FLAGS)
flags.DEFINE_integer("eval_batch_size", 8, "rows per generation batch when scoring --task_data", flag_values=core.FLAGS)
flags.DEFINE_boolean("chat_template", False, "wrap task prompts in the chat template", flag_values=core.FLAGS)
flags.DEFINE_string("tokenizer", None, "sentencepiece .model, tokenizer.json or a directory with one (default: the "
                    "run's data.tokenizer)", flag_values=core.FLAGS)


def random_prompts(model_cfg: model_lib.ModelConfig, batch: int, length: int, seed: int) -> np.ndarray:
  """Token ids that are none of the special ids, the same for every variant."""
  return core.random_tokens(np.random.default_rng(seed), model_cfg, (batch, length))


def _load_task(ctx: core.Context):
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


def _speed_prompts(ctx: core.Context, batch: int, tokenizer, examples) -> tuple[np.ndarray, np.ndarray, str]:
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


def _accuracy(ctx: core.Context, sampler_config, tokenizer, examples) -> dict[str, Any]:
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


def _sampler_configs(args: types.SimpleNamespace) -> dict[str, Any]:
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


def _check_sampling(args: types.SimpleNamespace) -> None:
  _sampler_configs(args)
  if not args.checkpoint:
    core.model_config_from_preset(args.model or "reference", args.model_overrides)


@core.register("sampling", check=_check_sampling, columns=(
    core.Column("variant", "variant", "{}"),
    core.Column("batch", "batch_size", "{}"),
    core.Column("tokens/s", "tokens_per_s", "{:.1f}"),
    core.Column("s/call", "median_s", "{:.3f}"),
    core.Column("min s", "min_s", "{:.3f}"),
    core.Column("max s", "max_s", "{:.3f}"),
    core.Column("NFE", "nfe", "{}"),
    core.Column("full", "full_forwards", "{}"),
    core.Column("speed-up", "speedup_vs_exact", "{:.2f}x"),
    core.Column("accuracy", "accuracy", "{:.3f}"),
    core.Column("acc drop", "accuracy_drop_vs_exact", "{:+.3f}"),
))
def bench_sampling(ctx: core.Context) -> list[core.Result]:
  """Each sampler variant at each batch size; rows ordered by batch size, then variant."""
  args = ctx.args
  sampler_configs = _sampler_configs(args)
  tokenizer, examples = _load_task(ctx)
  accuracy = {}
  if examples:
    accuracy = {name: _accuracy(ctx, config, tokenizer, examples) for name, config in sampler_configs.items()}

  results = []
  for batch in args.batch_sizes:
    prompts, lengths, prompt_source = _speed_prompts(ctx, batch, tokenizer, examples)
    # One key per row, derived once, so the timed call does not also derive them.
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(args.seed), np.arange(batch))
    rows = {name: _time_sampler(ctx, config, prompts, lengths, keys) for name, config in sampler_configs.items()}
    for name, result in rows.items():
      result.name = f"{name}@b{batch}"
      result.settings = {"variant": name, "batch_size": batch, **result.settings, "prompt_source": prompt_source}
      _compare_with_exact(result, rows.get("exact"), accuracy.get(name), accuracy.get("exact"))
      results.append(result)
  return results


def _time_sampler(ctx: core.Context, config, prompts, lengths, keys) -> core.Result:
  from llada_jax import sampling  # noqa: PLC0415

  args, bench_model = ctx.args, ctx.model
  batch = prompts.shape[0]
  call = functools.partial(sampling.sample, bench_model.params, bench_model.config, prompts, lengths, keys, config)
  times, warm, out = timing.time_calls(call, repeats=args.repeats, warmup=args.warmup)
  settings = {"prompt_length": prompts.shape[1], "gen_length": config.gen_length,
              "block_length": config.block_length, "steps": config.steps, "cache": config.cache,
              "threshold": config.threshold, "temperature": config.temperature}
  result = core.Result("sampling", "", settings, times, warm)
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


def _compare_with_exact(result: core.Result, exact: core.Result | None, accuracy: dict | None,
                        exact_accuracy: dict | None):
  """Speed-up from the medians at the same batch size; accuracy and its drop (positive: worse)."""
  result.metrics["speedup_vs_exact"] = exact.median_s / result.median_s if exact else None
  if accuracy is not None:
    result.metrics.update(accuracy)
    drop = None
    if exact_accuracy is not None and accuracy["accuracy"] is not None:
      drop = exact_accuracy["accuracy"] - accuracy["accuracy"]
    result.metrics["accuracy_drop_vs_exact"] = drop
