"""The whole demo chain, in its seconds-long smoke version, and its resumption."""

import dataclasses
import json

import numpy as np
import pytest

from llada_jax.recipes import demo


@pytest.mark.slow  # about 150 s on 2 cores; .ci/wheel_check runs the smoke chain from the installed wheel
def test_smoke_chain_runs_end_to_end_and_resumes(tmp_path):
  lines = []
  summary = demo.run_demo(tmp_path, demo.SMOKE, emit=lines.append)
  # Progress lines name each stage in order, its units and the time left for the whole chain.
  stages = [s.name for s in demo.plan(demo.SMOKE)]
  shown = list(dict.fromkeys(line.split("]")[0].split(" ", 1)[1] for line in lines))
  assert shown == stages, shown
  assert lines[-1].startswith(f"[{len(stages)}/{len(stages)} table2] setting 6/6;") and "left in all" in lines[-1]
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
  lines.clear()
  again = demo.run_demo(tmp_path, demo.SMOKE, emit=lines.append)
  assert again["test_accuracy"] == summary["test_accuracy"]
  # Only the training stages report (each found at its last step); nothing is left.
  assert all(" step " in line for line in lines) and lines[-1].endswith("about 0s left in all"), lines
  assert again["seconds"]["total"] < summary["seconds"]["total"]
  paired = summary["paired_vs_sft"]
  assert sorted(paired) == ["naive_dpo_seed0", "vrpo_seed0"]
  assert all(0.0 < t["p_value"] <= 1.0 for t in paired.values())
  assert "| vrpo_seed0 |" in demo.format_results(again)
  assert "| sft |" in demo.format_results(again) and "4, 1, no" in demo.format_variance_table(table)


def test_paired_test_counts_disagreements_and_gives_the_exact_binomial_p_value():
  base = [True] * 5 + [False] * 10 + [True, False]
  other = [True] * 5 + [True] * 8 + [False] * 2 + [False, True]  # fixed 8 + 1, broken 1
  out = demo.paired_test(base, other)
  assert (out["fixed"], out["broken"]) == (9, 1)
  # P(X <= 1) for X ~ Bin(10, 1/2) = 11/1024; two-sided: 22/1024.
  np.testing.assert_allclose(out["p_value"], 22 / 1024, rtol=1e-12)
  assert demo.paired_test(other, base) == {"fixed": 1, "broken": 9, "p_value": out["p_value"]}
  assert demo.paired_test(base, base)["p_value"] == 1.0  # no disagreement: no evidence
  assert demo.paired_test([True, False], [False, True])["p_value"] == 1.0
  with pytest.raises(ValueError, match="same problems"):
    demo.paired_test([True], [True, False])


@pytest.mark.parametrize("requested, speedup, dtype", [
    ("auto", 1.6, "bfloat16"),  # native bfloat16 dot products
    ("auto", 1.1, "float32"),  # not clearly faster
    ("auto", 0.58, "float32"),  # AVX2-only: bfloat16 is the slower one
    ("float32", 1.6, "float32"),
    ("bfloat16", 0.58, "bfloat16"),
])
def test_choose_dtype_for_a_new_workdir(tmp_path, requested, speedup, dtype):
  chosen, why = demo.choose_dtype(requested, tmp_path, measure=lambda: speedup)
  assert chosen == dtype
  assert (f"{speedup:.2f}x" in why) == (requested == "auto")


def test_a_workdir_keeps_the_dtype_it_was_started_with(tmp_path):
  demo._record_dtype(tmp_path, dataclasses.replace(demo.SMOKE, dtype="float32"))
  assert json.loads((tmp_path / demo.DTYPE_FILE).read_text()) == {"dtype": "float32"}
  never = lambda: pytest.fail("a workdir with runs is not measured again")  # noqa: E731
  assert demo.choose_dtype("auto", tmp_path, measure=never)[0] == "float32"
  assert demo.choose_dtype("float32", tmp_path, measure=never)[0] == "float32"
  with pytest.raises(ValueError, match="compute in float32; expected --dtype=float32"):
    demo.choose_dtype("bfloat16", tmp_path, measure=never)
  with pytest.raises(ValueError, match="expected the same dtype to resume"):
    demo._record_dtype(tmp_path, dataclasses.replace(demo.SMOKE, dtype="bfloat16"))
  # A workdir from before the choice was recorded holds the recipe's dtype.
  old = tmp_path / "old"
  (old / "pretrain").mkdir(parents=True)
  assert demo.read_dtype(old) == demo.configs.load("demo_pretrain").model.dtype


@pytest.mark.parametrize("content, message", [
    ("{", "unreadable"),
    ('{"precision": "float32"}', "unreadable"),
    ('["float32"]', "unreadable"),
    ('{"dtype": "float16"}', "dtype 'float16'; expected 'float32' or 'bfloat16'"),
])
def test_a_damaged_dtype_record_is_one_clear_error(tmp_path, content, message):
  (tmp_path / demo.DTYPE_FILE).write_text(content)
  with pytest.raises(ValueError, match=message) as e:
    demo.choose_dtype("auto", tmp_path, measure=lambda: 1.0)
  assert demo.DTYPE_FILE in str(e.value)


@pytest.mark.parametrize("content, message", [
    ("{", "unreadable"),
    ('{"dtype": "float32"}', "unreadable"),
    ('{"recipe": ["lean"]}', r"recipe \['lean'\]; expected one of lean, full, smoke"),
    ('{"recipe": "huge"}', "recipe 'huge'; expected one of lean, full, smoke"),
])
def test_a_damaged_recipe_record_is_one_clear_error(tmp_path, content, message):
  (tmp_path / demo.RECIPE_FILE).write_text(content)
  with pytest.raises(ValueError, match=message) as e:
    demo.check_recipe(tmp_path, demo.LEAN)
  assert demo.RECIPE_FILE in str(e.value)


def test_choose_dtype_refuses_an_unknown_dtype(tmp_path):
  with pytest.raises(ValueError, match="--dtype=fp16: expected auto, float32 or bfloat16"):
    demo.choose_dtype("fp16", tmp_path)


def test_bfloat16_matmul_speedup_is_measured():
  speedup = demo.bfloat16_matmul_speedup(n=64, repeats=2)  # whatever the host
  assert np.isfinite(speedup) and speedup > 0


def test_a_workdir_keeps_the_recipe_it_was_started_with(tmp_path):
  assert demo.read_recipe(tmp_path) is None  # a new workdir takes any recipe
  demo.check_recipe(tmp_path, demo.FULL)
  demo._record_recipe(tmp_path, demo.LEAN)
  assert json.loads((tmp_path / demo.RECIPE_FILE).read_text()) == {"recipe": "lean"}
  demo._record_recipe(tmp_path, dataclasses.replace(demo.LEAN, seeds=(3,)))  # other seeds: the same recipe
  with pytest.raises(ValueError, match=r"come from the lean recipe; expected the same recipe to resume them "
                                       r"\(no recipe flag\)"):
    demo.check_recipe(tmp_path, demo.FULL)
  assert json.loads((tmp_path / demo.RECIPE_FILE).read_text()) == {"recipe": "lean"}


def test_every_recipe_is_registered_under_its_own_name():
  assert {name: r.name for name, r in demo.RECIPES.items()} == {name: name for name in demo.RECIPES}
  assert set(demo.RECIPE_FLAGS) == set(demo.RECIPES)


def test_stage_overrides_change_one_stage_only(tmp_path):
  recipe = dataclasses.replace(demo.FULL, stage_overrides=(("sft", "optimizer.lr", 1.5e-3),
                                                           ("pretrain", "data.global_batch_size", 8)))
  configs = {name: demo._stage_config(recipe, name, None, tmp_path / name, [], "tok.model", None)
             for name in ("pretrain", "sft", "vrpo")}
  assert configs["sft"].optimizer.lr == 1.5e-3 and configs["pretrain"].optimizer.lr != 1.5e-3
  assert configs["pretrain"].data.global_batch_size == 8 and configs["sft"].data.global_batch_size != 8
  assert configs["vrpo"].optimizer.lr == demo.configs.load("demo_vrpo").optimizer.lr


def test_recipe_priors_replace_the_default_ones():
  recipe = dataclasses.replace(demo.FULL, prior_seconds=(("sft", 0.1),))
  priors = {s.name: s.prior_seconds_per_unit for s in demo.plan(recipe)}
  assert priors["sft"] == 0.1 and priors["pretrain"] == demo.PRIOR_SECONDS["pretrain"]


def test_the_lean_recipe_plans_its_own_steps_and_model():
  units = {s.name: s.units for s in demo.plan(demo.LEAN)}
  assert (units["pretrain"], units["sft"]) == (demo.LEAN.pretrain_steps, demo.LEAN.sft_steps)
  config = demo._stage_config(demo.LEAN, "sft", None, "/tmp/unused", [], "tok.model", demo.LEAN.sft_steps)
  assert (config.model.d_model, config.model.n_layers, config.optimizer.lr) == (128, 6, 1.5e-3)
  full = demo._stage_config(demo.FULL, "sft", None, "/tmp/unused", [], "tok.model", None)
  assert full.model.d_model == 256 and full.total_steps == 1800
