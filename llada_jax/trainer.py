"""The train state and the one train step shared by every objective.

`step(state, batch, root_key, reference_params) -> (state, metrics)` is a pure function: the step
key is fold_in(root_key, state.step), so a resumed run draws exactly what an uninterrupted one
would. Pretraining, SFT, VRPO and naive DPO differ only in the loss function.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llada_jax import diffusion, model as model_lib, optim, sharding, vrpo

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any
  nonfinite_in_a_row: Array  # skipped updates since the last good one
  max_nonfinite_in_a_row: Array  # the longest such run so far (read at logging time, no per-step sync)
  nonfinite_total: Array


@dataclasses.dataclass(frozen=True)
class Objective:
  """A loss `(params, batch, key, reference_params) -> (loss, metrics)` and what it needs."""

  name: str
  loss_fn: Callable
  needs_reference: bool = False  # the step takes the reference parameters
  reference_in_batch: bool = False  # the batch carries precomputed reference ELBOs (llada_jax.reference_elbo)


def make_objective(config, model_cfg: model_lib.ModelConfig) -> Objective:
  logits = model_lib.logits_fn(model_cfg)
  mask_id = model_cfg.mask_token_id
  name = config.objective
  if name == "pretrain":
    loss = diffusion.PretrainLoss(logits, mask_id, eps=config.diffusion.eps,
                                  random_length_prob=config.diffusion.random_length_prob)
    return Objective(name, lambda p, b, k, r=None: loss(p, b, k))
  if name == "sft":
    loss = diffusion.SFTLoss(logits, mask_id, eps=config.diffusion.eps,
                             prompt_drop_prob=config.diffusion.prompt_drop_prob)
    return Objective(name, lambda p, b, k, r=None: loss(p, b, k))
  if name in ("vrpo", "naive_dpo"):
    v = config.vrpo
    vcfg = vrpo.VRPOConfig(beta=v.beta, n_timesteps=v.n_timesteps, masks_per_timestep=v.masks_per_timestep,
                           antithetic=v.antithetic, estimator=v.estimator, stratified=v.stratified,
                           sft_weight=v.sft_weight, eps=config.diffusion.eps)
    if name == "naive_dpo":
      vcfg = dataclasses.replace(vcfg, n_timesteps=1, masks_per_timestep=1, antithetic=False)
    precomputed = bool(v.get("precompute_reference", False))
    return Objective(name, vrpo.VRPOLoss(logits, mask_id, vcfg), needs_reference=not precomputed,
                     reference_in_batch=precomputed)
  raise ValueError(f"config.objective={name!r}: expected one of pretrain, sft, vrpo, naive_dpo")


# --------------------------------------------------------------------------------------------
# State creation, already sharded.


def _boxed_state_fn(model_cfg, tx):
  def init(key):
    boxed = model_lib.LLaDA(model_cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"]
    zero = jnp.zeros((), jnp.int32)
    # The optimizer state is built on the boxed params, so it inherits their logical axes.
    return TrainState(step=zero, params=boxed, opt_state=tx.init(boxed), nonfinite_in_a_row=zero,
                      max_nonfinite_in_a_row=zero, nonfinite_total=zero)
  return init


def checked_batch_shards(config, mesh, batch_sh) -> int:
  """How many shards a batch splits into; an error naming the config if a micro-batch cannot split."""
  shards = sharding.batch_shards(batch_sh)
  micro = config.data.global_batch_size // config.grad_accum_steps
  if micro % shards:
    raise ValueError(f"config.data.global_batch_size={config.data.global_batch_size}: each of the "
                     f"{config.grad_accum_steps} micro-batches must split evenly over the {shards} batch shards of "
                     f"the mesh {dict(mesh.shape)}")
  return shards


def state_shardings(model_cfg, tx, mesh, rules):
  """(abstract state with shardings, NamedSharding pytree) without allocating anything."""
  init = _boxed_state_fn(model_cfg, tx)
  boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.logical_to_shardings(nn.get_partition_spec(boxed), mesh, rules)
  abstract = nn.meta.unbox(boxed)
  abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                    shardings)
  return abstract, shardings


def create_train_state(model_cfg, tx, key, mesh, rules, params=None):
  """A fresh state placed on `mesh`; `params` (already placed) replaces the random init if given."""
  _, shardings = state_shardings(model_cfg, tx, mesh, rules)
  init = _boxed_state_fn(model_cfg, tx)

  if params is None:
    return jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings)(key)

  def from_params(p):
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=p, opt_state=tx.init(p), nonfinite_in_a_row=zero,
                      max_nonfinite_in_a_row=zero, nonfinite_total=zero)

  return jax.jit(from_params, out_shardings=shardings)(params)


# --------------------------------------------------------------------------------------------
# The step.


def split_micro_batches(batch, n: int):
  """[B, ...] -> [n, B/n, ...], micro-batch a taking rows a, a+n, ... so each spans all devices."""
  def split(x):
    x = x.reshape((x.shape[0] // n, n) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree_util.tree_map(split, batch)


def _all_finite(tree) -> Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_train_step(objective: Objective, tx: optax.GradientTransformation, *, grad_accum_steps: int = 1):
  """The pure train step. Non-finite loss or gradients skip the update and are counted.

  A skipped update does not advance the optimizer's own count, so the learning-rate schedule
  moves only with applied updates; the lr reported is the one actually used.
  """

  def loss_and_grads(params, batch, key, reference_params):
    def loss(p):
      return objective.loss_fn(p, batch, key, reference_params)
    (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, metrics, grads

  def step(state: TrainState, batch, root_key, reference_params=None):
    key = jax.random.fold_in(root_key, state.step)
    if grad_accum_steps == 1:
      loss, metrics, grads = loss_and_grads(state.params, batch, key, reference_params)
    else:
      micro = split_micro_batches(batch, grad_accum_steps)

      def body(carry, inputs):
        index, mb = inputs
        # Batches with example ids draw per example (fold_in(key, example_id)), so every
        # micro-batch takes the step key; without them the micro-batch index is folded in.
        k = key if "example_id" in mb else jax.random.fold_in(key, index)
        l, m, g = loss_and_grads(state.params, mb, k, reference_params)
        acc = jax.tree_util.tree_map(jnp.add, carry, (l, m, g))
        return acc, None

      zeros = jax.tree_util.tree_map(
          jnp.zeros_like, jax.eval_shape(lambda: loss_and_grads(state.params, jax.tree_util.tree_map(
              lambda x: x[0], micro), key, reference_params)))
      total, _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), micro))
      loss, metrics, grads = jax.tree_util.tree_map(lambda x: x / grad_accum_steps, total)

    ok = jnp.isfinite(loss) & _all_finite(grads)

    def apply(operands):
      params, opt_state, grads = operands
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    def keep(operands):
      params, opt_state, _ = operands
      return params, opt_state

    params, opt_state = jax.lax.cond(ok, apply, keep, (state.params, state.opt_state, grads))
    in_a_row = jnp.where(ok, 0, state.nonfinite_in_a_row + 1)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, nonfinite_in_a_row=in_a_row,
        max_nonfinite_in_a_row=jnp.maximum(state.max_nonfinite_in_a_row, in_a_row),
        nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32))
    metrics = dict(metrics)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["skipped"] = (~ok).astype(jnp.float32)
    metrics["lr"] = optim.current_lr(opt_state)
    return new_state, metrics

  return step


def with_activation_rules(fn, mesh, rules):
  """`fn` traced with `mesh` and the logical-axis `rules` in context.

  The model's activation constraints (`nn.with_logical_constraint`) are no-ops without them, and
  XLA then shards activations like the weights they meet (along `embed`): 8B SFT on 64 devices
  plans at ~2 TB of temporaries per device instead of ~45 GB. The abstract mesh is entered inside
  the trace (a concrete `jax.set_mesh` is not allowed under jit), so callers need no context.
  """
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args)

  return traced


def jit_train_step(step_fn, state_sh, batch_sh, mesh, reference_sh=None, rules=None):
  """Jitted once with explicit shardings; the state is donated. With `rules` the activation
  constraints take effect (see `with_activation_rules`)."""
  if rules is not None:
    step_fn = with_activation_rules(step_fn, mesh, rules)
  rep = sharding.replicated(mesh)
  in_shardings = (state_sh, batch_sh, rep, reference_sh)
  return jax.jit(step_fn, in_shardings=in_shardings, out_shardings=(state_sh, rep), donate_argnums=(0,))
