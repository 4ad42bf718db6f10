"""Model presets and the shipped recipes, installed with the package.

`--config=` names a recipe in three ways: a shipped recipe by name (`demo_sft`, `llada_8b_vrpo:h100x8`),
its path inside the package (`llada_jax/configs/demo_sft.py`), or any user file (`my_run.py:arg`).
A user file starts from `llada_jax.configs.base.base_config()` like the shipped ones. Nothing here
reads the repository: the recipes are modules of this package.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import ml_collections

from llada_jax.configs import models
from llada_jax.configs.base import OBJECTIVES, base_config, validate  # noqa: F401 - the public names

_HERE = pathlib.Path(__file__).resolve().parent
# Modules of this package that are not training recipes.
_NOT_RECIPES = ("__init__", "base", "models", "demo_common")


def recipe_names() -> list[str]:
  """The shipped recipes, by the name `--config=` takes."""
  return sorted(p.stem for p in _HERE.glob("*.py") if p.stem not in _NOT_RECIPES)


def model_preset(name: str) -> ml_collections.ConfigDict:
  """A model preset (`models.PRESETS`) with every ModelConfig field, as a recipe's `c.model`."""
  return models.get_config(name)


def resolve_path(spec: str) -> pathlib.Path:
  """The file a `--config=` value (without its `:arg`) names: a user file, a shipped recipe's name,
  or a shipped recipe's path inside the package (`llada_jax/configs/NAME.py`, also `configs/NAME.py`)."""
  if os.path.isfile(spec):
    return pathlib.Path(spec)
  path = pathlib.PurePath(spec)
  name = path.stem if path.suffix == ".py" else path.name
  shipped = _HERE / f"{name}.py"
  inside = len(path.parts) == 1 or path.parent.name == "configs"
  if inside and name not in _NOT_RECIPES and shipped.is_file():
    return shipped
  raise FileNotFoundError(f"no config file and no shipped recipe named {spec!r}; expected a config file or one of "
                          f"{', '.join(recipe_names())}")


def load(spec: str) -> ml_collections.ConfigDict:
  """`get_config([arg])` of the recipe `spec` (`NAME[:arg]` or `PATH[:arg]`), as `--config=` loads it."""
  path_spec, _, arg = spec.partition(":")
  path = resolve_path(path_spec)
  module_spec = importlib.util.spec_from_file_location(f"_llada_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
