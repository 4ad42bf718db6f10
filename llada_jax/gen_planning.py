"""Memory plan for `generate`: the sampler compiled ahead of time on abstract sharded parameters.

The jitted sampler `generate` runs (`sampling._compiled` on a `placement.Placement`, the dual or
prefix cache included) is lowered from ShapeDtypeStructs that carry the parameters' NamedShardings
and the batch's, then compiled for the fake devices `python -m llada_jax.plan` sets up. No weight is
read or allocated. XLA's memory analysis of that program is the per-device footprint: argument
(parameter shards, batch), output, and temporaries (activations, logits, the key/value caches).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

from llada_jax.training import planning


def _abstract_inputs(model_cfg, place, gen_batch: int, prompt_length: int):
  """(params, prompts, prompt lengths, key data) as ShapeDtypeStructs placed as `generate` places them."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from llada_jax import model as model_lib, placement as placement_lib  # noqa: PLC0415

  shardings = placement_lib.param_shardings(model_cfg, place)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        model_lib.abstract_params(model_cfg), shardings)
  rows = placement_lib.padded_size(gen_batch, place.shards)
  key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  batch = [jax.ShapeDtypeStruct(shape, dtype, sharding=place.batch_sharding)
           for shape, dtype in (((rows, prompt_length), jnp.int32), ((rows,), jnp.int32),
                                ((rows, *key_data.shape), key_data.dtype))]
  return params, batch


def make_generate_plan(model_cfg, sampler_config, *, mesh: Mapping[str, int], gen_batch: int,
                       prompt_length: int, accelerators: Sequence[str] = ("v5e",), rules=None,
                       config_name: str = "") -> dict[str, Any]:
  """Compiles `generate`'s sampler for `gen_batch` prompts of `prompt_length` tokens on `mesh` and
  reports per-device memory against each accelerator's HBM."""
  import jax  # noqa: PLC0415

  from llada_jax import placement as placement_lib, sampling, sharding  # noqa: PLC0415

  unknown = [a for a in accelerators if a not in planning.ACCELERATORS]
  if unknown:
    raise ValueError(f"--device={','.join(unknown)}: expected some of {sorted(planning.ACCELERATORS)}")
  for name, value in (("gen_batch", gen_batch), ("prompt_length", prompt_length)):
    if value < 1:
      raise ValueError(f"--{name}={value}: expected a positive integer")
  place = placement_lib.make_placement(mesh, rules or sharding.DEFAULT_RULES)
  params, batch = _abstract_inputs(model_cfg, place, gen_batch, prompt_length)
  key_impl = jax.random.key_impl(jax.random.key(0))
  fn = sampling._compiled(model_cfg, sampler_config, None, place, key_impl)  # noqa: SLF001 - generate's own
  t0 = time.perf_counter()
  lowered = fn.lower(params, *batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  compiled_memory = planning._memory_analysis(compiled)  # noqa: SLF001 - the training plan's reading
  peak = compiled_memory.get("peak_estimate")
  fits = {}
  for name in accelerators:
    hbm = planning.ACCELERATORS[name].hbm_bytes
    fits[name] = {"name": planning.ACCELERATORS[name].name, "hbm_bytes_per_device": hbm,
                  "hbm_fraction": None if peak is None else peak / hbm,
                  "fits": None if peak is None else bool(peak <= hbm)}
  return {
      "config": config_name, "mode": "generate", "n_params": model_cfg.num_params(),
      "n_devices": place.mesh.devices.size, "mesh": {k: int(v) for k, v in place.mesh.shape.items()},
      "model": {k: getattr(model_cfg, k) for k in ("dtype", "param_dtype", "attention_impl")},
      "gen_batch": gen_batch, "padded_batch": batch[0].shape[0], "prompt_length": prompt_length,
      "sampler": {k: getattr(sampler_config, k) for k in ("gen_length", "block_length", "steps", "cache",
                                                         "threshold", "cfg_scale")},
      "memory_per_device_bytes": {"params": planning._shard_bytes(params),  # noqa: SLF001
                                  "batch": planning._shard_bytes(batch)},  # noqa: SLF001
      "compiled_memory_per_device_bytes": compiled_memory,
      "lower_seconds": t1 - t0, "compile_seconds": t2 - t1, "accelerators": fits,
  }


def format_generate_plan(plan: dict[str, Any]) -> str:
  size = planning._size  # noqa: SLF001 - the same units as the training plan
  s, mem, comp = plan["sampler"], plan["memory_per_device_bytes"], plan["compiled_memory_per_device_bytes"]
  lines = [f"generate plan {plan['config']}: {plan['n_params'] / 1e9:.2f}B parameters ({plan['model']['param_dtype']}, "
           f"compute {plan['model']['dtype']}) on {plan['n_devices']} devices, mesh {plan['mesh']}",
           f"batch {plan['gen_batch']} (padded to {plan['padded_batch']}) x prompt {plan['prompt_length']} + "
           f"gen_length {s['gen_length']} (block {s['block_length']}, {s['steps']} steps, cache {s['cache']})",
           f"per device: parameters {size(mem['params'])}, batch {size(mem['batch'])}; compiled: arguments "
           f"{size(comp.get('argument'))}, outputs {size(comp.get('output'))}, temporaries {size(comp.get('temp'))}, "
           f"peak {size(comp.get('peak_estimate'))}"]
  for est in plan["accelerators"].values():
    verdict = "-" if est["fits"] is None else "fits" if est["fits"] else "DOES NOT FIT"
    used = "-" if est["hbm_fraction"] is None else f"{est['hbm_fraction']:.0%}"
    lines.append(f"{est['name']}: HBM {size(est['hbm_bytes_per_device'])} per device, {used} used: {verdict}")
  return "\n".join(lines)
