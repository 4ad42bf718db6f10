"""What every benchmark section shares: measured results, the flags, the model under test, the section
registry, the tables and the JSON report.

The JSON report (`--output`) holds one run:

  command      the command line, as it could be typed again
  argv         its arguments, as given
  created      when the report was made (UTC, ISO 8601)
  environment  jax, backend, device_kind, device_count, cpu_count, python, platform
  model        sampling's model under test (source, num_params, config), or null where no section
               loaded one
  ceilings     the matmul FLOP/s per compute dtype that MFU is measured against (only those measured
               in this run)
  settings     every flag, with the `--model.FIELD` overrides merged into model_overrides
  results      one object per measured configuration: {"section", "name", "settings", "timing"
               (median_s, min_s, max_s, iqr_s, times_s, warmup_s), "metrics"}
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import datetime
import functools
import os
import platform
import shlex
import types
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from absl import flags

from llada_jax import configs
from llada_jax import model as model_lib
from llada_jax.storage import files

PROG = "python -m llada_jax.bench"

# The benchmark's own flags: apart from the process-wide absl.flags.FLAGS, so that they are parsed
# once per run (and again in the next run of the same process) and never meet another tool's flags.
FLAGS = flags.FlagValues()

# Not a preset of llada_jax.configs.models: the size at which the reference generate.py was timed.
_REFERENCE_SIZE = ("demo", dict(d_model=512, n_layers=8, n_heads=8, mlp_hidden_size=1536, vocab_size=8192))
MODEL_ALIASES = {"reference": _REFERENCE_SIZE, "ref35m": _REFERENCE_SIZE}


# --------------------------------------------------------------------------------------------
# Flags.


class ListParser(flags.ArgumentParser):
  """A comma-separated list, each item converted by `item`; with `choices`, a non-empty subset of them."""

  def __init__(self, item: Callable[[str], Any] = str, choices: Sequence[str] | None = None):
    self.item, self.choices = item, choices

  def parse(self, argument):
    texts = list(argument) if isinstance(argument, (list, tuple)) else argument.split(",")
    texts = [t.strip() if isinstance(t, str) else t for t in texts]
    try:
      values = [self.item(t) for t in texts if t != ""]
    except ValueError:
      what = "integers" if self.item is int else f"values of type {self.item.__name__}"
      raise ValueError(f"expected comma-separated {what}") from None
    # absl prefixes the message with `flag --NAME=VALUE: `.
    if self.choices is not None and (not values or any(v not in self.choices for v in values)):
      raise ValueError(f"expected names among {','.join(self.choices)}")
    return values

  def flag_type(self):
    return "comma-separated list"


# The flags that define_list defines belong to the modules that call it (absl groups `--help` by them).
flags.disclaim_key_flags()


def define_list(name: str, default: Sequence[Any], help_string: str, *, item: Callable[[str], Any] = str,
                choices: Sequence[str] | None = None) -> None:
  """A comma-separated list flag of the benchmark, its entries converted by `item` (and among `choices`)."""
  flags.DEFINE(ListParser(item, choices), name, list(default), help_string, flag_values=FLAGS,
               serializer=flags.CsvListSerializer(","))


def parse_value(text: str) -> Any:
  """A Python literal (`512`, `1e-5`, `None`, `True`), else the string itself (`bfloat16`)."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_overrides(text: str | None) -> dict[str, Any]:
  """`d_model=512,n_layers=8` -> {"d_model": 512, "n_layers": 8}."""
  out = {}
  for item in filter(None, (s.strip() for s in (text or "").split(","))):
    field, sep, value = item.partition("=")
    if not sep or not field.strip():
      raise ValueError(f"{item!r} is not FIELD=VALUE")
    out[field.strip()] = parse_value(value.strip())
  return out


class OverridesParser(flags.ArgumentParser):
  """`FIELD=VALUE,...` as a dict of model-config fields."""

  def parse(self, argument):
    return dict(argument) if isinstance(argument, Mapping) else parse_overrides(argument)

  def flag_type(self):
    return "FIELD=VALUE,..."


class OverridesSerializer(flags.ArgumentSerializer):

  def serialize(self, value):
    return ",".join(f"{k}={v!r}" for k, v in value.items())


def split_model_flags(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
  """Takes `--model.FIELD=VALUE` (or `--model.FIELD VALUE`) out of argv; absl parses the rest."""
  rest, overrides, i = [], {}, 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--model."):
      field, sep, value = arg[len("--model."):].partition("=")
      if not sep:
        if i + 1 >= len(argv):
          raise ValueError(f"{arg}: expected a value")
        value, i = argv[i + 1], i + 1
      overrides[field] = parse_value(value)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def parsed_flags(first: Sequence[str] = ()) -> types.SimpleNamespace:
  """Every flag's value, those named in `first` first: a copy, so that the next parse leaves it as is."""
  names = [*first, *(name for name in FLAGS if name not in first)]
  return types.SimpleNamespace(**{name: copy.deepcopy(FLAGS[name].value) for name in names})


# --------------------------------------------------------------------------------------------
# Measurement.


@dataclasses.dataclass
class Result:
  """One measured configuration of a section: what ran, how long each timed call took, derived rates."""

  section: str
  name: str
  settings: dict[str, Any]
  times_s: list[float]
  warmup_s: list[float] = dataclasses.field(default_factory=list)  # compilation included
  metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def median_s(self) -> float:
    return float(np.median(self.times_s))

  def timing(self) -> dict[str, Any]:
    q1, q3 = np.percentile(self.times_s, [25, 75])
    return {"median_s": self.median_s, "min_s": float(min(self.times_s)), "max_s": float(max(self.times_s)),
            "iqr_s": float(q3 - q1), "times_s": list(self.times_s), "warmup_s": list(self.warmup_s)}

  def to_dict(self) -> dict[str, Any]:
    return {"section": self.section, "name": self.name, "settings": self.settings, "timing": self.timing(),
            "metrics": self.metrics}

  def flat(self) -> dict[str, Any]:
    """Settings, timing and metrics in one mapping, for the table."""
    return {**self.settings, **self.timing(), **self.metrics}


# --------------------------------------------------------------------------------------------
# The model under test.


@dataclasses.dataclass
class BenchModel:
  config: model_lib.ModelConfig
  params: Any
  source: str  # "checkpoint:DIR" or "random:PRESET"
  run_config: dict | None = None  # the training run's config, with a checkpoint

  def describe(self) -> dict[str, Any]:
    return {"source": self.source, "num_params": self.config.num_params(),
            "config": dataclasses.asdict(self.config)}


def model_config_from_preset(name: str, overrides: Mapping[str, Any]) -> model_lib.ModelConfig:
  preset, alias_overrides = MODEL_ALIASES.get(name, (name, {}))
  values = {**configs.model_preset(preset).to_dict(), **alias_overrides, **overrides}
  return model_lib.ModelConfig.from_dict(values)


def random_tokens(rng: np.random.Generator, cfg: model_lib.ModelConfig, shape) -> np.ndarray:
  """Token ids that are none of the special ids (presets put them at the start or the end of the vocabulary)."""
  special = {cfg.mask_token_id, cfg.eos_token_id, cfg.bos_token_id}
  allowed = np.array([i for i in range(cfg.vocab_size) if i not in special], np.int32)
  return allowed[rng.integers(0, len(allowed), shape)]


def init_params(cfg: model_lib.ModelConfig, seed: int):
  """Random weights of `cfg`.

  The initialiser takes seconds to compile with full CPU codegen even at the tiny size, and it is
  not what is timed; unoptimised code still runs it in a fraction of that.
  """
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return jax.jit(lambda key: model_lib.init_params(cfg, key), compiler_options=options)(jax.random.key(seed))


def load_bench_model(args: types.SimpleNamespace) -> BenchModel:
  if args.checkpoint:
    from llada_jax.storage import checkpoint  # noqa: PLC0415 - Orbax only when a run is loaded

    # Only numerics (dtype, attention_impl, ...) can change: the weights fix the architecture.
    cfg, params, run_config = checkpoint.load_model(args.checkpoint, step=args.step,
                                                    overrides=args.model_overrides or None)
    return BenchModel(cfg, params, f"checkpoint:{args.checkpoint}", run_config)
  cfg = model_config_from_preset(args.model or "reference", args.model_overrides)
  return BenchModel(cfg, init_params(cfg, args.seed), f"random:{args.model or 'reference'}")


class Context:
  """What every section sees: the parsed flags, and the model and ceilings, made once on first use."""

  def __init__(self, args: types.SimpleNamespace):
    self.args = args

  @functools.cached_property
  def model(self) -> BenchModel:
    return load_bench_model(self.args)

  @functools.cached_property
  def ceilings(self):
    from llada_jax.bench import ceiling  # noqa: PLC0415 - the section module imports this one

    return ceiling.Ceilings(self)

  def loaded_model(self) -> BenchModel | None:
    """The model if a section asked for one (cached_property keeps it in the instance dict)."""
    return self.__dict__.get("model")


# --------------------------------------------------------------------------------------------
# Sections: each is a function Context -> [Result], a check of its flags and its table columns.


@dataclasses.dataclass(frozen=True)
class Column:
  header: str
  key: str
  fmt: str = "{}"


@dataclasses.dataclass(frozen=True)
class Section:
  run: Callable[[Context], list[Result]]
  columns: tuple[Column, ...]
  check: Callable[[types.SimpleNamespace], None]  # raises ValueError on bad flags, before anything runs


SECTIONS: dict[str, Section] = {}


def register(name: str, *, columns: Sequence[Column],
             check: Callable[[types.SimpleNamespace], None] = lambda args: None):
  def wrap(fn):
    SECTIONS[name] = Section(fn, tuple(columns), check)
    return fn
  return wrap


# --------------------------------------------------------------------------------------------
# Reporting.


def format_table(section: str, results: Sequence[Result], markdown: bool = False) -> str:
  """A fixed-width (or markdown) table of one section's results; columns no row has a value for are
  left out."""
  rows = [r.flat() for r in results]
  columns = [c for c in SECTIONS[section].columns if any(row.get(c.key) is not None for row in rows)]

  def cell(column, row):
    value = row.get(column.key)
    return "-" if value is None else column.fmt.format(value)

  cells = [[cell(c, row) for c in columns] for row in rows]
  if markdown:
    return "\n".join([f"[{section}]", "", "| " + " | ".join(c.header for c in columns) + " |",
                      "|" + " --- |" * len(columns)] + ["| " + " | ".join(r) + " |" for r in cells])
  widths = [max([len(c.header)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
  lines = [f"[{section}]", "  ".join(c.header.rjust(w) for c, w in zip(columns, widths))]
  lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
  return "\n".join(lines)


def environment() -> dict[str, Any]:
  device = jax.devices()[0]
  return {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": device.device_kind,
          "device_count": jax.device_count(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "platform": platform.platform()}


def report(ctx: Context, results: Sequence[Result], argv: Sequence[str]) -> dict[str, Any]:
  """The JSON report of one run (fields in the module docstring)."""
  loaded = ctx.loaded_model()
  ceilings = ctx.__dict__.get("ceilings")  # measured only where a section needed them
  return {
      "command": shlex.join([*PROG.split(), *argv]),
      "argv": list(argv),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "environment": environment(),
      "model": loaded.describe() if loaded else None,
      "ceilings": {dtype: r.metrics["flops_per_s"] for dtype, r in ceilings.results.items()} if ceilings else {},
      "settings": {k: v for k, v in vars(ctx.args).items() if k != "output"},
      "results": [r.to_dict() for r in results],
  }


write_json = files.write_json_atomic
