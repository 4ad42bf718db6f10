"""Generates completions from a trained checkpoint.

  python -m llada_jax.generate --checkpoint WORKDIR --prompt "what is 2 plus 3" [--chat_template]
  python -m llada_jax.generate --checkpoint WORKDIR --input prompts.jsonl --output out.jsonl \\
      --gen_length 128 --block_length 32 --steps 128 --cache dual --threshold 0.9

Input JSONL lines need a string `prompt` field. Output lines are `{"prompt": ..., "completion": ...}`
(stdout without --output). The completion is decoded up to the first EOS, with end-of-turn markers
removed.

Token ids instead of text: `--input_ids FILE` reads JSONL lines whose `prompt_ids` field is a list of
token ids, used as given (no chat template, no tokenizer needed). `--output_ids` (the default with
--input_ids) writes `{"prompt_ids": [...], "completion_ids": [...]}` lines, the completion's ids cut
as its text is, plus `prompt` and `completion` text when a tokenizer is at hand. Each prompt draws its randomness from `fold_in(key(seed), index)` and is padded and masked so that
its completion does not depend on --batch_size or on the other prompts.

The parameters are sharded over a device mesh and each batch split over its data x fsdp devices:
`--mesh.data`, `--mesh.fsdp`, `--mesh.tensor` (default: the run's own mesh when it fits, else all data).
"""

from __future__ import annotations

import json
import sys
import time
import types
from typing import Sequence

import jax
import numpy as np
from absl import app, flags
from etils import epath

from llada_jax import cli, model as model_lib, placement, sampling
from llada_jax.data import readers, token_ids
from llada_jax.data import tokenizer as tokenizer_lib
from llada_jax.data.errors import DataError
from llada_jax.storage import checkpoint, files

# This tool's own flags (see cli.run_tool).
FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "A training run's workdir or its checkpoints/ dir.", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=FLAGS)
flags.DEFINE_multi_string("prompt", None, "Prompt text", flag_values=FLAGS)
flags.DEFINE_string("input", None, "JSONL file whose lines have a 'prompt' field.", flag_values=FLAGS)
flags.DEFINE_string("input_ids", None, "JSONL file whose lines have a 'prompt_ids' field (a list of token ids).",
                    flag_values=FLAGS)
flags.DEFINE_bool("output_ids", None, "Write prompt_ids and completion_ids (default: with --input_ids).",
                  flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "sentencepiece .model, tokenizer.json or a directory with one (default: "
                    "the run's data.tokenizer).", flag_values=FLAGS)
flags.DEFINE_bool("chat_template", False, "Wrap each prompt in the chat template.", flag_values=FLAGS)
flags.DEFINE_integer("gen_length", 128, "Tokens generated per prompt.", flag_values=FLAGS)
flags.DEFINE_integer("block_length", None, "Semi-autoregressive block length (default: gen_length).",
                     flag_values=FLAGS)
flags.DEFINE_integer("steps", None, "Sampling steps over all blocks (default: gen_length).", flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0: greedy.", flag_values=FLAGS)
flags.DEFINE_enum("remasking", "low_confidence", list(sampling.REMASKING), "Which predictions stay masked.",
                  flag_values=FLAGS)
flags.DEFINE_float("cfg_scale", 0.0, "Unsupervised classifier-free guidance weight w; 0: off.", flag_values=FLAGS)
flags.DEFINE_bool("suppress_eos", False, "Set the EOS logit to -inf.", flag_values=FLAGS)
flags.DEFINE_float("eos_confidence_penalty", 0.0, "Subtracted from the confidence of EOS/EoT picks.",
                   flag_values=FLAGS)
flags.DEFINE_enum("cache", "none", list(sampling.CACHE_MODES), "Key/value cache.", flag_values=FLAGS)
flags.DEFINE_integer("refresh_every", 0, "With a cache, also recompute it every this many steps; 0: block "
                     "starts only.", flag_values=FLAGS)
flags.DEFINE_float("threshold", None, "Confidence-threshold parallel decoding.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "Prompts per sampler call.", flag_values=FLAGS)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype override.", flag_values=FLAGS)
flags.DEFINE_string("output", None, "JSONL output file (default: stdout).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Root of every prompt's random key.", flag_values=FLAGS)
cli.define_mesh_flags(FLAGS)
cli.define_distributed_flag(FLAGS)
flags.mark_flag_as_required("checkpoint", flag_values=FLAGS)
flags.mark_flags_as_mutual_exclusive(["prompt", "input", "input_ids"], required=True, flag_values=FLAGS)


def read_prompts(path: str) -> list[str]:
  """The `prompt` field of every line of a JSONL file, checked (errors name file, line and field)."""
  return [readers.get_string(obj, "prompt", path=path, line=line) for line, obj in readers.iter_jsonl(path)]


def check_prompt_flags(prompts: list[str]) -> list[str]:
  """The --prompt values, held to the rules of an --input line's 'prompt' field."""
  for i, text in enumerate(prompts):
    which = "--prompt" if len(prompts) == 1 else f"--prompt number {i + 1}"
    if not text:
      raise ValueError(f"{which} is empty; expected non-empty prompt text")
    readers.check_utf8(text, path=None, line=None, field=which)
  return prompts


def _check_tokenizer(tok, model_cfg) -> None:
  tokenizer_lib.check_vocab(tok, model_cfg.vocab_size)
  for name, model_id, tok_id in (("mask", model_cfg.mask_token_id, tok.mask_id),
                                 ("eos", model_cfg.eos_token_id, tok.eos_id)):
    if model_id != tok_id:
      raise ValueError(f"the tokenizer's {name} id is {tok_id} but the model's is {model_id}; "
                       "expected the tokenizer the model was trained with")


def _read_inputs(args) -> tuple[list[str] | None, list[tuple[int, list[int]]] | None]:
  """(prompt texts, None) or (None, (line, prompt ids) records), the file's records checked."""
  if args.input_ids is None:
    texts = check_prompt_flags(args.prompt) if args.input is None else read_prompts(args.input)
    if not texts:
      raise DataError("no prompts found; expected at least one line with a 'prompt' field", path=args.input)
    return texts, None
  if args.chat_template:
    raise ValueError("--chat_template wraps prompt text; expected --prompt or --input with it (the ids of "
                     "--input_ids are used as given)")
  records = token_ids.read_prompt_ids(args.input_ids)
  if not records:
    raise DataError(f"no prompts found; expected at least one line with a '{token_ids.FIELD}' field",
                    path=args.input_ids)
  return None, records


def _load_tokenizer(args, run_config, model_cfg, required: bool):
  """The tokenizer, checked against the model; None when token ids need none and none is at hand
  (the run's own data.tokenizer may not exist where its ids are decoded)."""
  path = args.tokenizer or (run_config.get("data") or {}).get("tokenizer")
  if not required and not args.tokenizer and (not path or not epath.Path(path).exists()):
    print("no tokenizer (pass --tokenizer for text): writing token ids only", file=sys.stderr)
    return None
  if not path:
    raise ValueError("no tokenizer: pass --tokenizer (the run config has no data.tokenizer)")
  tok = tokenizer_lib.load_tokenizer(path)
  _check_tokenizer(tok, model_cfg)
  return tok


def _sampler_config(args, tok) -> sampling.SamplerConfig:
  return sampling.SamplerConfig(
      gen_length=args.gen_length, block_length=args.block_length or args.gen_length,
      steps=args.steps or args.gen_length, temperature=args.temperature, remasking=args.remasking,
      cfg_scale=args.cfg_scale, suppress_eos=args.suppress_eos,
      eos_confidence_penalty=args.eos_confidence_penalty, eot_token_id=tok.eot_id if tok else None,
      cache=args.cache, refresh_every=args.refresh_every, threshold=args.threshold)


def _sample_all(params, model_cfg, prompt_ids, config, place, args) -> tuple[list[np.ndarray], int]:
  """The generated ids of every prompt, and the forward passes it took."""
  root = jax.random.key(args.seed)
  generated, nfe = [], 0
  for first in range(0, len(prompt_ids), args.batch_size):
    batch = prompt_ids[first:first + args.batch_size]
    n = len(batch)
    # A short last batch is filled with copies so every batch reuses one compilation.
    batch = batch + [batch[-1]] * (args.batch_size - n)
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(np.arange(first, first + len(batch)))
    out = sampling.sample_from_ids(params, model_cfg, batch, keys, config, placement=place)
    generated.extend(np.asarray(out.tokens)[:n])
    nfe += int(out.nfe)
  return generated, nfe


def _records(texts, prompt_ids, generated, tok, stops, with_ids: bool) -> list[dict]:
  results = []
  for i, (prompt, tokens) in enumerate(zip(prompt_ids, generated)):
    ids = token_ids.completion_ids(tokens, stops)
    record = {"prompt_ids": [int(t) for t in prompt], "completion_ids": ids} if with_ids else {}
    if tok is not None:
      record["prompt"] = texts[i] if texts is not None else tok.decode(prompt)
      record["completion"] = tok.decode(ids)
    results.append(record)
  return results


def run(args) -> list[dict]:
  """Completions of the prompts as the flags (`args`, read by attribute) say."""
  if args.batch_size <= 0:
    raise ValueError(f"--batch_size={args.batch_size}: expected a positive integer")
  requested_mesh = cli.mesh_flags(args)
  # Inputs first: a bad file fails before the model is loaded.
  texts, id_records = _read_inputs(args)
  with_ids = args.output_ids if args.output_ids is not None else id_records is not None
  step, run_config = checkpoint.read_run_config(args.checkpoint, args.step)
  if id_records is not None:  # the run config knows the vocabulary: still before the weights are read
    declared = model_lib.ModelConfig.from_dict(run_config["model"])
    token_ids.check_in_vocab(id_records, declared.vocab_size, declared.mask_token_id, path=args.input_ids)

  overrides = {"dtype": args.dtype} if args.dtype else None
  place = placement.for_run(run_config, requested_mesh)
  model_cfg, params, run_config = checkpoint.load_model(args.checkpoint, step=step, overrides=overrides,
                                                        mesh=place.mesh, rules=place.rules)
  tok = _load_tokenizer(args, run_config, model_cfg, required=texts is not None or not with_ids)
  config = _sampler_config(args, tok)
  if texts is not None:
    prompt_ids = [tok.chat_prompt(t) if args.chat_template else tok.encode(t) for t in texts]
  else:
    prompt_ids = [ids for _, ids in id_records]

  start = time.perf_counter()
  generated, nfe = _sample_all(params, model_cfg, prompt_ids, config, place, args)
  seconds = time.perf_counter() - start
  generated_tokens = len(prompt_ids) * config.gen_length
  print(f"{len(prompt_ids)} prompts, {generated_tokens} tokens in {seconds:.2f}s "
        f"({generated_tokens / seconds:.1f} tokens/s, compilation included), {nfe} forward passes on mesh "
        f"{dict(place.mesh.shape)}", file=sys.stderr)
  stops = (tok.eos_id, tok.eot_id) if tok is not None else (model_cfg.eos_token_id,)
  return _records(texts, prompt_ids, generated, tok, stops, with_ids)


def _command(positional: list[str]) -> int:
  if positional:
    raise app.UsageError(f"unexpected arguments {' '.join(positional)}; expected flags only")
  args = types.SimpleNamespace(**FLAGS.flag_values_dict())
  if args.output:
    files.check_output_file(args.output, "--output")  # before the work it would hold
  lead = cli.start_distributed(args)
  with cli.device_memory_hint(f"--batch_size (now {args.batch_size}) or --gen_length (now {args.gen_length})"):
    results = run(args)
  if not lead:
    return 0
  lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
  if args.output:
    try:
      files.write_text_atomic(args.output, lines)
    except OSError as e:
      raise ValueError(f"--output {args.output}: cannot be written ({e.strerror or e}); expected a writable "
                       "file path") from None
  else:
    sys.stdout.write(lines)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the tool on `argv` (the arguments after the program name; default: the command line)."""
  return cli.run_tool(_command, FLAGS, __doc__, argv)


if __name__ == "__main__":
  sys.exit(main())
