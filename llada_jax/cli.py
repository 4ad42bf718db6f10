"""What the command-line tools share: the `--config` flag, how a tool's flags are parsed and how a
user's mistake is reported.

Library modules never import this one; the tools (`train`, `plan`, `generate`, ...) sit above them.
"""

from __future__ import annotations

import sys
import textwrap
from typing import Callable, Sequence

from absl import app, flags
from ml_collections import config_flags

from llada_jax import configs
from llada_jax.data.errors import DataError

# Mistakes in a user's input or flags: reported in one line, exit status 1, no traceback.
USER_ERRORS = (DataError, ValueError, FileNotFoundError, NotImplementedError)


def fail(error: Exception) -> int:
  print(f"error: {error}", file=sys.stderr)
  return 1


class _RecipeParser(flags.ArgumentParser):
  """`--config=` as a shipped recipe's name or package path as well as a user's file: the name is
  resolved to the file, which ml_collections' own parser then loads."""

  def __init__(self, file_parser: flags.ArgumentParser):
    self.file_parser = file_parser

  def parse(self, argument):
    spec, sep, arg = argument.partition(":")
    try:
      resolved = configs.resolve_path(spec)
    except FileNotFoundError as e:
      raise ValueError(str(e)) from None  # absl reports a flag's ValueError in one line
    return self.file_parser.parse(f"{resolved}{sep}{arg}")

  def flag_type(self):
    return self.file_parser.flag_type()


def define_config_flag(name: str = "config", help_string: str | None = None) -> flags.FlagHolder:
  """The locked training-config flag with `--config.FIELD=value` overrides."""
  holder = config_flags.DEFINE_config_file(
      name, None, help_string or f"A recipe: a shipped name ({', '.join(configs.recipe_names())}) or a "
      "config file, with an optional :arg.", lock_config=True)
  flag = flags.FLAGS[name]
  flag.parser = _RecipeParser(flag.parser)
  return holder


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
