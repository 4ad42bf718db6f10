"""Converts Hugging Face LLaDA checkpoints and PEFT LoRA adapters to llada_jax run directories and back
(`llada_jax.storage.huggingface`, `llada_jax.storage.peft`).

  python -m llada_jax.convert import HF_DIR RUN_DIR [--param_dtype bfloat16] [--scan_layers] [--tokenizer FILE] \\
      [--allow_outside_links] [--overwrite]
  python -m llada_jax.convert export RUN_DIR HF_DIR [--step N] [--dtype bfloat16] [--max_shard_size 5GB] \\
      [--copy_from HF_DIR] [--overwrite]
  python -m llada_jax.convert export RUN_DIR PEFT_DIR --peft [--step N] [--dtype bfloat16] [--overwrite]
  python -m llada_jax.convert import-peft PEFT_DIR RUN_DIR --base BASE_RUN [--allow_outside_links] [--overwrite]

import: a Hugging Face LLaDA directory (config.json, model.safetensors or shards with their index,
optionally tokenizer.json) becomes a run directory that generate, evaluate and training read like a
training run. export: a run directory's checkpoint becomes safetensors shards, their index and a
config.json for the reference modeling_llada.py; a LoRA run's is its merged model (the base with the
adapters folded in), and with --peft its adapters alone as a PEFT adapter directory
(adapter_config.json, adapter_model.safetensors). import-peft: a PEFT LoRA adapter directory becomes
a LoRA run on BASE_RUN (a run directory, e.g. one written by import) that generate and evaluate read
like a trained LoRA run. Tensors are streamed one at a time, and the destination must be new or
empty; --overwrite replaces an existing one once the new one is complete. Imports read only files
inside the input directory; --allow_outside_links follows links out of it (a hub cache).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Sequence

from absl import app, flags

from llada_jax import cli
from llada_jax.storage import huggingface, lock, peft

# Which flags belong to which command; a flag of another command is refused.
_COMMAND_FLAGS = {"import": ("param_dtype", "scan_layers", "tokenizer", "allow_outside_links"),
                  "export": ("step", "dtype", "max_shard_size", "copy_from", "peft"),
                  "import-peft": ("base", "allow_outside_links")}
_POSITIONAL = {"import": "HF_DIR RUN_DIR", "export": "RUN_DIR HF_DIR", "import-peft": "PEFT_DIR RUN_DIR"}
_NOT_WITH_PEFT = ("max_shard_size", "copy_from")  # export flags of the full model only

# This tool's own flags (see cli.run_tool).
FLAGS = flags.FlagValues()
flags.DEFINE_enum("param_dtype", "float32", list(huggingface.PARAM_DTYPES), "import: dtype of the stored "
                  "parameters (bfloat16 weights convert to float32 exactly).", flag_values=FLAGS)
flags.DEFINE_bool("scan_layers", False, "import: store the blocks stacked, for training configs with "
                  "model.scan_layers=True.", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "import: tokenizer.json (default: HF_DIR/tokenizer.json if present).",
                    flag_values=FLAGS)
flags.DEFINE_bool("allow_outside_links", False, "import, import-peft: read files of HF_DIR / PEFT_DIR that are "
                  "links to elsewhere (a "
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
flags.DEFINE_bool("peft", False, "export: write a LoRA run's adapters as a PEFT adapter directory instead of the "
                  "merged model.", flag_values=FLAGS)
flags.DEFINE_string("base", None, "import-peft: the llada_jax run directory of the base model the adapters were "
                    "trained on (e.g. written by import).", flag_values=FLAGS)


def _check_arguments(positional: list[str]) -> str:
  """The command (`import`, `export` or `import-peft`), once its positional arguments and flags are checked."""
  command = positional[0] if positional else None
  if command not in _COMMAND_FLAGS:
    raise app.UsageError(f"expected the command import, export or import-peft first, got {command or 'none'}")
  if len(positional) != 3:
    raise app.UsageError(f"{command}: expected {_POSITIONAL[command]}, got {' '.join(positional[1:]) or 'nothing'}")
  stray = [name for names in _COMMAND_FLAGS.values() for name in names
           if FLAGS[name].present and name not in _COMMAND_FLAGS[command]]
  if stray:
    owner, *also = [c for c, names in _COMMAND_FLAGS.items() if stray[0] in names]
    raise app.UsageError(f"--{stray[0]} applies to {owner}, not {command}" + (f" (also to {', '.join(also)})"
                                                                                 if also else ""))
  stray = [name for name in _NOT_WITH_PEFT if FLAGS.peft and FLAGS[name].present]
  if stray:
    raise app.UsageError(f"--{stray[0]} applies to the merged export, not --peft")
  if command == "import-peft" and not FLAGS.base:
    raise app.UsageError("import-peft: expected --base BASE_RUN (the run directory of the model the adapters "
                         "were trained on)")
  return command


def _command(positional: list[str]) -> int:
  command = _check_arguments(positional)
  source, dest = positional[1:]
  with lock.DirectoryLock.for_output(dest, f"convert {command}"):
    return _convert(command, source, dest)


def _model_fields(cfg) -> str:
  return json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if v is not None})


def _convert(command: str, source: str, dest: str) -> int:
  if command == "import":
    cfg = huggingface.import_checkpoint(source, dest, param_dtype=FLAGS.param_dtype, scan_layers=FLAGS.scan_layers,
                                        tokenizer=FLAGS.tokenizer, overwrite=FLAGS.overwrite,
                                        allow_outside_links=FLAGS.allow_outside_links)
    print(f"wrote {dest}: {cfg.num_params():,} parameters; model config {_model_fields(cfg)}")
  elif command == "import-peft":
    cfg = peft.import_adapters(source, dest, base=FLAGS.base, overwrite=FLAGS.overwrite,
                               allow_outside_links=FLAGS.allow_outside_links)
    print(f"wrote {dest}: LoRA adapters r={cfg.lora_rank}, alpha={cfg.lora_alpha:g} on {', '.join(cfg.lora_targets)} "
          f"of {FLAGS.base}")
  elif FLAGS.peft:
    summary = peft.export_adapters(source, dest, step=FLAGS.step, dtype=FLAGS.dtype, overwrite=FLAGS.overwrite)
    print(f"wrote {dest}: step {summary['step']}, {summary['tensors']} adapter tensors (r={summary['r']} on "
          f"{', '.join(summary['target_modules'])}), {summary['total_size']:,} bytes ({summary['dtype']})")
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
