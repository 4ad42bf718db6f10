"""Tests of the mask predictor (`llada_jax/model.py`) against docs/method.md, "Architecture".

Most numerical checks compare against independent float64 NumPy code written here from the
reference description, so they fail if the math (not just the shapes) is wrong.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import model
from llada_jax.model import ModelConfig

# Std of a standard normal truncated at +-3 sigma: sqrt(1 - 2*3*phi(3) / (2*Phi(3) - 1)).
_TRUNC_FACTOR = math.sqrt(
    1.0 - 6.0 * math.exp(-4.5) / math.sqrt(2 * math.pi) / math.erf(3.0 / math.sqrt(2.0)))


def _presets():
  from llada_jax.configs import models  # noqa: PLC0415

  return models


def preset(name: str) -> ModelConfig:
  return ModelConfig.from_dict(_presets().get_config(name).to_dict())


def fast_jit(fn):
  """jax.jit with cheap backend codegen on CPU: XLA compile time dominates these tiny tests, and
  optimisation level 0 compiles ~3x faster (HLO-level numerics are unchanged)."""
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return jax.jit(fn, compiler_options=options)


@functools.lru_cache(maxsize=None)
def apply_fn(cfg: ModelConfig):
  """Jitted `(params, tokens, **masks) -> logits`: one compile per config and shapes."""
  return fast_jit(model.logits_fn(cfg))


@functools.lru_cache(maxsize=None)
def _jitted_init(cfg: ModelConfig):
  return fast_jit(lambda key: model.init_params(cfg, key))


def init_params(cfg: ModelConfig, seed: int):
  return _jitted_init(cfg)(jax.random.key(seed))


def to_np64(tree):
  return jax.tree.map(lambda x: np.asarray(x, dtype=np.float64), tree)


# --------------------------------------------------------------------------------------------
# Independent float64 NumPy reference (docs/method.md, "Architecture").


def np_rmsnorm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def np_rope(x_bthd, positions_bt, theta):
  """Half-split ("rotate_half") RoPE in float64."""
  hd = x_bthd.shape[-1]
  inv_freq = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
  ang = positions_bt.astype(np.float64)[..., None] * inv_freq  # [b, t, hd/2]
  cos, sin = np.cos(ang)[:, :, None, :], np.sin(ang)[:, :, None, :]
  x1, x2 = x_bthd[..., : hd // 2], x_bthd[..., hd // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_forward(params, cfg: ModelConfig, tokens, key_mask=None):
  """LLaDA forward in float64 with plain [in, out] matrices (as an HF-style implementation)."""
  p = to_np64(params)
  tokens = np.asarray(tokens)
  b, t = tokens.shape
  d, h, kv = cfg.d_model, cfg.n_heads, cfg.kv_heads
  hd = cfg.resolved_head_dim
  positions = np.broadcast_to(np.arange(t), (b, t))
  x = p["wte"][tokens]  # [b, t, d]
  for i in range(cfg.n_layers):
    blk = p[f"blocks_{i}"]
    hn = np_rmsnorm(x, blk["attn_norm"]["weight"], cfg.norm_eps)
    q = (hn @ blk["attn"]["q_proj"].reshape(d, h * hd)).reshape(b, t, h, hd)
    k = (hn @ blk["attn"]["k_proj"].reshape(d, kv * hd)).reshape(b, t, kv, hd)
    v = (hn @ blk["attn"]["v_proj"].reshape(d, kv * hd)).reshape(b, t, kv, hd)
    q, k = np_rope(q, positions, cfg.rope_theta), np_rope(k, positions, cfg.rope_theta)
    # Grouped KV heads: query head j uses kv head j // (h // kv) (HF repeat_kv).
    k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)  # no causal mask
    if key_mask is not None:
      scores = np.where(np.asarray(key_mask, bool)[:, None, None, :], scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    att = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, h * hd)
    x = x + att @ blk["attn"]["attn_out"].reshape(h * hd, d)
    hn = np_rmsnorm(x, blk["ff_norm"]["weight"], cfg.norm_eps)
    gate, up = hn @ blk["mlp"]["ff_proj"], hn @ blk["mlp"]["up_proj"]
    x = x + (gate / (1.0 + np.exp(-gate)) * up) @ blk["mlp"]["ff_out"]
  x = np_rmsnorm(x, p["ln_f"]["weight"], cfg.norm_eps)
  return x @ p["ff_out"]


# --------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
  return preset("tiny")


@pytest.fixture(scope="module")
def tiny_params(tiny):
  return init_params(tiny, 0)


@pytest.fixture(scope="module")
def perturbed_params(tiny, tiny_params):
  """Init params with non-trivial norm weights and sharper attention (so bugs show in the logits)."""
  rng = np.random.default_rng(0)

  def perturb(path, x):
    names = [getattr(k, "key", None) for k in path]
    x = np.asarray(x)
    if "weight" in names:  # RMSNorm weights: 1 at init; make them non-trivial.
      return jnp.asarray(x * rng.uniform(0.5, 1.5, size=x.shape).astype(np.float32))
    if names[-1] in ("q_proj", "k_proj"):
      return jnp.asarray(2.0 * x)
    return jnp.asarray(x)

  return jax.tree_util.tree_map_with_path(perturb, tiny_params)


def random_tokens(key, shape, cfg):
  return jax.random.randint(jax.random.key(key), shape, 0, cfg.vocab_size, dtype=jnp.int32)


# --------------------------------------------------------------------------------------------
# 1. Shapes and dtypes.


def test_logits_shape_and_dtype(tiny, tiny_params):
  tokens = random_tokens(1, (3, 7), tiny)
  logits = apply_fn(tiny)(tiny_params, tokens)
  chex.assert_shape(logits, (3, 7, tiny.vocab_size))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)
  for x in jax.tree_util.tree_leaves(tiny_params):
    chex.assert_type(x, jnp.float32)


def test_bfloat16_compute_float32_params(tiny, tiny_params):
  cfg16 = tiny.replace(dtype="bfloat16")
  # Parameters stay float32 (param_dtype) although compute is bfloat16 (shapes/dtypes via eval_shape).
  chex.assert_trees_all_equal_shapes_and_dtypes(model.abstract_params(cfg16), tiny_params)

  tokens = random_tokens(2, (2, 8), tiny)
  l32 = apply_fn(tiny)(tiny_params, tokens)
  l16 = apply_fn(cfg16)(tiny_params, tokens)
  chex.assert_type(l16, jnp.float32)  # logits are always float32.
  chex.assert_shape(l16, l32.shape)
  chex.assert_tree_all_finite(l16)
  # bfloat16 has ~3 significant digits; the tiny model's logits are O(1).
  # Tolerance: |l16 - l32| <= 0.1 + 0.05 |l32| (measured error ~0.04 on max |logit| ~3).
  np.testing.assert_allclose(l16, l32, atol=0.1, rtol=0.05)
  # ... and the compute really happened in bfloat16 (not silently float32).
  assert np.abs(np.asarray(l16) - np.asarray(l32)).max() > 1e-4


# --------------------------------------------------------------------------------------------
# 2. Bidirectionality.


def test_bidirectional_last_token_changes_first_position(tiny, tiny_params):
  tokens = random_tokens(3, (1, 8), tiny)
  changed = tokens.at[0, -1].set((tokens[0, -1] + 1) % tiny.vocab_size)
  apply = apply_fn(tiny)
  a, b = apply(tiny_params, tokens), apply(tiny_params, changed)
  assert np.abs(np.asarray(a[0, 0] - b[0, 0])).max() > 1e-4
  # Every position sees the change (no causal mask anywhere).
  assert (np.abs(np.asarray(a - b)).max(axis=-1) > 1e-5).all()


# --------------------------------------------------------------------------------------------
# 3. Key padding mask.


def test_padded_keys_do_not_affect_real_positions(tiny, tiny_params):
  apply = apply_fn(tiny)
  n_real, length = 5, 8
  tokens = random_tokens(4, (2, length), tiny)
  key_mask = jnp.broadcast_to(jnp.arange(length) < n_real, (2, length))
  other = tokens.at[:, n_real:].set(random_tokens(5, (2, length - n_real), tiny))
  assert not np.array_equal(np.asarray(tokens[:, n_real:]), np.asarray(other[:, n_real:]))

  a = apply(tiny_params, tokens, key_mask=key_mask)
  b = apply(tiny_params, other, key_mask=key_mask)
  chex.assert_tree_all_finite(a)
  np.testing.assert_allclose(a[:, :n_real], b[:, :n_real], atol=1e-6, rtol=1e-6)

  short = apply(tiny_params, tokens[:, :n_real])
  np.testing.assert_allclose(a[:, :n_real], short, atol=1e-5, rtol=1e-5)
  # Without the mask the padding does leak in (the test above is not vacuous).
  unmasked = apply(tiny_params, tokens)
  assert np.abs(np.asarray(unmasked[:, :n_real] - short)).max() > 1e-4


def test_per_row_key_mask(tiny, tiny_params):
  """Different padding per row: each row equals its own unpadded run."""
  apply = apply_fn(tiny)
  tokens = random_tokens(6, (2, 8), tiny)
  lengths = (3, 6)
  key_mask = jnp.arange(8)[None, :] < jnp.asarray(lengths)[:, None]
  out = apply(tiny_params, tokens, key_mask=key_mask)
  for row, n in enumerate(lengths):
    alone = apply(tiny_params, tokens[row:row + 1, :n])
    np.testing.assert_allclose(out[row:row + 1, :n], alone, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 4. Packed rows.


def test_positions_from_segments():
  seg = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 2, 2, 2, 2, 3, 3]])
  expected = np.array([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 0, 1, 2, 3, 0, 1]])
  np.testing.assert_array_equal(model.positions_from_segments(seg), expected)


def test_packed_row_equals_separate_sequences(tiny, tiny_params):
  apply = apply_fn(tiny)
  a_tok = random_tokens(7, (1, 5), tiny)
  b_tok = random_tokens(8, (1, 3), tiny)
  packed = jnp.concatenate([a_tok, b_tok], axis=1)
  segment_ids = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2]])
  out = apply(tiny_params, packed, segment_ids=segment_ids)
  np.testing.assert_allclose(out[:, :5], apply(tiny_params, a_tok), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out[:, 5:], apply(tiny_params, b_tok), atol=1e-5, rtol=1e-5)


def test_packed_row_with_padding(tiny, tiny_params):
  """Packing plus trailing padding (segment 0, key_mask 0) in a batch of two rows."""
  apply = apply_fn(tiny)
  tokens = random_tokens(9, (2, 10), tiny)
  segment_ids = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 2, 2, 2, 2, 2, 2, 0]])
  key_mask = segment_ids > 0
  out = apply(tiny_params, tokens, key_mask=key_mask, segment_ids=segment_ids)
  chex.assert_tree_all_finite(out)
  for row, spans in enumerate([[(0, 5), (5, 8)], [(0, 3), (3, 9)]]):
    for lo, hi in spans:
      alone = apply(tiny_params, tokens[row:row + 1, lo:hi])
      np.testing.assert_allclose(out[row:row + 1, lo:hi], alone, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 5. RoPE.


def _rope_at(x_1d, position, head_dim, theta):
  sin, cos = model.rope_tables(jnp.array([[position]]), head_dim, theta)
  return model.apply_rope(x_1d[None, None, None, :], sin, cos)[0, 0, 0]


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_scores_depend_only_on_relative_offset(theta):
  hd = 16
  q = jax.random.normal(jax.random.key(10), (hd,))
  k = jax.random.normal(jax.random.key(11), (hd,))

  def score(pq, pk):
    return float(jnp.dot(_rope_at(q, pq, hd, theta), _rope_at(k, pk, hd, theta)))

  for pq, pk in [(0, 0), (3, 1), (1, 6), (10, 2)]:
    base = score(pq, pk)
    for shift in (1, 7, 50):
      assert score(pq + shift, pk + shift) == pytest.approx(base, rel=1e-4, abs=1e-4)
  # Different offsets give different scores (the rotation is not a no-op).
  assert abs(score(0, 0) - score(3, 0)) > 1e-3
  assert abs(score(3, 0) - score(0, 3)) > 1e-3


def test_rope_preserves_norm():
  hd, theta = 32, 10000.0
  x = jax.random.normal(jax.random.key(12), (2, 9, 3, hd))
  positions = jnp.broadcast_to(jnp.arange(9) * 5, (2, 9))
  sin, cos = model.rope_tables(positions, hd, theta)
  y = model.apply_rope(x, sin, cos)
  chex.assert_shape(y, x.shape)
  chex.assert_type(y, x.dtype)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  # Position 0 is the identity.
  np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("head_dim,theta", [(8, 10000.0), (128, 500000.0)])
def test_rope_tables_match_float64_reference(head_dim, theta):
  positions = np.stack([np.arange(64), np.arange(64)[::-1] * 3])  # [2, 64], up to 189
  sin, cos = model.rope_tables(jnp.asarray(positions), head_dim, theta)
  chex.assert_shape((sin, cos), (2, 64, head_dim))
  chex.assert_type((sin, cos), jnp.float32)
  inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  ang = positions[..., None].astype(np.float64) * inv_freq
  ang = np.concatenate([ang, ang], axis=-1)  # half-split: the same frequency in both halves.
  # float32 angles: absolute error ~ position * 1e-7.
  np.testing.assert_allclose(sin, np.sin(ang), atol=5e-5, rtol=0)
  np.testing.assert_allclose(cos, np.cos(ang), atol=5e-5, rtol=0)


def test_apply_rope_matches_float64_reference():
  hd, theta = 16, 10000.0
  x = np.asarray(jax.random.normal(jax.random.key(13), (2, 6, 3, hd)))
  positions = np.stack([np.arange(6), np.arange(6) + 11])
  sin, cos = model.rope_tables(jnp.asarray(positions), hd, theta)
  y = model.apply_rope(jnp.asarray(x), sin, cos)
  np.testing.assert_allclose(y, np_rope(x.astype(np.float64), positions, theta), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 6. RMSNorm.


def test_rmsnorm_matches_float64_reference():
  d, eps = 24, 1e-5
  x = np.asarray(jax.random.normal(jax.random.key(14), (2, 5, d))) * 3.0 + 0.5
  x[0, 0] *= 1e-3  # small-norm row: eps matters here.
  w = np.asarray(jax.random.uniform(jax.random.key(15), (d,), minval=-2.0, maxval=2.0))
  norm = model.RMSNorm(eps)
  params = norm.init(jax.random.key(0), jnp.asarray(x))["params"]
  np.testing.assert_array_equal(nn.meta.unbox(params)["weight"], np.ones(d, np.float32))
  y = norm.apply({"params": {"weight": jnp.asarray(w)}}, jnp.asarray(x, jnp.float32))
  chex.assert_type(y, jnp.float32)
  expected = np_rmsnorm(x.astype(np.float64), w.astype(np.float64), eps)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_rmsnorm_keeps_input_dtype():
  x = jax.random.normal(jax.random.key(16), (3, 8)).astype(jnp.bfloat16)
  y = model.RMSNorm(1e-5).apply({"params": {"weight": jnp.full((8,), 2.0)}}, x)
  chex.assert_type(y, jnp.bfloat16)
  expected = np_rmsnorm(np.asarray(x, np.float64), 2.0, 1e-5)
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------------------------
# 7. Full forward pass against float64 NumPy.


@pytest.mark.parametrize("with_mask", [False, True])
def test_forward_matches_float64_numpy(tiny, perturbed_params, with_mask):
  tokens = random_tokens(17, (2, 7), tiny)
  key_mask = jnp.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]], bool) if with_mask else None
  with jax.default_matmul_precision("highest"):
    logits = apply_fn(tiny)(perturbed_params, tokens, key_mask=key_mask)
  expected = np_forward(perturbed_params, tiny, tokens, key_mask=key_mask)
  if with_mask:  # Only real query positions have a defined value.
    real = np.asarray(key_mask)
    logits, expected = np.asarray(logits)[real], expected[real]
  scale = np.abs(expected).max()
  assert scale > 0.5  # logits are not vanishingly small, so the tolerance means something.
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5 * scale)


# --------------------------------------------------------------------------------------------
# 8. Parameter count of LLaDA-8B.


def test_llada_8b_parameter_count():
  cfg = preset("llada_8b")
  abstract = model.abstract_params(cfg)  # jax.eval_shape: no allocation.
  leaves = jax.tree_util.tree_leaves(abstract)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  total = model.count_params(abstract)
  assert total == 8_015_581_184
  embeddings = math.prod(abstract["wte"].shape) + math.prod(abstract["ff_out"].shape)
  assert abstract["wte"].shape == (126464, 4096)
  assert abstract["ff_out"].shape == (4096, 126464)  # untied LM head
  assert total - embeddings == 6_979_588_096
  assert cfg.num_params() == 8_015_581_184
  assert cfg.num_params(include_embedding=False) == 6_979_588_096
  # The scanned layout holds the same parameters.
  assert model.count_params(model.abstract_params(cfg.replace(scan_layers=True))) == 8_015_581_184


@pytest.mark.parametrize("changes", [{}, {"n_kv_heads": 1}, {"head_dim": 6}, {"scan_layers": True}])
def test_num_params_matches_abstract_params(tiny, changes):
  cfg = tiny.replace(**changes)
  assert cfg.num_params() == model.count_params(model.abstract_params(cfg))


# --------------------------------------------------------------------------------------------
# 9. Scanned layers and rematerialisation.


def _stack_layers(params, n_layers):
  layers = [params[f"blocks_{i}"] for i in range(n_layers)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  rest = {k: v for k, v in params.items() if not k.startswith("blocks_")}
  return {**rest, "blocks": {"block": stacked}}


def test_scan_layers_matches_unscanned(tiny, perturbed_params):
  cfg = tiny.replace(scan_layers=True)
  scanned = _stack_layers(perturbed_params, tiny.n_layers)
  chex.assert_trees_all_equal_shapes_and_dtypes(scanned, model.abstract_params(cfg))
  tokens = random_tokens(18, (2, 8), tiny)
  key_mask = jnp.array([[1] * 8, [1] * 5 + [0] * 3], bool)
  ref = apply_fn(tiny)(perturbed_params, tokens, key_mask=key_mask)
  out = apply_fn(cfg)(scanned, tokens, key_mask=key_mask)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def _loss_and_grads(cfg, params, tokens):
  apply = model.logits_fn(cfg)  # not apply_fn: compiler options are only allowed on the outer jit.
  weights = jax.random.normal(jax.random.key(19), tokens.shape + (cfg.vocab_size,))

  def loss(p):
    logits = apply(p, tokens)
    return jnp.sum(weights * logits) + jnp.sum(jax.nn.log_softmax(logits)[..., 0])

  return fast_jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("scan", [False, True])
def test_remat_full_same_logits_and_grads(tiny, perturbed_params, scan):
  base = tiny.replace(scan_layers=scan)
  params = _stack_layers(perturbed_params, tiny.n_layers) if scan else perturbed_params
  tokens = random_tokens(20, (2, 6), tiny)
  remat = base.replace(remat="full")
  chex.assert_trees_all_equal_structs(params, model.abstract_params(remat))
  np.testing.assert_allclose(apply_fn(remat)(params, tokens), apply_fn(base)(params, tokens),
                             atol=1e-6, rtol=1e-6)
  v0, g0 = _loss_and_grads(base, params, tokens)
  v1, g1 = _loss_and_grads(remat, params, tokens)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  chex.assert_trees_all_close(g1, g0, atol=1e-4, rtol=1e-4)  # float32 rounding; |g| up to ~15
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(g0))  # every param is used


# --------------------------------------------------------------------------------------------
# 10. Initialisation.


@pytest.fixture(scope="module")
def init_cfg() -> ModelConfig:
  # Large enough for accurate sample stds (>= 65536 samples per matrix), small enough to be fast.
  return ModelConfig(vocab_size=256, d_model=256, n_layers=3, n_heads=4, n_kv_heads=2, mlp_hidden_size=512,
                     mask_token_id=255, eos_token_id=1, bos_token_id=2)


def _check_std(x, sigma, name):
  x = np.asarray(x, np.float64)
  assert np.abs(x).max() <= 3.0 * sigma * (1 + 1e-6), f"{name}: value beyond 3 sigma"
  assert abs(x.mean()) < 0.02 * sigma, f"{name}: mean {x.mean()}"
  # Sample std over >= 16k values is within ~1% (4 standard errors); depth factors differ by >= 13%.
  expected = _TRUNC_FACTOR * sigma
  assert x.std() == pytest.approx(expected, rel=0.03), f"{name}: std {x.std()} vs {expected}"


def _check_init(params_of_layer, cfg, n_layers, top):
  d, m = cfg.d_model, cfg.mlp_hidden_size
  for name, x in (("wte", top["wte"]), ("lm_head", top["ff_out"])):
    _check_std(x, 1 / math.sqrt(d), name)
  np.testing.assert_array_equal(top["ln_f"]["weight"], 1.0)
  for layer in range(n_layers):
    blk = params_of_layer(layer)
    for name in ("q_proj", "k_proj", "v_proj"):
      _check_std(blk["attn"][name], 1 / math.sqrt(d), f"layer {layer} {name}")
    for name in ("ff_proj", "up_proj"):
      _check_std(blk["mlp"][name], 1 / math.sqrt(d), f"layer {layer} {name}")
    depth = 1 / math.sqrt(2 * (layer + 1))
    _check_std(blk["attn"]["attn_out"], depth / math.sqrt(d), f"layer {layer} attn_out")
    _check_std(blk["mlp"]["ff_out"], depth / math.sqrt(m), f"layer {layer} ff_out")
    np.testing.assert_array_equal(blk["attn_norm"]["weight"], 1.0)
    np.testing.assert_array_equal(blk["ff_norm"]["weight"], 1.0)
  # Layers are independent draws.
  assert not np.allclose(params_of_layer(0)["attn"]["q_proj"], params_of_layer(1)["attn"]["q_proj"])


def test_initialisation_statistics(init_cfg):
  assert _TRUNC_FACTOR == pytest.approx(0.98658, abs=1e-4)
  params = init_params(init_cfg, 21)
  _check_init(lambda i: params[f"blocks_{i}"], init_cfg, init_cfg.n_layers, params)


def test_initialisation_statistics_scanned(init_cfg):
  cfg = init_cfg.replace(scan_layers=True)
  params = init_params(cfg, 22)
  stacked = params["blocks"]["block"]
  _check_init(lambda i: jax.tree.map(lambda x: x[i], stacked), cfg, cfg.n_layers, params)


# --------------------------------------------------------------------------------------------
# 11. Logical axes.

_BLOCK_AXES = {
    "attn_norm": {"weight": ("embed",)},
    "ff_norm": {"weight": ("embed",)},
    "attn": {
        "q_proj": ("embed", "heads", "head_dim"),
        "k_proj": ("embed", "heads", "head_dim"),
        "v_proj": ("embed", "heads", "head_dim"),
        "attn_out": ("heads", "head_dim", "embed"),
    },
    "mlp": {"ff_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"), "ff_out": ("mlp", "embed")},
}
_TOP_AXES = {"wte": ("vocab", "embed"), "ff_out": ("embed", "vocab"), "ln_f": {"weight": ("embed",)}}


def _as_tuples(specs):
  return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


@pytest.mark.parametrize("scan", [False, True])
def test_logical_axes(tiny, scan):
  cfg = tiny.replace(scan_layers=scan)
  specs = model.logical_axes(cfg)
  if scan:
    block = jax.tree.map(lambda axes: ("layers",) + axes, _BLOCK_AXES, is_leaf=lambda x: isinstance(x, tuple))
    expected = {**_TOP_AXES, "blocks": {"block": block}}
  else:
    expected = {**_TOP_AXES, **{f"blocks_{i}": _BLOCK_AXES for i in range(cfg.n_layers)}}
  got = _as_tuples(specs)
  assert got == expected
  # One spec entry per dimension of every parameter.
  abstract = model.abstract_params(cfg)
  flat_axes = jax.tree_util.tree_leaves(got, is_leaf=lambda x: isinstance(x, tuple))
  flat_params = jax.tree_util.tree_leaves(abstract)
  assert len(flat_axes) == len(flat_params)
  for axes, x in zip(flat_axes, flat_params):
    assert len(axes) == x.ndim


# --------------------------------------------------------------------------------------------
# 12. Config validation.


@pytest.mark.parametrize("changes,field", [
    ({"n_heads": 5}, "n_heads"),  # does not divide d_model=32
    ({"n_kv_heads": 3}, "n_kv_heads"),  # does not divide n_heads=4
    ({"head_dim": 7}, "head_dim"),  # odd: RoPE rotates pairs
    ({"dtype": "float8"}, "dtype"),
    ({"param_dtype": "int8"}, "param_dtype"),
    ({"mask_token_id": 32}, "mask_token_id"),  # == vocab_size
    ({"eos_token_id": -1}, "eos_token_id"),
    ({"bos_token_id": 1000}, "bos_token_id"),
    ({"remat": "sometimes"}, "remat"),
    ({"attention_impl": "flash"}, "attention_impl"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"d_model": -32}, "d_model"),
    ({"n_layers": 1.5}, "n_layers"),
])
def test_config_validation(tiny, changes, field):
  with pytest.raises(ValueError, match=rf"\b{field}\b"):
    tiny.replace(**changes)
  values = {**dataclasses.asdict(tiny), **changes}
  with pytest.raises(ValueError, match=rf"\b{field}\b"):
    ModelConfig.from_dict(values)


def test_config_from_dict_unknown_field(tiny):
  values = {**dataclasses.asdict(tiny), "n_head": 4}
  with pytest.raises(ValueError, match="n_head"):
    ModelConfig.from_dict(values)
  # A valid dict round-trips.
  assert ModelConfig.from_dict(dataclasses.asdict(tiny)) == tiny


def test_presets_are_valid():
  for name in _presets().PRESETS:
    cfg = preset(name)
    assert cfg.d_model % cfg.n_heads == 0
  cfg = preset("llada_8b")
  assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.resolved_head_dim,
          cfg.mlp_hidden_size) == (126464, 4096, 32, 32, 32, 128, 12288)
  assert (cfg.rope_theta, cfg.norm_eps, cfg.mask_token_id, cfg.eos_token_id, cfg.bos_token_id) == (
      500000.0, 1e-5, 126336, 126081, 126080)


# --------------------------------------------------------------------------------------------
# 13. attention_impl='jax' matches 'xla'.


def test_jax_attention_matches_xla(tiny, perturbed_params):
  tokens = random_tokens(23, (2, 10), tiny)
  segment_ids = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 2, 2, 2, 2, 2, 2, 0]])
  key_mask = segment_ids > 0
  xla = apply_fn(tiny)(perturbed_params, tokens, key_mask=key_mask, segment_ids=segment_ids)
  jx = apply_fn(tiny.replace(attention_impl="jax"))(
      perturbed_params, tokens, key_mask=key_mask, segment_ids=segment_ids)
  chex.assert_tree_all_finite(jx)
  real = np.asarray(key_mask)
  np.testing.assert_allclose(np.asarray(jx)[real], np.asarray(xla)[real], atol=1e-5, rtol=1e-5)
  # Also with the key mask alone.
  xla = apply_fn(tiny)(perturbed_params, tokens, key_mask=key_mask)
  jx = apply_fn(tiny.replace(attention_impl="jax"))(perturbed_params, tokens, key_mask=key_mask)
  np.testing.assert_allclose(np.asarray(jx)[real], np.asarray(xla)[real], atol=1e-5, rtol=1e-5)
