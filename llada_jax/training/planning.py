"""Planning a run before any accelerator is rented (`python -m llada_jax.plan`).

Builds the training program with `llada_jax.training.build`, as training does, lowers its step
from abstract arrays (shapes, dtypes and shardings only; no parameter is allocated) for N fake CPU
devices, compiles it, and reports per-device memory, FLOPs per step and the expected step time on
named accelerators. The step is traced as training traces it, with the mesh and the logical-axis rules in effect, so the model's activation
constraints hold.

Memory per device:
  parameters, optimizer state, VRPO reference   analytic, from each array's shard shape
  arguments, outputs, aliased, temporaries       the compiled program's `memory_analysis()`
  peak estimate                                  arguments + outputs - aliased + temporaries
The compiled program is the CPU one: its buffer assignment approximates, not reproduces, what
the TPU or GPU compiler would do (fusion, rematerialisation and scheduling differ).

Time per step: the analytic model FLOPs of one step (`llada_jax.metrics`, the count MFU uses)
over the devices' peak dense bf16 FLOP/s, at 100% and at an ASSUMED model-FLOPs utilisation
(`--mfu`, default 0.4); no step is run, so neither is a measurement.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

from llada_jax.training import build as build_lib, objectives

GB = 1e9  # reports use decimal gigabytes, as the HBM sizes are quoted


@dataclasses.dataclass(frozen=True)
class Accelerator:
  name: str
  device_kind: str  # as `jax.devices()[0].device_kind` names it; the peak comes from llada_jax.metrics
  hbm_bytes: float  # per JAX device


# One JAX device each: a TPU v4/v5/v6 chip (a v5p-N or v4-N slice has N/2 chips), or one GPU.
# Peak bf16 FLOP/s: llada_jax.metrics.
ACCELERATORS = {
    "v5p": Accelerator("TPU v5p", "TPU v5p", 95 * GB),
    "v5e": Accelerator("TPU v5e", "TPU v5e", 16 * GB),
    "v4": Accelerator("TPU v4", "TPU v4", 32 * GB),
    "v6e": Accelerator("TPU v6e", "TPU v6e", 32 * GB),
    "h100": Accelerator("H100 SXM", "NVIDIA H100 80GB HBM3", 80 * GB),
    "h200": Accelerator("H200 SXM", "NVIDIA H200", 141 * GB),
    "a100": Accelerator("A100 80GB", "NVIDIA A100-SXM4-80GB", 80 * GB),
}


# --------------------------------------------------------------------------------------------
# The plan.


def _shard_bytes(tree) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings (the largest shard)."""
  import jax  # noqa: PLC0415

  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def _global_bytes(tree) -> int:
  import jax  # noqa: PLC0415

  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def abstract_batch(config, batch_sh, *, reference_elbos: bool = False):
  """The global batch the step receives, as ShapeDtypeStructs placed like `sharding.global_batch`.

  `reference_elbos`: the batch also carries precomputed reference ELBOs (float32 per pair).
  """
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from llada_jax.data import pipelines  # noqa: PLC0415

  b = config.data.global_batch_size
  spec = pipelines.batch_spec(objectives.data_kind(config.objective), b, config.data.seq_len,
                              packed=bool(config.data.packing), max_segments=config.data.max_segments)
  if reference_elbos:
    shape = (b, config.data.max_segments) if config.data.packing else (b,)
    spec.update({k: (shape, np.dtype(np.float32)) for k in ("reference_chosen_elbo", "reference_rejected_elbo")})
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh) for k, (shape, dtype) in spec.items()}


def lower_train_step(config, devices=None):
  """The training step as `llada_jax.training.build` builds it for training, lowered from abstract
  arrays. Returns (lowered, program, parts): parts holds the abstract reference, batch and key."""
  import jax  # noqa: PLC0415

  from llada_jax import sharding  # noqa: PLC0415

  program = build_lib.build(config, devices)
  reference = program.abstract_frozen  # the VRPO reference, or a LoRA model's frozen base
  key = jax.eval_shape(lambda: jax.random.key(config.seed))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(program.mesh))
  batch = abstract_batch(config, program.batch_sharding, reference_elbos=program.objective.reference_in_batch)
  lowered = program.step.lower(program.abstract_state, batch, key, reference)
  return lowered, program, dict(reference=reference, batch=batch, key=key)


def _memory_analysis(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  out = {name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
         for name in ("argument", "output", "alias", "temp", "generated_code")}
  out["peak_estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def _xla_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - optional; not every backend reports it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return None if not cost or "flops" not in cost else float(cost["flops"])


def accelerator_estimate(name: str, *, flops_per_step: float, n_devices: int, tokens_per_step: int,
                         peak_bytes: float | None, assumed_mfu: float) -> dict[str, Any]:
  """Step time at 100% and at the assumed MFU, and whether the peak memory fits the device's HBM."""
  from llada_jax import metrics  # noqa: PLC0415

  if name not in ACCELERATORS:
    raise ValueError(f"--accelerator={name!r}: expected one of {sorted(ACCELERATORS)}")
  acc = ACCELERATORS[name]
  peak = metrics.peak_flops_per_device(acc.device_kind, "bfloat16")
  ideal = flops_per_step / (n_devices * peak)
  at_mfu = ideal / assumed_mfu
  out = {
      "accelerator": acc.name, "device_kind": acc.device_kind, "peak_bf16_flops_per_device": peak,
      "hbm_bytes_per_device": acc.hbm_bytes, "assumed_mfu": assumed_mfu,
      "step_time_s_at_100pct_mfu": ideal, "step_time_s_at_assumed_mfu": at_mfu,
      "tokens_per_s_at_assumed_mfu": tokens_per_step / at_mfu,
  }
  if peak_bytes is not None:
    out["hbm_fraction"] = peak_bytes / acc.hbm_bytes
    out["fits"] = bool(peak_bytes <= acc.hbm_bytes)
  return out


def make_plan(config, *, devices=None, accelerators: Sequence[str] = ("v5p", "h100"), assumed_mfu: float = 0.4,
              config_name: str = "") -> dict[str, Any]:
  """Lowers and compiles the train step of `config` on `devices` (default: all) and reports the plan."""
  import jax  # noqa: PLC0415

  if not 0 < assumed_mfu <= 1:
    raise ValueError(f"--mfu={assumed_mfu}: expected a fraction in (0, 1]")
  unknown = [a for a in accelerators if a not in ACCELERATORS]
  if unknown:
    raise ValueError(f"--accelerator={','.join(unknown)}: expected some of {sorted(ACCELERATORS)}")
  devices = list(devices if devices is not None else jax.devices())
  notes = []
  kernel_platform = {"cudnn": "gpu", "splash": "tpu"}.get(config.model.attention_impl)
  if kernel_platform is not None and devices[0].platform != kernel_platform:
    impl = config.model.attention_impl
    config = config.copy_and_resolve_references()
    config.model.attention_impl = "xla"
    notes.append(f"attention_impl {impl!r} planned as 'xla' (its fused kernel needs a {kernel_platform.upper()}); "
                 "the fused kernel holds no [q, k] score matrix, so the estimate is an upper bound")
  slices = int(config.mesh.get("dcn_data", 1) or 1)
  if slices > 1 and devices[0].platform == "cpu":
    # CPU devices belong to no slice; data parallelism across slices is the outer part of `data`.
    config = config.copy_and_resolve_references()
    config.mesh.dcn_data = 1
    if config.mesh.data != -1:
      config.mesh.data *= slices
    notes.append(f"mesh.dcn_data={slices} planned as a single mesh with the slices folded into `data` (the same "
                 "shards per device; CPU devices belong to no slice)")
  t0 = time.perf_counter()
  lowered, program, parts = lower_train_step(config, devices)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()

  state, model_cfg, mesh = program.abstract_state, program.model_cfg, program.mesh
  memory = {
      "params": _shard_bytes(state.params),
      "opt_state": _shard_bytes(state.opt_state),
      "reference_params": _shard_bytes(parts["reference"]) if parts["reference"] is not None else 0,
  }
  memory["analytic_total"] = sum(memory.values())
  # The rest of the step's arguments: the step counters, the batch and the key (all small).
  memory["state_counters"] = _shard_bytes(state) - memory["params"] - memory["opt_state"]
  memory["batch"] = _shard_bytes(parts["batch"])
  memory["analytic_arguments"] = (memory["analytic_total"] + memory["state_counters"] + memory["batch"]
                                  + _shard_bytes(parts["key"]))
  compiled_memory = _memory_analysis(compiled)
  flops = float(program.flops_per_step)  # the count training logs MFU with
  tokens = config.data.global_batch_size * config.data.seq_len
  peak_bytes = compiled_memory.get("peak_estimate")
  return {
      "config": config_name,
      "objective": config.objective,
      "n_params": model_cfg.num_params(),
      "params_bytes_total": _global_bytes(state.params),
      "opt_state_bytes_total": _global_bytes(state.opt_state),
      "n_devices": len(devices),
      "platform": devices[0].platform,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "batch_shards": program.batch_shards,
      "global_batch_size": config.data.global_batch_size,
      "seq_len": config.data.seq_len,
      "grad_accum_steps": config.grad_accum_steps,
      "model": {k: getattr(model_cfg, k) for k in ("dtype", "param_dtype", "remat", "scan_layers",
                                                   "attention_impl")},
      "memory_per_device_bytes": memory,
      "compiled_memory_per_device_bytes": compiled_memory,
      "flops_per_step": flops,
      "flops_per_device_per_step": flops / len(devices),
      "xla_cost_analysis_flops_per_device": _xla_flops(compiled),
      "tokens_per_step": tokens,
      "notes": notes,
      "lower_seconds": t1 - t0,
      "compile_seconds": t2 - t1,
      "accelerators": {name: accelerator_estimate(name, flops_per_step=flops, n_devices=len(devices),
                                                  tokens_per_step=tokens, peak_bytes=peak_bytes,
                                                  assumed_mfu=assumed_mfu)
                       for name in accelerators},
  }


# --------------------------------------------------------------------------------------------
# Output.


def _size(x) -> str:
  """Bytes in decimal units (GB = 1e9 bytes, as HBM sizes are quoted)."""
  if x is None:
    return "-"
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:,.2f} {unit}"
  return f"{x:,} B"


def format_plan(plan: dict[str, Any]) -> str:
  mem, comp = plan["memory_per_device_bytes"], plan["compiled_memory_per_device_bytes"]
  mesh = " x ".join(f"{k}={v}" for k, v in plan["mesh"].items())
  rows = [
      ("parameters (analytic)", mem["params"]),
      ("optimizer state (analytic)", mem["opt_state"]),
      ("frozen parameters: VRPO reference or LoRA base (analytic)", mem["reference_params"]),
      ("analytic total", mem["analytic_total"]),
      ("all arguments, with batch and counters (analytic)", mem["analytic_arguments"]),
      ("compiled: arguments", comp.get("argument")),
      ("compiled: outputs", comp.get("output")),
      ("compiled: aliased (donated state)", comp.get("alias")),
      ("compiled: temporaries", comp.get("temp")),
      ("compiled: generated code", comp.get("generated_code")),
      ("peak estimate (arguments + outputs - aliased + temporaries)", comp.get("peak_estimate")),
  ]
  lines = [
      f"plan: {plan['config'] or plan['objective']}  (objective {plan['objective']}, "
      f"{plan['n_params']:,} parameters)",
      f"mesh: {mesh} on {plan['n_devices']} {plan['platform'].upper()} devices; global batch "
      f"{plan['global_batch_size']} x {plan['seq_len']} tokens, {plan['batch_shards']} batch shards, "
      f"grad_accum_steps {plan['grad_accum_steps']}",
      "model: " + ", ".join(f"{k}={v}" for k, v in plan["model"].items()),
      f"compile: lowered in {plan['lower_seconds']:.1f} s, compiled in {plan['compile_seconds']:.1f} s",
      "",
      "per-device memory",
      *(f"  {name:<62}{_size(value):>12}" for name, value in rows),
      "",
      f"FLOPs per step (analytic model FLOPs): {plan['flops_per_step']:.4g} "
      f"({plan['flops_per_device_per_step']:.4g} per device)",
  ]
  if plan["xla_cost_analysis_flops_per_device"] is not None:
    lines.append(f"  XLA cost_analysis of the CPU program: {plan['xla_cost_analysis_flops_per_device']:.4g} per device "
                 "(loop bodies counted once: not comparable under scan_layers or grad accumulation)")
  lines.append("")
  lines.append(f"{'accelerator':<12}{'peak TFLOP/s':>13}{'HBM':>9}{'step s @100%':>14}{'assumed MFU':>13}"
               f"{'step s':>10}{'tokens/s':>14}{'HBM used':>10}  verdict")
  for est in plan["accelerators"].values():
    fits = est.get("fits")
    verdict = "unknown" if fits is None else ("fits" if fits else "DOES NOT FIT")
    lines.append(
        f"{est['accelerator']:<12}{est['peak_bf16_flops_per_device'] / 1e12:>13.1f}"
        f"{_size(est['hbm_bytes_per_device']):>9}{est['step_time_s_at_100pct_mfu']:>14.4g}{est['assumed_mfu']:>13.0%}"
        f"{est['step_time_s_at_assumed_mfu']:>10.4g}{est['tokens_per_s_at_assumed_mfu']:>14.4g}"
        f"{est.get('hbm_fraction', float('nan')):>10.0%}  {verdict}")
  lines.extend(f"note: {n}" for n in plan["notes"])
  lines.append("Step times are estimates (analytic FLOPs / (devices x peak x assumed MFU)), not measurements. Memory is "
               "the CPU compiler's buffer assignment, an approximation of the TPU/GPU compiler's.")
  return "\n".join(lines)
