"""The demo recipe's synthetic arithmetic task: generation, splits, verifier, files and CLI."""

import collections
import filecmp
import os
import re
import subprocess
import sys

import pytest

from llada_jax import task as task_cli
from llada_jax.data import demo_task as task

LEVELS = tuple(task.LEVELS)
FILES = ("train.jsonl", "validation.jsonl", "test.jsonl", "pretrain.txt")


def _numbers(text):
  return [int(x) for x in re.findall(r"\d+", text)]


@pytest.fixture(scope="module")
def samples():
  """600 training problems of each level."""
  return {level: task.make_split("train", 600, seed=3, level=level) for level in LEVELS}


# ---------------------------------------------------------------------------- generation.

def test_example_format():
  ex = task.make_split("train", 1)[0]
  assert list(ex) == ["prompt", "response", "answer", "n_ops", "op_seq"]
  assert ex["prompt"].endswith("?\n") and "\n" not in ex["prompt"][:-1]
  assert re.fullmatch(r"(\d+ [-+*] \d+ = \d+\. )+#### \d+", ex["response"])
  assert isinstance(ex["answer"], int) and ex["response"].endswith(f"#### {ex['answer']}")
  assert ex["n_ops"] == len(ex["op_seq"]) == ex["response"].count("=")


@pytest.mark.parametrize("level", LEVELS)
def test_every_solution_verifies(samples, level):
  for ex in samples[level]:
    assert task.verify(ex, ex["response"]), ex
    assert task.verify_steps(ex["response"]), ex
    assert task.extract_answer(ex["response"]) == ex["answer"]
    assert task.score(ex, ex["response"]) == {"answer": ex["answer"], "correct": True,
                                              "steps_valid": True}
    steps = task.parse_steps(ex["response"])
    assert "".join(op for _, op, _, _ in steps) == ex["op_seq"]
    # The working starts from the amount in the problem and uses its numbers in order (the
    # factors of "doubles" and "triples" are words, not digits).
    written = [b for _, op, b, _ in steps if not (op == "*" and b in (2, 3))]
    assert _numbers(ex["prompt"]) == [steps[0][0]] + written, ex
    assert ex["prompt"].count("doubles") == sum(op == "*" and b == 2 for _, op, b, _ in steps)


@pytest.mark.parametrize("level", LEVELS)
def test_values_within_bounds(samples, level):
  d = task.LEVELS[level]
  for ex in samples[level]:
    start_and_operands = _numbers(ex["prompt"])
    assert all(1 <= v <= d.max_operand for v in start_and_operands), ex
    for a, op, b, c in task.parse_steps(ex["response"]):
      assert 1 <= a <= d.max_value and 1 <= c <= d.max_value, ex
      if op == "*":
        assert 2 <= b <= d.max_factor, ex
      else:
        assert 1 <= b <= d.max_operand, ex
    assert 1 <= ex["answer"] <= d.max_value


def test_difficulty_knobs_change_the_distribution():
  def n_ops(**difficulty):
    return collections.Counter(ex["n_ops"] for ex in task.make_split("train", 300, **difficulty))

  assert set(n_ops(level="easy")) == {1, 2}
  assert set(n_ops(level="medium")) == {1, 2, 3}
  assert set(n_ops(level="hard")) == {2, 3}
  assert set(n_ops(min_ops=3, max_ops=3)) == {3}
  assert set(n_ops(level="easy", min_ops=4, max_ops=5)) == {4, 5}
  mean = {lvl: sum(k * v for k, v in n_ops(level=lvl).items()) / 300 for lvl in LEVELS}
  assert mean["easy"] < mean["medium"] < mean["hard"]

  ops = "".join(ex["op_seq"] for ex in task.make_split("train", 300, level="easy"))
  assert set(ops) == {"+", "-"}
  ops = "".join(ex["op_seq"] for ex in task.make_split("train", 300, ops="+*"))
  assert set(ops) == {"+", "*"}
  factors = {b for ex in task.make_split("train", 300, ops="*", max_factor=5, max_value=99)
             for _, _, b, _ in task.parse_steps(ex["response"])}
  assert factors == {2, 3, 4, 5}
  answers = {lvl: max(ex["answer"] for ex in task.make_split("train", 300, level=lvl))
             for lvl in LEVELS}
  assert answers["easy"] <= 20 < answers["medium"] <= 50 < answers["hard"] <= 99
  # A Difficulty, or a level with some knobs replaced.
  d = task.Difficulty(min_ops=2, max_ops=2, ops="-", max_operand=30, max_value=30)
  assert task.make_split("test", 20, level=d) == task.make_split(
      "test", 20, level="easy", min_ops=2, max_ops=2, ops="-", max_operand=30, max_value=30)


def test_bad_difficulty_and_arguments():
  for bad in (dict(min_ops=0), dict(min_ops=3, max_ops=2), dict(max_ops=7), dict(ops="+/"),
              dict(ops=""), dict(ops="++"), dict(max_operand=0), dict(max_value=10),
              dict(max_factor=1), dict(ops="-", min_ops=3, max_operand=3)):
    with pytest.raises(ValueError):
      task.make_difficulty(**bad)
  with pytest.raises(ValueError, match="unknown level"):
    task.make_split("train", 1, level="impossible")
  with pytest.raises(TypeError, match="unknown difficulty knob"):
    task.make_split("train", 1, n_steps=2)
  with pytest.raises(ValueError, match="unknown split"):
    task.make_split("dev", 1)
  with pytest.raises(ValueError, match="n must be"):
    task.make_split("train", -1)
  assert task.make_split("test", 0) == []
  # A distribution with too few distinct problems says so instead of looping.
  with pytest.raises(ValueError, match="found only"):
    task.make_split("test", 1000, ops="+", min_ops=1, max_ops=1, max_operand=1, max_value=2)


# -------------------------------------------------------------------------------- splits.

def test_splits_are_disjoint_and_deterministic():
  splits = {s: task.make_split(s, n, seed=0) for s, n in
            (("train", 2000), ("validation", 300), ("test", 300))}
  prompts = {s: [ex["prompt"] for ex in xs] for s, xs in splits.items()}
  for s, ps in prompts.items():
    assert len(set(ps)) == len(ps), f"duplicate prompts in {s}"
    assert all(task.split_of(p) == s for p in ps)
  assert not set(prompts["train"]) & set(prompts["validation"])
  assert not set(prompts["train"]) & set(prompts["test"])
  assert not set(prompts["validation"]) & set(prompts["test"])
  # Split ownership does not depend on the seed: other seeds' training data never holds
  # this test set.
  other_train = {ex["prompt"] for ex in task.make_split("train", 2000, seed=1)}
  assert not other_train & set(prompts["test"])

  assert task.make_split("test", 300, seed=0) == splits["test"]
  assert task.make_split("test", 300, seed=1) != splits["test"]
  # A split is a stream: fewer examples are a prefix of more.
  assert task.make_split("train", 500, seed=0) == splits["train"][:500]


# ------------------------------------------------------------------------------ verifier.

@pytest.mark.parametrize("text, answer", [
    ("3 + 4 = 7. #### 7", 7),
    ("####7", 7),
    ("  ####   42  ", 42),
    ("#### 42.", 42),
    ("#### 42\n", 42),
    ("#### -3", -3),
    ("#### +5", 5),
    ("#### 007", 7),
    ("#### 3 #### 4", 4),
    ("#### 1234567", 1234567),
    ("", None),
    ("the answer is 5", None),
    ("5", None),
    ("###5", None),
    ("####", None),
    ("####   ", None),
    ("#### nine", None),
    ("#### 9.5", None),
    ("#### 9 apples", None),
    ("#### 4 2", None),
    ("#### 3 #### x", None),
    ("#### 1,000", None),
    ("#### 5..", None),
])
def test_extract_answer(text, answer):
  assert task.extract_answer(text) == answer


def test_extract_answer_non_string():
  assert task.extract_answer(None) is None
  assert task.parse_steps(None) is None
  assert not task.verify_steps(None)


def test_verify_rejects_wrong_missing_and_malformed_answers():
  ex = {"prompt": "Mia has 7 apples. She buys 5 more. She gives 3 to Sam. How many apples "
                  "does Mia have now?\n",
        "response": "7 + 5 = 12. 12 - 3 = 9. #### 9", "answer": 9}
  assert task.verify(ex, ex["response"])
  assert task.verify(ex, "#### 9")  # the answer alone is enough for verify
  assert task.verify({**ex, "answer": "9"}, "#### 9")
  for wrong in ("7 + 5 = 12. 12 - 3 = 9. #### 10", "7 + 5 = 12. 12 - 3 = 9.", "9",
                "7 + 5 = 12. 12 - 3 = 9. #### nine", "7 + 5 = 12. 12 - 3 = 9. #### 9 #### 8",
                "#### 9.0", "#### -9", "", "####"):
    assert not task.verify(ex, wrong), wrong


def test_verify_steps_is_reported_separately():
  ok = "7 + 5 = 12. 12 - 3 = 9. #### 9"
  assert task.parse_steps(ok) == [(7, "+", 5, 12), (12, "-", 3, 9)]
  assert task.verify_steps(ok)
  assert task.verify_steps("7+5=12.12-3=9.####9")  # spacing is free
  assert task.verify_steps("3 x 4 = 12. 12 × 2 = 24. #### 24")  # x and × multiply
  assert task.parse_steps("3 x 4 = 12. #### 12") == [(3, "*", 4, 12)]
  for bad in ("7 + 5 = 13. 13 - 3 = 10. #### 10",  # a false equation
              "7 + 5 = 12. 11 - 3 = 8. #### 8",  # does not start from the previous result
              "7 + 5 = 12. 12 - 3 = 9. #### 10",  # answer is not the last result
              "7 + 5 = 12. 12 - 3 = 9.",  # no answer
              "#### 9",  # no working
              "7 + 5 = 12. 12 - 3 = 9 #### 9",  # last equation not terminated
              "7 plus 5 = 12. #### 12",
              "7 + 5 = 12. So 12 - 3 = 9. #### 9",
              "7 + 5 = 12.. #### 12",
              "7 + 5 = 12. 12 / 3 = 4. #### 4",
              "1.5 + 1.5 = 3. #### 3"):
    assert not task.verify_steps(bad), bad
  # Right answer with broken working, and sound working on the wrong numbers.
  ex = {"answer": 9}
  assert task.score(ex, "7 + 5 = 13. 13 - 3 = 9. #### 9") == {
      "answer": 9, "correct": True, "steps_valid": False}
  assert task.score(ex, "7 + 5 = 12. 12 - 2 = 10. #### 10") == {
      "answer": 10, "correct": False, "steps_valid": True}


# ---------------------------------------------------------------------------------- lengths.

# Largest prompt / solution of 1000 problems per level: easy 106/32 characters and 21/12 words,
# medium 130/49 and 26/17, hard 133/49 and 26/17.
@pytest.mark.parametrize("level", LEVELS)
def test_lengths(level):
  xs = task.make_split("test", 400, seed=0, level=level)
  prompt_chars = [len(ex["prompt"]) for ex in xs]
  prompt_words = [len(ex["prompt"].split()) for ex in xs]
  response_chars = [len(ex["response"]) for ex in xs]
  response_words = [len(ex["response"].split()) for ex in xs]
  assert 40 <= min(prompt_chars) and max(prompt_chars) <= 140
  assert 8 <= min(prompt_words) and max(prompt_words) <= 28
  assert 10 <= min(response_chars) and max(response_chars) <= 55
  assert 5 <= min(response_words) and max(response_words) <= 18
  # Two-digit numbers make every step of medium/hard longer than easy's.
  if level == "easy":
    assert max(response_chars) <= 35 and max(prompt_words) <= 22


def test_token_lengths_and_sft_loading(tmp_path):
  """With a sentencepiece tokenizer trained on the task: prompts <= 40 tokens, solutions <= 45,
  prompt + response tokenize as the pretraining document does, and SFTSource reads the files."""
  pytest.importorskip("sentencepiece")
  from llada_jax.data import sources
  from llada_jax.data.tokenizer import train_sentencepiece

  paths = task.write_task(tmp_path, train=1500, validation=10, test=300, level="hard")
  tok = train_sentencepiece([paths["pretrain"]], tmp_path / "sp", 2048, num_threads=1)
  for level in LEVELS:
    for ex in task.make_split("test", 300, level=level):
      prompt, response = tok.encode(ex["prompt"]), tok.encode(ex["response"])
      assert len(prompt) <= 40 and len(response) <= 45, (ex, len(prompt), len(response))
      assert prompt + response == tok.encode(task.format_document(ex))
  source = sources.SFTSource([paths["test"]], tok, 96, chat_template=False)
  assert len(source) == 300 and source.num_skipped == 0


# ------------------------------------------------------------------------------ files, CLI.

def test_write_task_is_byte_deterministic(tmp_path):
  kwargs = dict(train=200, validation=30, test=30, seed=5, level="hard")
  a = task.write_task(tmp_path / "a", **kwargs)
  b = task.write_task(tmp_path / "b", **kwargs)
  c = task.write_task(tmp_path / "c", **{**kwargs, "seed": 6})
  for name in FILES:
    key = name.split(".")[0]
    assert filecmp.cmp(a[key], b[key], shallow=False), name
    assert not filecmp.cmp(a[key], c[key], shallow=False), name
  assert sorted(os.listdir(tmp_path / "a")) == sorted(FILES)


def test_files_content(tmp_path):
  from llada_jax.data import readers, sources

  paths = task.write_task(tmp_path, train=100, validation=20, test=20, pretrain=150, seed=2)
  loaded = {s: task.read_jsonl(paths[s]) for s in task.SPLITS}
  for s, n in (("train", 100), ("validation", 20), ("test", 20)):
    assert loaded[s] == task.make_split(s, n, seed=2)
    assert all(list(ex)[:3] == ["prompt", "response", "answer"] for ex in loaded[s])
  docs = [doc for _, doc in readers.iter_text_documents(paths["pretrain"])]
  train150 = task.make_split("train", 150, seed=2)
  assert docs == [task.format_document(ex) for ex in train150]
  assert docs[0] == train150[0]["prompt"] + train150[0]["response"]
  held_out = {ex["prompt"].strip() for s in ("validation", "test") for ex in loaded[s]}
  assert not any(doc.split("\n")[0] in held_out for doc in docs)
  with open(paths["pretrain"], "rb") as f:
    raw = f.read()
  assert raw.endswith(b"#### %d\n" % train150[-1]["answer"]) and b"\r" not in raw
  assert raw.count(b"\n\n") == 149


def test_cli_matches_write_task(tmp_path):
  cmd = [sys.executable, "-m", "llada_jax.task", "--out_dir", str(tmp_path / "cli"),
         "--train", "80", "--validation", "10", "--test", "10", "--seed", "4", "--level",
         "easy", "--max_ops", "3", "--ops", "+-*"]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True)
  assert "wrote" in out.stdout
  ref = task.write_task(tmp_path / "ref", train=80, validation=10, test=10, seed=4,
                        level="easy", max_ops=3, ops="+-*")
  for name in FILES:
    assert filecmp.cmp(tmp_path / "cli" / name, ref[name.split(".")[0]], shallow=False), name

  assert task_cli.main(["--out_dir", str(tmp_path / "bad"), "--min_ops", "3", "--max_ops", "2"]) == 1

  # In one process, each call starts again from the defaults (no --level easy or --seed 4 left over).
  assert task_cli.main(cmd[3:5] + ["--train", "5", "--validation", "2", "--test", "2"]) == 0
  default = task.write_task(tmp_path / "default", train=5, validation=2, test=2)
  for name in FILES:
    assert filecmp.cmp(tmp_path / "cli" / name, default[name.split(".")[0]], shallow=False), name
  assert task_cli.main(["--out_dir", str(tmp_path / "x"), "stray"]) == 1
  assert task_cli.main(["--help"]) == 0
