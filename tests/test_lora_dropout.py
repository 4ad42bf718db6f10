"""Adapter dropout: off at rate 0 and at inference, drawn at its rate, and keyed per example.

Keyed per example means an example draws the same dropout in every layout: packed rows give the
unpacked losses and gradients, and chunked noised copies give the one-shot VRPO step, with dropout on
(tolerances as in tests/test_packed.py: float32 summation order only).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import diffusion, lora, model as M, packed, vrpo, vrpo_packed
from llada_jax.training import objectives
from tests import test_packed as tp
from tests.test_lora import BASE, SEGMENTS, TOKENS, nudged

RATE = 0.3


def dropout_model(rate=RATE, scan=False, seed=0):
  cfg = BASE.replace(lora_rank=4, lora_alpha=8.0, lora_dropout=rate, scan_layers=scan)
  adapters, base = lora.split(M.init_params(cfg, jax.random.key(seed)))
  return cfg, lora.combine(base, nudged(adapters, seed))


ROW_KEYS = jax.random.split(jax.random.key(5), 2)


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_no_keys_or_rate_zero_is_the_deterministic_forward(scan):
  cfg, params = dropout_model(scan=scan)
  plain = M.logits_fn(cfg.replace(lora_dropout=0.0))
  want = np.asarray(plain(params, TOKENS, segment_ids=SEGMENTS))
  # Inference passes no keys: no dropout whatever the rate.
  np.testing.assert_array_equal(M.logits_fn(cfg)(params, TOKENS, segment_ids=SEGMENTS), want)
  # Rate 0 ignores keys.
  slot_keys = jax.random.split(jax.random.key(1), 4).reshape(2, 2)
  np.testing.assert_array_equal(plain(params, TOKENS, segment_ids=SEGMENTS, dropout_keys=slot_keys), want)
  dropped = M.logits_fn(cfg)(params, TOKENS, segment_ids=SEGMENTS, dropout_keys=slot_keys)
  assert float(jnp.abs(dropped - want).max()) > 1e-3  # with keys, dropout changes the adapters' term
  np.testing.assert_array_equal(M.logits_fn(cfg)(params, TOKENS, segment_ids=SEGMENTS, dropout_keys=slot_keys),
                                dropped)  # and is a function of the keys


def test_dropout_leaves_the_base_alone_when_the_adapters_are_off():
  """LoRA-VRPO's reference (adapters zeroed) stays the base model exactly, dropout or not."""
  cfg, params = dropout_model()
  adapters, base = lora.split(params)
  off = lora.combine(base, lora.switched_off(adapters))
  got = M.logits_fn(cfg)(off, TOKENS, dropout_keys=ROW_KEYS)
  want = M.logits_fn(lora.base_config(cfg))(base, TOKENS)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_dropout_zeroes_entries_at_its_rate_and_rescales_the_rest():
  cfg, _ = dropout_model()
  x = jnp.ones((4, 64, 32), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(64), (4, 64))
  keys = lora.token_keys(jax.random.split(jax.random.key(0), 4), None, positions)
  out = np.asarray(lora.dropout(cfg, x, keys, 0, "q_proj"))
  assert set(np.unique(out)) <= {0.0, np.float32(1 / (1 - RATE))}
  # 8,192 Bernoulli(0.3) draws, seed 0: the dropped fraction is within 4 standard errors (0.02) of the rate.
  assert abs((out == 0).mean() - RATE) < 4 * np.sqrt(RATE * (1 - RATE) / out.size)
  # Every layer and target draws its own mask.
  for layer, name in ((1, "q_proj"), (0, "k_proj")):
    assert (np.asarray(lora.dropout(cfg, x, keys, layer, name)) != out).any(), (layer, name)


def test_a_token_draws_by_its_example_and_position_not_its_row():
  """Example 1 alone at the start of a row, or as segment 2 of a packed row: the same keys."""
  example_key = jax.random.key(9)
  alone = lora.token_keys(example_key[None], None, jnp.arange(7)[None])
  other = jax.random.key(3)
  seg = jnp.array([[1] * 5 + [2] * 7])
  packed_keys = lora.token_keys(jnp.stack([other, example_key])[None], seg, M.positions_from_segments(seg))
  np.testing.assert_array_equal(np.asarray(packed_keys)[0, 5:], np.asarray(alone)[0])


def sft_batches():
  examples = tp.make_examples(np.random.default_rng(0), 5)
  seqs, prompts = [e[0] for e in examples], [e[1] for e in examples]
  unpacked = dict(tokens=tp.padded(seqs, 16), prompt_lengths=np.array(prompts, np.int32),
                  lengths=np.array([len(s) for s in seqs], np.int32), example_id=tp.IDS)
  rows, slots = [[0, 1, 2], [3, 4]], 4
  tokens, seg = tp.pack_rows(seqs, rows, 40, slots)
  packed_batch = dict(tokens=tokens, segment_ids=seg, prompt_lengths=tp.slot_array(prompts, rows, slots, 0),
                      example_id=tp.slot_array(tp.IDS, rows, slots, -1))
  return unpacked, packed_batch


def test_packed_sft_equals_unpacked_sft_with_dropout():
  cfg, params = dropout_model()
  fn = M.logits_fn(cfg)
  unpacked, packed_batch = sft_batches()
  u_loss = diffusion.SFTLoss(fn, cfg.mask_token_id, adapter_dropout=True)
  p_loss = packed.PackedSFTLoss(fn, cfg.mask_token_id, adapter_dropout=True)
  (u_value, _), u_grads = jax.jit(jax.value_and_grad(u_loss, has_aux=True))(params, unpacked, tp.KEY)
  (p_value, _), p_grads = jax.jit(jax.value_and_grad(p_loss, has_aux=True))(params, packed_batch, tp.KEY)
  np.testing.assert_allclose(p_value, u_value, rtol=tp.RTOL)
  tp.assert_trees_close(p_grads, u_grads)
  # Dropout is on: the loss is not the deterministic one.
  plain, _ = jax.jit(dataclasses.replace(u_loss, adapter_dropout=False))(params, unpacked, tp.KEY)
  assert abs(float(plain) - float(u_value)) > 1e-4


@pytest.fixture(scope="module")
def pairs():
  chosen, rejected, prompts = tp.preference_examples(4)
  ids = tp.IDS[:4]
  return (tp.unpacked_pairs(chosen, rejected, prompts, ids),
          tp.packed_pairs(chosen, rejected, prompts, ids, tp.ROWS))


@pytest.mark.slow  # about 2 minutes on 2 cores: three VRPO steps compiled with gradients
def test_packed_and_chunked_vrpo_equal_unpacked_vrpo_with_dropout(pairs):
  cfg, params = dropout_model()
  fn = M.logits_fn(cfg)
  adapters, base = lora.split(params)
  reference = lora.combine(base, lora.switched_off(adapters))
  unpacked_batch, packed_batch = pairs
  one_row = vrpo.VRPOLoss(fn, cfg.mask_token_id, tp.VRPO_CFG, adapter_dropout=True)
  packed_loss = vrpo_packed.PackedVRPOLoss(fn, cfg.mask_token_id, tp.VRPO_CFG, adapter_dropout=True)
  chunked = dataclasses.replace(packed_loss, copy_chunks=2)
  (u_value, u_metrics), u_grads = jax.jit(jax.value_and_grad(one_row, has_aux=True))(
      params, unpacked_batch, tp.KEY, reference)
  (p_value, p_metrics), p_grads = jax.jit(jax.value_and_grad(packed_loss, has_aux=True))(
      params, packed_batch, tp.KEY, reference)
  c_value, c_metrics, c_grads = jax.jit(chunked.value_and_grad)(params, packed_batch, tp.KEY, reference)
  for value, metrics, grads in ((p_value, p_metrics, p_grads), (c_value, c_metrics, c_grads)):
    np.testing.assert_allclose(value, u_value, rtol=tp.RTOL)
    for name in ("score", "preference_loss", "sft_loss"):
      np.testing.assert_allclose(metrics[name], u_metrics[name], rtol=tp.RTOL, atol=1e-6, err_msg=name)
    tp.assert_trees_close(grads, u_grads)
  # The reference side never drops: its ELBOs are the base model's, as without dropout.
  plain = dataclasses.replace(one_row, adapter_dropout=False)
  for got, want in zip(one_row.reference_elbos(reference, unpacked_batch, tp.KEY),
                       plain.reference_elbos(reference, unpacked_batch, tp.KEY)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # The policy side does.
  drop_elbos = one_row.policy_elbos(params, unpacked_batch, tp.KEY)
  plain_elbos = plain.policy_elbos(params, unpacked_batch, tp.KEY)
  assert float(jnp.abs(drop_elbos[0] - plain_elbos[0]).max()) > 1e-4


@pytest.mark.parametrize("name,is_packed", [("sft", False), ("sft", True), ("pretrain", True)])
def test_objectives_turn_dropout_on_from_the_model_config(name, is_packed):
  cfg, params = dropout_model()
  batch = sft_batches()[is_packed]
  losses = [float(jax.jit(objectives.make_objective(name, c, packed=is_packed).loss_fn)(params, batch, tp.KEY)[0])
            for c in (cfg, cfg.replace(lora_dropout=0.0))]
  assert abs(losses[0] - losses[1]) > 1e-4, losses
  vrpo_loss = objectives.make_objective("vrpo", cfg, packed=is_packed).loss_fn
  assert vrpo_loss.adapter_dropout


@pytest.mark.parametrize("changes,field", [
    (dict(lora_rank=4, lora_dropout=1.0), "lora_dropout"),
    (dict(lora_rank=4, lora_dropout=-0.1), "lora_dropout"),
    (dict(lora_rank=0, lora_dropout=0.1), "lora_dropout"),
])
def test_bad_dropout_settings_are_refused(changes, field):
  with pytest.raises(ValueError, match=f"model.{field}="):
    BASE.replace(**changes)
