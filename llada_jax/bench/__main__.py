"""Benchmarks: wall time and derived rates of the framework's hot paths, as a table and JSON.

  python -m llada_jax.bench [--only ceiling,train_step,packing,lora,elbo,sampling,lm_eval,data,torch_baseline] \\
      [--size demo,ref35m] [--dtype float32,bfloat16] [--model PRESET | --checkpoint RUN_DIR] \\
      [--model.FIELD=VALUE ...] [--repeats 5] [--warmup 1] [--output bench.json]

Sections (`--only a,b`, run in that order; default: all but lm_eval and torch_baseline, ceiling first)
each time their own calls:

  ceiling     a large jitted matmul per compute dtype (float32 accumulation) and memory bandwidth:
              what MFU is measured against, in the same process.
  train_step  the training step exactly as llada_jax.train builds it (sharded on the default
              devices, state donated) for pretrain, SFT and VRPO at each n, the VRPO reference online
              or precomputed: tokens/s, achieved FLOP/s (llada_jax.metrics' analytic count), MFU
              against the measured ceiling of the same dtype (also as `MFU 6N`, counting the
              embedding like the reference PyTorch figures do), peak memory of the compiled step.
  packing     SFT and VRPO steps on a long-tailed length mix, one example per row against the same
              examples packed into rows (`data.packing`): useful (non-padding) tokens/s, padding
              fraction, examples per step, packed/padded; and the packed VRPO step at each
              `vrpo.copy_chunks` x `model.remat` (`--packing_chunks`, `--packing_remat`): step time
              and peak memory of the compiled step.
  lora        SFT and VRPO steps with LoRA adapters (float32 and bfloat16 frozen base) against full
              fine-tuning on the same batch: step time, peak memory of the compiled step, trainable
              parameters, each against full (`--lora_rank`, `--lora_vrpo_n`).
  elbo        likelihood scoring (llada_jax.eval.likelihood): sequences/s at each mc_num.
  sampling    every sampler variant (exact, prefix, dual, threshold, dual+threshold) at the given
              sizes: generated tokens/s, seconds per call, forward passes, speed-up vs exact; with a
              checkpoint and `--task_data`, also each variant's accuracy on the demo task.
  lm_eval     with a checkpoint and lm-eval installed: lm-evaluation-harness generate_until passes of
              the `llada_jax` model on a shipped task (`--lm_eval_task`, `--task_data`), per sampler
              variant: seconds per pass, seconds inside generate_until, accuracy, speed-up and points
              against the exact sampler.
  data        building the SFT and preference sources and reading one epoch of batches from the same
              `--data_records` records as JSONL and as Parquet: records/s and Parquet against JSONL.
  torch_baseline  with torch installed: the pretraining step beside the same architecture and step in
              plain PyTorch (llada_jax/bench/torch_model.py), same weights and batch, timed in turn
              (torch on os.cpu_count() threads): tokens/s of each, MFU, JAX/PyTorch.

train_step, packing, lora, elbo and torch_baseline run at the named `--size`s (a model preset and the
sequence length and batch it is timed at) in each `--dtype`. sampling runs a trained run (`--checkpoint`) or a preset of
llada_jax.configs.models with random weights (`--model`, default `reference` = `ref35m`: the size of
the reference PyTorch figures, d_model 512, 8 layers, 8 heads, MLP 1536, vocab 8192). `--model.FIELD`
overrides apply to every model. Every timed call blocks on its output; the first `--warmup` calls
(compilation) are timed apart and excluded.

`--output` writes a JSON report of the run: the command, environment, model, ceilings, every
setting and each result's timing and metrics (fields: llada_jax.bench.core).
"""

from __future__ import annotations

import sys
import types
from typing import Any, Sequence

from absl import flags

from llada_jax import cli
from llada_jax.bench import core
# Each section registers itself and defines its flags on import; this is the order they are listed in.
from llada_jax.bench import ceiling, train_step, packing, lora, elbo, sampling, lm_eval, data  # noqa: F401
from llada_jax.bench import torch_baseline  # noqa: F401 - imports torch only when it runs

# The ceiling first: the sections after it compute MFU against its measurements.
DEFAULT_ORDER = ("ceiling", "train_step", "packing", "lora", "elbo", "sampling", "lm_eval", "data", "torch_baseline")
_HELP = ("-h", "--help", "--helpfull", "--helpshort")

_ORDER = [name for name in DEFAULT_ORDER if name in core.SECTIONS] + [
    name for name in core.SECTIONS if name not in DEFAULT_ORDER]
# Run only when named: they need a trained run or an optional extra.
OPT_IN = ("lm_eval", "torch_baseline")
_DEFAULT = [name for name in _ORDER if name not in OPT_IN]
core.define_list("only", _DEFAULT, f"comma-separated sections to run, in order (default: {','.join(_DEFAULT)}; "
                 f"also {','.join(OPT_IN)})")
flags.DEFINE_string("checkpoint", None, "a training run's workdir or its checkpoints/ directory",
                    flag_values=core.FLAGS)
flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)", flag_values=core.FLAGS)
flags.DEFINE_string("model", None, f"a preset of llada_jax.configs.models or {','.join(core.MODEL_ALIASES)} (the "
                    "default), randomly initialised", flag_values=core.FLAGS)
flags.DEFINE(core.OverridesParser(), "model_overrides", {},
             "FIELD=VALUE,... over the preset (or numerics-only fields of a checkpoint)",
             flag_values=core.FLAGS, serializer=core.OverridesSerializer())
flags.DEFINE_integer("repeats", 5, "timed calls per measurement", flag_values=core.FLAGS)
flags.DEFINE_integer("warmup", 1, "untimed calls first (compilation)", flag_values=core.FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the random weights, inputs and sampling keys", flag_values=core.FLAGS)
flags.DEFINE_string("output", None, "JSON report path", flag_values=core.FLAGS)
flags.DEFINE_boolean("markdown", False, "print the tables as markdown", flag_values=core.FLAGS)

# The settings of the JSON report list these first, then each section's flags.
_COMMON = ("only", "checkpoint", "step", "model", "model_overrides", "repeats", "warmup", "seed", "output",
           "markdown")


def usage() -> str:
  return (f"{__doc__.rstrip()}\n\nflags:\n\n{core.FLAGS.get_help().strip()}\n\n"
          "Model fields can also be set as --model.FIELD=VALUE.")


def parse_args(argv: Sequence[str]) -> types.SimpleNamespace:
  """The flags of one run, checked (every chosen section's too) before anything runs.

  Raises absl.flags.Error where absl cannot parse them and ValueError where a check fails. Parsing
  again (the next run in the same process) starts from the defaults.
  """
  rest, dotted = core.split_model_flags(argv)
  core.FLAGS.unparse_flags()
  positional = core.FLAGS([core.PROG, *rest])[1:]
  if positional:
    raise flags.Error(f"unexpected arguments: {' '.join(positional)}")
  args = core.parsed_flags(first=_COMMON)
  args.model_overrides = {**args.model_overrides, **dotted}
  unknown = [s for s in args.only if s not in core.SECTIONS]
  if unknown or not args.only:
    raise ValueError(f"--only={','.join(args.only)}: expected sections among {','.join(core.SECTIONS)}")
  if args.checkpoint and args.model:
    raise ValueError("--checkpoint and --model: expected one of them (a checkpoint fixes the model)")
  if args.repeats < 1 or args.warmup < 0:
    raise ValueError(f"--repeats={args.repeats}, --warmup={args.warmup}: expected repeats >= 1, warmup >= 0")
  for name in args.only:  # every section's flags, before any section runs
    core.SECTIONS[name].check(args)
  return args


def run(args: types.SimpleNamespace, argv: Sequence[str]) -> dict[str, Any]:
  """Runs the chosen sections and returns the JSON report; prints each section's table."""
  ctx = core.Context(args)
  results = []
  for name in args.only:
    section_results = core.SECTIONS[name].run(ctx)
    print(core.format_table(name, section_results, markdown=args.markdown), flush=True)
    results += section_results
  return core.report(ctx, results, argv)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line: 0 on success, 2 where absl cannot parse the flags, 1 for any other mistake."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(arg in _HELP for arg in argv):
    print(usage())
    return 0
  try:
    args = parse_args(argv)
    report = run(args, argv)
  except flags.Error as e:
    cli.fail(e)
    return 2
  except cli.USER_ERRORS as e:
    return cli.fail(e)
  if args.output:
    core.write_json(args.output, report)
    print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
