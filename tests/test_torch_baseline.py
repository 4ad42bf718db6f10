"""The PyTorch baseline of the benchmark (`llada_jax.bench.torch_model`, the `torch_baseline` section):
the same architecture as the JAX model, checked on its logits, and the section's rows at the tiny size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llada_jax import model as model_lib  # noqa: E402
from llada_jax.bench import __main__ as bench_cli  # noqa: E402
from llada_jax.bench import core, torch_model  # noqa: E402
from llada_jax.bench import torch_baseline  # noqa: E402
from tests import helpers  # noqa: E402


def _tiny(**overrides) -> model_lib.ModelConfig:
  return core.model_config_from_preset("tiny", overrides)


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": None, "rope_theta": 500000.0, "norm_eps": 1e-6}],
                         ids=["gqa", "mha"])
def test_torch_logits_equal_the_jax_logits(overrides):
  cfg = _tiny(**overrides)
  params = model_lib.init_params(cfg, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
  expected = np.asarray(model_lib.logits_fn(cfg)(params, jnp.asarray(tokens)))
  module = torch_model.LLaDA(cfg)
  module.load_state_dict(torch_model.state_dict_from_flax(cfg, params), strict=True)
  with torch.no_grad():
    got = module(torch.from_numpy(tokens).long())
  assert got.dtype == torch.float32 and got.shape == expected.shape
  np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_bfloat16_logits_stay_near_the_jax_logits():
  # Both round differently (PyTorch's head output is bfloat16 before the cast): close, not equal.
  cfg = _tiny(dtype="bfloat16")
  params = model_lib.init_params(cfg, jax.random.key(1))
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
  expected = np.asarray(model_lib.logits_fn(cfg)(params, jnp.asarray(tokens)))
  module = torch_model.LLaDA(cfg)
  module.load_state_dict(torch_model.state_dict_from_flax(cfg, params))
  with torch.no_grad(), torch_model.autocast(cfg):
    got = module(torch.from_numpy(tokens).long()).numpy()
  np.testing.assert_allclose(got, expected, rtol=0, atol=0.05 * np.abs(expected).max())


def test_torch_step_lowers_the_loss_on_a_fixed_batch():
  cfg = _tiny()
  module = torch_model.LLaDA(cfg)
  module.load_state_dict(torch_model.state_dict_from_flax(cfg, model_lib.init_params(cfg, jax.random.key(0))))
  opt_cfg = {"lr": 1e-2, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
  optimizer, _ = torch_model.adamw(module, opt_cfg)
  tokens = torch.randint(3, 31, (8, 16), generator=torch.Generator().manual_seed(0))
  losses = [torch_model.train_step(module, optimizer, tokens, mask_id=cfg.mask_token_id, eps=1e-3, grad_clip=1.0,
                                   micro_batches=2, generator=torch.Generator().manual_seed(1)) for _ in range(20)]
  assert np.isfinite(losses).all() and losses[-1] < losses[0]


@pytest.fixture
def cheap_steps():
  with helpers.cheap_train_steps():
    yield


def test_section_rows_at_the_tiny_size(cheap_steps):
  argv = ["--only", "torch_baseline", "--size", "tiny", "--dtype", "float32", "--repeats", "2", "--matmul_size",
          "128", "--bandwidth_mb", "4"]
  args = bench_cli.parse_args(argv)
  assert "torch_baseline" not in bench_cli.parse_args([]).only  # opt-in
  results = torch_baseline.bench_torch_baseline(core.Context(args))
  rows = {r.name: r for r in results}
  assert list(rows) == ["tiny/float32/pretrain/jax", "tiny/float32/pretrain/torch"]
  jax_row, torch_row = rows["tiny/float32/pretrain/jax"], rows["tiny/float32/pretrain/torch"]
  for r in results:
    assert len(r.times_s) == 2 and len(r.warmup_s) == 1 and np.isfinite(r.metrics["loss"])
    assert r.metrics["tokens_per_s"] == pytest.approx(8 * 16 / r.median_s) and r.metrics["matmul_gflops_per_s"] > 0
    assert r.settings["torch_version"] == torch.__version__ and r.settings["torch_threads"] == torch.get_num_threads()
  assert jax_row.metrics["jax_vs_torch"] == pytest.approx(
      jax_row.metrics["tokens_per_s"] / torch_row.metrics["tokens_per_s"])
  assert torch_row.settings["adamw"] in ("fused", "default") and jax_row.settings["framework"] == "jax"
  assert "JAX/PyTorch" in core.format_table("torch_baseline", results)


def test_without_torch_the_section_is_refused_before_anything_runs(monkeypatch, capsys):
  monkeypatch.setattr(torch_baseline.importlib.util, "find_spec", lambda name: None)
  assert bench_cli.main(["--only", "torch_baseline", "--size", "tiny"]) == 1
  assert "pip install 'llada_jax[torch]'" in capsys.readouterr().err
