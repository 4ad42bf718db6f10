"""Evaluate a trained model: likelihood tasks (ELBO) and generation benchmarks.

  python -m llada_jax.evaluate --checkpoint RUN_DIR --task {mc,scores,ppl,gsm8k,demo} --data FILE \\
      [--tokenizer PATH] [--mc_num 128] [--batch_size 16] [--cfg_scale 0] \\
      [--gen_length 256] [--steps N] [--block_length 32] [--temperature 0] [--cache none] \\
      [--threshold T] [--limit N] [--output results.json] [--seed 0]

Prints a one-table summary and, with --output, writes the metrics and per-example records as
JSON. Data formats are listed in `llada_jax.eval.tasks`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

import jax

from llada_jax import cli, checkpoint as ckpt_lib
from llada_jax.data import tokenizer as tok_lib
# The public evaluation API, importable from here as well as from llada_jax.eval.
from llada_jax.eval import (TASKS, evaluate_generation, extract_gsm8k_answer, gsm8k_verify,
                            guided_logits_fn, load_task, run_generation, run_multiple_choice, run_perplexity,
                            run_scores, score_answers)
from llada_jax.eval import likelihood, tasks as tasks_lib

__all__ = ["TASKS", "evaluate", "evaluate_generation", "extract_gsm8k_answer", "gsm8k_verify", "guided_logits_fn",
           "load_task", "main", "run_generation", "run_multiple_choice", "run_perplexity", "run_scores",
           "score_answers"]

LIKELIHOOD_TASKS = ("mc", "scores", "ppl")
GENERATION_TASKS = ("gsm8k", "demo")
_FINETUNED = ("sft", "vrpo", "naive_dpo")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m llada_jax.evaluate", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="a training run's workdir or its checkpoints/ directory")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--task", required=True, choices=tasks_lib.TASKS)
  p.add_argument("--data", required=True, help="JSONL file (plain text also accepted for ppl)")
  p.add_argument("--tokenizer", default=None, help="sentencepiece .model, tokenizer.json or a directory with one (default: the run's data.tokenizer)")
  p.add_argument("--chat_template", choices=("auto", "true", "false"), default="auto",
                 help="wrap prompts in the chat template; auto: as the run trained (never for pretraining)")
  p.add_argument("--append_eos", action="store_true", help="score answers followed by EOS (likelihood tasks)")
  p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", default=None, help="JSON file for metrics and per-example records")
  lik = p.add_argument_group("likelihood")
  lik.add_argument("--mc_num", type=int, default=128, help="Monte Carlo samples per answer")
  lik.add_argument("--batch_size", type=int, default=16,
                   help="rows per stratified round (likelihood); prompts per sampler call (generation)")
  lik.add_argument("--cfg_scale", type=float, default=0.0, help="unsupervised classifier-free guidance w")
  gen = p.add_argument_group("generation")
  gen.add_argument("--gen_length", type=int, default=256)
  gen.add_argument("--steps", type=int, default=None, help="default: gen_length")
  gen.add_argument("--block_length", type=int, default=32)
  gen.add_argument("--temperature", type=float, default=0.0)
  gen.add_argument("--remasking", choices=("low_confidence", "random"), default="low_confidence")
  gen.add_argument("--suppress_eos", action="store_true")
  gen.add_argument("--eos_confidence_penalty", type=float, default=0.0)
  gen.add_argument("--cache", choices=("none", "prefix", "dual"), default="none")
  gen.add_argument("--refresh_every", type=int, default=0)
  gen.add_argument("--threshold", type=float, default=None, help="confidence-threshold parallel decoding")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype override")
  return p


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


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
  """Runs one task as the CLI flags say; returns the JSON-able result."""
  if args.limit is not None and args.limit < 1:
    raise ValueError(f"--limit={args.limit}: expected a positive number of examples")
  examples = tasks_lib.load_task(args.task, args.data, args.limit)
  # Bad flags fail before the model is loaded.
  if args.task in GENERATION_TASKS:
    sampler_config_from_args(args)
  else:
    likelihood.check_budget(args.mc_num, args.batch_size, args.cfg_scale)
  overrides = {"dtype": args.dtype} if args.dtype else None
  model_cfg, params, run_config = ckpt_lib.load_model(args.checkpoint, step=args.step, overrides=overrides)
  tokenizer_path = args.tokenizer or (run_config.get("data") or {}).get("tokenizer")
  if not tokenizer_path:
    raise ValueError(f"{args.checkpoint}: the run config names no data.tokenizer; pass --tokenizer")
  tokenizer = tok_lib.load_tokenizer(tokenizer_path)
  tok_lib.check_vocab(tokenizer, model_cfg.vocab_size)
  chat_template = resolve_chat_template(args.chat_template, run_config)
  key = jax.random.key(args.seed)

  start = time.perf_counter()
  if args.task in LIKELIHOOD_TASKS:
    score_kwargs = dict(mc_num=args.mc_num, batch_size=args.batch_size, cfg_scale=args.cfg_scale)
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
                                   batch_size=args.batch_size, chat_template=chat_template)
  elapsed = time.perf_counter() - start
  if args.task in GENERATION_TASKS:  # compilation included
    out["metrics"]["tokens_per_s"] = len(examples) * args.gen_length / elapsed
  settings = {k: v for k, v in vars(args).items() if k not in ("output",)}
  settings["chat_template"] = chat_template
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


write_json = cli.write_json_atomic


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    result = evaluate(args)
  except cli.USER_ERRORS as e:
    return cli.fail(e)
  print(format_table(result))
  if args.output:
    write_json(args.output, result)
    print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
