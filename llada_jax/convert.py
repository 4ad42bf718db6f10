"""Converts Hugging Face LLaDA checkpoints to llada_jax run directories and back (`llada_jax.storage.huggingface`).

  python -m llada_jax.convert import HF_DIR RUN_DIR [--param_dtype bfloat16] [--scan_layers] [--tokenizer FILE] \\
      [--allow_outside_links] [--overwrite]
  python -m llada_jax.convert export RUN_DIR HF_DIR [--step N] [--dtype bfloat16] [--max_shard_size 5GB] \\
      [--copy_from HF_DIR] [--overwrite]

import: a Hugging Face LLaDA directory (config.json, model.safetensors or shards with their index,
optionally tokenizer.json) becomes a run directory that generate, evaluate and training read like a
training run. export: a run directory's checkpoint becomes safetensors shards, their index and a
config.json for the reference modeling_llada.py. Tensors are streamed one at a time, and the
destination must be new or empty; --overwrite replaces an existing one once the new one is complete.
Import reads only files inside HF_DIR; --allow_outside_links follows links out of it (a hub cache).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Sequence

from absl import app, flags

from llada_jax import cli
from llada_jax.storage import huggingface, lock

# Which flags belong to which command; a flag of the other command is refused.
_COMMAND_FLAGS = {"import": ("param_dtype", "scan_layers", "tokenizer", "allow_outside_links"),
                  "export": ("step", "dtype", "max_shard_size", "copy_from")}
_POSITIONAL = {"import": "HF_DIR RUN_DIR", "export": "RUN_DIR HF_DIR"}

# This tool's own flags (see cli.run_tool).
FLAGS = flags.FlagValues()
flags.DEFINE_enum("param_dtype", "float32", list(huggingface.PARAM_DTYPES), "import: dtype of the stored "
                  "parameters (bfloat16 weights convert to float32 exactly).", flag_values=FLAGS)
flags.DEFINE_bool("scan_layers", False, "import: store the blocks stacked, for training configs with "
                  "model.scan_layers=True.", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "import: tokenizer.json (default: HF_DIR/tokenizer.json if present).",
                    flag_values=FLAGS)
flags.DEFINE_bool("allow_outside_links", False, "import: read files of HF_DIR that are links to elsewhere (a "
                  "Hugging Face hub cache links every file to a blob outside the snapshot directory).",
                  flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty destination directory, once the new one "
                  "is complete.", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "export: checkpoint step (default: the latest).", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", list(huggingface.PARAM_DTYPES), "export: dtype of the written tensors.",
                  flag_values=FLAGS)
flags.DEFINE_string("max_shard_size", huggingface.DEFAULT_MAX_SHARD_SIZE, "export: largest shard file, e.g. 5GB, "
                    "500MB, 2GiB (a larger single tensor gets its own shard).", flag_values=FLAGS)
flags.DEFINE_string("copy_from", None, "export: a Hugging Face LLaDA directory whose modeling/configuration .py "
                    "files, tokenizer and generation config are copied beside the weights.", flag_values=FLAGS)


def _check_arguments(positional: list[str]) -> str:
  """The command (`import` or `export`), once its positional arguments and flags are checked."""
  command = positional[0] if positional else None
  if command not in _COMMAND_FLAGS:
    raise app.UsageError(f"expected the command import or export first, got {command or 'none'}")
  if len(positional) != 3:
    raise app.UsageError(f"{command}: expected {_POSITIONAL[command]}, got {' '.join(positional[1:]) or 'nothing'}")
  other = next(c for c in _COMMAND_FLAGS if c != command)
  stray = [name for name in _COMMAND_FLAGS[other] if FLAGS[name].present]
  if stray:
    raise app.UsageError(f"--{stray[0]} applies to {other}, not {command}")
  return command


def _command(positional: list[str]) -> int:
  command = _check_arguments(positional)
  source, dest = positional[1:]
  with lock.DirectoryLock.for_output(dest, f"convert {command}"):
    return _convert(command, source, dest)


def _convert(command: str, source: str, dest: str) -> int:
  if command == "import":
    cfg = huggingface.import_checkpoint(source, dest, param_dtype=FLAGS.param_dtype, scan_layers=FLAGS.scan_layers,
                                        tokenizer=FLAGS.tokenizer, overwrite=FLAGS.overwrite,
                                        allow_outside_links=FLAGS.allow_outside_links)
    print(f"wrote {dest}: {cfg.num_params():,} parameters; model config "
          f"{json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if v is not None})}")
  else:
    summary = huggingface.export_checkpoint(source, dest, step=FLAGS.step, dtype=FLAGS.dtype,
                                            max_shard_size=FLAGS.max_shard_size, copy_from=FLAGS.copy_from,
                                            overwrite=FLAGS.overwrite)
    print(f"wrote {dest}: step {summary['step']}, {summary['tensors']} tensors, "
          f"{summary['total_size']:,} bytes ({summary['dtype']}) in {len(summary['files'])} file(s)")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the tool on `argv` (the arguments after the program name; default: the command line)."""
  return cli.run_tool(_command, FLAGS, __doc__, argv)


if __name__ == "__main__":
  sys.exit(main())
