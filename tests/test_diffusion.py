"""Masked-diffusion objectives and ELBO estimators against exact and float64 computations."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import diffusion as D
from tests.helpers import np_log_softmax, sharp_tiny_model

MASK = 31


@pytest.fixture(scope="module")
def tiny():
  return sharp_tiny_model()


# ----------------------------------------------------------------------------------------------
# Exact ELBO by enumerating every mask of a short answer.


def enumerate_masks(prompt_len, answer_len):
  """All 2^L subsets of the answer positions as boolean rows over the whole sequence."""
  rows = []
  for bits in itertools.product([False, True], repeat=answer_len):
    rows.append([False] * prompt_len + list(bits))
  return np.array(rows)


def exact_elbos(logits_fn, params, tokens, prompt_len, eps):
  """Exact expectations of the l/L and the 1/t estimators (the latter with p = (1-eps) t + eps)."""
  L = tokens.shape[0] - prompt_len
  masks = enumerate_masks(prompt_len, L)
  noisy = np.where(masks, MASK, tokens[None])
  logp = np_log_softmax(logits_fn(params, jnp.asarray(noisy)))
  logp = np.take_along_axis(logp, np.broadcast_to(tokens[None, :, None], (len(masks), tokens.shape[0], 1)), -1)[..., 0]
  sums = (logp * masks).sum(-1)  # sum over masked positions, per mask
  k = masks.sum(-1)
  nodes, w = np.polynomial.legendre.leggauss(64)
  p = eps + (1 - eps) * (nodes + 1) / 2  # Gauss-Legendre on [eps, 1]; integrand is a polynomial
  l_over_L = one_over_t = 0.0
  for m in range(len(masks)):
    if k[m] == 0:
      continue
    l_over_L += (1 / L) * (L / k[m]) / math.comb(L, k[m]) * sums[m]
    # E_t[(1/p) p^k (1-p)^(L-k)] with t uniform <=> p uniform on [eps, 1] with density 1/(1-eps).
    integral = ((1 - eps) / 2) * np.sum(w * p ** (k[m] - 1) * (1 - p) ** (L - k[m])) / (1 - eps)
    one_over_t += integral * sums[m]
  return l_over_L, one_over_t


def test_one_over_t_and_l_over_L_have_the_same_expectation_at_eps_zero(tiny):
  cfg, params, fn = tiny
  tokens = np.array([5, 9, 12, 3, 7, 1])
  a, b = exact_elbos(fn, params, tokens, prompt_len=2, eps=0.0)
  assert a == pytest.approx(b, rel=1e-10)
  _, c = exact_elbos(fn, params, tokens, prompt_len=2, eps=0.05)
  assert abs(c - a) > 1e-3  # eps really changes the 1/t estimator's target


@pytest.mark.parametrize("estimator,stratified", [("l_over_L", False), ("l_over_L", True), ("one_over_t", False)])
def test_monte_carlo_elbo_converges_to_exact_enumeration(tiny, estimator, stratified):
  cfg, params, fn = tiny
  eps = 1e-3
  tokens = np.array([[5, 9, 12, 3, 7, 1], [4, 8, 20, 11, 2, 6]])
  prompt_len = 2
  exact = [exact_elbos(fn, params, t, prompt_len, eps)[0 if estimator == "l_over_L" else 1] for t in tokens]

  n_t = 4 if stratified else 1
  n_yt = 1
  config = D.ELBOConfig(n_timesteps=n_t, masks_per_timestep=n_yt, estimator=estimator, stratified=stratified,
                        eps=eps)
  # Many independent estimates, each itself one batched forward over n_t * n_yt samples.
  n_rep = 4000
  keys = jax.random.split(jax.random.key(7), n_rep * 2).reshape(n_rep, 2)
  tok = jnp.asarray(tokens)
  prompt_lengths = jnp.full((2,), prompt_len)

  @jax.jit
  def estimates(keys_r2):
    return jax.vmap(lambda k: D.elbo(fn, params, tok, prompt_lengths, k, config, mask_id=MASK))(keys_r2)

  est = np.asarray(estimates(keys), np.float64)  # [n_rep, 2]
  mean, stderr = est.mean(0), est.std(0, ddof=1) / math.sqrt(n_rep)
  # 4 standard errors: a wrong weight (e.g. L/l -> 1/l, or a missed position) moves the mean by far more.
  np.testing.assert_array_less(np.abs(mean - np.array(exact)), 4 * stderr + 1e-6)
  assert np.all(stderr < 0.05 * np.abs(np.array(exact)))


def test_stratified_levels_cover_every_level_once_when_n_t_equals_L():
  answer = jnp.array([False] * 3 + [True] * 5)
  config = D.ELBOConfig(n_timesteps=5, estimator="l_over_L", stratified=True)
  for seed in range(10):
    masks, weights = D.sample_elbo_masks(jax.random.key(seed), answer, config)
    levels = np.asarray(masks.sum(-1))
    assert sorted(levels.tolist()) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(weights, 5 / levels, rtol=1e-6)
    assert not np.asarray(masks[:, :3]).any()  # the prompt is never masked


def test_masks_per_timestep_share_the_level():
  answer = jnp.array([False] * 2 + [True] * 9)
  config = D.ELBOConfig(n_timesteps=3, masks_per_timestep=4)
  masks, _ = D.sample_elbo_masks(jax.random.key(1), answer, config)
  levels = np.asarray(masks.sum(-1)).reshape(3, 4)
  assert (levels == levels[:, :1]).all()
  # ...but the masks themselves differ within a timestep (with overwhelming probability).
  rows = np.asarray(masks).reshape(3, 4, -1)
  assert any(len({r.tobytes() for r in rows[t]}) > 1 for t in range(3) if 1 < levels[t, 0] < 9)


def test_mask_exactly_is_uniform_over_subsets():
  maskable = jnp.array([True, False, True, True, True])
  keys = jax.random.split(jax.random.key(0), 24000)
  masks = np.asarray(jax.vmap(lambda k: D.mask_exactly(k, maskable, 2))(keys))
  assert (masks.sum(-1) == 2).all() and not masks[:, 1].any()
  counts = {}
  for row in masks:
    counts[row.tobytes()] = counts.get(row.tobytes(), 0) + 1
  assert len(counts) == math.comb(4, 2)
  freqs = np.array(list(counts.values())) / len(masks)
  # 24000 draws: the std of each frequency is ~0.0024; 5 sigma.
  np.testing.assert_allclose(freqs, 1 / 6, atol=0.012)


def test_level_draw_is_uniform():
  answer = jnp.ones((4,), bool)
  keys = jax.random.split(jax.random.key(3), 20000)
  masks, weights = jax.vmap(lambda k: D.sample_elbo_masks(k, answer, D.ELBOConfig()))(keys)
  levels = np.asarray(masks.sum(-1))[:, 0]
  np.testing.assert_allclose(np.bincount(levels, minlength=5)[1:] / len(levels), 0.25, atol=0.015)
  np.testing.assert_allclose(np.asarray(weights)[:, 0], 4 / levels)


def test_empty_answer_gives_zero_estimate(tiny):
  cfg, params, fn = tiny
  tokens = jnp.array([[5, 9, 12, 3]])
  keys = jax.random.split(jax.random.key(0), 1)
  est = D.elbo(fn, params, tokens, jnp.array([4]), keys, D.ELBOConfig(n_timesteps=3), mask_id=MASK)
  assert float(est[0]) == 0.0


def test_batched_forward_equals_one_forward_per_sample(tiny):
  cfg, params, fn = tiny
  tokens = jnp.array([[5, 9, 12, 3, 7, 1, 1], [4, 8, 20, 11, 2, 6, 9]])
  prompt_lengths, lengths = jnp.array([2, 3]), jnp.array([6, 7])
  config = D.ELBOConfig(n_timesteps=3, masks_per_timestep=2)
  keys = jax.random.split(jax.random.key(4), 2)
  answer = D.answer_mask(prompt_lengths, lengths, 7)
  masks, weights = D.sample_batch_elbo_masks(keys, answer, config)
  est, per_sample = D.elbo_from_masks(fn, params, tokens, masks, weights, mask_id=MASK,
                                      key_mask_bl=D.valid_mask(lengths, 7))
  for b in range(2):
    n = int(lengths[b])
    for j in range(6):
      noisy = jnp.where(masks[b, j, :n], MASK, tokens[b, :n])[None]
      logp = np_log_softmax(fn(params, noisy))[0]
      direct = float(weights[b, j]) * sum(logp[i, int(tokens[b, i])] for i in range(n) if masks[b, j, i])
      assert float(per_sample[b, j]) == pytest.approx(direct, rel=1e-4, abs=1e-4)
  np.testing.assert_allclose(est, np.asarray(per_sample).mean(-1), rtol=1e-6)
  assert not np.asarray(masks[0, :, 6]).any()  # padding is never masked


def test_elbo_config_validation():
  with pytest.raises(ValueError, match="estimator"):
    D.ELBOConfig(estimator="1/t")
  with pytest.raises(ValueError, match="n_timesteps"):
    D.ELBOConfig(n_timesteps=0)
  with pytest.raises(ValueError, match="stratified"):
    D.ELBOConfig(estimator="one_over_t", stratified=True)


# ----------------------------------------------------------------------------------------------
# Training losses against direct float64 computations on the same masks.


def test_pretrain_loss_equals_float64_computation(tiny):
  cfg, params, fn = tiny
  tokens = jax.random.randint(jax.random.key(1), (3, 12), 0, 30)
  key = jax.random.key(9)
  loss, metrics = D.PretrainLoss(fn, MASK, random_length_prob=0.0)(params, {"tokens": tokens}, key)
  noise = D.pretrain_noise(key, tokens, mask_id=MASK, random_length_prob=0.0)
  assert int(noise.length) == 12
  logp = np_log_softmax(fn(params, noise.noisy_tokens))
  tok, masked, p = np.asarray(tokens), np.asarray(noise.masked), np.asarray(noise.p, np.float64)
  assert (np.asarray(noise.noisy_tokens)[masked] == MASK).all()
  assert (np.asarray(noise.noisy_tokens)[~masked] == tok[~masked]).all()
  total = sum(-logp[b, i, tok[b, i]] / p[b] for b in range(3) for i in range(12) if masked[b, i])
  assert float(loss) == pytest.approx(total / (3 * 12), rel=1e-5)
  assert masked.any() and not masked.all()


def test_pretrain_random_length_hides_the_tail(tiny):
  cfg, params, fn = tiny
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 30)
  for seed in range(20):
    key = jax.random.key(seed)
    noise = D.pretrain_noise(key, tokens, mask_id=MASK, random_length_prob=1.0)
    n = int(noise.length)
    if n < 12:
      break
  assert 1 <= n < 12
  assert not np.asarray(noise.masked[:, n:]).any()
  loss, _ = D.PretrainLoss(fn, MASK, random_length_prob=1.0)(params, {"tokens": tokens}, key)
  # Equal to the loss of the truncated batch, with the same masks, normalised by B * n.
  logp = np_log_softmax(fn(params, noise.noisy_tokens[:, :n]))
  tok, masked, p = np.asarray(tokens), np.asarray(noise.masked), np.asarray(noise.p, np.float64)
  total = sum(-logp[b, i, tok[b, i]] / p[b] for b in range(2) for i in range(n) if masked[b, i])
  assert float(loss) == pytest.approx(total / (2 * n), rel=1e-5)


def test_mask_ratio_statistics():
  tokens = jnp.zeros((4000, 64), jnp.int32)
  noise = D.pretrain_noise(jax.random.key(0), tokens, mask_id=MASK, eps=0.1)
  p = np.asarray(noise.p)
  assert p.min() >= 0.1 and p.max() < 1.0
  assert p.mean() == pytest.approx(0.1 + 0.9 * 0.5, abs=0.01)  # E[p] = eps + (1-eps)/2
  frac = np.asarray(noise.masked).mean(-1)
  # Per row the masked fraction is Binomial(64, p)/64 around p.
  assert np.abs(frac - p).mean() < 0.06
  assert np.corrcoef(frac, p)[0, 1] > 0.95


def sft_batch():
  eos = 1
  tokens = np.array([[4, 5, 6, 10, 11, 12, eos, eos, eos, eos],
                     [7, 8, 13, 14, 15, 16, 17, 18, eos, eos],
                     [9, 20, 21, 22, 23, eos, eos, eos, eos, eos]])
  return jnp.asarray(tokens), jnp.array([3, 2, 1])


def test_sft_loss_equals_float64_computation(tiny):
  cfg, params, fn = tiny
  tokens, prompt_lengths = sft_batch()
  key = jax.random.key(3)
  loss, _ = D.SFTLoss(fn, MASK)(params, {"tokens": tokens, "prompt_lengths": prompt_lengths}, key)
  noise = D.sft_noise(key, tokens, prompt_lengths, mask_id=MASK)
  tok, masked, p = np.asarray(tokens), np.asarray(noise.masked), np.asarray(noise.p, np.float64)
  for b, pl in enumerate(np.asarray(prompt_lengths)):
    assert not masked[b, :pl].any()  # the prompt is restored
    assert (np.asarray(noise.noisy_tokens)[b, :pl] == tok[b, :pl]).all()
  logp = np_log_softmax(fn(params, noise.noisy_tokens))
  per_row = []
  for b, pl in enumerate(np.asarray(prompt_lengths)):
    answer_len = 10 - pl  # EOS padding counts as answer
    per_row.append(sum(-logp[b, i, tok[b, i]] / p[b] for i in range(10) if masked[b, i]) / answer_len)
  assert float(loss) == pytest.approx(np.mean(per_row), rel=1e-5)


def test_sft_eos_padding_is_maskable_and_lengths_exclude_it():
  tokens, prompt_lengths = sft_batch()
  hits = np.zeros(10)
  for seed in range(50):
    noise = D.sft_noise(jax.random.key(seed), tokens, prompt_lengths, mask_id=MASK)
    hits += np.asarray(noise.masked)[0]
  assert hits[7:].sum() > 0  # padding EOS of row 0 gets masked
  lengths = jnp.array([7, 9, 6])
  for seed in range(20):
    noise = D.sft_noise(jax.random.key(seed), tokens, prompt_lengths, mask_id=MASK, lengths=lengths)
    m = np.asarray(noise.masked)
    assert not m[0, 7:].any() and not m[1, 9:].any() and not m[2, 6:].any()
    np.testing.assert_array_equal(np.asarray(noise.answer).sum(1), [4, 7, 5])


def test_sft_prompt_drop_masks_prompt_input_only(tiny):
  tokens, prompt_lengths = sft_batch()
  noise = D.sft_noise(jax.random.key(0), tokens, prompt_lengths, mask_id=MASK, prompt_drop_prob=1.0)
  noisy = np.asarray(noise.noisy_tokens)
  for b, pl in enumerate(np.asarray(prompt_lengths)):
    assert (noisy[b, :pl] == MASK).all()
    assert not np.asarray(noise.masked)[b, :pl].any()
  # Same key, no drop: identical answer masks, so dropping changes only the conditioning.
  plain = D.sft_noise(jax.random.key(0), tokens, prompt_lengths, mask_id=MASK, prompt_drop_prob=0.0)
  chex.assert_trees_all_equal(plain.masked, noise.masked)


def test_losses_are_differentiable_and_jittable(tiny):
  cfg, params, fn = tiny
  tokens, prompt_lengths = sft_batch()
  loss_fn = D.SFTLoss(fn, MASK)
  grads = jax.jit(jax.grad(lambda p: loss_fn(p, {"tokens": tokens, "prompt_lengths": prompt_lengths},
                                                 jax.random.key(0))[0]))(params)
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree_util.tree_leaves(grads)]
  assert all(np.isfinite(norms)) and sum(norms) > 0
