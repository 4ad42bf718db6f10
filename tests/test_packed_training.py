"""Packed rows through the train step and the training loop.

Micro-batches of packed rows hold different numbers of examples; the step divides every micro-batch
by the whole batch's count, so accumulation equals the full batch (same tolerances as
tests/test_train.py: rtol 1e-5 on loss and parameters after one linearised Adam step).
"""

import chex
import jax
import numpy as np
import pytest

from llada_jax.training import loop
from tests import train_fixtures
from tests.test_train import one_step


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return train_fixtures.write_corpus(tmp_path_factory.mktemp("corpus"))


def packed_batch(objective, vocab, rows=8, length=48, slots=4, seed=0):
  """Rows of 1 to `slots` examples with random lengths; the rows of one micro-batch differ in count."""
  rng = np.random.default_rng(seed)
  sides = ("chosen", "rejected") if objective in ("vrpo", "naive_dpo") else ("tokens",)
  out = {side: np.full((rows, length), 2, np.int32) for side in sides}
  seg = {side: np.zeros((rows, length), np.int32) for side in sides}
  ids = np.full((rows, slots), -1, np.int32)
  prompts = np.zeros((rows, slots), np.int32)
  next_id = 0
  for r in range(rows):
    at = dict.fromkeys(sides, 0)
    for s in range(int(rng.integers(1, slots + 1))):
      prompt = int(rng.integers(2, 5))
      sizes = {side: prompt + int(rng.integers(2, 8)) for side in sides}
      if any(at[side] + sizes[side] > length for side in sides):
        break
      head = rng.integers(4, vocab, prompt)
      for side in sides:
        n = sizes[side]
        out[side][r, at[side]:at[side] + n] = np.concatenate([head, rng.integers(4, vocab, n - prompt)])
        seg[side][r, at[side]:at[side] + n] = s + 1
        at[side] += n
      ids[r, s], prompts[r, s] = next_id, prompt
      next_id += 1
  batch = {"example_id": ids}
  for side in sides:
    batch[side] = out[side]
    batch["segment_ids" if side == "tokens" else f"{side}_segment_ids"] = seg[side]
  if objective != "pretrain":
    batch["prompt_lengths"] = prompts
  return batch


CASES = [pytest.param("pretrain", {}, marks=pytest.mark.slow), pytest.param("sft", {}, marks=pytest.mark.slow),
         pytest.param("vrpo", {}, marks=pytest.mark.slow), ("vrpo", {"vrpo.copy_chunks": 2})]


@pytest.mark.parametrize("objective,overrides", CASES)
def test_packed_micro_batches_equal_the_full_batch(corpus, tmp_path, objective, overrides):
  config = train_fixtures.make_config(corpus, tmp_path, objective, **{"data.packing": True,
                                                                      "diffusion.random_length_prob": 0.0,
                                                                      **overrides})
  batch = packed_batch(objective, config.model.vocab_size)
  full, m_full, _ = one_step(config, {"data": 1}, jax.devices()[:1], batch)
  accum, m_acc, _ = one_step(config, {"data": 2, "fsdp": 2}, jax.devices()[:4], batch, grad_accum_steps=2)
  assert m_full["loss"] == pytest.approx(m_acc["loss"], rel=1e-5)
  chex.assert_trees_all_close(jax.device_get(full.params), jax.device_get(accum.params), rtol=1e-5, atol=1e-6)


PACKED = {"data.packing": True, "diffusion.random_length_prob": 0.0, "data.global_batch_size": 8,
          "data.max_segments": 8, "data.seq_len": 128}


def run_and_resume(corpus, root, objective, **overrides):
  """A packed run straight through, and the same run stopped after 3 steps and resumed."""
  straight = train_fixtures.make_config(corpus, root / "straight", objective, **PACKED, **overrides)
  result = loop.run(straight)
  resumed = train_fixtures.make_config(corpus, root / "resumed", objective, **PACKED, **overrides)
  loop.run(resumed, stop_after=3, final_save=False)
  again = loop.run(resumed)
  chex.assert_trees_all_close(jax.device_get(again.state.params), jax.device_get(result.state.params), rtol=0,
                              atol=0)
  return result


@pytest.fixture(scope="module")
def packed_sft(corpus, tmp_path_factory):
  root = tmp_path_factory.mktemp("packed_sft")
  return root, run_and_resume(corpus, root, "sft")


def check_data_metrics(result, workdir):
  rows = [r for r in result.metrics if "data/padding_fraction" in r]
  assert rows and all(0 <= r["data/padding_fraction"] < 0.5 and r["data/examples_per_row"] >= 1 for r in rows)
  assert max(r["data/examples_per_row"] for r in rows) > 1
  metrics_file = (workdir / "metrics.jsonl").read_text()
  assert '"data/examples"' in metrics_file and '"data/too_long_skipped"' in metrics_file


def test_packed_sft_run_logs_data_stats_and_resumes_exactly(packed_sft):
  root, result = packed_sft
  check_data_metrics(result, root / "straight")


@pytest.mark.slow
def test_packed_pretraining_run_resumes_exactly(corpus, tmp_path):
  check_data_metrics(run_and_resume(corpus, tmp_path, "pretrain"), tmp_path / "straight")


@pytest.mark.slow
def test_packed_chunked_vrpo_run_from_packed_sft_resumes_exactly(corpus, packed_sft, tmp_path):
  root, _ = packed_sft
  result = run_and_resume(corpus, tmp_path, "vrpo", **{"vrpo.copy_chunks": 2, "total_steps": 4,
                                                       "checkpoint.init_from": str(root / "straight" / "checkpoints")})
  check_data_metrics(result, tmp_path / "straight")
  assert all(np.isfinite(r["loss"]) and "preference_loss" in r for r in result.metrics if "loss" in r)


# (id, config overrides, expected message): packing and chunking settings a run refuses before it starts.
BAD_CONFIGS = [
    ("zero_max_segments", {"data.max_segments": 0}, r"config\.data\.max_segments=0: expected a positive integer"),
    ("negative_bins", {"data.packing_bins": -1}, r"config\.data\.packing_bins=-1: expected an integer >= 0"),
    ("chunks_not_dividing_n", {"vrpo.copy_chunks": 3}, r"config\.vrpo\.copy_chunks=3: expected a divisor of the "
                                                        r"budget n = 2"),
    ("zero_chunks", {"vrpo.copy_chunks": 0}, r"config\.vrpo\.copy_chunks=0"),
    ("random_length_with_packing", {"objective": "pretrain", "data.packing": True,
                                    "diffusion.random_length_prob": 0.01},
     r"config\.diffusion\.random_length_prob=0\.01: expected 0 with data\.packing=True"),
]


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_packing_configs_are_refused_with_the_field(corpus, tmp_path, case):
  from llada_jax import configs  # noqa: PLC0415

  _, overrides, pattern = case
  overrides = dict(overrides)
  config = train_fixtures.make_config(corpus, tmp_path, overrides.pop("objective", "vrpo"), **overrides)
  with pytest.raises(ValueError, match=pattern):
    configs.validate(config)
