"""`generate` on token ids: `--input_ids` prompts give the completions of the same prompts as text.

A tiny run written straight to a checkpoint (random weights, as in test_sharded_eval.py); greedy
sampling, so equal prompt ids and key must give equal completion ids.
"""

import json

import pytest

from llada_jax import generate, model as M
from tests import train_fixtures
from tests.test_sharded_eval import _random, _write_run

PROMPTS = ["what is 2 plus 3", "the cat", "one two three four five six"]
COMMON = ["--gen_length", "8", "--block_length", "4", "--batch_size", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(a run with its tokenizer, the same weights in a run whose tokenizer is gone)."""
  root = tmp_path_factory.mktemp("ids")
  corpus = train_fixtures.write_corpus(root / "corpus")
  config = train_fixtures.make_config(corpus, root / "run", "sft")
  params = _random(M.abstract_params(M.ModelConfig.from_dict(config.model)), 0)
  bare = train_fixtures.make_config(corpus, root / "bare", "sft")
  bare.data.tokenizer = str(root / "moved" / "tok.model")
  return _write_run(root / "run", config, params), _write_run(root / "bare", bare, params)


def _lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def _generate(run, out, *args):
  assert generate.main(["--checkpoint", str(run), *COMMON, "--output", str(out), *args]) == 0
  return _lines(out)


def test_token_ids_in_give_the_text_paths_completion_ids(runs, tmp_path):
  run, _ = runs
  texts = _generate(run, tmp_path / "text.jsonl", "--chat_template", *[f"--prompt={p}" for p in PROMPTS])
  with_ids = _generate(run, tmp_path / "text_ids.jsonl", "--chat_template", "--output_ids",
                       *[f"--prompt={p}" for p in PROMPTS])
  assert [{k: r[k] for k in ("prompt", "completion")} for r in with_ids] == texts
  # The chat template's ids, fed back as ids: the same completions, ids and text.
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt_ids": r["prompt_ids"]}) + "\n" for r in with_ids))
  from_ids = _generate(run, tmp_path / "ids.jsonl", "--input_ids", str(tmp_path / "in.jsonl"))
  assert len(from_ids) == len(PROMPTS)
  for got, want in zip(from_ids, with_ids):
    assert got["prompt_ids"] == want["prompt_ids"]
    assert got["completion_ids"] == want["completion_ids"] and got["completion"] == want["completion"]
    assert set(got) == {"prompt_ids", "completion_ids", "prompt", "completion"}
  assert any(r["completion_ids"] for r in from_ids)  # not all empty: the comparison says something


def test_token_ids_need_no_tokenizer(runs, tmp_path):
  run, bare = runs
  (tmp_path / "in.jsonl").write_text(json.dumps({"prompt_ids": [40, 41, 42]}) + "\n")
  with_tok = _generate(run, tmp_path / "a.jsonl", "--input_ids", str(tmp_path / "in.jsonl"))
  ids_only = _generate(bare, tmp_path / "b.jsonl", "--input_ids", str(tmp_path / "in.jsonl"))
  assert set(ids_only[0]) == {"prompt_ids", "completion_ids"} and ids_only[0]["prompt_ids"] == [40, 41, 42]
  # Without the tokenizer only EOS ends a completion (its end-of-turn id is not known).
  assert ids_only[0]["completion_ids"][:len(with_tok[0]["completion_ids"])] == with_tok[0]["completion_ids"]
