"""python -m llada_jax.demo [--workdir runs/demo] [--full | --smoke] [--seeds 0,1,2] [--dtype auto]

The LLaDA 1.5 recipe in miniature, offline on a CPU (`llada_jax.recipes.demo`): task, tokenizer,
pretraining, SFT, preference pairs, VRPO and naive DPO, evaluation, Table 2 and the figures. Run
again, it resumes where it stopped. Results and timings: docs/demo.md.
"""

from __future__ import annotations

import dataclasses
import pathlib

from absl import app, flags, logging

from llada_jax import cli, compilation_cache
from llada_jax.recipes import demo

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where every stage writes its outputs.")
_FULL = flags.DEFINE_bool("full", False, "The longer recipe: a 5.6M-parameter model and 2400 training steps.")
_SMOKE = flags.DEFINE_bool("smoke", False, "A seconds-long version of the whole chain (for tests).")
_SEEDS = flags.DEFINE_list("seeds", None, "Alignment seeds (default: the recipe's 0,1,2).")
_DTYPE = flags.DEFINE_string("dtype", "auto", "Compute dtype: float32, bfloat16, or auto (bfloat16 where its "
                             "matmuls measure clearly faster than float32's; a workdir keeps its first choice).")


def main(argv):
  del argv
  if _FULL.value and _SMOKE.value:
    return cli.fail(ValueError("--full and --smoke: expected at most one recipe flag"))
  recipe = demo.SMOKE if _SMOKE.value else demo.FULL if _FULL.value else demo.LEAN
  if _SEEDS.value:
    if not all(s.strip().isdigit() for s in _SEEDS.value):
      return cli.fail(ValueError(f"--seeds={','.join(_SEEDS.value)}: expected integers >= 0, comma-separated"))
    recipe = dataclasses.replace(recipe, seeds=tuple(int(s) for s in _SEEDS.value))
  try:
    demo.check_recipe(_WORKDIR.value, recipe)
    compilation_cache.enable(pathlib.Path(_WORKDIR.value) / "jax_cache")
    dtype, why = demo.choose_dtype(_DTYPE.value, _WORKDIR.value)
    logging.info("demo: computing in %s (%s)", dtype, why)
    summary = demo.run_demo(_WORKDIR.value, dataclasses.replace(recipe, dtype=dtype))
  except cli.USER_ERRORS as e:
    return cli.fail(e)
  print(demo.format_results(summary))
  print()
  print(demo.format_variance_table(summary["variance_table"]))
  print(f"total {summary['seconds']['total']:.0f} s; details in {_WORKDIR.value}/results.json")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
