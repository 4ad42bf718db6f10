"""The one place a training config becomes a program: `build(config) -> TrainProgram`.

Training (`llada_jax.train`), planning (`llada_jax.plan`), the benchmark and the reference-ELBO
precompute all call `build`, so the step they run, lower or time is the step training runs: the
same objective, optimizer, mesh, logical-axis rules, shardings, micro-batching and jit. The
ConfigDict is read here and nowhere below: the modules this calls take typed arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import optax
from jax.sharding import Mesh, NamedSharding

from llada_jax import configs, model as model_lib, optim, sharding, vrpo
from llada_jax.training import objectives, state as state_lib, step as step_lib


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """What a run needs, built from its config without allocating the state."""

  model_cfg: model_lib.ModelConfig
  objective: objectives.Objective
  tx: optax.GradientTransformation
  mesh: Mesh
  rules: tuple
  abstract_state: Any  # TrainState of ShapeDtypeStructs carrying their shardings
  state_shardings: Any  # TrainState of NamedShardings
  batch_sharding: NamedSharding
  batch_shards: int  # how many pieces the batch dimension is split into
  # The step's frozen argument: the VRPO reference parameters, or a LoRA model's base; None when it takes none.
  reference_shardings: Any
  abstract_frozen: Any  # that argument as ShapeDtypeStructs with shardings (None likewise)
  grad_accum_steps: int
  global_batch_size: int
  seq_len: int
  step: Callable  # jitted `(state, batch, root_key, reference_params) -> (state, metrics)`, state donated

  @property
  def flops_per_step(self) -> int:
    return objectives.step_flops(self.objective, self.model_cfg, batch_size=self.global_batch_size,
                                 seq_len=self.seq_len)

  @property
  def tokens_per_step(self) -> int:
    return self.global_batch_size * self.seq_len

  def create_state(self, key, params=None):
    """A fresh state placed on the mesh; `params` (already placed) replaces the random init."""
    return state_lib.create_train_state(self.model_cfg, self.tx, key, self.mesh, self.rules, params=params)


def objective_from_config(config, model_cfg: model_lib.ModelConfig) -> objectives.Objective:
  v = config.vrpo
  vcfg = vrpo.VRPOConfig(beta=v.beta, n_timesteps=v.n_timesteps, masks_per_timestep=v.masks_per_timestep,
                         antithetic=v.antithetic, estimator=v.estimator, stratified=v.stratified,
                         sft_weight=v.sft_weight, eps=config.diffusion.eps)
  return objectives.make_objective(
      config.objective, model_cfg, eps=config.diffusion.eps, random_length_prob=config.diffusion.random_length_prob,
      prompt_drop_prob=config.diffusion.prompt_drop_prob, vrpo_config=vcfg,
      precompute_reference=bool(v.get("precompute_reference", False)), packed=bool(config.data.packing),
      copy_chunks=int(v.copy_chunks))


def checked_batch_shards(mesh: Mesh, batch_sh: NamedSharding, *, global_batch_size: int,
                         grad_accum_steps: int) -> int:
  """How many shards a batch splits into; an error naming the config if a micro-batch cannot split."""
  shards = sharding.batch_shards(batch_sh)
  if (global_batch_size // grad_accum_steps) % shards:
    raise ValueError(f"config.data.global_batch_size={global_batch_size}: each of the {grad_accum_steps} "
                     f"micro-batches must split evenly over the {shards} batch shards of the mesh {dict(mesh.shape)}")
  return shards


def build(config, devices: Sequence[jax.Device] | None = None) -> TrainProgram:
  """Validates `config` and assembles its training program on `devices` (default: all)."""
  configs.validate(config)
  model_cfg = model_lib.ModelConfig.from_dict(config.model)
  objective = objective_from_config(config, model_cfg)
  tx = optim.make_optimizer(config.optimizer)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_from_config(config.sharding_rules)
  abstract_state, state_sh = state_lib.state_shardings(model_cfg, tx, mesh, rules)
  batch_sh = sharding.batch_sharding(mesh, rules)
  shards = checked_batch_shards(mesh, batch_sh, global_batch_size=config.data.global_batch_size,
                                grad_accum_steps=config.grad_accum_steps)
  lora_base = model_cfg.lora_rank > 0
  if lora_base:  # the base is frozen and feeds the policy (and the VRPO reference, adapters off)
    abstract_frozen, reference_sh = state_lib.base_shardings(model_cfg, mesh, rules)
  elif objective.needs_reference:
    abstract_frozen, reference_sh = abstract_state.params, state_sh.params
  else:
    abstract_frozen = reference_sh = None
  step = step_lib.jit_train_step(
      step_lib.make_train_step(objective, tx, grad_accum_steps=config.grad_accum_steps, lora_base=lora_base),
      state_sh, batch_sh, mesh, reference_sh, rules=rules)
  return TrainProgram(model_cfg=model_cfg, objective=objective, tx=tx, mesh=mesh, rules=rules,
                      abstract_state=abstract_state, state_shardings=state_sh, batch_sharding=batch_sh,
                      batch_shards=shards, reference_shardings=reference_sh, abstract_frozen=abstract_frozen,
                      grad_accum_steps=config.grad_accum_steps, global_batch_size=config.data.global_batch_size,
                      seq_len=config.data.seq_len, step=step)
