"""Shared test helpers."""

import importlib.util
import pathlib

import jax
import numpy as np

_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load_config_module(name: str):
  spec = importlib.util.spec_from_file_location(f"_llada_configs_{name}", _CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def preset(name: str) -> dict:
  """A model preset from configs/models.py as a plain dict."""
  return dict(load_config_module("models").get_config(name))


def sharp_tiny_model():
  """The tiny preset with weights x3: predictions depend strongly on context, so estimator errors show."""
  from llada_jax import model as M  # noqa: PLC0415

  cfg = M.ModelConfig.from_dict(preset("tiny"))
  params = jax.tree_util.tree_map(lambda x: x * 3.0, M.init_params(cfg, jax.random.key(0)))
  return cfg, params, jax.jit(M.logits_fn(cfg))


def np_log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
