"""LoRA: the base at init, merged == unmerged, only adapters train, the base as VRPO reference, resume.

Exact identities are checked with array equality; merged against unmerged forwards differ by float32
rounding (tolerance 1e-5 relative to the largest logit).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import lora, model as M, vrpo
from llada_jax.configs import models
from llada_jax.storage import checkpoint as ckpt_lib
from llada_jax.training import build as build_lib, loop, state as state_lib
from llada_jax import sharding
from tests import train_fixtures

BASE = M.ModelConfig.from_dict(dict(models.get_config("tiny")))
TOKENS = (jnp.arange(2 * 12).reshape(2, 12) * 7) % 30
SEGMENTS = jnp.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3])


def lora_cfg(scan: bool, **changes):
  return BASE.replace(lora_rank=4, lora_alpha=8.0, scan_layers=scan, **changes)


def nudged(adapters, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda x: x + 0.2 * jnp.asarray(rng.normal(size=x.shape), x.dtype), adapters)


@pytest.mark.parametrize("scan", [False, True])
def test_adapters_at_init_give_the_base_logits_exactly(scan):
  cfg = lora_cfg(scan)
  params = M.init_params(cfg, jax.random.key(0))
  adapters, base = lora.split(params)
  assert adapters and all(k.endswith(("_lora_a", "_lora_b")) for k in
                          jax.tree_util.tree_leaves(jax.tree_util.tree_map_with_path(
                              lambda p, _: p[-1].key, adapters)))
  with_adapters = M.logits_fn(cfg)(params, TOKENS, segment_ids=SEGMENTS)
  alone = M.logits_fn(lora.base_config(cfg))(base, TOKENS, segment_ids=SEGMENTS)
  np.testing.assert_array_equal(np.asarray(with_adapters), np.asarray(alone))


@pytest.mark.parametrize("scan", [False, True])
def test_merged_and_unmerged_forwards_agree(scan):
  cfg = lora_cfg(scan)
  adapters, base = lora.split(M.init_params(cfg, jax.random.key(1)))
  params = lora.combine(base, nudged(adapters))
  unmerged = M.logits_fn(cfg)(params, TOKENS)
  merged = M.logits_fn(lora.base_config(cfg))(lora.merge(params, cfg), TOKENS)
  base_logits = M.logits_fn(lora.base_config(cfg))(base, TOKENS)
  scale = float(jnp.abs(unmerged).max())
  np.testing.assert_allclose(merged, unmerged, atol=1e-5 * scale)
  assert float(jnp.abs(unmerged - base_logits).max()) > 100 * 1e-5 * scale  # the adapters do change the model


def test_targets_and_rank_follow_the_config():
  cfg = lora_cfg(False, lora_targets=("q_proj", "ff_out"))
  adapters, _ = lora.split(M.init_params(cfg, jax.random.key(0)))
  block = adapters["blocks_0"]
  assert sorted(block["attn"]) == ["q_proj_lora_a", "q_proj_lora_b"]
  assert sorted(block["mlp"]) == ["ff_out_lora_a", "ff_out_lora_b"]
  assert block["attn"]["q_proj_lora_a"].shape == (BASE.d_model, 4)
  assert block["attn"]["q_proj_lora_b"].shape == (4, BASE.n_heads, BASE.resolved_head_dim)
  with pytest.raises(ValueError, match="lora_targets"):
    lora_cfg(False, lora_targets=("wte",))


def test_lora_vrpo_reference_is_the_base_model_on_the_same_masks():
  cfg = lora_cfg(False)
  adapters, base = lora.split(M.init_params(cfg, jax.random.key(2)))
  rng = np.random.default_rng(0)
  b, length = 3, 12
  batch = dict(chosen=jnp.asarray(rng.integers(3, 30, (b, length)), jnp.int32),
               rejected=jnp.asarray(rng.integers(3, 30, (b, length)), jnp.int32),
               prompt_lengths=jnp.array([2, 3, 2], jnp.int32), chosen_lengths=jnp.array([12, 9, 7], jnp.int32),
               rejected_lengths=jnp.array([8, 12, 10], jnp.int32), example_id=jnp.array([4, 1, 9], jnp.int32))
  key = jax.random.key(3)
  vcfg = vrpo.VRPOConfig(n_timesteps=2, masks_per_timestep=2)
  policy_model = vrpo.VRPOLoss(M.logits_fn(cfg), cfg.mask_token_id, vcfg)
  base_model = vrpo.VRPOLoss(M.logits_fn(lora.base_config(cfg)), cfg.mask_token_id, vcfg)
  reference = lora.combine(base, lora.switched_off(nudged(adapters)))
  got = policy_model.reference_elbos(reference, batch, key)
  want = base_model.reference_elbos(base, batch, key)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return train_fixtures.write_corpus(tmp_path_factory.mktemp("corpus"))


LORA = {"model.lora_rank": 4, "model.lora_alpha": 8.0, "optimizer.lr": 3e-2}


@pytest.mark.slow
def test_one_step_trains_adapters_only_and_sharded_equals_single(corpus, tmp_path):
  results = []
  for mesh, devices in (({"data": 1}, jax.devices()[:1]), ({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())):
    config = train_fixtures.make_config(corpus, tmp_path, "vrpo", **LORA, **{"optimizer.warmup_steps": 0})
    config.mesh = config.mesh.copy_and_resolve_references()
    config.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, **mesh})
    program = build_lib.build(config, devices)
    base = state_lib.random_base(program.model_cfg, 0, program.mesh, program.rules)
    state = program.create_state(jax.random.key(1))
    before = jax.device_get(state.params)
    moments = jax.tree_util.tree_leaves(state.opt_state)
    assert sum(x.size for x in moments) <= 2 * sum(x.size for x in jax.tree_util.tree_leaves(before)) + 8
    from tests.test_train import synthetic_batch  # noqa: PLC0415
    batch = sharding.global_batch(synthetic_batch("vrpo", config.model.vocab_size), program.batch_sharding)
    base_before = jax.device_get(base)
    state, metrics = program.step(state, batch, jax.random.key(2), base)
    after = jax.device_get(state.params)
    chex.assert_trees_all_equal(jax.device_get(base), base_before)  # the base is never written
    assert jax.tree_util.tree_structure(after) == jax.tree_util.tree_structure(lora.split(
        M.init_params(program.model_cfg, jax.random.key(0)))[0])
    moved_b = [np.abs(a - b).max() for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(after)[0],
                                                         jax.tree_util.tree_leaves(before))
               if jax.tree_util.keystr(p).endswith("_lora_b']")]
    assert min(moved_b) > 0  # B gets a gradient at once; A only once B is non-zero
    results.append((after, jax.device_get(metrics)))
  (single, m1), (sharded, m8) = results
  assert m1["loss"] == pytest.approx(m8["loss"], rel=2e-5)
  chex.assert_trees_all_close(single, sharded, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # two short training runs and a resume: a minute and a half on 2 cores
def test_lora_run_resumes_bit_identically_and_loads_merged(corpus, tmp_path):
  straight = train_fixtures.make_config(corpus, tmp_path / "straight", "sft", **LORA)
  result = loop.run(straight)
  resumed = train_fixtures.make_config(corpus, tmp_path / "resumed", "sft", **LORA)
  loop.run(resumed, stop_after=3, final_save=False)
  again = loop.run(resumed)
  chex.assert_trees_all_equal(jax.device_get(again.state.params), jax.device_get(result.state.params))
  # generate / evaluate read a LoRA run as the merged plain model.
  model_cfg, params, _ = ckpt_lib.load_model(tmp_path / "straight")
  assert model_cfg.lora_rank == 0
  cfg = M.ModelConfig.from_dict(straight.model)
  base = lora.split(M.init_params(cfg, jax.random.key(straight.seed)))[1]
  full = lora.combine(base, jax.device_get(result.state.params))
  tokens = jnp.arange(24).reshape(2, 12) % 40 + 4
  np.testing.assert_allclose(M.logits_fn(model_cfg)(params, tokens), M.logits_fn(cfg)(full, tokens), rtol=1e-5,
                             atol=1e-5)
