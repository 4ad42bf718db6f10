"""The whole demo chain, in its seconds-long smoke version, and its resumption."""

import json

import numpy as np

from llada_jax import demo


def test_smoke_chain_runs_end_to_end_and_resumes(tmp_path):
  summary = demo.run_demo(tmp_path, demo.SMOKE)
  for name in ("sft", "vrpo", "naive_dpo"):
    acc = summary["test_accuracy"][name]
    assert len(acc["per_seed"]) == (1 if name == "sft" else len(demo.SMOKE.seeds))
    assert all(0.0 <= a <= 1.0 for a in acc["per_seed"])
  prefs = [json.loads(l) for l in (tmp_path / "preferences.jsonl").read_text().splitlines()]
  assert prefs and all(p["chosen"] != p["rejected"] for p in prefs)
  table = summary["variance_table"]
  assert [(r["n_timesteps"], r["masks_per_timestep"], r["antithetic"]) for r in table] == list(
      demo.TABLE2_SETTINGS)
  assert all(np.isfinite(r["score_variance"]) for r in table)
  for png in ("variance_table.png", "training_curves.png"):
    assert (tmp_path / png).stat().st_size > 10_000
  for stage in ("pretrain", "sft", "vrpo_seed0", "naive_dpo_seed0"):
    assert (tmp_path / stage / "checkpoints").is_dir()

  # Everything is on disk: a second run skips or resumes every stage and reports the same.
  again = demo.run_demo(tmp_path, demo.SMOKE)
  assert again["test_accuracy"] == summary["test_accuracy"]
  assert again["seconds"]["total"] < summary["seconds"]["total"]
  assert "| sft |" in demo.format_results(again) and "4, 1, no" in demo.format_variance_table(table)
