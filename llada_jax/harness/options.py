"""The `--model_args` of the lm-evaluation-harness model, parsed and checked before any work.

lm-eval hands model arguments over as strings (`key=value,...`, partly converted to bool/int/float)
or as a dict; each is converted to its field's type here, and a mistake (an unknown key, a value of
the wrong type, a missing checkpoint) raises `ModelArgsError` with one line naming the argument.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from typing import Any, Mapping

from llada_jax.eval import likelihood


class ModelArgsError(ValueError):
  """A bad `--model_args` entry: the message names the argument and what was expected."""


@dataclasses.dataclass(frozen=True)
class Options:
  """Every model argument, with the defaults of `python -m llada_jax.evaluate`."""

  checkpoint: str
  step: int | None = None  # None: the latest checkpoint
  tokenizer: str | None = None  # None: the run's data.tokenizer
  dtype: str | None = None  # compute dtype override
  seed: int = 0  # root of every random draw: jax.random.key(seed), as evaluate
  # Likelihood.
  mc_num: int = 128
  batch_size: int = 16  # rows per stratified round (likelihood); prompts per sampler call (generation)
  cfg_scale: float = 0.0
  append_eos: bool = False
  check_greedy: bool = False
  max_length: int | None = None  # None: sequences are never cut or windowed
  # Generation (llada_jax.sampling.SamplerConfig); gen_length None: each request's max_gen_toks.
  gen_length: int | None = None
  steps: int | None = None
  block_length: int = 32
  temperature: float = 0.0
  remasking: str = "low_confidence"
  suppress_eos: bool = False
  eos_confidence_penalty: float = 0.0
  cache: str = "none"
  refresh_every: int = 0
  threshold: float | None = None
  # Device mesh sizes, as the tools' --mesh.data/fsdp/tensor. None of them: one device (JAX's default).
  data: int | None = None
  fsdp: int | None = None
  tensor: int | None = None


MESH_AXES = ("data", "fsdp", "tensor")


# The LLaDA reference harness calls the guidance scale `cfg`.
ALIASES = {"cfg": "cfg_scale"}
_CHOICES = {"dtype": ("float32", "bfloat16"), "remasking": ("low_confidence", "random"),
            "cache": ("none", "prefix", "dual")}
_FIELDS = {f.name: f for f in dataclasses.fields(Options)}
_OPTIONAL = {name for name, f in _FIELDS.items() if f.default is None}
_KIND = {"step": int, "seed": int, "mc_num": int, "batch_size": int, "max_length": int, "gen_length": int,
         "steps": int, "block_length": int, "refresh_every": int, "cfg_scale": float, "temperature": float,
         "eos_confidence_penalty": float, "threshold": float, "append_eos": bool, "check_greedy": bool,
         "suppress_eos": bool, "data": int, "fsdp": int, "tensor": int}
_POSITIVE = ("mc_num", "batch_size", "max_length", "gen_length", "steps", "block_length")


def _convert(name: str, value: Any) -> Any:
  """`value` as field `name`'s type; strings are read as lm-eval's `key=value` parser would."""
  if name in _OPTIONAL and (value is None or (isinstance(value, str) and value.strip().lower() == "none")):
    return None
  kind = _KIND.get(name, str)
  text = value.strip() if isinstance(value, str) else value
  if kind is bool:
    if isinstance(text, bool):
      return text
    if isinstance(text, str) and text.lower() in ("true", "false"):
      return text.lower() == "true"
    raise ModelArgsError(f"model_args {name}={value!r}: expected true or false")
  if kind is int:
    if isinstance(text, str):
      try:
        text = int(text)
      except ValueError:
        pass
    if isinstance(text, int) and not isinstance(text, bool):
      return text
    raise ModelArgsError(f"model_args {name}={value!r}: expected an integer")
  if kind is float:
    if isinstance(text, str):
      try:
        text = float(text)
      except ValueError:
        pass
    if isinstance(text, (int, float)) and not isinstance(text, bool) and math.isfinite(text):
      return float(text)
    raise ModelArgsError(f"model_args {name}={value!r}: expected a finite number")
  if not isinstance(text, str) or not text:
    raise ModelArgsError(f"model_args {name}={value!r}: expected a non-empty string")
  if name in _CHOICES and text not in _CHOICES[name]:
    raise ModelArgsError(f"model_args {name}={value!r}: expected one of {', '.join(_CHOICES[name])}")
  return text


def _unknown(key: str) -> ModelArgsError:
  close = difflib.get_close_matches(key, [*_FIELDS, *ALIASES], n=1)
  hint = f" (did you mean {close[0]}?)" if close else ""
  return ModelArgsError(f"model_args: unknown argument {key!r}{hint}; expected some of "
                        f"{', '.join(_FIELDS)}")


def parse(model_args: Mapping[str, Any]) -> Options:
  """Options from lm-eval's model arguments (a dict of strings or values)."""
  values: dict[str, Any] = {}
  for key, value in model_args.items():
    name = ALIASES.get(key, key)
    if name not in _FIELDS:
      raise _unknown(key)
    if name in values:
      raise ModelArgsError(f"model_args: {name} is given twice (as {key} and as an alias); expected it once")
    values[name] = _convert(name, value)
  if values.get("checkpoint") is None:
    raise ModelArgsError("model_args: checkpoint is missing; expected checkpoint=RUN_DIR (a llada_jax run "
                         "directory or its checkpoints/ directory)")
  options = Options(**values)
  check(options)
  return options


def check(options: Options) -> None:
  """Raises ModelArgsError for values that are each well typed but do not work (together)."""
  for name in _POSITIVE:
    value = getattr(options, name)
    if value is not None and value < 1:
      raise ModelArgsError(f"model_args {name}={value}: expected a positive integer")
  if options.max_length == 1:
    raise ModelArgsError("model_args max_length=1: expected at least 2 (a window needs a token of context)")
  if options.step is not None and options.step < 0:
    raise ModelArgsError(f"model_args step={options.step}: expected a saved step >= 0 (or none: the latest)")
  try:
    likelihood.check_budget(options.mc_num, options.batch_size, options.cfg_scale)
  except ValueError as e:
    raise ModelArgsError(f"model_args: {e}") from None
  # The sampler settings, checked on a stand-in length when each request brings its own.
  sampler_config(options, options.gen_length or options.block_length)


def requested_mesh(options: Options, n_devices: int | None = None) -> dict[str, int] | None:
  """The mesh the data/fsdp/tensor arguments ask for, checked against the devices as the tools'
  --mesh.* flags are (`cli.mesh_flags`); None when none is given."""
  from llada_jax import cli  # noqa: PLC0415 - the tools' own rules, so both agree

  args = types.SimpleNamespace(**{f"mesh.{axis}": getattr(options, axis) for axis in MESH_AXES})
  try:
    return cli.mesh_flags(args, n_devices)
  except ValueError as e:
    # The tools name their flags `--mesh.x`; here they are model arguments.
    raise ModelArgsError("model_args " + str(e).replace("--mesh.", "")) from None


def sampler_config(options: Options, gen_length: int, eot_token_id: int | None = None):
  """The SamplerConfig `python -m llada_jax.evaluate` builds from the same settings."""
  from llada_jax import evaluate  # noqa: PLC0415 - the command-line tool's own mapping, so both agree

  args = types.SimpleNamespace(**{**dataclasses.asdict(options), "gen_length": gen_length})
  try:
    return evaluate.sampler_config_from_args(args, eot_token_id)
  except ValueError as e:
    # SamplerConfig names its fields `sampler.x`; here they are model arguments.
    raise ModelArgsError(f"model_args {str(e).removeprefix('sampler.')}") from None
