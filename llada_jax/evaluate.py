"""Evaluate a trained model: likelihood tasks (ELBO) and generation benchmarks.

  python -m llada_jax.evaluate --checkpoint RUN_DIR --task {mc,scores,ppl,gsm8k,demo} --data FILE \\
      [--tokenizer PATH] [--mc_num 128] [--batch_size 16] [--cfg_scale 0] \\
      [--gen_length 256] [--steps N] [--block_length 32] [--temperature 0] [--cache none] \\
      [--threshold T] [--limit N] [--output results.json] [--seed 0] \\
      [--mesh.data N] [--mesh.fsdp N] [--mesh.tensor N]

Prints a one-table summary and, with --output, writes the metrics and per-example records as
JSON. Data formats are listed in `llada_jax.eval.tasks`. The parameters are sharded over the mesh
(default: the run's own when it fits these devices, else every device on data) and each batch is
split over its data x fsdp devices.
"""

from __future__ import annotations

import os
import sys
import time
import types
from typing import Any, Sequence

import jax
from absl import app, flags

from llada_jax import cli, placement
from llada_jax.data import tokenizer as tok_lib
from llada_jax.eval import likelihood, tasks as tasks_lib
from llada_jax.storage import checkpoint as ckpt_lib, files

LIKELIHOOD_TASKS = ("mc", "scores", "ppl")
GENERATION_TASKS = ("gsm8k", "demo")
_FINETUNED = ("sft", "vrpo", "naive_dpo")


# This tool's own flags (see cli.run_tool).
FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "A training run's workdir or its checkpoints/ directory.", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=FLAGS)
flags.DEFINE_enum("task", None, list(tasks_lib.TASKS), "Evaluation task.", flag_values=FLAGS)
flags.DEFINE_string("data", None, "JSONL file (plain text also accepted for ppl).", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "sentencepiece .model, tokenizer.json or a directory with one (default: "
                    "the run's data.tokenizer).", flag_values=FLAGS)
flags.DEFINE_enum("chat_template", "auto", ["auto", "true", "false"], "Wrap prompts in the chat template; auto: "
                  "as the run trained (never for pretraining).", flag_values=FLAGS)
flags.DEFINE_bool("append_eos", False, "Score answers followed by EOS (likelihood tasks).", flag_values=FLAGS)
flags.DEFINE_integer("limit", None, "Evaluate the first N examples.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Root of the Monte Carlo and sampling randomness.", flag_values=FLAGS)
flags.DEFINE_string("output", None, "JSON file for metrics and per-example records.", flag_values=FLAGS)
# Likelihood tasks.
flags.DEFINE_integer("mc_num", 128, "Likelihood: Monte Carlo samples per answer.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 16, "Rows per stratified round (likelihood); prompts per sampler call "
                     "(generation).", flag_values=FLAGS)
flags.DEFINE_float("cfg_scale", 0.0, "Unsupervised classifier-free guidance w.", flag_values=FLAGS)
# Generation tasks.
flags.DEFINE_integer("gen_length", 256, "Generation: tokens generated per prompt.", flag_values=FLAGS)
flags.DEFINE_integer("steps", None, "Generation: sampling steps (default: gen_length).", flag_values=FLAGS)
flags.DEFINE_integer("block_length", 32, "Generation: semi-autoregressive block length.", flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.0, "Generation: sampling temperature; 0: greedy.", flag_values=FLAGS)
flags.DEFINE_enum("remasking", "low_confidence", ["low_confidence", "random"], "Generation: which predictions "
                  "stay masked.", flag_values=FLAGS)
flags.DEFINE_bool("suppress_eos", False, "Generation: set the EOS logit to -inf.", flag_values=FLAGS)
flags.DEFINE_float("eos_confidence_penalty", 0.0, "Generation: subtracted from the confidence of EOS/EoT picks.",
                   flag_values=FLAGS)
flags.DEFINE_enum("cache", "none", ["none", "prefix", "dual"], "Generation: key/value cache.", flag_values=FLAGS)
flags.DEFINE_integer("refresh_every", 0, "Generation: with a cache, also recompute it every this many steps; 0: "
                     "block starts only.", flag_values=FLAGS)
flags.DEFINE_float("threshold", None, "Generation: confidence-threshold parallel decoding.", flag_values=FLAGS)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype override.", flag_values=FLAGS)
cli.define_mesh_flags(FLAGS)
cli.define_distributed_flag(FLAGS)
flags.mark_flags_as_required(["checkpoint", "task", "data"], flag_values=FLAGS)


def resolve_chat_template(flag: str, run_config: dict) -> bool:
  if flag != "auto":
    return flag == "true"
  data = run_config.get("data") or {}
  return run_config.get("objective") in _FINETUNED and bool(data.get("chat_template", False))


def sampler_config_from_args(args, eot_token_id: int | None = None):
  from llada_jax import sampling  # noqa: PLC0415 - only generation tasks need the sampler

  return sampling.SamplerConfig(
      gen_length=args.gen_length, block_length=min(args.block_length, args.gen_length),
      steps=args.steps or args.gen_length, temperature=args.temperature, remasking=args.remasking,
      cfg_scale=args.cfg_scale, suppress_eos=args.suppress_eos, eos_confidence_penalty=args.eos_confidence_penalty,
      eot_token_id=eot_token_id, cache=args.cache, refresh_every=args.refresh_every, threshold=args.threshold)


def evaluate(args) -> dict[str, Any]:
  """Runs one task as the flags (`args`, read by attribute) say; returns the JSON-able result."""
  if args.limit is not None and args.limit < 1:
    raise ValueError(f"--limit={args.limit}: expected a positive number of examples")
  requested_mesh = cli.mesh_flags(args)
  examples = tasks_lib.load_task(args.task, args.data, args.limit)
  # Bad flags fail before the model is loaded.
  if args.task in GENERATION_TASKS:
    sampler_config_from_args(args)
  else:
    likelihood.check_budget(args.mc_num, args.batch_size, args.cfg_scale)
  overrides = {"dtype": args.dtype} if args.dtype else None
  step, run_config = ckpt_lib.read_run_config(args.checkpoint, args.step)
  place = placement.for_run(run_config, requested_mesh)
  model_cfg, params, run_config = ckpt_lib.load_model(args.checkpoint, step=step, overrides=overrides,
                                                      mesh=place.mesh, rules=place.rules)
  tokenizer_path = args.tokenizer or (run_config.get("data") or {}).get("tokenizer")
  if not tokenizer_path:
    raise ValueError(f"{args.checkpoint}: the run config names no data.tokenizer; pass --tokenizer")
  tokenizer = tok_lib.load_tokenizer(tokenizer_path)
  tok_lib.check_vocab(tokenizer, model_cfg.vocab_size)
  chat_template = resolve_chat_template(args.chat_template, run_config)
  key = jax.random.key(args.seed)

  start = time.perf_counter()
  if args.task in LIKELIHOOD_TASKS:
    score_kwargs = dict(mc_num=args.mc_num, batch_size=args.batch_size, cfg_scale=args.cfg_scale, placement=place)
    if args.task == "mc":
      out = tasks_lib.run_multiple_choice(params, model_cfg, tokenizer, examples, key, chat_template=chat_template,
                                          append_eos=args.append_eos, **score_kwargs)
    elif args.task == "scores":
      out = tasks_lib.run_scores(params, model_cfg, tokenizer, examples, key, chat_template=chat_template,
                                 append_eos=args.append_eos, **score_kwargs)
    else:
      out = tasks_lib.run_perplexity(params, model_cfg, tokenizer, examples, key, append_eos=args.append_eos,
                                     **score_kwargs)
  else:
    sampler_config = sampler_config_from_args(args, tokenizer.eot_id)
    out = tasks_lib.run_generation(params, model_cfg, tokenizer, examples, sampler_config, key, task=args.task,
                                   batch_size=args.batch_size, chat_template=chat_template, placement=place)
  elapsed = time.perf_counter() - start
  if args.task in GENERATION_TASKS:  # compilation included
    out["metrics"]["tokens_per_s"] = len(examples) * args.gen_length / elapsed
  settings = {k: v for k, v in vars(args).items() if k not in ("output",)}
  settings["chat_template"] = chat_template
  settings["mesh"] = dict(place.mesh.shape)
  settings["tokenizer"] = os.fspath(tokenizer_path)
  return {"task": args.task, "n": len(examples), "metrics": out["metrics"], "time_s": elapsed,
          "settings": settings, "records": out["records"]}


def format_table(result: dict[str, Any]) -> str:
  rows = [(k, v) for k, v in result["metrics"].items() if k != "n"]
  lines = [f"{'task':<8} {'n':>6}  {'metric':<22} {'value':>12}  {'time':>8}"]
  for i, (name, value) in enumerate(rows):
    shown = "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
    head = f"{result['task']:<8} {result['n']:>6}" if i == 0 else " " * 15
    tail = f"{result['time_s']:>7.1f}s" if i == 0 else ""
    lines.append(f"{head}  {name:<22} {shown:>12}  {tail:>8}")
  return "\n".join(lines)


def _command(positional: list[str]) -> int:
  if positional:
    raise app.UsageError(f"unexpected arguments {' '.join(positional)}; expected flags only")
  args = types.SimpleNamespace(**FLAGS.flag_values_dict())
  if args.output:
    files.check_output_file(args.output, "--output")  # before the work it would hold
  lead = cli.start_distributed(args)
  with cli.device_memory_hint("--batch_size" + (" or --gen_length" if args.task in GENERATION_TASKS else "")):
    result = evaluate(args)
  if not lead:
    return 0
  print(format_table(result))
  if args.output:
    try:
      files.write_json_atomic(args.output, result)
    except OSError as e:
      raise ValueError(f"--output {args.output}: cannot be written ({e.strerror or e}); expected a writable "
                       "file path") from None
    print(f"wrote {args.output}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the tool on `argv` (the arguments after the program name; default: the command line)."""
  return cli.run_tool(_command, FLAGS, __doc__, argv)


if __name__ == "__main__":
  sys.exit(main())
