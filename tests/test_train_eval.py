"""Evaluation during training (`llada_jax.training.evaluation`): the logged validation ELBOs equal an
independent computation on the checkpoint of that step, evaluation changes nothing the training
computes (metrics and parameters bit for bit, resume included), and bad `eval.*` fields are refused."""

import json
import math

import chex
import jax
import numpy as np
import pytest

from llada_jax import configs, metrics as metrics_lib, model as model_lib
from llada_jax.data import demo_task, tokenizer as tok_lib
from llada_jax.eval import likelihood
from llada_jax.storage import checkpoint as ckpt_lib
from llada_jax.training import build as build_lib, evaluation, loop
from tests import train_fixtures

# Wall-clock throughput differs between any two runs; everything else a step logs must not.
_TIMING = set(metrics_lib.throughput(steps=1, wall_time_s=1.0, tokens_per_step=1, flops_per_step=1, n_devices=1,
                                     peak_flops_per_device=1.0))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return train_fixtures.write_corpus(tmp_path_factory.mktemp("corpus"))


def _eval_on(corpus, objective, **overrides):
  return {"eval.every_steps": 3, "eval.validation_files": (corpus[objective],), "eval.max_examples": 6,
          "eval.mc_num": 4, "eval.mc_batch_size": 2, **overrides}


def _training_rows(rows):
  return [{k: v for k, v in r.items() if k not in _TIMING} for r in rows if "loss" in r]


def _eval_rows(workdir):
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in lines if "eval/elbo" in r or "eval/chosen_elbo" in r}


def _params(workdir, config, step=None):
  model_cfg = model_lib.ModelConfig.from_dict(config.model)
  return ckpt_lib.load_params(f"{workdir}/checkpoints", model_lib.abstract_params(model_cfg), step=step)


def _independent_nll(config, params, data):
  """-sum ELBO / answer tokens, each round scored straight with `score_answers` on one device."""
  model_cfg = model_lib.ModelConfig.from_dict(config.model)
  key = jax.random.fold_in(jax.random.key(config.eval.seed), evaluation._KEY_TAG)
  key = jax.random.fold_in(key, 0)  # the validation half of the evaluation keys
  tokens = sum(len(a) for a in data.answers)
  rounds = [-likelihood.score_answers(params, model_cfg, list(data.prompts), list(data.answers),
                                      jax.random.fold_in(key, r), mc_num=2, batch_size=2).sum() / tokens
            for r in range(2)]
  return float(np.mean(rounds)), float(np.std(rounds, ddof=1) / math.sqrt(2))


@pytest.mark.slow  # three short training runs: about a minute on 2 cores
def test_eval_changes_no_training_and_logs_the_checkpoints_elbo(corpus, tmp_path):
  off = train_fixtures.make_config(corpus, tmp_path / "off", "sft")
  baseline = loop.run(off)
  # With evaluation, killed after step 3's checkpoint and resumed: the run without evaluation, bit for bit.
  on = train_fixtures.make_config(corpus, tmp_path / "on", "sft", **_eval_on(corpus, "sft"))
  first = loop.run(on, stop_after=3, final_save=False)
  second = loop.run(on)
  assert _training_rows(first.metrics + second.metrics) == _training_rows(baseline.metrics)
  chex.assert_trees_all_equal(_params(off.workdir, off), _params(on.workdir, on))

  logged = _eval_rows(tmp_path / "on")
  assert sorted(logged) == [3, 6]  # every 3 steps; the end (6) is one of them
  tokenizer = tok_lib.load_tokenizer(corpus["tokenizer"])
  data = evaluation.load_validation("sft", [corpus["sft"]], tokenizer, seq_len=48, chat_template=True,
                                    on_too_long="error", max_examples=6)
  assert len(data) == 6 and logged[3]["eval/examples"] == 6
  for step in (3, 6):  # before the kill and after the resume
    nll, se = _independent_nll(on, _params(on.workdir, on, step=step), data)
    np.testing.assert_allclose(logged[step]["eval/nll_per_token"], nll, rtol=2e-5)
    np.testing.assert_allclose(logged[step]["eval/nll_per_token_se"], se, rtol=1e-3, atol=1e-6)
  assert logged[3]["eval/nll_per_token"] != logged[6]["eval/nll_per_token"]  # the parameters moved


def test_pretraining_and_preference_metrics(corpus, tmp_path):
  """The evaluator of a pretraining and a VRPO run on fresh parameters (the loop calls it the same way)."""
  task = tmp_path / "demo.jsonl"
  demo_task.write_jsonl(task, demo_task.make_split("test", 4))
  pre = train_fixtures.make_config(corpus, tmp_path / "pre", "pretrain", **_eval_on(corpus, "pretrain", **{
      "eval.task": "demo", "eval.task_data": str(task), "eval.gen_length": 16, "eval.block_length": 8,
      "eval.steps": 4}))
  program = build_lib.build(pre)
  params = program.create_state(jax.random.key(0)).params
  row = evaluation.make_evaluator(pre, program)(params, None)
  assert row["eval/examples"] == 6 and 0 < row["eval/nll_per_token"] < 10 and row["eval/nll_per_token_se"] >= 0
  assert row["eval/demo_accuracy"] == 0 and row["eval/demo_n_correct"] == 0  # random weights: greedy, 4 prompts
  assert "eval/reward_margin" not in row

  vrpo = train_fixtures.make_config(corpus, tmp_path / "vrpo", "vrpo", **_eval_on(corpus, "vrpo"))
  program = build_lib.build(vrpo)
  reference = program.create_state(jax.random.key(1)).params
  evaluator = evaluation.make_evaluator(vrpo, program)
  same = evaluator(reference, reference)
  # Policy == reference: the shared masks cancel and the margin is 0 up to rounding, with no error bar.
  assert abs(same["eval/reward_margin"]) < 1e-4 and same["eval/reward_margin_se"] < 1e-4
  row = evaluator(params, reference)  # the reference's ELBOs are kept from the first call
  for k in ("chosen_elbo", "rejected_elbo", "chosen_nll_per_token", "reward_margin", "reward_margin_se",
            "preference_accuracy"):
    assert np.isfinite(row[f"eval/{k}"]), k
  assert row["eval/reward_margin"] != same["eval/reward_margin"]


# (id, eval overrides, expected message): refused by the config check, before anything runs.
BAD_EVAL_CONFIGS = [
    ("negative_every_steps", {"eval.every_steps": -1}, r"config\.eval\.every_steps=-1: expected an integer >= 0"),
    ("missing_validation_file", {"eval.every_steps": 5, "eval.validation_files": ("/nonexistent/val.jsonl",)},
     r"config\.eval\.validation_files=.*: expected existing files; no file '/nonexistent/val\.jsonl'"),
    ("no_validation_files", {"eval.every_steps": 5},
     r"config\.eval\.validation_files=\(\): expected at least one held-out file"),
    ("zero_mc_num", {"eval.mc_num": 0}, r"config\.eval\.mc_num=0: expected a positive multiple"),
    ("mc_num_not_multiple", {"eval.mc_num": 6, "eval.mc_batch_size": 4}, r"config\.eval\.mc_num=6"),
    ("task_without_data", {"eval.task": "demo"}, r"config\.eval\.task_data='': expected the JSONL file"),
    ("unknown_task", {"eval.task": "mmlu"}, r"config\.eval\.task='mmlu': expected one of"),
    ("zero_max_examples", {"eval.max_examples": 0}, r"config\.eval\.max_examples=0: expected a positive integer"),
]


@pytest.mark.parametrize("case", BAD_EVAL_CONFIGS, ids=[c[0] for c in BAD_EVAL_CONFIGS])
def test_bad_eval_configs_are_refused_with_the_field(corpus, tmp_path, case):
  _, overrides, pattern = case
  config = train_fixtures.make_config(corpus, tmp_path, "sft", **overrides)
  with pytest.raises(ValueError, match=pattern):
    configs.validate(config)
