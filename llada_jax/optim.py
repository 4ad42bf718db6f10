"""Learning-rate schedules and the AdamW optimizer, built from the `optimizer` config section.

Schedules (docs/method.md, "Recipes"):

  wsd       warmup-stable-decay (LLaDA pretraining): linear 0 -> lr over `warmup_steps`, hold lr;
            at `decay_start` drop to `decay_lr`, hold it until `anneal_start` (default: decay_start),
            then linear to `final_lr` at `total_steps`.
  sft       LLaDA SFT: linear warmup to lr, constant, linear to `final_lr` over the last
            `decay_fraction` of `total_steps`.
  cosine    VRPO: linear warmup, then cosine decay to `final_lr` at `total_steps`.
  constant  optional linear warmup, then lr.

`decay_start` and `anneal_start` are a step, or a fraction of `total_steps` when below 1. Every
schedule starts at 0 when `warmup_steps > 0` and stays at its last value after `total_steps`.

The optimizer is `clip_by_global_norm(grad_clip)` then AdamW with decoupled weight decay (scaled by
the learning rate, as in PyTorch's AdamW). The learning rate of the latest update lives in the
optimizer state (`current_lr(opt_state)`), so it is checkpointed and logged with the state; the
schedule itself is also available from `make_schedule` for code that only has the step
(update number k, counted from 0, uses `schedule(k)`).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from ml_collections import config_dict

SCHEDULES = ("wsd", "sft", "cosine", "constant")
WEIGHT_DECAY_MASKS = ("all", "no_norms")

# LLaDA pretraining (arXiv 2502.09992): 2.3T tokens at 1280 x 4096 tokens a step; the lr drops to
# 1e-4 after 1.2T tokens, holds for 0.8T, then anneals to 1e-5 over the last 0.3T.
_LLADA_PRETRAIN_STEPS = round(2.3e12 / (1280 * 4096))  # 438,690
# LLaDA SFT: 4.5M pairs, 3 epochs, global batch 256. VRPO: 350K pairs, 1 epoch, batch 64.
_LLADA_SFT_STEPS = math.ceil(4.5e6 * 3 / 256)
_VRPO_STEPS = math.ceil(350e3 / 64)

_RECIPES = {
    "pretrain": dict(schedule="wsd", lr=4e-4, warmup_steps=2000, total_steps=_LLADA_PRETRAIN_STEPS,
                     decay_start=1.2 / 2.3, anneal_start=2.0 / 2.3, decay_lr=1e-4, final_lr=1e-5,
                     weight_decay=0.1),
    "sft": dict(schedule="sft", lr=2.5e-5, warmup_steps=50, total_steps=_LLADA_SFT_STEPS, final_lr=2.5e-6,
                decay_fraction=0.1, weight_decay=0.1),
    # "Cosine decay" without a floor in the paper: decay to 0 (?).
    "vrpo": dict(schedule="cosine", lr=5e-7, warmup_steps=15, total_steps=_VRPO_STEPS, final_lr=0.0,
                 weight_decay=0.01, b1=0.9, b2=0.95),
}


def default_optimizer_config(recipe: str = "pretrain") -> ml_collections.ConfigDict:
  """Every optimizer field, with the values of one paper recipe (docs/method.md, "Recipes") ('pretrain', 'sft', 'vrpo').

  Betas 0.9/0.95, eps 1e-8, clipping at 1.0 and decay on all parameters are not stated for LLaDA
  pretraining/SFT; they follow SMDM, the LLaDA authors' earlier code (?).
  """
  if recipe not in _RECIPES:
    raise ValueError(f"default_optimizer_config: unknown recipe {recipe!r}; expected one of {sorted(_RECIPES)}")
  fields = dict(
      schedule="constant",
      lr=1e-4,
      warmup_steps=0,
      total_steps=10_000,
      decay_start=0.8,  # wsd: a step, or a fraction of total_steps when < 1.
      # wsd: None means at decay_start; a typed placeholder stays overridable from the command line.
      anneal_start=config_dict.placeholder(float),
      decay_lr=1e-4,  # wsd: the level after the drop.
      final_lr=0.0,
      decay_fraction=0.1,  # sft: the share of total_steps spent on the final linear decay.
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      weight_decay_mask="all",  # or 'no_norms': no decay on 1-D (norm) parameters.
      grad_clip=1.0,  # global-norm clipping; 0 or None turns it off.
  )
  fields.update(_RECIPES[recipe])
  return ml_collections.ConfigDict(fields)


# ---------------------------------------------------------------------------------------------
# Validation.

_KNOWN_FIELDS = frozenset(default_optimizer_config().keys())


def _fail(field, value, expected):
  raise ValueError(f"optimizer.{field}={value!r}: expected {expected}")


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _get(cfg, field, default=None):
  return cfg.get(field, default) if hasattr(cfg, "get") else getattr(cfg, field, default)


def _number(cfg, field, *, low=None, high=None, low_open=False, high_open=False, default=None):
  value = _get(cfg, field, default)
  bounds = []
  if low is not None:
    bounds.append(f"{'>' if low_open else '>='} {low}")
  if high is not None:
    bounds.append(f"{'<' if high_open else '<='} {high}")
  expected = " ".join(["a number", " and ".join(bounds)]).strip()
  if not _is_number(value):
    _fail(field, value, expected)
  if low is not None and (value < low or (low_open and value == low)):
    _fail(field, value, expected)
  if high is not None and (value > high or (high_open and value == high)):
    _fail(field, value, expected)
  return float(value)


def _int(cfg, field, *, low=0, default=None):
  value = _get(cfg, field, default)
  is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
  # ml_collections turns ints into floats in float fields; an integral float is still a step count.
  is_int = is_int or (isinstance(value, float) and value.is_integer())
  if not is_int or value < low:
    _fail(field, value, f"an integer >= {low}")
  return int(value)


def _step_or_fraction(cfg, field, total_steps, default=None):
  value = _get(cfg, field, default)
  if not _is_number(value) or value <= 0 or (value >= 1 and not float(value).is_integer()):
    _fail(field, value, "a fraction of total_steps in (0, 1) or a whole step number >= 1")
  step = round(value * total_steps) if value < 1 else int(value)
  if step > total_steps:
    _fail(field, value, f"a step <= total_steps={total_steps}")
  return step


def _check_known_fields(cfg):
  keys = set(cfg.keys()) if hasattr(cfg, "keys") else set()
  unknown = sorted(keys - _KNOWN_FIELDS)
  if unknown:
    raise ValueError(f"optimizer: unknown field(s) {unknown}; expected some of {sorted(_KNOWN_FIELDS)}")


# ---------------------------------------------------------------------------------------------
# Schedules.


def _linear(step, start, end, start_value, end_value):
  """start_value at `start`, end_value at `end` and after; clipped on both sides."""
  frac = jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0)
  # This form is exact at both ends in float32.
  return start_value * (1.0 - frac) + end_value * frac


def _warmup(step, warmup_steps, lr):
  if warmup_steps == 0:
    return jnp.full_like(step, lr)
  return lr * jnp.minimum(step / warmup_steps, 1.0)


def make_schedule(cfg) -> optax.Schedule:
  """`step -> learning rate` (float32) for the `optimizer` config section `cfg`; validates it."""
  _check_known_fields(cfg)
  kind = _get(cfg, "schedule")
  if kind not in SCHEDULES:
    _fail("schedule", kind, f"one of {SCHEDULES}")
  # Above 1 an AdamW step moves every weight by more than its typical size: a typo, not a schedule.
  lr = _number(cfg, "lr", low=0, low_open=True, high=1)
  warmup = _int(cfg, "warmup_steps", low=0, default=0)

  if kind == "constant":
    def constant(step):
      return _warmup(jnp.asarray(step, jnp.float32), warmup, lr)
    return constant

  total = _int(cfg, "total_steps", low=1)
  if warmup > total:
    _fail("warmup_steps", warmup, f"an integer <= total_steps={total}")
  final_lr = _number(cfg, "final_lr", low=0, default=0.0)

  if kind == "wsd":
    decay_start = _step_or_fraction(cfg, "decay_start", total)
    if decay_start < warmup:
      _fail("decay_start", _get(cfg, "decay_start"), f"a step >= warmup_steps={warmup}")
    anneal_start = decay_start
    if _get(cfg, "anneal_start") is not None:
      anneal_start = _step_or_fraction(cfg, "anneal_start", total)
      if anneal_start < decay_start:
        _fail("anneal_start", _get(cfg, "anneal_start"), f"a step >= decay_start={decay_start}")
    decay_lr = _number(cfg, "decay_lr", low=0)

    def wsd(step):
      step = jnp.asarray(step, jnp.float32)
      decayed = _linear(step, anneal_start, total, decay_lr, final_lr)
      return jnp.where(step < decay_start, _warmup(step, warmup, lr), decayed)
    return wsd

  if kind == "sft":
    fraction = _number(cfg, "decay_fraction", low=0, high=1, default=0.1)
    decay_start = total - round(fraction * total)
    if decay_start < warmup:
      _fail("decay_fraction", fraction, f"a fraction that leaves the {warmup} warmup steps before the decay")

    def sft(step):
      step = jnp.asarray(step, jnp.float32)
      decayed = _linear(step, decay_start, total, lr, final_lr)
      return jnp.where(step < decay_start, _warmup(step, warmup, lr), decayed)
    return sft

  # cosine
  def cosine(step):
    step = jnp.asarray(step, jnp.float32)
    frac = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    weight = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    decayed = lr * weight + final_lr * (1.0 - weight)
    return jnp.where(step < warmup, _warmup(step, warmup, lr), decayed)
  return cosine


# ---------------------------------------------------------------------------------------------
# Optimizer.


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def no_norms_mask(params):
  """True where weight decay applies: not on 1-D parameters, nor on norm weights.

  The name test catches RMSNorm weights that scanned layers stack into 2-D `[layers, embed]`.
  """

  def decays(path, leaf) -> bool:
    names = [_key_name(k).lower() for k in path]
    is_norm = any("norm" in n for n in names) or "ln_f" in names
    return len(leaf.shape) > 1 and not is_norm

  return jax.tree_util.tree_map_with_path(decays, params)


class ScheduleState(NamedTuple):
  count: jax.Array  # int32: updates applied so far
  learning_rate: jax.Array  # float32: the rate of the latest update (schedule(0) before the first)


def scale_by_recorded_schedule(schedule: optax.Schedule) -> optax.GradientTransformation:
  """Multiplies updates by -schedule(count) and keeps that rate in the state.

  Unlike `optax.inject_hyperparams`, this keeps the updates in the parameters' dtype (a float32
  rate would promote bfloat16 updates and moments to float32).
  """

  def init_fn(params):
    del params
    return ScheduleState(jnp.zeros([], jnp.int32), jnp.asarray(schedule(0), jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    lr = jnp.asarray(schedule(state.count), jnp.float32)
    updates = jax.tree.map(lambda u: u * (-lr).astype(u.dtype), updates)
    return updates, ScheduleState(optax.safe_increment(state.count), lr)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW on the schedule; validates `cfg` (the `optimizer` section).

  AdamW is optax's own composition (scale_by_adam, add_decayed_weights, learning rate), so the
  decay is decoupled from the moments and scaled by the learning rate, as in PyTorch's AdamW.
  """
  schedule = make_schedule(cfg)
  b1 = _number(cfg, "b1", low=0, high=1, high_open=True)
  b2 = _number(cfg, "b2", low=0, high=1, high_open=True)
  eps = _number(cfg, "eps", low=0, low_open=True)
  weight_decay = _number(cfg, "weight_decay", low=0, default=0.0)
  mask_kind = _get(cfg, "weight_decay_mask", "all")
  if mask_kind not in WEIGHT_DECAY_MASKS:
    _fail("weight_decay_mask", mask_kind, f"one of {WEIGHT_DECAY_MASKS}")
  grad_clip = _get(cfg, "grad_clip")
  if grad_clip is not None:
    grad_clip = _number(cfg, "grad_clip", low=0)

  return optax.chain(
      # identity keeps the state structure the same whether or not clipping is on.
      optax.clip_by_global_norm(grad_clip) if grad_clip else optax.identity(),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, no_norms_mask if mask_kind == "no_norms" else None),
      scale_by_recorded_schedule(schedule),
  )


def current_lr(opt_state) -> jax.Array:
  """The learning rate of the latest update (schedule(0) before the first).

  Works on any state that holds exactly one `make_optimizer` state (e.g. inside `optax.MultiSteps`).
  """
  found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, ScheduleState))
           if isinstance(s, ScheduleState)]
  if len(found) != 1:
    raise ValueError(f"current_lr: expected one optimizer state from make_optimizer, found {len(found)}")
  return found[0].learning_rate
