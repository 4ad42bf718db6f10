"""Evaluation: ELBO scoring against exact enumeration, guidance, bucketing, benchmarks and the CLI."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import evaluate
from llada_jax.data.errors import DataError
from llada_jax.eval import generation as gen, likelihood as LK, tasks
from tests.helpers import np_log_softmax, sharp_tiny_model
from tests.test_diffusion import enumerate_masks

REPO = pathlib.Path(__file__).resolve().parent.parent
MASK = 31


@pytest.fixture(scope="module")
def tiny():
  return sharp_tiny_model()


def level_elbos(fn, params, tokens, prompt_len):
  """{l: E_mask[(L/l) sum_{masked} log p]} over every mask of exactly l answer tokens."""
  L = len(tokens) - prompt_len
  masks = enumerate_masks(prompt_len, L)
  noisy = np.where(masks, MASK, tokens[None])
  logp = np_log_softmax(fn(params, jnp.asarray(noisy)))
  logp = np.take_along_axis(logp, np.broadcast_to(tokens[None, :, None], (len(masks), len(tokens), 1)), -1)[..., 0]
  sums, k = (logp * masks).sum(-1), masks.sum(-1)
  return {l: float(np.mean((L / l) * sums[k == l])) for l in range(1, L + 1)}


def stratified_level_probs(L, b):
  """How often the sweep l_j = ((k - 1 + round_half_up(j L / b)) mod L) + 1, k ~ U{1..L}, uses each level."""
  probs = np.zeros(L + 1)
  for k in range(1, L + 1):
    levels = (k - 1 + np.floor(np.arange(b) * L / b + 0.5).astype(int)) % L + 1
    np.add.at(probs, levels, 1 / (L * b))
  return probs


@pytest.mark.parametrize("mc_num,batch_size", [(32, 16), (8, 4), (24, 6)])
def test_scorer_mean_matches_exact_enumeration(tiny, mc_num, batch_size):
  cfg, params, fn = tiny
  seqs = [np.array([5, 9, 12, 3, 7, 4]), np.array([4, 8, 20, 11, 2, 6])]
  prompt_len, L, n_rep = 2, 4, 400
  # Copies of each example get their own example id, hence independent estimates.
  prompts = [s[:prompt_len] for s in seqs] * n_rep
  answers = [s[prompt_len:] for s in seqs] * n_rep
  est = LK.score_answers(params, cfg, prompts, answers, jax.random.key(1), mc_num=mc_num,
                         batch_size=batch_size).reshape(n_rep, 2)
  mean, stderr = est.mean(0), est.std(0, ddof=1) / math.sqrt(n_rep)
  # The sweep shifts a uniform start by fixed offsets, so every level is equally likely, also
  # where j L / b lands on x.5 (L = 4 with b = 16 or 6), which rounding k + j L / b half-to-even
  # would tie to the even level.
  np.testing.assert_allclose(stratified_level_probs(L, batch_size)[1:], 1 / L)
  for j, s in enumerate(seqs):
    f = level_elbos(fn, params, s, prompt_len)
    elbo = np.mean(list(f.values()))  # the l/L ELBO: l uniform on 1..L
    # 4 standard errors: a wrong weight, a masked prompt or a biased level mix moves it far more.
    assert abs(mean[j] - elbo) < 4 * stderr[j], (mean[j], elbo, stderr[j])


def test_single_token_answer_is_the_exact_log_prob(tiny):
  cfg, params, fn = tiny
  prompt, answer = [5, 9, 12], [7]
  logp = np_log_softmax(fn(params, jnp.array([prompt + [MASK]])))[0, -1, answer[0]]
  for seed in range(3):
    for mc_num, batch_size in [(16, 16), (1, 1), (32, 8)]:
      est = LK.score_answers(params, cfg, [prompt], [answer], jax.random.key(seed), mc_num=mc_num,
                             batch_size=batch_size)
      assert est[0] == pytest.approx(logp, abs=1e-4)


def test_mc_num_must_be_a_multiple_of_batch_size(tiny):
  cfg, params, _ = tiny
  with pytest.raises(ValueError, match="mc_num=20 with batch_size=16: expected mc_num to be a positive multiple"):
    LK.score_answers(params, cfg, [[5]], [[6, 7]], jax.random.key(0), mc_num=20, batch_size=16)
  with pytest.raises(ValueError, match=r"answers\[1\] is empty"):
    LK.score_answers(params, cfg, [[5], [5]], [[6], []], jax.random.key(0))
  with pytest.raises(ValueError, match="mask token"):
    LK.score_answers(params, cfg, [[5, MASK]], [[6]], jax.random.key(0))


def test_guidance_scale_zero_is_no_guidance_and_positive_matches_hand_computation(tiny):
  cfg, params, fn = tiny
  prompt, answer = [5, 9, 12, 3], [7]
  key = jax.random.key(4)
  prompts, answers = [prompt, [4, 8]], [answer, [20, 11, 2]]
  plain = LK.score_answers(params, cfg, prompts, answers, key, mc_num=16, batch_size=8)
  np.testing.assert_array_equal(
      LK.score_answers(params, cfg, prompts, answers, key, mc_num=16, batch_size=8, cfg_scale=0.0), plain)
  # The wrapper itself at w = 0 is the conditional model: un + 1 * (cond - un).
  tokens = jnp.array([prompt + [MASK]])
  prompt_mask = jnp.arange(5)[None] < 4
  np.testing.assert_allclose(LK.guided_logits_fn(fn, prompt_mask, 0.0, MASK)(params, tokens), fn(params, tokens),
                             atol=1e-4)

  w = 1.5
  cond = np.asarray(fn(params, tokens), np.float64)[0, -1]
  un = np.asarray(fn(params, jnp.array([[MASK] * 4 + [MASK]])), np.float64)[0, -1]
  guided = un + (w + 1) * (cond - un)
  expected = guided[answer[0]] - np.log(np.exp(guided - guided.max()).sum()) - guided.max()
  est = LK.score_answers(params, cfg, [prompt], [answer], key, mc_num=16, batch_size=16, cfg_scale=w)
  assert est[0] == pytest.approx(expected, abs=1e-3)
  assert abs(expected - plain[0]) > 0.1  # guidance really changed the score


def test_scores_do_not_depend_on_batch_mates_or_padding(tiny):
  cfg, params, _ = tiny
  key = jax.random.key(9)
  target_prompt, target_answer = [5, 9, 12], [3, 7, 4, 10]
  alone = LK.score_answers(params, cfg, [target_prompt], [target_answer], key, mc_num=32, batch_size=16,
                           example_ids=[3])
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(4, 30, n)) for n in (20, 2, 6, 30)]
  answers = [list(rng.integers(4, 30, n)) for n in (9, 10, 1, 5)]
  prompts.insert(3, target_prompt)
  answers.insert(3, target_answer)
  together = LK.score_answers(params, cfg, prompts, answers, key, mc_num=32, batch_size=16)
  assert together[3] == pytest.approx(alone[0], abs=1e-4)
  # Small forward budgets split buckets into more chunks; nothing changes.
  np.testing.assert_allclose(
      LK.score_answers(params, cfg, prompts, answers, key, mc_num=32, batch_size=16, max_tokens_per_forward=1),
      together, atol=1e-4)
  # The same example padded to 16 or 64 positions draws the same masks and gets the same estimate.
  seq = np.array(target_prompt + target_answer, np.int32)
  scores = []
  for t in (16, 64):
    tokens = np.full((1, t), cfg.eos_token_id, np.int32)
    tokens[0, :seq.size] = seq
    keys = jax.random.split(jax.random.key(2), 1)
    scores.append(float(LK._score_chunk(params, jnp.asarray(tokens), jnp.array([3]), jnp.array([seq.size]), keys,
                                        jnp.float32(0), logits_fn=LK._model_logits_fn(cfg), mask_id=MASK,
                                        n_rows=16, n_rounds=2, guided=False)[0][0]))
  assert scores[0] == pytest.approx(scores[1], abs=1e-4)


def test_bucket_lengths():
  assert [LK.bucket_length(n) for n in (1, 16, 17, 100, 512, 513, 1000)] == [16, 16, 32, 128, 512, 768, 1024]


# ------------------------------------------------------------------------------ task runners


class IdTokenizer:
  """Text is space-separated token ids; enough of the tokenizer interface for the runners."""

  eos_id, eot_id, bos_id = 1, 6, 2

  def encode(self, text):
    return [int(t) for t in text.split()]

  def decode(self, ids, skip_special=True):
    return " ".join(str(int(i)) for i in ids)

  def chat_prompt(self, text):
    return [self.bos_id] + self.encode(text)


def increment_logits(params, tokens, key_mask=None, **_):
  """Every position predicts (first token + 1) with a margin of 8."""
  target = (tokens[:, 0] + 1) % 32
  return jnp.broadcast_to(8.0 * jax.nn.one_hot(target, 32)[:, None, :], (*tokens.shape, 32))


def test_multiple_choice_accuracy_on_a_determinable_task(tiny, tmp_path):
  cfg, params, _ = tiny
  lines = [
      {"prompt": "5", "choices": ["6 6 6", "7"], "answer": 0},
      {"prompt": "10", "choices": ["12", "11 12", "11", "13 13 13"], "answer": 2},
      {"prompt": "20", "choices": ["20 20", "21 21"], "answer": 1},
      {"prompt": "7 9", "choices": ["9", "8 8 8 8 8"], "answer": 1},
  ]
  path = tmp_path / "mc.jsonl"
  path.write_text("".join(json.dumps(x) + "\n" for x in lines))
  examples = tasks.load_task("mc", path)
  out = tasks.run_multiple_choice(params, cfg, IdTokenizer(), examples, jax.random.key(0), logits_fn=increment_logits,
                                  mc_num=16, batch_size=8)
  assert out["metrics"] == {"accuracy": 1.0, "accuracy_per_token": 1.0, "n": 4, "elbo_se_method": "rounds"}
  assert [r["prediction"] for r in out["records"]] == [0, 2, 1, 1]
  assert out["records"][1]["n_tokens"] == [1, 2, 1, 3]


@pytest.mark.parametrize("text,line,field", [
    ('{"prompt": "a", "choices": ["x"], "answer": 0}', 2, "choices"),
    ('{"prompt": "a", "choices": ["x", 3], "answer": 0}', 2, "choices[1]"),
    ('{"prompt": "a", "choices": ["x", "y"], "answer": 2}', 2, "answer"),
    ('{"prompt": "a", "choices": ["x", "y"], "answer": "0"}', 2, "answer"),
    ('{"choices": ["x", "y"], "answer": 0}', 2, "prompt"),
])
def test_bad_multiple_choice_lines_are_located(tmp_path, text, line, field):
  path = tmp_path / "mc.jsonl"
  path.write_text('{"prompt": "a", "choices": ["x", "y"], "answer": 1}\n' + text + "\n")
  with pytest.raises(DataError) as e:
    tasks.load_task("mc", path)
  assert (e.value.path, e.value.line, e.value.field) == (str(path), line, field)


def test_per_sequence_scores_and_perplexity(tiny):
  cfg, params, _ = tiny
  examples = [{"prompt": "5", "response": "6 6"}, {"prompt": "9", "response": "3 4 5"}]
  out = tasks.run_scores(params, cfg, IdTokenizer(), examples, jax.random.key(0), mc_num=16, batch_size=16,
                         logits_fn=increment_logits)
  recs = out["records"]
  assert [r["n_tokens"] for r in recs] == [2, 3]
  assert recs[0]["elbo"] == pytest.approx(2 * -math.log1p(31 * math.exp(-8)), rel=1e-4)  # every token right
  assert recs[1]["elbo_per_token"] == pytest.approx(recs[1]["elbo"] / 3)
  ppl = tasks.run_perplexity(params, cfg, IdTokenizer(), [{"text": "5 6 7 8"}], jax.random.key(0), mc_num=16,
                             batch_size=16)
  assert ppl["metrics"]["tokens"] == 4 and ppl["metrics"]["perplexity_bound"] > 1


# ---------------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize("text,strict,flexible", [
    ("so the total is #### 1,234", "1234", "1234"),
    ("####   42 \n", "42", "42"),
    ("#### -5 apples", "-5", "-5"),
    ("#### - 5", "-5", "-5"),
    ("#### $18.00.", "18", "18"),
    ("#### 2.50", "2.5", "2.5"),
    ("#### 72.", "72", "72"),
    ("#### 1,234,567", "1234567", "1234567"),
    ("#### 3 then #### 4", "3", "3"),
    ("the answer is 7, not 9", None, "9"),
    ("####", None, None),
    ("#### unknown, maybe 12", None, "12"),
    ("", None, None),
])
def test_gsm8k_answer_extraction(text, strict, flexible):
  assert gen.extract_gsm8k_answer(text) == strict
  assert gen.extract_gsm8k_answer(text, flexible=True) == flexible


def test_gsm8k_reference_and_verify():
  assert gen.gsm8k_reference_answer("She pays 3 * 6 = $18.\n#### 18") == "18"
  assert gen.gsm8k_reference_answer("#### 1,000") == "1000"
  assert gen.gsm8k_reference_answer("no mark") is None
  example = {"question": "q", "answer": "work\n#### 1,200"}
  assert gen.gsm8k_verify(example, "1000 + 200 = 1200. #### 1200")
  assert gen.gsm8k_verify(example, "####1,200.00")
  assert not gen.gsm8k_verify(example, "#### 120")
  assert not gen.gsm8k_verify(example, "1200")  # strict: the answer must follow ####


class CharTokenizer:
  """Characters as ids (offset past the special ids); EOS = 1, end of turn = 6."""

  eos_id, eot_id, bos_id = 1, 6, 2

  def encode(self, text):
    return [ord(c) + 10 for c in text]

  def decode(self, ids, skip_special=True):
    return "".join(chr(i - 10) for i in ids if i >= 10)

  def chat_prompt(self, text):
    return [self.bos_id] + self.encode(text)


def stub_sampler(answers, calls):
  """Answers each prompt (looked up by its text) with '#### N', then EOS and junk."""

  def sample(params, model_cfg, prompt_ids, keys, config):
    tok = CharTokenizer()
    calls.append((len(prompt_ids), np.asarray(jax.random.key_data(keys)).tolist()))
    rows = []
    for ids in prompt_ids:
      text = tok.decode(ids[1:] if ids[0] == tok.bos_id else ids)
      row = tok.encode(f"#### {answers[text]}") + [tok.eos_id] + tok.encode("#### 999")
      rows.append(row + [tok.eos_id] * (config["gen_length"] - len(row)))
    return np.array(rows, np.int32)

  return sample


def test_generation_benchmark_with_a_stub_sampler(tmp_path):
  lines = [{"question": f"q{i}", "answer": f"work\n#### {i * 1000:,}"} for i in range(5)]
  path = tmp_path / "gsm.jsonl"
  path.write_text("".join(json.dumps(x) + "\n" for x in lines))
  examples = tasks.load_task("gsm8k", path)
  assert [e["target"] for e in examples] == ["0", "1000", "2000", "3000", "4000"]
  answers = {"q0": "0", "q1": "1,000", "q2": "2001", "q3": " 3000.", "q4": "4 000"}
  calls = []
  out = tasks.run_generation(None, None, CharTokenizer(), examples, {"gen_length": 24}, jax.random.key(0),
                             task="gsm8k", batch_size=2, chat_template=True, sample_fn=stub_sampler(answers, calls))
  assert [r["correct"] for r in out["records"]] == [True, True, False, True, False]
  assert out["metrics"]["accuracy"] == pytest.approx(0.6) and out["metrics"]["n"] == 5
  assert out["records"][0]["completion"] == "#### 0"  # cut at the first EOS
  assert out["records"][4]["extracted"] == "4"
  assert [c[0] for c in calls] == [2, 2, 2]  # the last batch is filled to the batch size
  # Example i samples with fold_in(key, i), whatever the batch size.
  row_keys = [k for _, keys in calls for k in keys][:5]
  assert row_keys == [np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(0), i))).tolist()
                      for i in range(5)]

  # No verifier: sampling only (candidate answers for the demo pipeline).
  batches = []
  plain = gen.evaluate_generation(None, None, CharTokenizer(), [{"prompt": "q1"}], {"gen_length": 24},
                                  jax.random.key(0), batch_size=4, sample_fn=stub_sampler(answers, []),
                                  on_batch=lambda done, total: batches.append((done, total)))
  assert batches == [(1, 1)]  # examples scored, not the filled batch's rows
  assert plain["accuracy"] is None and plain["records"] == [{"prompt": "q1", "completion": "#### 1,000",
                                                             "correct": None}]


def test_demo_task_benchmark_with_a_stub_sampler(tmp_path):
  from llada_jax.data import demo_task

  examples = demo_task.make_split("test", 4, seed=0, level="easy")
  path = tmp_path / "demo.jsonl"
  demo_task.write_jsonl(path, examples)
  loaded = tasks.load_task("demo", path)
  answers = {ex["prompt"]: str(ex["answer"] + (i == 2)) for i, ex in enumerate(examples)}
  out = tasks.run_generation(None, None, CharTokenizer(), loaded, {"gen_length": 24}, jax.random.key(0),
                             task="demo", batch_size=3, sample_fn=stub_sampler(answers, []))
  assert out["metrics"]["accuracy"] == pytest.approx(0.75)
  assert [r["extracted"] for r in out["records"]] == [ex["answer"] + (i == 2) for i, ex in enumerate(examples)]


# ------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  from tests import train_fixtures

  return train_fixtures.train_tiny_sft_run(tmp_path_factory.mktemp("eval_run"))[0]


def test_cli_end_to_end(run_dir, tmp_path, capsys):
  mc = tmp_path / "mc.jsonl"
  mc.write_text("".join(json.dumps({"prompt": f"what is {a} plus 1", "choices": [f"the answer is {a + 1}",
                                                                                  f"the answer is {a + 3}"],
                                    "answer": 0}) + "\n" for a in range(3)))
  out = tmp_path / "res" / "mc.json"
  rc = evaluate.main(["--checkpoint", str(run_dir), "--task", "mc", "--data", str(mc), "--mc_num", "8",
                      "--batch_size", "4", "--output", str(out), "--cfg_scale", "0.5"])
  assert rc == 0
  printed = capsys.readouterr().out
  assert "accuracy" in printed and "mc" in printed
  result = json.loads(out.read_text())
  assert result["n"] == 3 and 0 <= result["metrics"]["accuracy"] <= 1
  assert result["settings"]["chat_template"] is True  # an SFT run trained with the chat template
  assert len(result["records"]) == 3 and len(result["records"][0]["elbo"]) == 2
  assert all(np.isfinite(result["records"][0]["elbo"]))

  scores = tmp_path / "scores.jsonl"
  scores.write_text(json.dumps({"prompt": "what is 2 plus 2", "response": "the answer is 4"}) + "\n")
  out2 = tmp_path / "scores.json"
  assert evaluate.main(["--checkpoint", str(run_dir), "--task", "scores", "--data", str(scores), "--mc_num", "4",
                        "--batch_size", "4", "--output", str(out2), "--chat_template", "false"]) == 0
  record = json.loads(out2.read_text())["records"][0]
  assert record["elbo"] < 0 and record["elbo_per_token"] == pytest.approx(record["elbo"] / record["n_tokens"])


def test_cli_generation_with_the_real_sampler(run_dir, tmp_path, capsys):
  from llada_jax.data import demo_task

  data = tmp_path / "demo.jsonl"
  demo_task.write_jsonl(data, demo_task.make_split("test", 3, seed=0, level="easy"))
  out = tmp_path / "demo.json"
  assert evaluate.main(["--checkpoint", str(run_dir), "--task", "demo", "--data", str(data), "--gen_length", "8",
                        "--block_length", "4", "--steps", "4", "--batch_size", "2", "--output", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["n"] == 3 and result["metrics"]["accuracy"] is not None and result["metrics"]["tokens_per_s"] > 0
  assert all(set(r) >= {"prompt", "completion", "correct"} for r in result["records"])
  assert "demo" in capsys.readouterr().out


def test_cli_bad_jsonl_names_file_line_and_field(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "choices": ["x", "y"], "answer": 0}\n\n{"prompt": "b", "choices": "xy", '
                 '"answer": 0}\n')
  out = tmp_path / "never.json"
  proc = subprocess.run([sys.executable, "-m", "llada_jax.evaluate", "--checkpoint", str(tmp_path / "none"),
                         "--task", "mc", "--data", str(bad), "--output", str(out)], cwd=REPO, capture_output=True,
                        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 1
  assert f"{bad}, line 3, field 'choices'" in proc.stderr
  assert not out.exists()


def test_cli_flag_errors_are_one_line(tmp_path, capsys):
  assert evaluate.main(["--checkpoint", str(tmp_path), "--task", "nope", "--data", "x.jsonl"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: flag --task=nope") and err.count("\n") == 1
  assert evaluate.main(["--task", "mc", "--data", "x.jsonl"]) == 1
  assert "--checkpoint" in capsys.readouterr().err
  assert evaluate.main(["--checkpoint", str(tmp_path), "--task", "mc", "--data", "x.jsonl", "extra"]) == 1
  assert capsys.readouterr().err.startswith("error: unexpected arguments extra")
  assert evaluate.main(["--help"]) == 0
  assert "--mc_num" in capsys.readouterr().out
