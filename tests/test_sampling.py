"""Tests of the samplers (`llada_jax/sampling.py`), the cached forward passes they use and the CLI.

The exact sampler is checked token for token against a step-by-step NumPy transcription of the
reference algorithm (docs/method.md, "Sampler") written here, which calls the model once per step.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import generate as generate_cli
from llada_jax import model as model_lib
from llada_jax import sampling
from llada_jax.eval import generation
from llada_jax.sampling import SamplerConfig
from tests import helpers, train_fixtures

REPO = pathlib.Path(__file__).resolve().parent.parent
# Cheap backend codegen: compile time dominates these tiny models (HLO numerics are unchanged).
FAST = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27], [4, 30]]


@functools.lru_cache(maxsize=None)
def tiny(scan_layers=False):
  cfg = model_lib.ModelConfig.from_dict({**helpers.preset("tiny"), "scan_layers": scan_layers})
  params = jax.jit(lambda k: model_lib.init_params(cfg, k), compiler_options=FAST)(jax.random.key(0))
  return cfg, params


@functools.lru_cache(maxsize=None)
def sharpened():
  """The tiny model with a larger LM head, so confidences spread over (0, 1) as a trained model's do."""
  cfg, params = tiny()
  return cfg, {**params, "ff_out": params["ff_out"] * 6.0}


@functools.lru_cache(maxsize=None)
def logits_of(cfg):
  return jax.jit(model_lib.logits_fn(cfg), compiler_options=FAST)


def run(config, prompts=PROMPTS, key=None, model=None, **kw):
  cfg, params = model or tiny()
  key = jax.random.key(7) if key is None else key
  return jax.device_get(sampling.sample_from_ids(params, cfg, prompts, key, config, compiler_options=FAST, **kw))


@functools.lru_cache(maxsize=None)
def run_default(config):
  return run(config)


# --------------------------------------------------------------------------------------------
# The reference algorithm, step by step in NumPy (one prompt, no padding).


def reference_schedule(n, steps):
  base, remainder = divmod(n, steps)
  counts = np.full(steps, base)
  counts[:remainder] += 1
  return counts


def reference_generate(cfg, params, prompt, row_key, c: SamplerConfig):
  mask_id, vocab = cfg.mask_token_id, cfg.vocab_size
  p_len = len(prompt)
  x = np.array([list(prompt) + [mask_id] * c.gen_length])
  prompt_index = x != mask_id
  num_blocks = c.gen_length // c.block_length
  steps = c.steps // num_blocks
  for b in range(num_blocks):
    start = p_len + b * c.block_length
    counts = reference_schedule(int((x[:, start:start + c.block_length] == mask_id).sum()), steps)
    for i in range(steps):
      mask_index = x == mask_id
      if c.cfg_scale:
        un_x = x.copy()
        un_x[prompt_index] = mask_id
        both = np.asarray(logits_of(cfg)(params, jnp.asarray(np.concatenate([x, un_x]))), np.float64)
        logits = both[1:] + (c.cfg_scale + 1) * (both[:1] - both[1:])
      else:
        logits = np.asarray(logits_of(cfg)(params, jnp.asarray(x)), np.float64)
      # The sampler's draws for this step cover the current block; elsewhere nothing is committed.
      gumbel_u, score_u = (np.asarray(a, np.float64) for a in
                           sampling.step_noise(row_key, b, i, c.block_length, vocab))
      if c.temperature > 0:
        u = np.full(logits.shape, 0.5)
        u[0, start:start + c.block_length] = gumbel_u
        noisy = np.exp(logits) / (-np.log(u)) ** c.temperature
      else:
        noisy = logits
      x0 = noisy.argmax(-1)
      if c.remasking == "low_confidence":
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x0_p = np.take_along_axis(probs, x0[..., None], -1)[..., 0]
      else:
        x0_p = np.full(x.shape, 0.5)
        x0_p[0, start:start + c.block_length] = score_u
      x0_p[:, start + c.block_length:] = -np.inf
      x0 = np.where(mask_index, x0, x)
      confidence = np.where(mask_index, x0_p, -np.inf)
      select = np.argsort(-confidence[0], kind="stable")[:counts[i]]
      x[0, select] = x0[0, select]
  return x[0, p_len:]


SETTINGS = [  # gen_length, block_length, steps
    (8, 8, 8),
    (12, 4, 6),  # two tokens per step
    (8, 4, 6),  # schedule 2, 1, 1
    (6, 2, 12),  # more steps than tokens: 1, 1, 0, 0
]


# Greedy on every setting, the other modes on fewer (compile time).
CASES = ([("greedy", s) for s in SETTINGS] + [("guided", s) for s in SETTINGS[1:3]]
         + [("random", SETTINGS[2]), ("temperature", SETTINGS[1])])


@pytest.mark.parametrize("mode,setting", CASES)
def test_exact_sampler_equals_numpy_reference(mode, setting):
  gen, block, steps = setting
  options = {"greedy": {}, "guided": {"cfg_scale": 1.5}, "random": {"remasking": "random"},
             "temperature": {"temperature": 1.0, "cfg_scale": 0.5}}[mode]
  config = SamplerConfig(gen_length=gen, block_length=block, steps=steps, **options)
  cfg, params = tiny()
  keys = jax.random.split(jax.random.key(3), len(PROMPTS))
  out = run(config, key=keys)
  assert out.tokens.shape == (len(PROMPTS), gen) and out.tokens.dtype == np.int32
  for row, prompt in enumerate(PROMPTS):
    expected = reference_generate(cfg, params, prompt, keys[row], config)
    np.testing.assert_array_equal(out.tokens[row], expected, err_msg=f"prompt {row}")
  assert (out.tokens != cfg.mask_token_id).all()
  # Steps that would commit nothing are skipped.
  assert int(out.nfe) == config.num_blocks * min(steps // config.num_blocks, block)


# --------------------------------------------------------------------------------------------
# The schedule and the step, through the per-step history.


def test_transfer_schedule():
  np.testing.assert_array_equal(sampling.transfer_schedule(8, 3), [3, 3, 2])
  np.testing.assert_array_equal(sampling.transfer_schedule(2, 4), [1, 1, 0, 0])
  for n, s in [(32, 32), (32, 5), (7, 7), (1, 3)]:
    np.testing.assert_array_equal(sampling.transfer_schedule(n, s), reference_schedule(n, s))


def committed_per_step(out, config, mask_id):
  """[(block, step, newly committed bool [B, G])] for the steps that ran, checking monotonicity."""
  history = out.history
  previous = np.full(history[:, 0].shape, mask_id)
  steps = []
  for s in range(history.shape[1]):
    tokens = history[:, s]
    if (tokens == -1).all():
      continue
    was = previous != mask_id
    np.testing.assert_array_equal(tokens[was], previous[was], err_msg="a committed token changed")
    steps.append((s // config.max_steps_per_block, s % config.max_steps_per_block, was ^ (tokens != mask_id)))
    previous = tokens
  np.testing.assert_array_equal(previous, out.tokens)
  return steps


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_each_step_commits_the_scheduled_tokens_inside_its_block(remasking):
  config = SamplerConfig(gen_length=12, block_length=6, steps=8, remasking=remasking, record_history=True)
  cfg, _ = tiny()
  out = run(config)
  schedule = sampling.transfer_schedule(6, 4)  # 2, 2, 1, 1
  steps = committed_per_step(out, config, cfg.mask_token_id)
  assert [(b, i) for b, i, _ in steps] == [(b, i) for b in range(2) for i in range(4)]
  for block, i, new in steps:
    np.testing.assert_array_equal(new.sum(-1), schedule[i])
    inside = np.zeros(12, bool)
    inside[block * 6:(block + 1) * 6] = True
    assert not new[:, ~inside].any()


def test_commit_step_threshold_and_eos_rules():
  mask, eos, eot = 9, 1, 2
  probs = np.array([[[0.9, 0.1, 0, 0], [0.2, 0.05, 0.75, 0], [0.3, 0.4, 0.3, 0], [0.5, 0, 0, 0.5]]])
  logits = jnp.log(jnp.asarray(probs + 1e-9, jnp.float32))
  block = jnp.array([[mask, mask, 7, mask]])  # position 2 is already committed
  def step(**kw):
    config = SamplerConfig(gen_length=4, block_length=4, steps=4, **kw)
    new, committed, conf = sampling.commit_step(block, logits, None, None, 2, config, mask_id=mask, eos_id=eos)
    return np.asarray(new), np.asarray(committed), np.asarray(conf)
  new, committed, conf = step()  # top 2 of the masked by confidence: positions 0 (0.9) and 1 (0.75)
  np.testing.assert_array_equal(new, [[0, 2, 7, mask]])
  np.testing.assert_allclose(conf[0, [0, 1, 3]], [0.9, 0.75, 0.5], rtol=1e-5)
  new, committed, _ = step(threshold=0.8)  # only position 0 is above
  np.testing.assert_array_equal(committed, [[True, False, False, False]])
  new, committed, _ = step(threshold=0.95)  # none above: the most confident is forced
  np.testing.assert_array_equal(committed, [[True, False, False, False]])
  new, committed, _ = step(threshold=0.5)  # >= threshold, ties at 0.5 included
  np.testing.assert_array_equal(committed, [[True, True, False, True]])
  # An EoT pick (position 1) penalised below every other pick.
  new, committed, conf = step(eos_confidence_penalty=1.0, eot_token_id=eot)
  np.testing.assert_array_equal(committed, [[True, False, False, True]])
  new, _, _ = step(suppress_eos=True, threshold=0.01)
  assert not (new == eos).any()


# --------------------------------------------------------------------------------------------
# Batches: padding and batch-mates do not change a completion; one compilation per bucket.


@pytest.mark.parametrize("options", [{}, {"temperature": 1.0, "cfg_scale": 1.0}, {"cache": "dual"}])
def test_completion_is_the_same_alone_and_in_a_padded_batch(options):
  config = SamplerConfig(gen_length=8, block_length=4, steps=4, **options)
  keys = jax.random.split(jax.random.key(5), 3)
  batch = run(config, prompts=PROMPTS, key=keys)  # lengths 5, 18, 2: padded to 24
  for row in (0, 2):
    alone = run(config, prompts=[PROMPTS[row]], key=keys[row:row + 1])  # padded to 16
    np.testing.assert_array_equal(alone.tokens[0], batch.tokens[row])


def test_prompt_length_buckets_and_one_compilation_per_bucket():
  assert [sampling.bucket_length(n) for n in (1, 16, 17, 24, 25, 33, 49, 100)] == [16, 16, 24, 24, 32, 48, 64, 128]
  prompts, lengths = sampling.pad_prompts([[3, 4], [5, 6, 7]], pad_id=1)
  np.testing.assert_array_equal(prompts[:, -3:], [[1, 3, 4], [5, 6, 7]])
  assert prompts.shape == (2, 16) and lengths.tolist() == [2, 3]
  config = SamplerConfig(gen_length=4, block_length=4, steps=2)
  cfg, _ = tiny()
  run(config, prompts=[[5, 6], [7, 8, 9]])
  run(config, prompts=[[5, 6, 7, 8, 9, 10], [11]])
  assert sampling._compiled(cfg, config, tuple(sorted(FAST.items())) if FAST else None)._cache_size() == 1


def test_bad_configs_and_prompts_are_named():
  with pytest.raises(ValueError, match="block_length"):
    SamplerConfig(gen_length=10, block_length=4, steps=10)
  with pytest.raises(ValueError, match="steps"):
    SamplerConfig(gen_length=8, block_length=4, steps=3)
  with pytest.raises(ValueError, match="remasking"):
    SamplerConfig(remasking="lowest")
  with pytest.raises(ValueError, match="cache"):
    SamplerConfig(cache="full")
  with pytest.raises(ValueError, match="threshold"):
    SamplerConfig(threshold=0.9, remasking="random")
  with pytest.raises(ValueError, match="temperature"):
    SamplerConfig(temperature=-1.0)
  cfg, params = tiny()
  with pytest.raises(ValueError, match="mask id"):
    sampling.sample(params, cfg, [[1, 2, cfg.mask_token_id]], [3], jax.random.key(0), SamplerConfig())
  with pytest.raises(ValueError, match=r"prompts\[0, 0\] = -1"):
    sampling.sample(params, cfg, [[-1, 2, 3]], [2], jax.random.key(0), SamplerConfig())
  with pytest.raises(ValueError, match="prompt_lengths"):
    sampling.sample(params, cfg, [[1, 2, 3]], [4], jax.random.key(0), SamplerConfig())


# --------------------------------------------------------------------------------------------
# Cached forward passes and samplers.


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_forward_passes_match_the_model(scan_layers):
  cfg, params = tiny(scan_layers)
  tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, cfg.vocab_size)
  pad = jnp.array([[3], [0]])
  key_mask = jnp.arange(20)[None] >= pad
  positions = jnp.maximum(jnp.arange(20)[None] - pad, 0)
  expected = logits_of(cfg)(params, tokens, key_mask=key_mask, positions=positions)

  @functools.partial(jax.jit, compiler_options=FAST)
  def cached_passes(params, tokens):
    full, cache = model_lib.forward_with_cache(cfg, params, tokens, key_mask=key_mask, positions=positions)
    part, _ = model_lib.forward_with_cache(cfg, params, tokens, key_mask=key_mask, positions=positions,
                                           logits_range=(5, 6))
    span = model_lib.forward_span(cfg, params, tokens[:, 8:16], cache, 8, key_mask=key_mask,
                                  span_positions=positions[:, 8:16], num_logits=4)
    stale = model_lib.KVCache(cache.k.at[:, :, 8:16].set(0.0), cache.v.at[:, :, 8:16].set(0.0))
    stale_span = model_lib.forward_span(cfg, params, tokens[:, 8:16], stale, 8, key_mask=key_mask,
                                        span_positions=positions[:, 8:16])
    return full, cache, part, span, stale_span

  full, cache, part, span, stale_span = cached_passes(params, tokens)
  np.testing.assert_allclose(full, expected, atol=2e-5)
  assert cache.k.shape == (cfg.n_layers, 2, 20, cfg.kv_heads, cfg.resolved_head_dim)
  np.testing.assert_allclose(part, expected[:, 5:11], atol=2e-5)
  # A span against a cache of the same tokens is the full pass on those positions.
  np.testing.assert_allclose(span, expected[:, 8:12], atol=2e-5)
  # The span's own keys replace the cached ones: a stale cache there changes nothing.
  np.testing.assert_allclose(stale_span, expected[:, 8:16], atol=2e-5)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_cached_samplers_refreshed_every_step_equal_the_exact_one(cache, cfg_scale):
  base = SamplerConfig(gen_length=8, block_length=4, steps=8, cfg_scale=cfg_scale)
  exact = run_default(base)
  refreshed = run(base.replace(cache=cache, refresh_every=1))
  np.testing.assert_array_equal(refreshed.tokens, exact.tokens)
  assert int(refreshed.full_forwards) == int(refreshed.nfe) == 8
  # Without refreshes only block starts run the whole sequence; refreshing every 2nd step: 2 per block.
  cached = run(base.replace(cache=cache))
  assert (int(cached.nfe), int(cached.full_forwards)) == (8, 2)
  assert (cached.tokens != tiny()[0].mask_token_id).all()
  if cache == "dual" and not cfg_scale:
    every_2 = run(base.replace(cache=cache, refresh_every=2))
    assert (int(every_2.nfe), int(every_2.full_forwards)) == (8, 4)


def test_prefix_and_dual_caches_agree_when_there_is_one_block():
  # With no suffix after the block, both keep only the prompt's keys/values between refreshes.
  base = SamplerConfig(gen_length=8, block_length=8, steps=8)
  prefix, dual = run(base.replace(cache="prefix")), run(base.replace(cache="dual"))
  np.testing.assert_array_equal(prefix.tokens, dual.tokens)
  assert int(prefix.full_forwards) == int(dual.full_forwards) == 1


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_threshold_decoding_commits_confident_tokens_in_fewer_passes(cache):
  model = sharpened()
  mask_id = model[0].mask_token_id
  config = SamplerConfig(gen_length=16, block_length=8, steps=16, threshold=0.6, cache=cache, record_history=True)
  out = run(config, model=model)
  steps = committed_per_step(out, config, mask_id)
  assert (out.tokens != mask_id).all()
  assert int(out.nfe) == len(steps) < 16 and out.block_steps.sum() == len(steps)
  parallel = False
  for row in range(len(PROMPTS)):
    for _, _, new in steps:
      n = int(new[row].sum())
      conf = out.commit_confidence[row][new[row]]
      # Either every commit reached the threshold, or a single (forced, most confident) one did not.
      assert n == 1 or n == 0 or (conf >= config.threshold).all(), conf
      parallel |= n > 1
  assert parallel


def test_threshold_decoding_commits_at_least_one_token_until_a_row_is_done():
  config = SamplerConfig(gen_length=8, block_length=8, steps=8, threshold=0.6, record_history=True)
  out = run(config, model=sharpened())
  steps = committed_per_step(out, config, sharpened()[0].mask_token_id)
  counts = np.array([new.sum(-1) for _, _, new in steps])  # [steps, rows]
  masked_before = 8 - np.cumsum(counts, axis=0) + counts
  assert (counts[masked_before > 0] >= 1).all() and (counts[masked_before == 0] == 0).all()
  assert (masked_before[-1] > 0).any()  # the last step still had work for some row


# --------------------------------------------------------------------------------------------
# The command line, on a checkpoint trained for two steps.


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("generate")
  run, corpus = train_fixtures.train_tiny_sft_run(root)
  return {"workdir": str(run), "tokenizer": corpus["tokenizer"], "root": root}


def test_generate_cli_end_to_end(trained):
  root = trained["root"]
  prompts = ["what is 2 plus 3", "what is 1 plus 1", "the cat"]
  (root / "in.jsonl").write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
  out_file = root / "out.jsonl"
  proc = subprocess.run(
      [sys.executable, "-m", "llada_jax.generate", "--checkpoint", trained["workdir"], "--input",
       str(root / "in.jsonl"), "--output", str(out_file), "--chat_template", "--gen_length", "8",
       "--block_length", "4", "--steps", "4", "--batch_size", "2", "--cache", "dual"],
      cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert proc.returncode == 0, proc.stderr
  lines = [json.loads(x) for x in out_file.read_text().splitlines()]
  assert [r["prompt"] for r in lines] == prompts
  assert all(isinstance(r["completion"], str) for r in lines)
  assert "forward passes" in proc.stderr


def test_generate_cli_prompt_to_stdout_and_bad_input(trained, tmp_path, capsys):
  argv = ["--checkpoint", trained["workdir"], "--gen_length", "4", "--steps", "2", "--block_length", "2"]
  assert generate_cli.main(argv + ["--prompt", "the cat", "--threshold", "0.5"]) == 0
  record = json.loads(capsys.readouterr().out.strip())
  assert record["prompt"] == "the cat" and isinstance(record["completion"], str)

  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"question": "no prompt"}) + "\n")
  out_file = tmp_path / "out.jsonl"
  assert generate_cli.main(argv + ["--input", str(bad), "--output", str(out_file)]) == 1
  err = capsys.readouterr().err
  assert str(bad) in err and "line 2" in err and "'prompt'" in err
  assert not out_file.exists()
  bad.write_text("{not json\n")
  assert generate_cli.main(argv + ["--input", str(bad)]) == 1
  assert "line 1" in capsys.readouterr().err
  assert generate_cli.main(argv + ["--input", str(bad), "--prompt", "the cat"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "prompt" in err and "input" in err and err.count("\n") == 1


def test_completion_ids_stop_at_eos_or_end_of_turn():
  tok = types.SimpleNamespace(eos_id=2, eot_id=9)
  assert generation.completion_ids(tok, [5, 6, 9, 7, 2, 8, 2]) == [5, 6]
  assert generation.completion_ids(tok, [5, 7, 2, 9]) == [5, 7]
  assert generation.completion_ids(tok, [5, 6]) == [5, 6]
