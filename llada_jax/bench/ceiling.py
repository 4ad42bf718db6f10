"""The `ceiling` section: what one device can do (matmul FLOP/s per compute dtype, memory bandwidth),
and the MFU of the other sections, measured against the same process's matmul ceiling."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
from absl import flags

from llada_jax import metrics as metrics_lib
from llada_jax.bench import core, timing
from llada_jax.bench import sizes  # noqa: F401 - defines --dtype, which this section reads

flags.DEFINE_integer("matmul_size", 2048, "n of the n x n x n matmul", flag_values=core.FLAGS)
flags.DEFINE_integer("bandwidth_mb", 256, "MB of float32 read and written by the add", flag_values=core.FLAGS)


def _time_matmul(ctx: core.Context, dtype: str) -> core.Result:
  n, args = ctx.args.matmul_size, ctx.args
  times, warm = timing.time_matmul(dtype, n, repeats=args.repeats, warmup=args.warmup)
  result = core.Result("ceiling", f"matmul_{dtype}", {"kind": "matmul", "dtype": dtype, "size": n}, times, warm)
  rate = 2 * n ** 3 / result.median_s
  result.metrics = {"flops_per_s": rate, "gflops_per_s": rate / 1e9}
  return result


class Ceilings:
  """Measured matmul FLOP/s per dtype on one device, measured once per run and shared by sections."""

  def __init__(self, ctx: core.Context):
    self.ctx = ctx
    self.results: dict[str, core.Result] = {}

  def result(self, dtype: str) -> core.Result:
    if dtype not in self.results:
      self.results[dtype] = _time_matmul(self.ctx, dtype)
    return self.results[dtype]

  def flops_per_s(self, dtype: str) -> float:
    return self.result(dtype).metrics["flops_per_s"]


def rates(flops: float, seconds: float, ceiling: float, dtype: str) -> dict[str, float | None]:
  """Achieved FLOP/s per device; MFU against the measured ceiling of the same dtype and, where the
  device's datasheet peak is known (16-bit on TPUs and NVIDIA GPUs), against that peak."""
  per_device = flops / seconds / jax.device_count()
  peak = metrics_lib.peak_flops_per_device(dtype=dtype)
  return {"flops_per_step": flops, "achieved_flops_per_s": per_device, "achieved_gflops_per_s": per_device / 1e9,
          "ceiling_gflops_per_s": ceiling / 1e9, "mfu": per_device / ceiling,
          "mfu_datasheet": per_device / peak if peak else None}


def _check_ceiling(args: types.SimpleNamespace) -> None:
  if args.matmul_size < 1 or args.bandwidth_mb < 1:
    raise ValueError(f"--matmul_size={args.matmul_size}, --bandwidth_mb={args.bandwidth_mb}: expected positive sizes")


@core.register("ceiling", check=_check_ceiling, columns=(
    core.Column("kind", "kind"),
    core.Column("dtype", "dtype"),
    core.Column("size", "size"),
    core.Column("GFLOP/s", "gflops_per_s", "{:.1f}"),
    core.Column("GB/s", "gb_per_s", "{:.2f}"),
    core.Column("s/call", "median_s", "{:.4f}"),
    core.Column("min s", "min_s", "{:.4f}"),
    core.Column("max s", "max_s", "{:.4f}"),
))
def bench_ceiling(ctx: core.Context) -> list[core.Result]:
  """What one device can do: matmul FLOP/s per compute dtype and memory bandwidth."""
  args = ctx.args
  results = [ctx.ceilings.result(dtype) for dtype in args.dtype]
  n = args.bandwidth_mb * (1 << 20) // 4
  x = jnp.ones((n,), jnp.float32)
  add = jax.jit(lambda x: x + 1.0)  # reads and writes every byte once
  times, warm, _ = timing.time_calls(lambda: add(x), repeats=args.repeats, warmup=max(args.warmup, 1))
  bandwidth = core.Result("ceiling", "bandwidth", {"kind": "bandwidth", "dtype": "float32", "size": n}, times, warm)
  moved = 2 * 4 * n
  bandwidth.metrics = {"bytes_moved": moved, "bytes_per_s": moved / bandwidth.median_s,
                       "gb_per_s": moved / bandwidth.median_s / 1e9}
  return results + [bandwidth]
