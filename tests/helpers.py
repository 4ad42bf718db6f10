"""Shared test helpers."""

import importlib.util
import pathlib

_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load_config_module(name: str):
  spec = importlib.util.spec_from_file_location(f"_llada_configs_{name}", _CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def preset(name: str) -> dict:
  """A model preset from configs/models.py as a plain dict."""
  return dict(load_config_module("models").get_config(name))
