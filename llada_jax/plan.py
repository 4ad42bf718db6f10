"""python -m llada_jax.plan --config=RECIPE[:arg] --devices=N [--accelerator=v5p,h100] [--config.key=value ...]

Plans a run before any accelerator is rented: lowers and compiles the training step for N fake
CPU devices from abstract arrays and reports per-device memory, FLOPs and step-time estimates
(`llada_jax.training.planning`; how to read the numbers: docs/scale-out.md).

  python -m llada_jax.plan --config=llada_8b_sft --mode=generate --mesh.fsdp=16 --device=v5e \
      --gen_batch=16 --prompt_length=512 --gen_length=256 --block_length=32 --cache=dual

plans `generate` instead: its jitted sampler compiled on abstract sharded parameters
(`llada_jax.gen_planning`); --devices defaults to the product of the --mesh.* sizes.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Sequence


# --------------------------------------------------------------------------------------------
# Fake devices: must be set before JAX is imported.


def use_cpu_devices(n: int) -> None:
  """Asks for `n` CPU devices (XLA_FLAGS) and the CPU platform. Fails if JAX already started."""
  if "jax" in sys.modules:
    import jax  # noqa: PLC0415
    if jax.device_count() != n or jax.devices()[0].platform != "cpu":
      raise RuntimeError(f"JAX is already running with {jax.device_count()} {jax.devices()[0].platform} devices; "
                         f"--devices={n} must be set before JAX is imported")
    return
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"


def _mesh_devices(argv: Sequence[str]) -> int | None:
  """In --mode=generate, the devices the --mesh.* sizes multiply to (None without the mode)."""
  if "--mode=generate" not in argv:
    return None
  n = 1
  for arg in argv:
    match = re.fullmatch(r"--mesh\.(data|fsdp|tensor)=(\d+)", arg)
    n *= int(match.group(2)) if match else 1
  return n


def _devices_from_argv(argv: Sequence[str]) -> int:
  if any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in argv):
    return 1  # help needs no device count
  for i, arg in enumerate(argv):
    if arg.startswith("--devices="):
      value = arg.split("=", 1)[1]
    elif arg == "--devices" and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    if not value.isdigit() or int(value) < 1:
      raise SystemExit(f"error: --devices={value!r}: expected a positive number of devices")
    return int(value)
  if _mesh_devices(argv) is not None:
    return _mesh_devices(argv)
  raise SystemExit("error: --devices=N is required (the number of devices to plan for)")


# --------------------------------------------------------------------------------------------
# Command line.


def _define_generate_flags(flags, cli) -> None:
  flags.DEFINE_string("device", "v5e", "--mode=generate: comma-separated accelerators whose HBM the plan is "
                      "held against.")
  flags.DEFINE_integer("gen_batch", 16, "--mode=generate: prompts per sampler call (generate --batch_size).")
  flags.DEFINE_integer("prompt_length", 512, "--mode=generate: padded prompt length.")
  flags.DEFINE_integer("gen_length", 256, "--mode=generate: tokens generated per prompt.")
  flags.DEFINE_integer("block_length", None, "--mode=generate: block length (default: gen_length).")
  flags.DEFINE_integer("steps", None, "--mode=generate: sampling steps (default: gen_length).")
  flags.DEFINE_enum("cache", "none", ["none", "prefix", "dual"], "--mode=generate: key/value cache.")
  flags.DEFINE_float("threshold", None, "--mode=generate: confidence-threshold parallel decoding.")
  flags.DEFINE_float("cfg_scale", 0.0, "--mode=generate: classifier-free guidance (doubles the batch).")
  cli.define_mesh_flags(flags.FLAGS)


def _generate_plan(config, FLAGS, cli, config_name):  # noqa: N803 - absl's flag holder
  """(plan, text) of `generate` for the recipe's model on the --mesh.* mesh."""
  from llada_jax import gen_planning, model as model_lib, sampling  # noqa: PLC0415

  model_cfg = model_lib.ModelConfig.from_dict(config.model)
  if model_cfg.attention_impl in ("cudnn", "splash"):
    # Fused kernels need their accelerator; XLA attention holds the [q, k] scores: an upper bound.
    model_cfg = model_cfg.replace(attention_impl="xla")
  sampler = sampling.SamplerConfig(
      gen_length=FLAGS.gen_length, block_length=FLAGS.block_length or FLAGS.gen_length,
      steps=FLAGS.steps or FLAGS.gen_length, cache=FLAGS.cache, threshold=FLAGS.threshold,
      cfg_scale=FLAGS.cfg_scale)
  mesh = cli.mesh_flags(FLAGS) or {"data": -1}
  plan = gen_planning.make_generate_plan(
      model_cfg, sampler, mesh=mesh, gen_batch=FLAGS.gen_batch, prompt_length=FLAGS.prompt_length,
      accelerators=[a.strip() for a in FLAGS.device.split(",") if a.strip()],
      rules=config.get("sharding_rules") or None, config_name=config_name)
  return plan, gen_planning.format_generate_plan(plan)


def _cli() -> None:
  use_cpu_devices(_devices_from_argv(sys.argv[1:]))

  from absl import app, flags  # noqa: PLC0415

  from llada_jax import cli  # noqa: PLC0415
  from llada_jax.storage import files  # noqa: PLC0415
  from llada_jax.training import planning  # noqa: PLC0415

  config_flag = cli.define_config_flag()

  flags.DEFINE_integer("devices", None, "Number of devices to plan for (fake CPU devices).", lower_bound=1)
  flags.DEFINE_string("accelerator", "v5p,h100", f"Comma-separated accelerators to estimate for: "
                      f"{', '.join(sorted(planning.ACCELERATORS))}.")
  flags.DEFINE_float("mfu", 0.4, "Assumed model-FLOPs utilisation for the step-time estimate.")
  flags.DEFINE_string("out", "", "Also write the plan as JSON to this path.")
  flags.DEFINE_enum("mode", "train", ["train", "generate"], "What to plan: the training step or generate.")
  _define_generate_flags(flags, cli)
  FLAGS = flags.FLAGS  # noqa: N806

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = config_flag.value
    if config is None:
      raise app.UsageError("--config=RECIPE[:arg] is required")
    config.workdir = config.workdir or "unused-by-plan"  # nothing is written; validation wants one
    names = [a.strip() for a in FLAGS.accelerator.split(",") if a.strip()]
    config_name = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
    try:
      if FLAGS.mode == "generate":
        plan, text = _generate_plan(config, FLAGS, cli, config_name)
      else:
        plan = planning.make_plan(config, accelerators=names, assumed_mfu=FLAGS.mfu, config_name=config_name)
        text = planning.format_plan(plan)
    except cli.USER_ERRORS as e:
      return cli.fail(e)
    print(text)
    if FLAGS.out:
      files.write_json_atomic(FLAGS.out, plan)
    return 0

  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  _cli()
