"""python -m llada_jax.train --config=RECIPE[:arg] [--config.key=value ...]

RECIPE is a shipped recipe's name (`demo_sft`, `llada_8b_vrpo:h100x8`) or a config file. One loop
for pretraining, SFT, VRPO and naive DPO (`llada_jax.training.loop`); running the same command
again resumes where the run stopped.
"""

from __future__ import annotations

from absl import app, logging

from llada_jax import cli

_CONFIG = cli.define_config_flag()


def main(argv):
  if len(argv) > 1:
    return cli.fail(ValueError(f"unexpected arguments {argv[1:]}: flags only (--config=RECIPE --config.FIELD=VALUE)"))
  config = _CONFIG.value
  if config is None:
    return cli.fail(ValueError("--config=RECIPE is required (a shipped recipe's name or a config file)"))
  from llada_jax.training import loop  # noqa: PLC0415 - keeps `--help` fast

  lower = ("config.data.seq_len or config.data.global_batch_size, raise config.grad_accum_steps, set "
           "config.model.remat=full")
  try:
    with cli.device_memory_hint(lower, dtype_flag="config.model.dtype=bfloat16"):
      result = loop.run(config)
  except (*cli.USER_ERRORS, loop.TrainingError) as e:
    return cli.fail(e)
  logging.info("Finished at step %d%s", result.final_step, " (preempted)" if result.preempted else "")
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
