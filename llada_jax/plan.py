"""python -m llada_jax.plan --config=RECIPE[:arg] --devices=N [--accelerator=v5p,h100] [--config.key=value ...]

Plans a run before any accelerator is rented: lowers and compiles the training step for N fake
CPU devices from abstract arrays and reports per-device memory, FLOPs and step-time estimates
(`llada_jax.training.planning`; how to read the numbers: docs/scale-out.md).
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
  raise SystemExit("error: --devices=N is required (the number of devices to plan for)")


# --------------------------------------------------------------------------------------------
# Command line.


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
  flags.mark_flag_as_required("devices")
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
      plan = planning.make_plan(config, accelerators=names, assumed_mfu=FLAGS.mfu, config_name=config_name)
    except cli.USER_ERRORS as e:
      return cli.fail(e)
    print(planning.format_plan(plan))
    if FLAGS.out:
      files.write_json_atomic(FLAGS.out, plan)
    return 0

  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  _cli()
