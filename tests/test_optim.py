"""Tests of `llada_jax/optim.py`: schedule values at key steps (hand-computed), AdamW against a
NumPy implementation written here, clipping, weight-decay masks and config validation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from llada_jax import optim
from llada_jax.model import ModelConfig, abstract_params

from tests.helpers import preset


def _cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = optim.default_optimizer_config()
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _values(schedule, steps):
  return {s: float(schedule(s)) for s in steps}


def _assert_schedule(cfg, expected: dict):
  schedule = optim.make_schedule(cfg)
  got = _values(schedule, expected)
  for step, value in expected.items():
    assert got[step] == pytest.approx(value, rel=1e-5, abs=1e-12), f"step {step}: {got[step]} != {value}"


# --------------------------------------------------------------------------------------------
# Schedules.


def test_wsd_llada_pretraining_recipe():
  cfg = optim.default_optimizer_config("pretrain")
  total = 438690  # 2.3T tokens / (1280 x 4096)
  decay_start = round(1.2 / 2.3 * total)  # 228882: after 1.2T tokens
  anneal_start = round(2.0 / 2.3 * total)  # 381470: after 2.0T tokens
  assert (cfg.total_steps, decay_start, anneal_start) == (total, 228882, 381470)
  midpoint = (anneal_start + total) / 2
  _assert_schedule(cfg, {
      0: 0.0,
      1: 4e-4 / 2000,
      1000: 2e-4,
      2000: 4e-4,
      100_000: 4e-4,
      decay_start - 1: 4e-4,
      decay_start: 1e-4,
      anneal_start: 1e-4,
      int(midpoint): 1e-4 + (1e-5 - 1e-4) * (int(midpoint) - anneal_start) / (total - anneal_start),
      total: 1e-5,
      total + 100: 1e-5,
  })


def test_wsd_without_hold_decays_linearly_from_the_drop():
  cfg = _cfg(schedule="wsd", lr=4e-4, warmup_steps=100, total_steps=1000, decay_start=0.8, anneal_start=None, decay_lr=1e-4,
             final_lr=1e-5)
  _assert_schedule(cfg, {0: 0.0, 50: 2e-4, 100: 4e-4, 799: 4e-4, 800: 1e-4, 900: 5.5e-5, 1000: 1e-5})
  # decay_start as a step number gives the same schedule.
  same = optim.make_schedule(_cfg(**{**cfg.to_dict(), "decay_start": 800}))
  steps = range(0, 1001, 50)
  np.testing.assert_allclose(list(_values(same, steps).values()),
                             list(_values(optim.make_schedule(cfg), steps).values()), rtol=1e-7)


def test_sft_schedule():
  cfg = _cfg(schedule="sft", lr=2.5e-5, warmup_steps=50, total_steps=1000, final_lr=2.5e-6, decay_fraction=0.1)
  _assert_schedule(cfg, {0: 0.0, 25: 1.25e-5, 50: 2.5e-5, 500: 2.5e-5, 899: 2.5e-5, 900: 2.5e-5,
                         950: 1.375e-5, 1000: 2.5e-6, 1200: 2.5e-6})


def test_cosine_schedule():
  cfg = _cfg(schedule="cosine", lr=5e-7, warmup_steps=15, total_steps=115, final_lr=1e-8)

  def cos(step):
    return 1e-8 + (5e-7 - 1e-8) * 0.5 * (1 + math.cos(math.pi * (step - 15) / 100))

  _assert_schedule(cfg, {0: 0.0, 5: 5e-7 / 3, 15: 5e-7, 40: cos(40), 65: (5e-7 + 1e-8) / 2, 100: cos(100),
                         115: 1e-8, 130: 1e-8})


def test_constant_schedule_with_and_without_warmup():
  _assert_schedule(_cfg(schedule="constant", lr=3e-4, warmup_steps=10), {0: 0.0, 5: 1.5e-4, 10: 3e-4, 10**6: 3e-4})
  _assert_schedule(_cfg(schedule="constant", lr=3e-4, warmup_steps=0), {0: 3e-4, 7: 3e-4})


@pytest.mark.parametrize("recipe", ["pretrain", "sft", "vrpo"])
def test_schedules_run_under_jit_on_int32_steps(recipe):
  cfg = optim.default_optimizer_config(recipe)
  schedule = optim.make_schedule(cfg)
  steps = jnp.arange(0, cfg.total_steps + 1, max(cfg.total_steps // 97, 1), dtype=jnp.int32)
  jitted = jax.jit(jax.vmap(schedule))(steps)
  assert jitted.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(jitted), [float(schedule(int(s))) for s in steps], rtol=1e-5,
                             atol=1e-6 * cfg.lr)
  assert np.all(np.asarray(jitted) >= 0) and float(jitted.max()) <= cfg.lr * (1 + 1e-6)
  assert float(jax.jit(schedule)(jnp.int32(cfg.warmup_steps))) == pytest.approx(cfg.lr, rel=1e-6)


def test_recipe_defaults_follow_the_reference():
  pre, sft, vrpo = (optim.default_optimizer_config(r) for r in ("pretrain", "sft", "vrpo"))
  assert (pre.schedule, pre.lr, pre.warmup_steps, pre.decay_lr, pre.final_lr, pre.weight_decay) == (
      "wsd", 4e-4, 2000, 1e-4, 1e-5, 0.1)
  assert (sft.schedule, sft.lr, sft.warmup_steps, sft.final_lr, sft.decay_fraction, sft.weight_decay) == (
      "sft", 2.5e-5, 50, 2.5e-6, 0.1, 0.1)
  assert (vrpo.schedule, vrpo.lr, vrpo.warmup_steps, vrpo.weight_decay, vrpo.b1, vrpo.b2) == (
      "cosine", 5e-7, 15, 0.01, 0.9, 0.95)
  with pytest.raises(ValueError, match="unknown recipe"):
    optim.default_optimizer_config("dpo")


# --------------------------------------------------------------------------------------------
# AdamW against NumPy.


def _toy_params():
  rng = np.random.default_rng(0)
  return {
      "dense": {"kernel": rng.normal(size=(3, 4)).astype(np.float32)},
      "attn_norm": {"weight": (1 + 0.1 * rng.normal(size=(4,))).astype(np.float32)},
      # A scanned RMSNorm weight is 2-D; its name still excludes it from decay.
      "blocks": {"ff_norm": {"weight": (1 + 0.1 * rng.normal(size=(2, 4))).astype(np.float32)}},
      "bias_like": rng.normal(size=(5,)).astype(np.float32),
  }


def _numpy_adamw(params, grads_seq, *, lrs, b1, b2, eps, wd, decay, clip):
  """Reference AdamW (decoupled decay scaled by lr, bias-corrected moments, eps outside the sqrt)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
    g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
    if clip:
      norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
      if norm > clip:
        g = {k: x * clip / norm for k, x in g.items()}
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
      p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + (wd * p[k] if decay[k] else 0.0))
  return p


def _flat(tree):
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _run_optimizer(cfg, params, grads_seq):
  tx = optim.make_optimizer(cfg)
  state = tx.init(params)
  lrs = []

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), state

  for grads in grads_seq:
    params, state = step(params, state, grads)
    lrs.append(float(optim.current_lr(state)))
  return params, lrs


@pytest.mark.parametrize("mask", ["all", "no_norms"])
def test_adamw_matches_numpy(mask):
  cfg = _cfg(schedule="constant", lr=1e-2, warmup_steps=3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
             weight_decay_mask=mask, grad_clip=0.0)
  params = _toy_params()
  rng = np.random.default_rng(1)
  grads_seq = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params) for _ in range(6)]
  got, lrs = _run_optimizer(cfg, params, grads_seq)

  schedule = optim.make_schedule(cfg)
  expected_lrs = [float(schedule(s)) for s in range(6)]  # update t uses schedule(t - 1)
  np.testing.assert_allclose(lrs, expected_lrs, rtol=1e-6)
  assert lrs[0] == 0.0 and lrs[3] == pytest.approx(1e-2)

  flat_params, flat_grads = _flat(params), [_flat(g) for g in grads_seq]
  decay = {k: mask == "all" or ("norm" not in k and flat_params[k].ndim > 1) for k in flat_params}
  assert sum(not d for d in decay.values()) == (0 if mask == "all" else 3)
  want = _numpy_adamw(flat_params, flat_grads, lrs=expected_lrs, b1=0.9, b2=0.95, eps=1e-8, wd=0.1,
                      decay=decay, clip=None)
  for key, value in _flat(got).items():
    np.testing.assert_allclose(np.asarray(value), want[key], rtol=2e-5, atol=1e-6, err_msg=key)


def test_gradient_clipping_clips():
  # A large eps makes Adam's step depend on the gradient scale, so clipping shows in the result.
  base = dict(schedule="constant", lr=0.1, warmup_steps=0, b1=0.9, b2=0.99, eps=1.0, weight_decay=0.0)
  params = _toy_params()
  grads = [jax.tree.map(lambda x: np.full(x.shape, 3.0, np.float32), params)]  # global norm 3 * sqrt(33)
  flat_params, flat_grads = _flat(params), [_flat(g) for g in grads]
  no_decay = {k: False for k in flat_params}

  clipped, _ = _run_optimizer(_cfg(**base, grad_clip=1.0), params, grads)
  unclipped, _ = _run_optimizer(_cfg(**base, grad_clip=0.0), params, grads)
  want_clipped = _numpy_adamw(flat_params, flat_grads, lrs=[0.1], b1=0.9, b2=0.99, eps=1.0, wd=0.0,
                              decay=no_decay, clip=1.0)
  want_unclipped = _numpy_adamw(flat_params, flat_grads, lrs=[0.1], b1=0.9, b2=0.99, eps=1.0, wd=0.0,
                                decay=no_decay, clip=None)
  for key in flat_params:
    np.testing.assert_allclose(np.asarray(_flat(clipped)[key]), want_clipped[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(np.asarray(_flat(unclipped)[key]), want_unclipped[key], rtol=1e-5, err_msg=key)
  assert not np.allclose(want_clipped["['dense']['kernel']"], want_unclipped["['dense']['kernel']"])

  # Gradients under the threshold pass unchanged; None also turns clipping off.
  small = [jax.tree.map(lambda x: np.full(x.shape, 1e-3, np.float32), params)]
  a, _ = _run_optimizer(_cfg(**base, grad_clip=1.0), params, small)
  b, _ = _run_optimizer(_cfg(**base, grad_clip=None), params, small)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-7), a, b)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_no_norms_mask_on_model_params(scan_layers):
  config = ModelConfig(**{**preset("tiny"), "scan_layers": scan_layers})
  params = abstract_params(config)
  mask = _flat(optim.no_norms_mask(params))
  excluded = sorted(k for k, decays in mask.items() if not decays)
  assert all("norm" in k or "ln_f" in k for k in excluded)
  assert len(excluded) == (3 if scan_layers else 2 * config.n_layers + 1)
  assert sum(mask.values()) == len(mask) - len(excluded)
  # The optimizer initialises on the abstract params (as the trainer does under eval_shape).
  tx = optim.make_optimizer(_cfg(weight_decay_mask="no_norms"))
  jax.eval_shape(tx.init, params)


# --------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize("overrides, match", [
    (dict(schedule="linear"), r"optimizer\.schedule='linear': expected one of"),
    (dict(lr=0.0), r"optimizer\.lr=0\.0: expected a number > 0"),
    (dict(lr=-1e-4), r"optimizer\.lr=-0\.0001: expected"),
    (dict(warmup_steps=-1), r"optimizer\.warmup_steps=-1: expected an integer >= 0"),
    (dict(warmup_steps=20_000, total_steps=10_000), r"optimizer\.warmup_steps=20000: expected an integer <= total_steps"),
    (dict(schedule="wsd", total_steps=0), r"optimizer\.total_steps=0: expected an integer >= 1"),
    (dict(schedule="wsd", decay_start=1.5), r"optimizer\.decay_start=1\.5: expected a fraction"),
    (dict(schedule="wsd", decay_start=0.0), r"optimizer\.decay_start=0\.0: expected a fraction"),
    (dict(schedule="wsd", decay_start=20_000), r"optimizer\.decay_start=20000.*: expected a step <= total_steps"),
    (dict(schedule="wsd", total_steps=1000, warmup_steps=900, decay_start=0.5), r"optimizer\.decay_start=0\.5: expected a step >= warmup_steps"),
    (dict(schedule="wsd", decay_start=0.8, anneal_start=0.5), r"optimizer\.anneal_start=0\.5: expected a step >= decay_start"),
    (dict(schedule="wsd", decay_lr=-1.0), r"optimizer\.decay_lr=-1\.0: expected"),
    (dict(schedule="cosine", final_lr=-1e-6), r"optimizer\.final_lr=-1e-06: expected"),
    (dict(schedule="sft", decay_fraction=1.5), r"optimizer\.decay_fraction=1\.5: expected a number >= 0 and <= 1"),
    (dict(schedule="sft", warmup_steps=9500, total_steps=10_000), r"optimizer\.decay_fraction=0\.1: expected"),
    (dict(b1=1.0), r"optimizer\.b1=1\.0: expected a number >= 0 and < 1"),
    (dict(b2=-0.1), r"optimizer\.b2=-0\.1: expected"),
    (dict(eps=0.0), r"optimizer\.eps=0\.0: expected a number > 0"),
    (dict(weight_decay=-0.1), r"optimizer\.weight_decay=-0\.1: expected a number >= 0"),
    (dict(weight_decay_mask="norms"), r"optimizer\.weight_decay_mask='norms': expected one of"),
    (dict(grad_clip=-1.0), r"optimizer\.grad_clip=-1\.0: expected a number >= 0"),
])
def test_bad_fields_raise_naming_the_field(overrides, match):
  cfg = _cfg(total_steps=10_000)
  for key, value in overrides.items():
    cfg[key] = value
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(cfg)


def test_unknown_field_and_bool_are_rejected():
  cfg = _cfg().to_dict()
  cfg["learning_rate"] = 1e-3
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['learning_rate'\]"):
    optim.make_schedule(ml_collections.ConfigDict(cfg))
  with pytest.raises(ValueError, match=r"optimizer\.warmup_steps=True"):
    optim.make_schedule({**_cfg().to_dict(), "warmup_steps": True})


def test_bfloat16_params_keep_their_dtype_through_updates():
  tx = optim.make_optimizer(optim.default_optimizer_config("vrpo"))
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _toy_params())
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  # Same dtypes before and after: the state can be donated and checkpointed without surprises.
  assert jax.tree.map(lambda a: a.dtype, state) == jax.tree.map(lambda a: a.dtype, new_state)
  assert float(optim.current_lr(new_state)) == pytest.approx(float(optim.make_schedule(
      optim.default_optimizer_config("vrpo"))(0)))
