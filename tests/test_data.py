"""Tests for llada_jax.data: tokenizer, pipelines, validation, ArrayRecord."""

import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from llada_jax.data import (
    DataError,
    SentencePieceTokenizer,
    batch_spec,
    check_vocab,
    make_dataset,
    make_pipeline,
    make_source,
    train_sentencepiece,
    write_array_record,
)
from llada_jax import tokenizer as tokenizer_cli

WORDS = ("the a cat dog runs jumps over under big small red blue green seven eleven "
         "é naïve 数据 模型 😀 café 42 1999 hello world, mask diffusion model.").split()


def _sentence(rng, lo=3, hi=20):
  return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return str(path)


def _write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("corpus")
  rng = random.Random(0)
  paragraphs = ["\n".join(_sentence(rng) for _ in range(rng.randint(1, 3))) for _ in range(300)]
  text = _write(d / "a.txt", "\n\n".join(paragraphs) + "\n")
  docs = [{"text": _sentence(rng, 5, 60)} for _ in range(200)]
  jsonl = _write_jsonl(d / "b.jsonl", docs)
  return {"dir": d, "text": text, "jsonl": jsonl, "paragraphs": paragraphs,
          "docs": [x["text"] for x in docs]}


@pytest.fixture(scope="module")
def tok(corpus):
  return train_sentencepiece([corpus["text"], corpus["jsonl"]], corpus["dir"] / "tok" / "sp",
                             vocab_size=512)


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
  rng = random.Random(1)
  rows = [{"prompt": _sentence(rng, 1, 8), "response": _sentence(rng, 1, 10)} for _ in range(10)]
  # One dialogue with two assistant turns gives examples 10 and 11.
  rows.append({"messages": [
      {"role": "user", "content": "hello cat"},
      {"role": "assistant", "content": "hello dog"},
      {"role": "user", "content": "big red"},
      {"role": "assistant", "content": "small blue"},
  ]})
  return _write_jsonl(tmp_path_factory.mktemp("sft") / "sft.jsonl", rows), rows


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory):
  rng = random.Random(2)
  rows = [{"prompt": _sentence(rng, 1, 8), "chosen": _sentence(rng, 1, 10),
           "rejected": _sentence(rng, 1, 10)} for _ in range(12)]
  return _write_jsonl(tmp_path_factory.mktemp("pref") / "pref.jsonl", rows), rows


def _kw(**overrides):
  kw = dict(seq_len=64, per_process_batch_size=2, seed=0, num_epochs=1, process_index=0,
            process_count=1, read_threads=1)
  kw.update(overrides)
  return kw


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ------------------------------------------------------------------------------ tokenizer.

def test_special_ids_fixed_and_distinct(tok):
  ids = tok.special_ids
  assert ids == {"mask": 3, "eos": 2, "bos": 1, "eot": 6, "start_header": 4, "end_header": 5}
  assert len(set(ids.values())) == len(ids)
  assert tok.pad_id == tok.eos_id
  assert all(i < tok.vocab_size for i in ids.values())
  reloaded = SentencePieceTokenizer(tok.model_path)
  assert reloaded.special_ids == ids and reloaded.vocab_size == tok.vocab_size


@pytest.mark.parametrize("text", [
    "hello world", "  two  spaces\n\nand newlines\n", "数据 模型 😀 ☃ unseen ÿ", "tabs\tand\r\n",
])
def test_round_trip(tok, text):
  ids = tok.encode(text)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text


def test_special_text_is_not_special(tok):
  ids = tok.encode("<|mdm_mask|> <|eot_id|> <|endoftext|>")
  assert not set(ids) & set(tok.special_ids.values())
  assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id]) == "hi"
  assert tok.decode([*tok.encode("hi"), tok.eos_id], skip_special=False) == "hi<|endoftext|>"
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([tok.vocab_size])


def test_chat_template(tok):
  ids = tok.chat_prompt("red cat")
  expected = ([tok.bos_id, tok.start_header_id] + tok.encode("user") + [tok.end_header_id]
              + tok.encode("\n\nred cat") + [tok.eot_id, tok.start_header_id]
              + tok.encode("assistant") + [tok.end_header_id] + tok.encode("\n\n"))
  assert ids == expected
  assert [ids.count(i) for i in (tok.bos_id, tok.start_header_id, tok.end_header_id,
                                 tok.eot_id)] == [1, 2, 2, 1]
  assert tok.decode(ids, skip_special=False) == (
      "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nred cat<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_check_vocab(tok):
  check_vocab(tok, tok.vocab_size)
  check_vocab(tok, tok.vocab_size + 100)
  with pytest.raises(ValueError) as e:
    check_vocab(tok, tok.vocab_size - 1)
  assert str(tok.vocab_size) in str(e.value) and str(tok.vocab_size - 1) in str(e.value)


def test_load_rejects_model_without_specials(tmp_path, corpus):
  import sentencepiece as spm
  spm.SentencePieceTrainer.Train(input=corpus["text"], model_prefix=str(tmp_path / "plain"),
                                 vocab_size=60, hard_vocab_limit=False,
                                 minloglevel=2)
  with pytest.raises(DataError, match="plain.model.*special token"):
    SentencePieceTokenizer(tmp_path / "plain.model")
  with pytest.raises(DataError, match="not found"):
    SentencePieceTokenizer(tmp_path / "missing.model")


def test_cli_train(tmp_path, corpus):
  sft = _write_jsonl(tmp_path / "sft.jsonl", [
      {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
  rc = tokenizer_cli.main(["train", "--input", corpus["text"], "--input", corpus["jsonl"],
                           "--input", sft, "--model_prefix", str(tmp_path / "out" / "tok"),
                           "--vocab_size", "400", "--model_type", "unigram"])
  assert rc == 0
  tok = SentencePieceTokenizer(tmp_path / "out" / "tok.model")
  assert tok.decode(tok.encode("hello world")) == "hello world"


def test_cli_errors_are_one_line(tmp_path, corpus, capsys):
  args = ["--input", corpus["text"], "--model_prefix", str(tmp_path / "tok"), "--vocab_size", "320"]
  assert tokenizer_cli.main(args) == 1  # no command
  assert capsys.readouterr().err.startswith("error: expected the command train")
  assert tokenizer_cli.main(["train", *args[:-1], "10"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: vocab_size 10 is too small") and err.count("\n") == 1
  assert tokenizer_cli.main(["train", "--model_prefix", str(tmp_path / "tok"), "--vocab_size", "320"]) == 1
  assert "--input" in capsys.readouterr().err
  assert tokenizer_cli.main(["--help"]) == 0
  assert "--model_prefix" in capsys.readouterr().out


def test_cli_module_entry_point(tmp_path, corpus):
  out = subprocess.run(
      [sys.executable, "-m", "llada_jax.tokenizer", "train", "--input", corpus["text"],
       "--model_prefix", str(tmp_path / "tok"), "--vocab_size", "320"],
      capture_output=True, text=True, timeout=60,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr
  assert os.path.exists(tmp_path / "tok.model")


# ---------------------------------------------------------------------------- pretraining.

def _expected_stream(tok, documents):
  return np.concatenate([tok.encode(d) + [tok.eos_id] for d in documents]).astype(np.int32)


def test_pretrain_rows_are_the_document_stream(tok, corpus):
  seq_len = 32
  stream = _expected_stream(tok, corpus["paragraphs"] + corpus["docs"])
  n_rows = len(stream) // seq_len
  it = make_pipeline("pretrain", [corpus["text"], corpus["jsonl"]], tok,
                     **_kw(seq_len=seq_len, per_process_batch_size=1, shuffle=False))
  rows = [b["tokens"] for b in it]
  assert len(rows) == n_rows
  assert all(r.shape == (1, seq_len) and r.dtype == np.int32 for r in rows)
  np.testing.assert_array_equal(np.concatenate(rows, axis=1)[0], stream[:n_rows * seq_len])


def test_pretrain_shapes_determinism_and_seed(tok, corpus):
  files = [corpus["text"], corpus["jsonl"]]
  a = list(make_pipeline("pretrain", files, tok, **_kw(per_process_batch_size=4)))
  b = list(make_pipeline("pretrain", files, tok, **_kw(per_process_batch_size=4)))
  c = list(make_pipeline("pretrain", files, tok, **_kw(per_process_batch_size=4, seed=1)))
  _assert_batches_equal(a, b)
  assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
  spec = batch_spec("pretrain", 4, 64)
  for batch in a:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec


def test_pretrain_processes_are_disjoint(tok, corpus):
  files = [corpus["text"]]
  source = make_source("pretrain", files, tok, seq_len=64)
  all_rows = {source[i]["tokens"].tobytes() for i in range(len(source))}
  per_process = []
  for p in range(3):
    it = make_pipeline("pretrain", files, tok, **_kw(process_index=p, process_count=3))
    per_process.append([r.tobytes() for b in it for r in b["tokens"]])
  assert len({len(rows) for rows in per_process}) == 1  # same number of steps everywhere
  seen = [set(rows) for rows in per_process]
  assert sum(len(s) for s in seen) == sum(len(rows) for rows in per_process)
  assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
  union = set().union(*seen)
  assert union <= all_rows and len(union) == len(source) - len(source) % 6


def test_pretrain_pretokenized_jsonl(tmp_path, tok):
  path = _write_jsonl(tmp_path / "ids.jsonl", [{"tokens": [10, 11, 12]}, {"text": "cat"}])
  source = make_source("pretrain", path, tok, seq_len=4)
  expected = [10, 11, 12, tok.eos_id] + tok.encode("cat") + [tok.eos_id]
  assert len(source) == len(expected) // 4
  np.testing.assert_array_equal(source[0]["tokens"], expected[:4])


# ------------------------------------------------------------------------------------ SFT.

def test_sft_format(tok, sft_file):
  path, rows = sft_file
  batches = list(make_pipeline("sft", path, tok, **_kw(shuffle=False)))
  assert len(batches) == 6  # 12 examples: 10 pairs + a dialogue with 2 assistant turns
  spec = batch_spec("sft", 2, 64)
  for b in batches:
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == spec
  examples = {int(i): (t, int(p)) for b in batches
              for t, p, i in zip(b["tokens"], b["prompt_lengths"], b["example_id"])}
  assert sorted(examples) == list(range(12))
  for i, row in enumerate(rows[:10]):
    tokens, prompt_len = examples[i]
    prompt = tok.chat_prompt(row["prompt"])
    answer = tok.encode(row["response"]) + [tok.eos_id]
    assert prompt_len == len(prompt)
    assert tokens[:prompt_len].tolist() == prompt
    assert tokens[prompt_len:prompt_len + len(answer)].tolist() == answer
    assert (tokens[prompt_len + len(answer):] == tok.eos_id).all()
  messages = rows[10]["messages"]
  for example_id, turn in ((10, 1), (11, 3)):
    tokens, prompt_len = examples[example_id]
    assert tokens[:prompt_len].tolist() == tok.encode_chat(messages[:turn])
    answer = tok.encode(messages[turn]["content"]) + [tok.eos_id]
    assert tokens[prompt_len:prompt_len + len(answer)].tolist() == answer


def test_sft_without_chat_template(tok, sft_file):
  path, rows = sft_file
  # The two-turn dialogue cannot be written without the template.
  single = _write_jsonl(os.path.join(os.path.dirname(path), "single.jsonl"), rows[:10])
  source = make_source("sft", single, tok, seq_len=64, chat_template=False)
  example = source[3]
  prompt = tok.encode(rows[3]["prompt"])
  assert int(example["prompt_lengths"]) == len(prompt)
  assert example["tokens"][:len(prompt)].tolist() == prompt
  with pytest.raises(DataError, match="line 11, field 'messages'.*chat_template=True"):
    make_source("sft", path, tok, seq_len=64, chat_template=False)


def test_sft_processes_partition_each_epoch(tok, sft_file):
  path, _ = sft_file
  ids = []
  for p in range(3):
    it = make_pipeline("sft", path, tok, **_kw(process_index=p, process_count=3, num_epochs=2))
    ids.append([b["example_id"].tolist() for b in it])
  assert [len(x) for x in ids] == [4, 4, 4]  # 2 epochs x 12 examples / (3 processes x 2)
  for epoch in range(2):
    parts = [sum(x[2 * epoch:2 * epoch + 2], []) for x in ids]
    assert sorted(sum(parts, [])) == list(range(12))
  first = sum((sum(x[:2], []) for x in ids), [])
  second = sum((sum(x[2:], []) for x in ids), [])
  assert first != second  # a new permutation each epoch


def test_sft_epochs_and_stop(tok, sft_file):
  path, _ = sft_file
  it = make_pipeline("sft", path, tok, **_kw(per_process_batch_size=4, num_epochs=2))
  batches = list(it)
  assert len(batches) == 6
  epoch = [sorted(np.concatenate([b["example_id"] for b in batches[i:i + 3]]).tolist())
           for i in (0, 3)]
  assert epoch == [list(range(12))] * 2
  with pytest.raises(StopIteration):
    next(it)


@pytest.mark.parametrize("kind, path_fixture", [
    ("pretrain", None), ("sft", "sft_file"), ("preference", "pref_file")])
def test_resume_is_exact(request, tok, corpus, kind, path_fixture):
  path = corpus["text"] if path_fixture is None else request.getfixturevalue(path_fixture)[0]
  kw = _kw(num_epochs=None, per_process_batch_size=5, process_index=1, process_count=2,
           read_threads=2)
  it = make_pipeline(kind, path, tok, **kw)
  _take(it, 3)
  state = it.get_state()
  state = json.loads(json.dumps(state))  # how grain.checkpoint stores it
  expected = _take(it, 7)  # runs across epoch boundaries for the small files
  fresh = make_pipeline(kind, path, tok, **kw)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 7), expected)


def test_resume_through_grain_checkpoint(tmp_path, tok, sft_file):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain
  path, _ = sft_file
  it = make_pipeline("sft", path, tok, **_kw(num_epochs=None))
  _take(it, 5)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = _take(it, 4)
    fresh = make_pipeline("sft", path, tok, **_kw(num_epochs=None))
    manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_batches_equal(_take(fresh, 4), expected)


def _too_long_file(tmp_path):
  return _write_jsonl(tmp_path / "long.jsonl", [
      {"prompt": "cat", "response": "dog"},
      {"prompt": "cat", "response": "big red dog " * 20},
      {"prompt": "red", "response": "blue"},
  ])


def test_sft_too_long_policies(tmp_path, tok):
  path = _too_long_file(tmp_path)
  seq_len = 40
  with pytest.raises(DataError, match=r"line 2, field 'response'.*seq_len 40"):
    make_source("sft", path, tok, seq_len=seq_len)
  skipped = make_source("sft", path, tok, seq_len=seq_len, on_too_long="skip")
  assert len(skipped) == 2 and [int(skipped[i]["example_id"]) for i in range(2)] == [0, 2]
  truncated = make_source("sft", path, tok, seq_len=seq_len, on_too_long="truncate")
  example = truncated[1]
  prompt = tok.chat_prompt("cat")
  assert example["tokens"][:len(prompt)].tolist() == prompt
  answer = tok.encode("big red dog " * 20)
  assert example["tokens"][len(prompt):].tolist() == answer[:seq_len - len(prompt)]


# ---------------------------------------------------------------------------- preferences.

def test_preference_format(tok, pref_file):
  path, rows = pref_file
  batches = list(make_pipeline("preference", path, tok, **_kw(per_process_batch_size=3)))
  spec = batch_spec("preference", 3, 64)
  seen = set()
  for b in batches:
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == spec
    for j, example_id in enumerate(b["example_id"].tolist()):
      seen.add(example_id)
      row = rows[example_id]
      prompt = tok.chat_prompt(row["prompt"])
      assert b["prompt_lengths"][j] == len(prompt)
      for name in ("chosen", "rejected"):
        tokens, length = b[name][j], b[f"{name}_lengths"][j]
        valid = prompt + tok.encode(row[name]) + [tok.eos_id]
        assert length == len(valid)
        assert tokens[:length].tolist() == valid
        assert (tokens[length:] == tok.eos_id).all()
  assert seen == set(range(12))


def test_preference_processes_disjoint(tok, pref_file):
  path, _ = pref_file
  ids = [[i for b in make_pipeline("preference", path, tok,
                                   **_kw(process_index=p, process_count=2, per_process_batch_size=3))
          for i in b["example_id"].tolist()] for p in range(2)]
  assert not set(ids[0]) & set(ids[1]) and sorted(ids[0] + ids[1]) == list(range(12))


def test_preference_too_long(tmp_path, tok):
  path = _write_jsonl(tmp_path / "p.jsonl", [
      {"prompt": "cat", "chosen": "dog", "rejected": "red"},
      {"prompt": "cat", "chosen": "dog", "rejected": "big red dog " * 20}])
  with pytest.raises(DataError, match=r"p.jsonl, line 2, field 'rejected'"):
    make_source("preference", path, tok, seq_len=40)
  truncated = make_source("preference", path, tok, seq_len=40, on_too_long="truncate")
  assert int(truncated[1]["rejected_lengths"]) == 40
  assert int(truncated[1]["chosen_lengths"]) < 40


# ------------------------------------------------------------------------------ bad data.

BAD_JSONL = [
    # kind, line 2 content (bytes), expected pattern after "line 2"
    ("sft", b'{"prompt": "a", "response": ', r"line 2: malformed JSON"),
    ("sft", b'["prompt", "response"]', r"line 2: expected a JSON object"),
    ("sft", b'{"prompt": "a"}', r"line 2, field 'response': missing"),
    ("sft", b'{"response": "a"}', r"line 2, field 'prompt': missing"),
    ("sft", b'{"prompt": "", "response": "b"}', r"line 2, field 'prompt': empty"),
    ("sft", b'{"prompt": 3, "response": "b"}', r"line 2, field 'prompt': expected a non-empty "
     r"string, got int"),
    ("sft", b'{"prompt": "a", "response": "b\xff\xfec"}',
     r"line 2, field 'response': text is not valid UTF-8 \(byte 0xff"),
    ("sft", b'{"prompt": "a", "response": "\\ud800"}',
     r"line 2, field 'response': text is not valid UTF-8"),
    ("sft", b'{"prompt": "cat " , "response": "' + b"dog " * 40 + b'"}',
     r"line 2, field 'response': prompt \(\d+\) \+ answer"),
    ("sft", b'{"prompt": "' + b"cat " * 40 + b'", "response": "dog"}',
     r"line 2, field 'prompt': prompt is \d+ tokens; expected fewer than seq_len 32"),
    ("sft", b'{"messages": [{"role": "bot", "content": "x"}]}',
     r"line 2, field 'messages\[0\].role': role 'bot'; expected one of"),
    ("sft", b'{"messages": [{"role": "user", "content": "x"}]}',
     r"line 2, field 'messages': no assistant turn"),
    ("sft", b'{"messages": [{"role": "user", "content": ["x"]}]}',
     r"line 2, field 'messages\[0\].content': expected a non-empty string, got list"),
    ("sft", b'{"messages": "hi"}', r"line 2, field 'messages': expected a non-empty list"),
    ("preference", b'{"prompt": "a", "chosen": "b"}', r"line 2, field 'rejected': missing"),
    ("preference", b'{"prompt": "a", "chosen": null, "rejected": "c"}',
     r"line 2, field 'chosen': expected a non-empty string, got NoneType"),
    ("pretrain", b'{"txt": "a"}', r"line 2, field 'text': missing"),
    ("pretrain", b'{"text": "a\xc3"}', r"line 2, field 'text': text is not valid UTF-8"),
    ("pretrain", b'{"tokens": [10, 99999]}',
     r"line 2, field 'tokens': token id 99999 at position 1 is outside the vocabulary"),
    ("pretrain", b'{"tokens": [10, 3]}', r"line 2, field 'tokens': token id 3 .* mask token"),
    ("pretrain", b'{"tokens": [10, "a"]}', r"line 2, field 'tokens': element 1 is str"),
]


@pytest.mark.parametrize("kind, line, pattern", BAD_JSONL)
def test_bad_jsonl_is_located(tmp_path, tok, kind, line, pattern):
  good = {"sft": b'{"prompt": "a", "response": "b"}',
          "preference": b'{"prompt": "a", "chosen": "b", "rejected": "c"}',
          "pretrain": b'{"text": "a b c"}'}[kind]
  path = tmp_path / "bad.jsonl"
  path.write_bytes(good + b"\n" + line + b"\n" + good + b"\n")
  with pytest.raises(DataError, match=f"^{re.escape(str(path))}, {pattern}"):
    make_dataset(kind, str(path), tok, **_kw(seq_len=32, per_process_batch_size=1))


def test_bad_utf8_in_text_file(tmp_path, tok):
  path = tmp_path / "bad.txt"
  path.write_bytes(b"good text\n\nmore\nbad \xff here\n")
  with pytest.raises(DataError, match=f"^{re.escape(str(path))}, line 4, field 'text': text is "
                     r"not valid UTF-8 \(byte 0xff at byte column 5\)"):
    make_source("pretrain", str(path), tok, seq_len=8)


def test_missing_files_and_wrong_format(tmp_path, tok, corpus):
  with pytest.raises(DataError, match="nope.jsonl: file not found"):
    make_source("sft", tmp_path / "nope.jsonl", tok, seq_len=8)
  with pytest.raises(DataError, match=r"nope\*.jsonl: no file matches"):
    make_source("sft", str(tmp_path / "nope*.jsonl"), tok, seq_len=8)
  with pytest.raises(DataError, match="a.txt: sft data must be JSONL"):
    make_source("sft", corpus["text"], tok, seq_len=8)
  with pytest.raises(ValueError, match="unknown pipeline kind"):
    make_source("rlhf", corpus["text"], tok, seq_len=8)


def test_too_little_data_for_a_batch(tmp_path, tok):
  path = _write_jsonl(tmp_path / "one.jsonl", [{"prompt": "a", "response": "b"}])
  with pytest.raises(DataError, match="cannot fill one global batch of 4"):
    make_dataset("sft", path, tok, **_kw(per_process_batch_size=2, process_count=2))


# ---------------------------------------------------------------------------- ArrayRecord.

def test_array_record_round_trip(tmp_path, tok, corpus):
  files = [corpus["text"], corpus["jsonl"]]
  out = tmp_path / "corpus.array_record"
  stats = write_array_record(files, out, tok, chunk_len=50)
  stream = _expected_stream(tok, corpus["paragraphs"] + corpus["docs"])
  assert stats["tokens"] == len(stream) and stats["records"] == -(-len(stream) // 50)
  assert stats["documents"] == len(corpus["paragraphs"]) + len(corpus["docs"])
  # Rows of any length, cut across records, equal the text pipeline's rows.
  for seq_len in (37, 64, 120):
    from_records = make_source("pretrain", str(out), tok, seq_len=seq_len)
    from_text = make_source("pretrain", files, tok, seq_len=seq_len)
    assert len(from_records) == len(from_text) == len(stream) // seq_len
    for i in range(len(from_text)):
      np.testing.assert_array_equal(from_records[i]["tokens"], from_text[i]["tokens"])
  with pytest.raises(FileExistsError):
    write_array_record(files, out, tok)
  kw = _kw(num_epochs=None, per_process_batch_size=3)
  it = make_pipeline("pretrain", [str(out), corpus["text"]], tok, **kw)
  _take(it, 2)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = make_pipeline("pretrain", [str(out), corpus["text"]], tok, **kw)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 3), expected)


def _raw_array_record(path, records):
  from array_record.python import array_record_module
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for r in records:
    writer.write(r)
  writer.close()
  return str(path)


def test_array_record_bad_ids_named_by_record(tmp_path, tok):
  chunks = [np.arange(10, 20, dtype="<i4") + k for k in range(5)]
  chunks[3][4] = tok.vocab_size + 7
  path = _raw_array_record(tmp_path / "bad.array_record", [c.tobytes() for c in chunks])
  it = make_pipeline("pretrain", path, tok, **_kw(seq_len=8, per_process_batch_size=1))
  with pytest.raises(DataError, match=f"^{re.escape(path)}, record 3, field 'tokens': token id "
                     f"{tok.vocab_size + 7} at position 4 is outside the vocabulary"):
    list(it)
  odd = _raw_array_record(tmp_path / "odd.array_record", [b"\x01\x00\x00\x00\x02"])
  with pytest.raises(DataError,
                     match=f"^{re.escape(odd)}, record 0, field 'tokens': record of 5 bytes"):
    make_source("pretrain", odd, tok, seq_len=8)


def test_default_process_from_jax(tok, sft_file):
  pipeline = make_dataset("sft", sft_file[0], tok, seq_len=64, per_process_batch_size=2, seed=0)
  assert (pipeline.process_index, pipeline.process_count) == (0, 1)
  assert pipeline.num_examples == 12 and pipeline.num_batches is None
  assert pipeline.steps_per_epoch == 6


def test_train_reports_bad_utf8(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b'{"text": "fine"}\n{"messages": [{"role": "user", "content": "x\xff"}]}\n')
  with pytest.raises(DataError, match=r"line 2, field 'messages\[0\].content': text is not valid"):
    train_sentencepiece([str(path)], tmp_path / "tok", vocab_size=300)
