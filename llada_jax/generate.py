"""Generates completions from a trained checkpoint.

  python -m llada_jax.generate --checkpoint WORKDIR --prompt "what is 2 plus 3" [--chat_template]
  python -m llada_jax.generate --checkpoint WORKDIR --input prompts.jsonl --output out.jsonl \
      --gen_length 128 --block_length 32 --steps 128 --cache dual --threshold 0.9

Input JSONL lines need a string `prompt` field. Output lines are `{"prompt": ..., "completion": ...}`
(stdout without --output). The completion is decoded up to the first EOS, with end-of-turn markers
removed. Each prompt draws its randomness from `fold_in(key(seed), index)` and is padded and masked so that
its completion does not depend on --batch_size or on the other prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import jax
import numpy as np

from llada_jax import cli, checkpoint, sampling
from llada_jax.eval.generation import completion_ids
from llada_jax.data import sources
from llada_jax.data import tokenizer as tokenizer_lib
from llada_jax.data.errors import DataError

def read_prompts(path: str) -> list[str]:
  """The `prompt` field of every line of a JSONL file, checked (errors name file, line and field)."""
  return [sources.get_string(obj, "prompt", path=path, line=line) for line, obj in sources.iter_jsonl(path)]


def _check_tokenizer(tok, model_cfg) -> None:
  tokenizer_lib.check_vocab(tok, model_cfg.vocab_size)
  for name, model_id, tok_id in (("mask", model_cfg.mask_token_id, tok.mask_id),
                                 ("eos", model_cfg.eos_token_id, tok.eos_id)):
    if model_id != tok_id:
      raise ValueError(f"the tokenizer's {name} id is {tok_id} but the model's is {model_id}; "
                       "expected the tokenizer the model was trained with")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m llada_jax.generate", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="a training run's workdir or its checkpoints/ dir")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--prompt", action="append", help="prompt text; repeat for several")
  source.add_argument("--input", help="JSONL file whose lines have a 'prompt' field")
  p.add_argument("--tokenizer", default=None, help="sentencepiece .model, tokenizer.json or a directory with one (default: the run's data.tokenizer)")
  p.add_argument("--chat_template", action="store_true", help="wrap each prompt in the chat template")
  p.add_argument("--gen_length", type=int, default=128)
  p.add_argument("--block_length", type=int, default=None, help="default: gen_length")
  p.add_argument("--steps", type=int, default=None, help="default: gen_length")
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--remasking", choices=sampling.REMASKING, default="low_confidence")
  p.add_argument("--cfg_scale", type=float, default=0.0)
  p.add_argument("--suppress_eos", action="store_true")
  p.add_argument("--eos_confidence_penalty", type=float, default=0.0)
  p.add_argument("--cache", choices=sampling.CACHE_MODES, default="none")
  p.add_argument("--refresh_every", type=int, default=0)
  p.add_argument("--threshold", type=float, default=None)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype override")
  p.add_argument("--output", default=None, help="JSONL output file (default: stdout)")
  p.add_argument("--seed", type=int, default=0)
  return p


def run(args: argparse.Namespace) -> list[dict]:
  if args.batch_size <= 0:
    raise ValueError(f"--batch_size={args.batch_size}: expected a positive integer")
  # Inputs first: a bad file fails before the model is loaded.
  texts = args.prompt if args.input is None else read_prompts(args.input)
  if not texts:
    raise DataError("no prompts found; expected at least one line with a 'prompt' field", path=args.input)

  overrides = {"dtype": args.dtype} if args.dtype else None
  model_cfg, params, run_config = checkpoint.load_model(args.checkpoint, step=args.step, overrides=overrides)
  tok_path = args.tokenizer or (run_config.get("data") or {}).get("tokenizer")
  if not tok_path:
    raise ValueError("no tokenizer: pass --tokenizer (the run config has no data.tokenizer)")
  tok = tokenizer_lib.load_tokenizer(tok_path)
  _check_tokenizer(tok, model_cfg)

  config = sampling.SamplerConfig(
      gen_length=args.gen_length, block_length=args.block_length or args.gen_length,
      steps=args.steps or args.gen_length, temperature=args.temperature, remasking=args.remasking,
      cfg_scale=args.cfg_scale, suppress_eos=args.suppress_eos,
      eos_confidence_penalty=args.eos_confidence_penalty, eot_token_id=tok.eot_id, cache=args.cache,
      refresh_every=args.refresh_every, threshold=args.threshold)
  prompt_ids = [tok.chat_prompt(t) if args.chat_template else tok.encode(t) for t in texts]
  root = jax.random.key(args.seed)

  results, nfe, start = [], 0, time.perf_counter()
  for first in range(0, len(prompt_ids), args.batch_size):
    batch = prompt_ids[first:first + args.batch_size]
    n = len(batch)
    # A short last batch is filled with copies so every batch reuses one compilation.
    batch = batch + [batch[-1]] * (args.batch_size - n)
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(np.arange(first, first + len(batch)))
    out = sampling.sample_from_ids(params, model_cfg, batch, keys, config)
    tokens = np.asarray(out.tokens)[:n]
    nfe += int(out.nfe)
    for i in range(n):
      ids = completion_ids(tok, tokens[i])
      results.append({"prompt": texts[first + i], "completion": tok.decode(ids)})
  seconds = time.perf_counter() - start
  generated = len(prompt_ids) * config.gen_length
  print(f"{len(prompt_ids)} prompts, {generated} tokens in {seconds:.2f}s ({generated / seconds:.1f} tokens/s, "
        f"compilation included), {nfe} forward passes", file=sys.stderr)
  return results


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    results = run(args)
  except cli.USER_ERRORS as e:
    return cli.fail(e)
  lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
  if args.output:
    cli.write_text_atomic(args.output, lines)
  else:
    sys.stdout.write(lines)
  return 0


if __name__ == "__main__":
  sys.exit(main())
