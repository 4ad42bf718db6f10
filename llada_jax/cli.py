"""What the command-line tools share: the `--config` flag, how a tool's flags are parsed and how a
user's mistake is reported.

Library modules never import this one; the tools (`train`, `plan`, `generate`, ...) sit above them.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import sys
import textwrap
from typing import Callable, Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from llada_jax import configs
from llada_jax.data.errors import DataError
from llada_jax.storage.lock import LockedError

# Mistakes in a user's input or flags, and what the machine refused (a path that is not writable, a
# directory another run holds): reported in one line, exit status 1, no traceback.
USER_ERRORS = (DataError, ValueError, OSError, NotImplementedError, LockedError)


def fail(error: Exception) -> int:
  print(f"error: {error}", file=sys.stderr)
  return 1


@contextlib.contextmanager
def device_memory_hint(lower: str, dtype_flag: str = "--dtype bfloat16"):
  """An out-of-device-memory error from XLA inside the block becomes a user error in one line that
  says what to lower (`lower`); every other runtime error stays a bug."""
  import jax  # noqa: PLC0415

  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise ValueError(f"out of device memory ({str(e).splitlines()[0][:200]}); expected less memory per call: "
                     f"lower {lower}, or use {dtype_flag}") from None


MESH_FLAG_AXES = ("data", "fsdp", "tensor")
_MESH_HELP = {
    "data": "Mesh: data-parallel devices (-1: those the other axes leave, the default). Without any --mesh.* "
            "flag the run's own mesh is used when it fits these devices, else every device goes on data.",
    "fsdp": "Mesh: devices the parameters are sharded over, FSDP style (default 1); the batch is split over "
            "data x fsdp.",
    "tensor": "Mesh: tensor-parallel devices, splitting heads, MLP and vocabulary (default 1).",
}


def define_mesh_flags(flag_values: flags.FlagValues) -> None:
  """`--mesh.data`, `--mesh.fsdp`, `--mesh.tensor`: the device mesh of a generation or evaluation tool."""
  for axis in MESH_FLAG_AXES:
    flags.DEFINE_integer(f"mesh.{axis}", None, _MESH_HELP[axis], flag_values=flag_values)


def define_distributed_flag(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_enum("distributed", "off", ["off", "auto"], "Several hosts: 'auto' calls "
                    "jax.distributed.initialize() first, which finds the other processes on Cloud TPU, SLURM and "
                    "Open MPI. Every host runs the same command; process 0 writes the results.",
                    flag_values=flag_values)


def start_distributed(args) -> bool:
  """Joins the other processes when `--distributed=auto` (before anything asks JAX for devices);
  returns whether this process is the one that writes results."""
  import jax  # noqa: PLC0415 - only tools that run a model need it

  from llada_jax import sharding  # noqa: PLC0415

  if getattr(args, "distributed", "off") == "auto":
    sharding.maybe_initialize_distributed({"initialize": "auto"})
  return jax.process_index() == 0


def mesh_flags(args, n_devices: int | None = None) -> dict[str, int] | None:
  """The mesh the `--mesh.*` flags ask for (`args` read by attribute), checked against the devices;
  None when no such flag is given. A mistake names the flags and what was expected."""
  given = {a: getattr(args, f"mesh.{a}", None) for a in MESH_FLAG_AXES}
  given = {a: v for a, v in given.items() if v is not None}
  if not given:
    return None
  for axis, value in given.items():
    if value == 0 or value < -1:
      raise ValueError(f"--mesh.{axis}={value}: expected a positive number of devices, or -1 for those the "
                       "other axes leave")
  shown = " ".join(f"--mesh.{a}={v}" for a, v in given.items())
  free = [a for a, v in given.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"{shown}: expected at most one axis of -1")
  mesh = {"data": given.get("data", 1 if free else -1), "fsdp": given.get("fsdp", 1),
          "tensor": given.get("tensor", 1)}
  if n_devices is None:
    import jax  # noqa: PLC0415 - only tools that run a model need it

    n_devices = jax.device_count()
  fixed = math.prod(v for v in mesh.values() if v != -1)
  rest = next((a for a, v in mesh.items() if v == -1), None)
  if rest and n_devices % fixed:
    raise ValueError(f"{shown}: the mesh needs a multiple of {fixed} devices but found {n_devices}; expected "
                     f"sizes whose product divides {n_devices} (--mesh.{rest} takes the devices left)")
  if not rest and fixed != n_devices:
    raise ValueError(f"{shown}: the mesh takes {fixed} devices but found {n_devices}; expected sizes whose "
                     f"product is {n_devices}, or one of them -1")
  return mesh


class _RecipeParser(flags.ArgumentParser):
  """`--config=` as a shipped recipe's name or package path as well as a user's file
  (`configs.load`); the config comes back locked, so a mistyped field is an error."""

  def parse(self, argument):
    try:
      config = configs.load(argument)
    except FileNotFoundError as e:
      raise ValueError(str(e)) from None  # absl reports a flag's ValueError in one line
    except Exception as e:  # noqa: BLE001 - whatever the recipe's get_config raised, in one line
      raise ValueError(f"{type(e).__name__}: {e}") from None
    config.lock()
    return config

  def flag_type(self):
    return "config object"


def define_config_flag(name: str = "config", help_string: str | None = None) -> flags.FlagHolder:
  """The locked training-config flag with `--config.FIELD=value` overrides."""
  holder = config_flags.DEFINE_config_file(
      name, None, help_string or f"A recipe: a shipped name ({', '.join(configs.recipe_names())}) or a "
      "config file, with an optional :arg.", lock_config=True)
  flags.FLAGS[name].parser = _RecipeParser()
  return holder


def _override_error(argv: Sequence[str], error: Exception) -> str:
  """What was wrong with a `--config.FIELD=value` override: the first path the config lacks, with
  the closest field name, or the error of the value that did not parse."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  overrides = [a for a in argv if a.startswith("--config.")]
  try:
    config = configs.load(spec) if spec else None
  except Exception:  # noqa: BLE001 - the --config value itself is reported by absl
    config = None
  for arg in overrides if config is not None else ():
    path = arg[len("--config."):].split("=", 1)[0]
    node, parents = config, []
    for part in path.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(part, fields, n=1)
        where = "config" + "".join(f".{p}" for p in parents)
        hint = f"; did you mean --{where}.{close[0]}?" if close else ""
        return f"--config.{path}: {where} has no field {part!r}{hint}"
      node, parents = node[part], parents + [part]
  culprit = overrides[-1] if len(overrides) == 1 else "--config.*"
  return f"{culprit}: {type(error).__name__}: {error}"


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing for `app.run(main, flags_parser=cli.parse_flags)`: a bad flag, recipe or
  config override is one line and exit status 1, never a traceback."""
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    message = str(e)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # raised by ml_collections for overrides
    message = _override_error(argv, e)
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


HELP_ARGS = ("-h", "-?", "-help", "--help", "--helpshort", "--helpfull")


def help_text(flag_values: flags.FlagValues, usage: str) -> str:
  """`usage` (a tool's docstring) followed by its flags, in the order they were defined."""
  lines, seen = [usage.strip(), "", "flags:"], set()
  for flag in (f for module_flags in flag_values.flags_by_module_dict().values() for f in module_flags):
    if flag.name in seen:
      continue
    seen.add(flag.name)
    shown = "" if flag.default is None or flag.default is False else f" (default: {flag.default_as_str})"
    lines.append(textwrap.fill(f"--{flag.name}: {' '.join(flag.help.split())}{shown}", 100, initial_indent="  ",
                               subsequent_indent="      "))
  return "\n".join(lines)


def run_tool(command: Callable[[list[str]], int], flag_values: flags.FlagValues, usage: str,
             argv: Sequence[str] | None = None) -> int:
  """Parses `argv` (the arguments after the program name; default `sys.argv[1:]`) into the tool's own
  `flag_values` and returns `command(positional arguments)`.

  Every call parses from the defaults again, so a tool can run several times in one process. A tool
  keeps its flags in its own FlagValues rather than absl's global FLAGS: several tools imported in
  one process (tests) then share no flag names. `--help` prints `usage` and the flags and returns 0;
  a bad flag, a wrong positional argument (`app.UsageError`) or one of USER_ERRORS prints one line
  `error: ...` and returns 1.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  options = argv[:argv.index("--")] if "--" in argv else argv
  if any(arg in HELP_ARGS for arg in options):
    print(help_text(flag_values, usage))
    return 0
  flag_values.unparse_flags()
  try:
    positional = flag_values([sys.argv[0], *argv])[1:]
  except flags.Error as e:
    return fail(e)
  try:
    return command(positional)
  except (app.UsageError, *USER_ERRORS) as e:
    return fail(e)
