"""Writes the demo recipe's arithmetic word-problem task (`llada_jax.data.demo_task`).

  python -m llada_jax.task --out_dir DIR [--train N] [--validation N] [--test N] [--pretrain N] [--seed S] \\
      [--level easy|medium|hard] [--min_ops K] [--max_ops K] [--ops +-*] [--max_operand M] [--max_value V] \\
      [--max_factor F]

Writes DIR/{train,validation,test}.jsonl (`{"prompt", "response", "answer", "n_ops", "op_seq"}` per
line) and DIR/pretrain.txt (the first --pretrain training problems, default --train, as running text
separated by blank lines), byte for byte the same for the same flags. The difficulty knobs override
the --level preset.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import app, flags

from llada_jax import cli
from llada_jax.data import demo_task

_KNOBS = ("min_ops", "max_ops", "ops", "max_operand", "max_value", "max_factor")

# This tool's own flags (see cli.run_tool).
FLAGS = flags.FlagValues()
flags.DEFINE_string("out_dir", None, "Directory to write the task files into.", flag_values=FLAGS)
flags.DEFINE_integer("train", 5000, "Training problems.", flag_values=FLAGS)
flags.DEFINE_integer("validation", 200, "Validation problems.", flag_values=FLAGS)
flags.DEFINE_integer("test", 500, "Test problems.", flag_values=FLAGS)
flags.DEFINE_integer("pretrain", None, "Training problems in pretrain.txt (default: --train).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of every split's problems.", flag_values=FLAGS)
flags.DEFINE_enum("level", demo_task.DEFAULT_LEVEL, list(demo_task.LEVELS), "Difficulty preset.",
                  flag_values=FLAGS)
flags.DEFINE_integer("min_ops", None, "Fewest operations per problem.", flag_values=FLAGS)
flags.DEFINE_integer("max_ops", None, "Most operations per problem.", flag_values=FLAGS)
flags.DEFINE_string("ops", None, "Allowed operations, e.g. '+-' or '+-*'.", flag_values=FLAGS)
flags.DEFINE_integer("max_operand", None, "Largest start amount and number added or subtracted.",
                     flag_values=FLAGS)
flags.DEFINE_integer("max_value", None, "Largest value any number may take.", flag_values=FLAGS)
flags.DEFINE_integer("max_factor", None, "Multiplication is by a factor in 2..max_factor.", flag_values=FLAGS)
flags.mark_flag_as_required("out_dir", flag_values=FLAGS)


def _command(positional: list[str]) -> int:
  if positional:
    raise app.UsageError(f"unexpected arguments {' '.join(positional)}; expected flags only")
  difficulty = demo_task.make_difficulty(FLAGS.level, **{k: FLAGS[k].value for k in _KNOBS})
  paths = demo_task.write_task(FLAGS.out_dir, train=FLAGS.train, validation=FLAGS.validation, test=FLAGS.test,
                               pretrain=FLAGS.pretrain, seed=FLAGS.seed, level=difficulty)
  print(f"wrote {', '.join(paths.values())} ({difficulty}, seed={FLAGS.seed})")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the tool on `argv` (the arguments after the program name; default: the command line)."""
  return cli.run_tool(_command, FLAGS, __doc__, argv)


if __name__ == "__main__":
  sys.exit(main())
