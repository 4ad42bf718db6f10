"""Shared test helpers."""

import contextlib
import signal

import jax
import numpy as np


def preset(name: str) -> dict:
  """A model preset (llada_jax.configs.models) as a plain dict."""
  from llada_jax.configs import models  # noqa: PLC0415

  return dict(models.get_config(name))


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


@contextlib.contextmanager
def cheap_train_steps():
  """Unoptimised codegen for the bench's timed train steps: compilation dominates at the tiny size."""
  from llada_jax.bench import train_step  # noqa: PLC0415

  if jax.default_backend() != "cpu":
    yield
    return
  import pytest  # noqa: PLC0415

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train_step, "COMPILER_OPTIONS", {"xla_backend_optimization_level": 0})
    yield


@contextlib.contextmanager
def fail_if_blocked(seconds: int):
  """A reader that opens a FIFO waits forever for a writer: inside the block, fail after `seconds`."""

  def blocked(signum, frame):
    raise AssertionError("blocked opening a file: it was opened before its type was checked")

  previous = signal.signal(signal.SIGALRM, blocked)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
