"""Wall time of jitted calls: each call blocked on until its output is ready, compilation timed apart.

Imports only JAX and NumPy, so that other tools (the demo's start-up check) can time a matmul
without loading the benchmark sections.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp


def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> tuple[list[float], list[float], Any]:
  """(timed seconds, warm-up seconds, last output) of `fn()`, each call blocked on until done.

  JAX dispatches asynchronously, so without the block a call would be timed as its dispatch only.
  """
  def once():
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out

  warm, out = [], None
  for _ in range(warmup):
    seconds, out = once()
    warm.append(seconds)
  times = []
  for _ in range(repeats):
    seconds, out = once()
    times.append(seconds)
  return times, warm, out


def time_matmul(dtype: str, n: int, *, repeats: int, warmup: int = 1) -> tuple[list[float], list[float]]:
  """(timed, warm-up) seconds of an n x n x n matmul in `dtype` (a model dtype name: float32,
  bfloat16, float16) on the default device."""
  jdtype = jnp.dtype(dtype)
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(jdtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(jdtype)
  # float32 accumulation and output, as the model's matmuls ask for.
  matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  times, warm, _ = time_calls(lambda: matmul(a, b), repeats=repeats, warmup=max(warmup, 1))
  return times, warm


def time_interleaved(fns: Sequence[Callable[[], Any]], *, repeats: int, warmup: int = 1
                     ) -> list[tuple[list[float], list[float], Any]]:
  """`time_calls` of several functions in turn, one call of each per round: compared with each other,
  they see the same changes in the machine's load (another process starting or ending)."""
  out = [([], [], None) for _ in fns]
  for rnd in range(warmup + repeats):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      value = jax.block_until_ready(fn())
      times, warm, _ = out[i]
      (warm if rnd < warmup else times).append(time.perf_counter() - start)
      out[i] = (times, warm, value)
  return out
