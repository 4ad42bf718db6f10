"""Trains a sentencepiece tokenizer with the LLaDA special tokens (`llada_jax.data.tokenizer`).

  python -m llada_jax.tokenizer train --input a.txt --input b.jsonl --model_prefix out/tok --vocab_size 2048

Inputs are plain text or JSONL (the `text`, `prompt`, `response`, `chosen`, `rejected` and
`messages[*].content` fields); writes PREFIX.model and PREFIX.vocab, neither of which may exist
unless --overwrite.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import app, flags

from llada_jax import cli
from llada_jax.storage import lock

COMMANDS = ("train",)

# This tool's own flags (see cli.run_tool).
FLAGS = flags.FlagValues()
flags.DEFINE_multi_string("input", None, "Text or JSONL file", flag_values=FLAGS)
flags.DEFINE_string("model_prefix", None, "Writes PREFIX.model and PREFIX.vocab.", flag_values=FLAGS)
flags.DEFINE_integer("vocab_size", None, "Number of ids, special tokens and byte pieces included.",
                     flag_values=FLAGS)
flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "sentencepiece model type.", flag_values=FLAGS)
flags.DEFINE_float("character_coverage", 0.9995, "Share of characters the pieces cover.", flag_values=FLAGS)
flags.DEFINE_integer("max_sentences", 2_000_000, "Most text lines to train on.", flag_values=FLAGS)
flags.DEFINE_integer("num_threads", None, "Trainer threads (default: all cores).", flag_values=FLAGS)
flags.DEFINE_bool("verbose", False, "Show the trainer's log.", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace an existing PREFIX.model and PREFIX.vocab (a run trained with the "
                  "old tokenizer cannot use the new one).", flag_values=FLAGS)
flags.mark_flags_as_required(["input", "model_prefix", "vocab_size"], flag_values=FLAGS)


def _command(positional: list[str]) -> int:
  if positional != ["train"]:
    raise app.UsageError(f"expected the command {' or '.join(COMMANDS)} and no other argument, got "
                         f"{' '.join(positional) or 'none'}")
  from llada_jax.data import tokenizer as tok_lib  # noqa: PLC0415 - keeps `--help` fast

  with lock.DirectoryLock.for_output(f"{FLAGS.model_prefix}.model", "tokenizer train"):
    tok = tok_lib.train_sentencepiece(
        FLAGS.input, FLAGS.model_prefix, FLAGS.vocab_size, model_type=FLAGS.model_type,
        character_coverage=FLAGS.character_coverage, max_sentences=FLAGS.max_sentences,
        num_threads=FLAGS.num_threads, verbose=FLAGS.verbose, overwrite=FLAGS.overwrite)
  print(f"wrote {tok.model_path} (vocab_size={tok.vocab_size}, special ids={tok.special_ids})")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the tool on `argv` (the arguments after the program name; default: the command line)."""
  return cli.run_tool(_command, FLAGS, __doc__, argv)


if __name__ == "__main__":
  sys.exit(main())
