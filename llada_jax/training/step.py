"""The one train step shared by every objective.

`step(state, batch, root_key, reference_params) -> (state, metrics)` is a pure function. Keys are
derived, never drawn: the step key is `step_key(root_key, state.step)`, so a resumed run draws
exactly what an uninterrupted one would, and reference ELBOs computed ahead of time
(`training.reference_elbo`) draw exactly what the step would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from llada_jax import lora, optim, packed, sharding
from llada_jax.training.objectives import Objective
from llada_jax.training.state import TrainState

Array = jax.Array


def step_key(root_key, step) -> Array:
  """The key of training step `step`; every draw of that step derives from it."""
  return jax.random.fold_in(root_key, step)


def micro_batch_key(key, micro_batch, index) -> Array:
  """The key one micro-batch draws from. Batches with example ids draw per example
  (fold_in(key, example_id)), so every micro-batch takes the step key and the split does not
  change the draws; without them the micro-batch index is folded in."""
  return key if "example_id" in micro_batch else jax.random.fold_in(key, index)


def split_micro_batches(batch, n: int):
  """[B, ...] -> [n, B/n, ...], micro-batch a taking rows a, a+n, ... so each spans all devices."""
  def split(x):
    x = x.reshape((x.shape[0] // n, n) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree_util.tree_map(split, batch)


def _all_finite(tree) -> Array:
  """Whether every element of the tree's floating-point leaves is finite.

  x * 0 is 0 for a finite x and NaN for an infinite or NaN one, so the sum of those products says it
  for a whole tree without overflowing; that product fuses into one reduction per leaf, where
  isfinite + all made XLA:CPU write a boolean copy of every leaf first (docs/benchmarks.md).
  """
  leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.bool_(True)
  return jnp.isfinite(sum(jnp.sum(x * jnp.zeros((), x.dtype), dtype=jnp.float32) for x in leaves))


def make_train_step(objective: Objective, tx: optax.GradientTransformation, *, grad_accum_steps: int = 1,
                    lora_base: bool = False):
  """The pure train step. A non-finite loss, gradient, new parameter or optimizer state skips the
  update; skips are counted.

  A skipped update does not advance the optimizer's own count, so the learning-rate schedule
  moves only with applied updates; the lr reported is the one actually used.

  `lora_base`: the state's params are LoRA adapters and the step's last argument is the frozen base
  (`llada_jax.lora`). The model runs on base + adapters; a VRPO reference is the base with the
  adapters switched off, on the same masks, so no reference copy exists.
  """

  def loss_and_grads(params, batch, key, frozen):
    to_params, reference = (lambda p: p), frozen
    if lora_base:
      to_params = lambda p: lora.combine(frozen, p)  # noqa: E731
      reference = to_params(lora.switched_off(params)) if objective.needs_reference else None
    if objective.value_and_grad is not None:
      return objective.value_and_grad(params, batch, key, reference, to_params=to_params)

    def loss(p):
      return objective.loss_fn(to_params(p), batch, key, reference)
    (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, metrics, grads

  def step(state: TrainState, batch, root_key, reference_params=None):
    key = step_key(root_key, state.step)
    if grad_accum_steps == 1:
      loss, metrics, grads = loss_and_grads(state.params, batch, key, reference_params)
    else:
      if objective.denominator is not None:  # packed rows: each micro-batch divides by the step's count
        batch = packed.with_denominator(batch, objective.denominator(batch), grad_accum_steps)
      micro = split_micro_batches(batch, grad_accum_steps)

      def body(carry, inputs):
        index, mb = inputs
        k = micro_batch_key(key, mb, index)
        l, m, g = loss_and_grads(state.params, mb, k, reference_params)
        acc = jax.tree_util.tree_map(jnp.add, carry, (l, m, g))
        return acc, None

      zeros = jax.tree_util.tree_map(
          jnp.zeros_like, jax.eval_shape(lambda: loss_and_grads(state.params, jax.tree_util.tree_map(
              lambda x: x[0], micro), key, reference_params)))
      total, _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), micro))
      loss, metrics, grads = jax.tree_util.tree_map(lambda x: x / grad_accum_steps, total)

    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # A finite gradient can still make a non-finite update (moments overflowing, a damaged restored
    # state): what would be stored is checked too, so a skipped step leaves the state as it was.
    ok = jnp.isfinite(loss) & _all_finite(grads) & _all_finite((new_params, new_opt_state))
    # One branch or the other as a whole: an elementwise select over every leaf compiled twice as
    # slowly (docs/benchmarks.md) for the same result.
    params, opt_state = jax.lax.cond(ok, lambda: (new_params, new_opt_state),
                                     lambda: (state.params, state.opt_state))
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
    with sharding.activation_rules(mesh, rules):
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
