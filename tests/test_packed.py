"""Packed rows give the unpacked results: losses, ELBOs, VRPO scores, losses and gradients.

Every comparison runs the same examples with the same key in two layouts. The only differences
allowed are float32 summation order (segment sums are matmuls against a one-hot matrix): the
tolerance is rtol 2e-5 on values and atol 2e-5 x the largest gradient entry on gradients.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import diffusion, packed, vrpo, vrpo_packed
from tests.helpers import sharp_tiny_model

CFG, PARAMS, LOGITS_FN = sharp_tiny_model()
MASK, EOS = CFG.mask_token_id, CFG.eos_token_id
KEY = jax.random.key(7)
RTOL = 2e-5


def assert_trees_close(a, b):
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(b))
  chex.assert_trees_all_close(a, b, rtol=RTOL, atol=2e-5 * scale)


def make_examples(rng, n, *, prompt=(2, 4), answer=(3, 9)):
  """(tokens ending in one EOS, prompt length) per example."""
  out = []
  for _ in range(n):
    p, a = int(rng.integers(*prompt)), int(rng.integers(*answer))
    out.append((np.concatenate([rng.integers(3, MASK, p + a - 1), [EOS]]).astype(np.int32), p))
  return out


def pack_rows(sequences, rows, length, slots):
  """Tokens and segment ids [R, L]: the sequences of rows[r] one after another, EOS padding after."""
  tokens = np.full((len(rows), length), EOS, np.int32)
  seg = np.zeros((len(rows), length), np.int32)
  for r, members in enumerate(rows):
    assert len(members) <= slots
    at = 0
    for s, i in enumerate(members):
      x = sequences[i]
      tokens[r, at:at + len(x)] = x
      seg[r, at:at + len(x)] = s + 1
      at += len(x)
    assert at <= length
  return tokens, seg


def slot_array(values, rows, slots, fill):
  out = np.full((len(rows), slots), fill, np.int32)
  for r, members in enumerate(rows):
    for s, i in enumerate(members):
      out[r, s] = values[i]
  return out


def padded(sequences, length):
  out = np.full((len(sequences), length), EOS, np.int32)
  for i, x in enumerate(sequences):
    out[i, :len(x)] = x
  return out


IDS = np.array([11, 5, 42, 7, 3], np.int32)


# ----------------------------------------------------------------------------------------------
# Pretraining and SFT.


def test_packed_sft_equals_unpacked_sft_on_the_same_examples():
  examples = make_examples(np.random.default_rng(0), 5)
  seqs, prompts = [e[0] for e in examples], [e[1] for e in examples]
  unpacked = dict(tokens=padded(seqs, 16), prompt_lengths=np.array(prompts, np.int32),
                  lengths=np.array([len(s) for s in seqs], np.int32), example_id=IDS)
  rows, slots = [[0, 1, 2], [3, 4]], 4
  tokens, seg = pack_rows(seqs, rows, 40, slots)  # another row length: the draws do not depend on it
  packed_batch = dict(tokens=tokens, segment_ids=seg, prompt_lengths=slot_array(prompts, rows, slots, 0),
                      example_id=slot_array(IDS, rows, slots, -1))
  unpacked_loss = diffusion.SFTLoss(LOGITS_FN, MASK, prompt_drop_prob=0.5)
  packed_loss = packed.PackedSFTLoss(LOGITS_FN, MASK, prompt_drop_prob=0.5)
  (u_value, u_metrics), u_grads = jax.jit(jax.value_and_grad(unpacked_loss, has_aux=True))(PARAMS, unpacked, KEY)
  (p_value, p_metrics), p_grads = jax.jit(jax.value_and_grad(packed_loss, has_aux=True))(PARAMS, packed_batch, KEY)
  np.testing.assert_allclose(p_value, u_value, rtol=RTOL)
  np.testing.assert_allclose(p_metrics["masked_fraction"], u_metrics["masked_fraction"], rtol=RTOL)
  assert_trees_close(p_grads, u_grads)


def test_packed_sft_masks_answers_only_and_every_example_draws_its_own_noise():
  examples = make_examples(np.random.default_rng(1), 3)
  seqs, prompts = [e[0] for e in examples], [e[1] for e in examples]
  tokens, seg = pack_rows(seqs, [[0, 1, 2]], 32, 3)
  ids = np.array([[4, 9, 1]], np.int32)
  noisy, masked, p, answer = packed.sft_noise(KEY, tokens, seg, np.array([prompts], np.int32), ids, mask_id=MASK)
  pos = np.asarray(jax.jit(packed.positions_from_segments)(seg))
  prompt_tok = (seg > 0) & (pos < np.array(prompts)[np.clip(seg - 1, 0, 2)])
  np.testing.assert_array_equal(answer, (seg > 0) & ~prompt_tok)
  assert not np.any(np.asarray(masked) & ~np.asarray(answer))
  # Each segment's p is its own example's, from fold_in(key, example_id).
  for s, example_id in enumerate(ids[0]):
    t, _, _ = diffusion.sft_draws(jax.random.fold_in(KEY, example_id), 32, 0.0)
    np.testing.assert_allclose(np.asarray(p)[0][seg[0] == s + 1], diffusion.mask_ratio(t), rtol=1e-6)


def test_packed_pretraining_row_equals_its_documents_alone():
  rng = np.random.default_rng(2)
  docs = [np.concatenate([rng.integers(3, MASK, n - 1), [EOS]]).astype(np.int32) for n in (5, 9, 3, 7)]
  ids = np.array([3, 0, 8, 2], np.int32)
  loss = packed.PackedPretrainLoss(LOGITS_FN, MASK)
  tokens, seg = pack_rows(docs, [[0, 1, 2, 3]], 32, 4)
  row = dict(tokens=tokens, segment_ids=seg, example_id=ids[None])
  alone_rows = [[0], [1], [2], [3]]
  tokens, seg = pack_rows(docs, alone_rows, 12, 1)
  alone = dict(tokens=tokens, segment_ids=seg, example_id=ids[:, None])
  (v1, m1), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True))(PARAMS, row, KEY)
  (v2, m2), g2 = jax.jit(jax.value_and_grad(loss, has_aux=True))(PARAMS, alone, KEY)
  np.testing.assert_allclose(v1, v2, rtol=RTOL)
  np.testing.assert_allclose(m1["masked_fraction"], m2["masked_fraction"], rtol=RTOL)
  assert_trees_close(g1, g2)


def test_padding_and_empty_slots_do_not_change_the_loss():
  examples = make_examples(np.random.default_rng(3), 2)
  seqs, prompts = [e[0] for e in examples], [e[1] for e in examples]
  loss = packed.PackedSFTLoss(LOGITS_FN, MASK)
  values = []
  for length, slots in ((24, 2), (48, 6)):
    tokens, seg = pack_rows(seqs, [[0, 1]], length, slots)
    batch = dict(tokens=tokens, segment_ids=seg, prompt_lengths=slot_array(prompts, [[0, 1]], slots, 0),
                 example_id=slot_array(IDS, [[0, 1]], slots, -1))
    values.append(loss(PARAMS, batch, KEY)[0])
  np.testing.assert_allclose(values[0], values[1], rtol=RTOL)


# ----------------------------------------------------------------------------------------------
# VRPO.

VRPO_CFG = vrpo.VRPOConfig(beta=0.2, n_timesteps=2, masks_per_timestep=2, sft_weight=0.05)
REFERENCE = jax.tree_util.tree_map(
    lambda x: x * (1 + 0.05 * jnp.cos(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape))), PARAMS)


def preference_examples(seed, n=4):
  rng = np.random.default_rng(seed)
  chosen, rejected, prompts = [], [], []
  for _ in range(n):
    p = int(rng.integers(2, 4))
    prompt = rng.integers(3, MASK, p)
    for side in (chosen, rejected):
      side.append(np.concatenate([prompt, rng.integers(3, MASK, int(rng.integers(2, 8))), [EOS]]).astype(np.int32))
    prompts.append(p)
  return chosen, rejected, prompts


def unpacked_pairs(chosen, rejected, prompts, ids, length=16):
  return dict(chosen=padded(chosen, length), rejected=padded(rejected, length),
              prompt_lengths=np.array(prompts, np.int32), chosen_lengths=np.array([len(c) for c in chosen], np.int32),
              rejected_lengths=np.array([len(r) for r in rejected], np.int32), example_id=np.asarray(ids, np.int32))


def packed_pairs(chosen, rejected, prompts, ids, rows, length=40, slots=3):
  c_tokens, c_seg = pack_rows(chosen, rows, length, slots)
  r_tokens, r_seg = pack_rows(rejected, rows, length, slots)
  return dict(chosen=c_tokens, rejected=r_tokens, chosen_segment_ids=c_seg, rejected_segment_ids=r_seg,
              prompt_lengths=slot_array(prompts, rows, slots, 0), example_id=slot_array(ids, rows, slots, -1))


ROWS = [[0, 1], [2, 3]]


@pytest.fixture(scope="module")
def pairs():
  chosen, rejected, prompts = preference_examples(4)
  ids = IDS[:4]
  return unpacked_pairs(chosen, rejected, prompts, ids), packed_pairs(chosen, rejected, prompts, ids, ROWS)


def in_pair_order(x_rk):
  return np.concatenate([np.asarray(x_rk)[r, :len(members)] for r, members in enumerate(ROWS)])


@pytest.mark.parametrize("antithetic", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_packed_vrpo_equals_unpacked_vrpo(pairs, antithetic):
  unpacked_batch, packed_batch = pairs
  cfg = dataclasses.replace(VRPO_CFG, antithetic=antithetic)
  one_row = vrpo.VRPOLoss(LOGITS_FN, MASK, cfg)
  packed_loss = vrpo_packed.PackedVRPOLoss(LOGITS_FN, MASK, cfg)
  (u_value, u_metrics), u_grads = jax.jit(jax.value_and_grad(one_row, has_aux=True))(PARAMS, unpacked_batch, KEY, REFERENCE)
  (p_value, p_metrics), p_grads = jax.jit(jax.value_and_grad(packed_loss, has_aux=True))(PARAMS, packed_batch, KEY, REFERENCE)
  np.testing.assert_allclose(p_value, u_value, rtol=RTOL)
  for name in ("score", "preference_loss", "sft_loss", "reward_margin"):
    np.testing.assert_allclose(p_metrics[name], u_metrics[name], rtol=RTOL, atol=1e-6, err_msg=name)
  assert_trees_close(p_grads, u_grads)


def test_packed_elbos_and_scores_per_pair_equal_unpacked(pairs):
  unpacked_batch, packed_batch = pairs
  one_row = vrpo.VRPOLoss(LOGITS_FN, MASK, VRPO_CFG)
  score, _, elbos = one_row.per_pair(PARAMS, unpacked_batch, KEY, REFERENCE)
  packed_loss = vrpo_packed.PackedVRPOLoss(LOGITS_FN, MASK, VRPO_CFG)
  masks, weights = packed_loss.masks(packed_batch, KEY, (vrpo._CHOSEN, vrpo._REJECTED))
  sums = packed_loss._terms(PARAMS, packed_batch, masks, weights) / VRPO_CFG.elbo.n_samples
  chosen, rejected = np.split(np.asarray(sums), 2)
  np.testing.assert_allclose(in_pair_order(chosen), elbos["policy_chosen"], rtol=RTOL)
  np.testing.assert_allclose(in_pair_order(rejected), elbos["policy_rejected"], rtol=RTOL)
  # Each example's masks, placed in its packed slot, are the unpacked row's masks.
  u_masks, _ = one_row._masks(KEY, unpacked_batch, (vrpo._CHOSEN, vrpo._REJECTED))
  seg = packed_batch["chosen_segment_ids"]
  for pair, (r, s) in enumerate([(r, s) for r, m in enumerate(ROWS) for s in range(len(m))]):
    n_tok = int(unpacked_batch["chosen_lengths"][pair])
    np.testing.assert_array_equal(np.asarray(masks)[r][:, seg[r] == s + 1], np.asarray(u_masks)[pair][:, :n_tok])
  del score


CHUNK_CASES = [pytest.param(4, False, "packed", marks=pytest.mark.slow), (2, True, "unpacked"), (2, True, "precomputed"),
               pytest.param(4, True, "packed", marks=pytest.mark.slow)]


@pytest.mark.parametrize("chunks,antithetic,layout", CHUNK_CASES)
def test_chunked_copies_equal_the_one_shot_step(pairs, chunks, antithetic, layout):
  unpacked_batch, packed_batch = pairs
  cfg = dataclasses.replace(VRPO_CFG, antithetic=antithetic)
  one_shot = vrpo_packed.PackedVRPOLoss(LOGITS_FN, MASK, cfg)
  chunked = dataclasses.replace(one_shot, copy_chunks=chunks)
  batch = unpacked_batch if layout == "unpacked" else dict(packed_batch)
  reference = REFERENCE
  if layout == "precomputed":
    masks = one_shot.masks(batch, KEY, (vrpo._CHOSEN, vrpo._REJECTED))
    ref = np.asarray(one_shot._terms(REFERENCE, batch, *masks)) / cfg.elbo.n_samples
    batch["reference_chosen_elbo"], batch["reference_rejected_elbo"] = np.split(ref, 2)
    reference = None
  (v1, m1), g1 = jax.jit(jax.value_and_grad(one_shot, has_aux=True))(PARAMS, batch, KEY, reference)
  v2, m2, g2 = jax.jit(chunked.value_and_grad)(PARAMS, batch, KEY, reference)
  np.testing.assert_allclose(v2, v1, rtol=RTOL)
  for name in m1:
    np.testing.assert_allclose(m2[name], m1[name], rtol=RTOL, atol=1e-6, err_msg=name)
  assert_trees_close(g2, g1)


def test_copy_chunks_must_divide_the_budget():
  with pytest.raises(ValueError, match="copy_chunks=3"):
    vrpo_packed.PackedVRPOLoss(LOGITS_FN, MASK, VRPO_CFG, copy_chunks=3)
