"""The splash-attention path (`llada_jax/attention.py`) against the einsum path, on CPU.

The Pallas kernel runs through its interpreter here, so the test is of its semantics (segment ids,
the key mask folded into them, grouped-query heads, the query scale, gradients), not of TPU
lowering. Everything is float32; the interpreter's matmuls and the kernel's online softmax round
differently from one softmax over the whole row, hence a float32 tolerance rather than equality:
atol 1e-5 and rtol 1e-4 for attention outputs and their gradients, atol/rtol 1e-4 for logits and
parameter gradients of the whole model (which add a few matmuls on top).
"""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import attention, model, sharding
from llada_jax.attention import AttentionMasks

_KERNEL_TOL = dict(atol=1e-5, rtol=1e-4)
_MODEL_TOL = dict(atol=1e-4, rtol=1e-4)
_HEAD_DIM = 128  # the smallest head dim the splash path takes


def _jit(fn, **kwargs):
  """jax.jit with cheap backend codegen on CPU: compiling the interpreted kernels dominates these tests."""
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return jax.jit(fn, compiler_options=options, **kwargs)


def _qkv(seed, batch, length, heads, kv_heads):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (batch, length, heads, _HEAD_DIM)),
          jax.random.normal(kk, (batch, length, kv_heads, _HEAD_DIM)),
          jax.random.normal(kv, (batch, length, kv_heads, _HEAD_DIM)))


def _packed_segments():
  """Two packed rows of 256: segments of different lengths across the 128 blocks, tail padding (0)."""
  row0 = [1] * 40 + [2] * 120 + [3] * 20 + [0] * 76
  row1 = [5] * 130 + [6] * 125 + [0]
  return jnp.array([row0, row1], jnp.int32)


def _value_and_grads(attend):
  def run(q, k, v, cotangent):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(cotangent)

  return _jit(run)


def _compare(q, k, v, masks):
  """Splash (interpreted) vs the einsum path on the real positions (those whose key is not masked).

  Gradients are of sum(out * c) for a random c that is zero at padding, as the objectives weight
  their losses. Padding rows may differ between the paths (splash lets padding see only padding);
  they must stay finite, and a cotangent on them must not reach the real positions' gradients.
  """
  scale = 1.0 / math.sqrt(_HEAD_DIM)
  splash = _value_and_grads(lambda q, k, v: attention.splash_attention(q, k, v, masks, scale, interpret=True))
  einsum = _value_and_grads(lambda q, k, v: model._xla_attention(q, k, v, masks.dense(), scale))
  real = np.ones(q.shape[:2], bool) if masks.key_mask is None else np.asarray(masks.key_mask)
  noise = jax.random.normal(jax.random.key(9), q.shape)
  cotangent = noise * real[:, :, None, None]
  out, grads = splash(q, k, v, cotangent)
  ref_out, ref_grads = einsum(q, k, v, cotangent)
  chex.assert_tree_all_finite((out, grads))
  chex.assert_trees_all_close(out[real], ref_out[real], **_KERNEL_TOL)
  chex.assert_trees_all_close(grads, ref_grads, **_KERNEL_TOL)
  if not real.all():
    _, noisy_grads = splash(q, k, v, noise)
    chex.assert_trees_all_close([g[real] for g in noisy_grads], [g[real] for g in grads], **_KERNEL_TOL)


def test_splash_matches_einsum_on_packed_rows_with_padding(monkeypatch):
  # 128-blocks on 256 positions: segments straddle blocks and the online softmax spans two key blocks.
  monkeypatch.setattr(attention, "_SPLASH_BLOCKS", (128,))
  segment_ids = _packed_segments()
  q, k, v = _qkv(0, 2, 256, 2, 2)
  _compare(q, k, v, AttentionMasks(segment_ids > 0, segment_ids))
  # Without a key mask the padding (segment 0) is one more segment.
  _compare(q, k, v, AttentionMasks(None, segment_ids))


def test_splash_matches_einsum_with_a_key_mask():
  key_mask = jnp.ones((2, 128), bool).at[0, 100:].set(False).at[1, :7].set(False).at[1, 60:64].set(False)
  _compare(*_qkv(1, 2, 128, 2, 2), AttentionMasks(key_mask))


def test_splash_matches_einsum_with_grouped_query_heads():
  segment_ids = jnp.array([[1] * 90 + [2] * 30 + [0] * 8], jnp.int32)
  q, k, v = _qkv(2, 1, 128, 4, 2)  # query heads 0, 1 share key/value head 0; 2, 3 share head 1
  _compare(q, k, v, AttentionMasks(segment_ids > 0, segment_ids))
  _compare(q, k, v, AttentionMasks())


def test_splash_shards_over_a_mesh():
  """Under the abstract mesh training traces with, the kernel runs per device (rows x heads)."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
  segment_ids = _packed_segments()[:, :128]
  masks = AttentionMasks(segment_ids > 0, segment_ids)
  q, k, v = _qkv(3, 2, 128, 4, 2)
  scale = 1.0 / math.sqrt(_HEAD_DIM)

  def splash(q, k, v):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
      return attention.splash_attention(q, k, v, masks, scale, interpret=True)

  out = _jit(splash, in_shardings=sharding.replicated(mesh))(q, k, v)
  assert "shard_map" in str(jax.make_jaxpr(splash)(q, k, v))
  ref = model._xla_attention(q, k, v, masks.dense(), scale)
  real = np.asarray(masks.key_mask)
  chex.assert_trees_all_close(out[real], ref[real], **_KERNEL_TOL)


def test_splash_block_size():
  assert attention.splash_block_size(1024, 1024, 128) == 512
  assert attention.splash_block_size(384, 384, 256) == 128
  assert attention.splash_block_size(100, 100, 128) is None  # not whole 128-blocks
  assert attention.splash_block_size(128, 128, 64) is None  # head dim below the 128 lanes
  assert attention.splash_block_size(32, 256, 128) is None  # a span against a KV cache


# --------------------------------------------------------------------------------------------
# The whole model.


def _config(**changes) -> model.ModelConfig:
  values = dict(vocab_size=64, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=_HEAD_DIM,
                mlp_hidden_size=64, rope_theta=10000.0, mask_token_id=63, eos_token_id=1, bos_token_id=2,
                attention_impl="xla")
  return model.ModelConfig(**{**values, **changes})


_SPLASH = dict(attention_impl="splash", attention_interpret=True)


@pytest.fixture(scope="module")
def params():
  return _jit(lambda key: model.init_params(_config(), key))(jax.random.key(0))


def test_model_logits_and_grads_match_with_splash(params):
  segment_ids = _packed_segments()[:, :128]
  key_mask = segment_ids > 0
  tokens = jax.random.randint(jax.random.key(1), segment_ids.shape, 0, 64)
  weights = key_mask.astype(jnp.float32)  # as the objectives: no loss on padding

  def loss_and_logits(cfg):
    def loss(params):
      logits = model.logits_fn(cfg)(params, tokens, key_mask=key_mask, segment_ids=segment_ids)
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1)[..., 0]
      return jnp.sum(nll * weights), logits

    return _jit(jax.value_and_grad(loss, has_aux=True))(params)

  (loss, logits), grads = loss_and_logits(_config(**_SPLASH))
  (ref_loss, ref_logits), ref_grads = loss_and_logits(_config())
  chex.assert_tree_all_finite(logits)  # padding positions included, though they differ between the paths
  real = np.asarray(key_mask)
  chex.assert_trees_all_close(logits[real], ref_logits[real], **_MODEL_TOL)
  chex.assert_trees_all_close(loss, ref_loss, **_MODEL_TOL)
  chex.assert_trees_all_close(grads, ref_grads, **_MODEL_TOL)


def test_cached_passes_with_splash(params):
  """The full cached pass runs splash; a span against the cache falls back to the einsum path."""
  tokens = jax.random.randint(jax.random.key(2), (1, 128), 0, 64)
  key_mask = jnp.ones((1, 128), bool).at[0, :5].set(False)
  def passes(cfg):
    def run(params):
      logits, cache = model.forward_with_cache(cfg, params, tokens, key_mask=key_mask)
      return logits, cache, model.forward_span(cfg, params, tokens[:, 64:96], cache, 64, key_mask=key_mask)

    return _jit(run)(params)

  logits, cache, span = passes(_config(**_SPLASH))
  ref_logits, ref_cache, ref_span = passes(_config())
  real = np.asarray(key_mask[0])  # padding rows differ from the second layer on; nothing attends to them
  chex.assert_trees_all_close((logits[:, real], cache.k[:, :, real], cache.v[:, :, real], span),
                              (ref_logits[:, real], ref_cache.k[:, :, real], ref_cache.v[:, :, real], ref_span),
                              **_MODEL_TOL)


def test_lengths_splash_cannot_take_run_the_einsum_path(params):
  tokens = jax.random.randint(jax.random.key(3), (2, 10), 0, 64)
  segment_ids = jnp.array([[1] * 6 + [2] * 4, [1] * 8 + [0] * 2])
  kwargs = dict(key_mask=segment_ids > 0, segment_ids=segment_ids)
  logits = _jit(model.logits_fn(_config(**_SPLASH)))(params, tokens, **kwargs)
  np.testing.assert_array_equal(logits, _jit(model.logits_fn(_config()))(params, tokens, **kwargs))


# --------------------------------------------------------------------------------------------
# Configuration.


def test_splash_without_a_tpu_is_refused_at_first_use(params):
  cfg = _config(attention_impl="splash")  # constructing it is fine: configs are planned off-TPU too
  with pytest.raises(ValueError, match=r"attention_impl='splash' needs a TPU.*attention_interpret=True"):
    jax.eval_shape(model.logits_fn(cfg), params, jnp.zeros((1, 128), jnp.int32))
  with pytest.raises(ValueError, match=r"\battention_interpret\b"):
    _config(attention_interpret="yes")


@pytest.mark.parametrize("backend,dtype,expected", [
    ("tpu", "float32", "splash"), ("tpu", "bfloat16", "splash"), ("gpu", "bfloat16", "cudnn"),
    ("gpu", "float32", "xla"), ("cpu", "bfloat16", "xla"),
])
def test_auto_resolves_per_backend(monkeypatch, backend, dtype, expected):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert _config(attention_impl="auto", dtype=dtype).resolved_attention_impl == expected
  # On a TPU an explicit "splash" needs no interpreter.
  if backend == "tpu":
    assert _config(attention_impl="splash").resolved_attention_impl == "splash"
