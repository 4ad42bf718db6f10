"""Tests for packed rows (llada_jax.data.packing through make_dataset/make_pipeline).

Packed rows are taken apart again (segments from tokens + segment ids) and each segment is matched,
by example_id, to what the unpacked pipeline gives for that example.
"""

import json
import logging
import re

import grain
import numpy as np
import pytest

from llada_jax.data import (DataError, batch_spec, batch_stats, make_dataset, make_pipeline, make_source,
                            write_array_record)
from llada_jax.data import tokenizer as tok_lib
from tests.test_convert import build_tokenizer

WORDS = "the cat sat on a mat what is seven plus five hello world apples buys more".split()
SEQ_LEN = 96
MAX_SEGMENTS = 4


def _text(rng, lo, hi):
  return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi + 1))))


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tok_lib.load_tokenizer(build_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("packing")
  rng = np.random.default_rng(0)
  sft = [{"prompt": _text(rng, 1, 3), "response": _text(rng, 1, 12)} for _ in range(30)]
  sft.append({"messages": [{"role": "user", "content": "hello cat"}, {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "seven"}, {"role": "assistant", "content": "plus five"}]})
  pref = [{"prompt": _text(rng, 1, 3), "chosen": _text(rng, 1, 10), "rejected": "no " + _text(rng, 1, 10)}
          for _ in range(30)]
  documents = [_text(rng, 1, 20) for _ in range(30)]
  documents[7] = " ".join(["hello world apples"] * 40)  # far longer than a row: cut into pieces
  text = d / "docs.txt"
  text.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
  return {"sft": _write_jsonl(d / "sft.jsonl", sft), "preference": _write_jsonl(d / "pref.jsonl", pref),
          "pretrain": str(text), "documents": documents, "dir": d}


def _kw(**overrides):
  kw = dict(seq_len=SEQ_LEN, per_process_batch_size=1, seed=0, num_epochs=1, process_index=0, process_count=1,
            read_threads=1, packing=True, max_segments=MAX_SEGMENTS, packing_bins=4)
  kw.update(overrides)
  return kw


def _take(it, n):
  return [next(it) for _ in range(n)]


def _segments(tokens, segment_ids, eos_id):
  """The segments of one packed row, checked: contiguous from 0, ids 1..k in order, padding EOS/0."""
  used = int(np.count_nonzero(segment_ids))
  assert (segment_ids[used:] == 0).all() and (tokens[used:] == eos_id).all()
  ids = segment_ids[:used]
  assert ids[0] == 1 and set(np.diff(ids).tolist()) <= {0, 1}
  bounds = np.flatnonzero(np.diff(ids)) + 1
  return [s.tolist() for s in np.split(tokens[:used], bounds)]


def _packed_examples(batches, kind, eos_id):
  """example_id -> segment(s) and prompt length, from packed batches; each id must appear once."""
  seen = {}
  names = ("chosen", "rejected") if kind == "preference" else ("tokens",)
  for batch in batches:
    for r in range(len(batch["example_id"])):
      ids = batch["example_id"][r]
      k = int(np.count_nonzero(ids >= 0))
      assert (ids[k:] == -1).all()
      segs = {}
      for name in names:
        seg_key = "segment_ids" if name == "tokens" else f"{name}_segment_ids"
        segs[name] = _segments(batch[name][r], batch[seg_key][r], eos_id)
        assert len(segs[name]) == k  # lockstep: as many chosen as rejected segments, slot s = id s + 1
      prompts = batch["prompt_lengths"][r] if kind != "pretrain" else np.zeros(MAX_SEGMENTS, np.int32)
      assert (prompts[k:] == 0).all()
      for s in range(k):
        example_id = int(ids[s])
        assert example_id not in seen, f"example {example_id} packed twice"
        seen[example_id] = ({name: segs[name][s] for name in names}, int(prompts[s]))
  return seen


def _unpacked_examples(kind, path, tok):
  """example_id -> the unpacked example without its padding, and its prompt length."""
  out = {}
  for b in make_pipeline(kind, path, tok, **_kw(packing=False, shuffle=False)):
    p = int(b["prompt_lengths"][0])
    if kind == "preference":
      out[int(b["example_id"][0])] = ({n: b[n][0, :b[f"{n}_lengths"][0]].tolist() for n in ("chosen", "rejected")}, p)
    else:
      tokens = b["tokens"][0]
      end = p + int(np.flatnonzero(tokens[p:] == tok.eos_id)[0]) + 1  # the answer's EOS
      out[int(b["example_id"][0])] = ({"tokens": tokens[:end].tolist()}, p)
  return out


@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_every_example_once_and_exact(tok, files, kind):
  pipeline = make_dataset(kind, files[kind], tok, **_kw())
  batches = list(pipeline)
  spec = batch_spec(kind, 1, SEQ_LEN, packed=True, max_segments=MAX_SEGMENTS)
  assert all({k: (v.shape, v.dtype) for k, v in b.items()} == spec for b in batches)
  packed = _packed_examples(batches, kind, tok.eos_id)
  assert packed == _unpacked_examples(kind, files[kind], tok)
  assert len(packed) == pipeline.num_examples == pipeline.stats["examples"] == (32 if kind == "sft" else 30)
  assert len(batches) < len(packed) and pipeline.num_batches is None and pipeline.steps_per_epoch is None


def test_pretrain_documents_packed_and_long_ones_split(tok, files):
  pipeline = make_dataset("pretrain", files["pretrain"], tok, **_kw())
  packed = _packed_examples(list(pipeline), "pretrain", tok.eos_id)
  expected = []
  for doc in files["documents"]:
    ids = tok.encode(doc) + [tok.eos_id]
    expected.extend(ids[i:i + SEQ_LEN] for i in range(0, len(ids), SEQ_LEN))
  assert sorted(packed) == list(range(len(expected)))
  assert [packed[i][0]["tokens"] for i in range(len(expected))] == expected
  long_doc = len(tok.encode(files["documents"][7])) + 1
  assert long_doc > 2 * SEQ_LEN
  assert pipeline.stats == {"examples": len(expected), "too_long_skipped": 0, "too_long_truncated": 0,
                            "documents_split": 1, "tokens_dropped": 0}
  # The pieces in order are the unpacked stream: nothing lost, nothing added.
  np.testing.assert_array_equal(make_source("pretrain", files["pretrain"], tok, seq_len=SEQ_LEN).tokens,
                                np.concatenate(expected))


def test_pretrain_packing_refuses_array_record(tok, files, tmp_path):
  records = tmp_path / "docs.array_record"
  write_array_record([files["pretrain"]], records, tok)
  with pytest.raises(DataError) as e:
    make_dataset("pretrain", [files["pretrain"], str(records)], tok, **_kw())
  assert re.fullmatch(re.escape(str(records)) + r": packed pretraining needs document boundaries.*text or JSONL.*",
                      str(e.value))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_too_long_counted(tok, tmp_path, kind, caplog):
  answer = "response" if kind == "sft" else "rejected"
  short = {"prompt": "cat", "response": "dog"} if kind == "sft" else {"prompt": "cat", "chosen": "a", "rejected": "b"}
  path = _write_jsonl(tmp_path / "long.jsonl", [short, {**short, answer: "big red dog " * 40}, short])
  skipped = make_dataset(kind, path, tok, **_kw(on_too_long="skip"))
  assert skipped.stats == {"examples": 2, "too_long_skipped": 1, "too_long_truncated": 0, "documents_split": 0,
                           "tokens_dropped": 0}
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="llada_jax.data.pipelines"):
    truncated = make_dataset(kind, path, tok, **_kw(on_too_long="truncate"))
    make_dataset(kind, path, tok, **_kw(on_too_long="truncate", seq_len=1000))
  assert truncated.stats["too_long_truncated"] == 1 and truncated.stats["examples"] == 3
  assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]  # once per build
  assert "0 skipped, 1 truncated" in caplog.records[0].getMessage()
  packed = _packed_examples(list(truncated), kind, tok.eos_id)
  cut = packed[1][0]["rejected" if kind == "preference" else "tokens"]
  assert sorted(packed) == [0, 1, 2] and len(cut) == SEQ_LEN  # fills its row alone


@pytest.mark.parametrize("kind", ["pretrain", "sft", "preference"])
def test_resume_is_exact(tok, files, kind):
  kw = _kw(num_epochs=None, per_process_batch_size=2, read_threads=2)
  it = make_pipeline(kind, files[kind], tok, **kw)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # how grain.checkpoint stores it
  assert state["next_row"] == 2  # 6 rows: in the middle of a window of 4 packed rows
  expected = _take(it, 3)
  fresh = make_pipeline(kind, files[kind], tok, **kw)
  fresh.set_state(state)
  for a, b in zip(_take(fresh, 3), expected):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_same_rows(tok, files):
  kw = _kw(num_epochs=None, per_process_batch_size=2)
  a, b = (_take(make_pipeline("sft", files["sft"], tok, **kw), 5) for _ in range(2))
  c = _take(make_pipeline("sft", files["sft"], tok, **{**kw, "seed": 1}), 5)
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
  assert not all(np.array_equal(x["example_id"], y["example_id"]) for x, y in zip(a, c))


def test_processes_pack_disjoint_examples(tok, files):
  n, bins = 31, 2
  # Process p reads positions p, p + 2, ... of the shuffled epochs; rows emitted so far hold only
  # examples among the stream's first (seen + one window) elements.
  stream = grain.MapDataset.range(n).shuffle(seed=0).repeat(None)
  seen = []
  for p in range(2):
    it = make_pipeline("sft", files["sft"], tok, **_kw(num_epochs=None, process_index=p, process_count=2,
                                                        packing_bins=bins))
    ids = []
    while len(ids) < 4:
      ids.extend(i for i in next(it)["example_id"][0].tolist() if i >= 0)
    window = len(ids) + bins * MAX_SEGMENTS
    assert window <= 15  # within this process's 15 or 16 positions of the first epoch
    assert set(ids) <= {stream[i] for i in range(p, 2 * window, 2)}
    seen.append(set(ids))
  assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_finite_epochs_with_processes_refused(tok, files):
  with pytest.raises(ValueError, match=r"^num_epochs=2 with packing and 2 processes: .*expected num_epochs=None"):
    make_dataset("sft", files["sft"], tok, **_kw(num_epochs=2, process_count=2))


def test_batch_stats_exact():
  eos = 9
  segment_ids = np.array([[1, 1, 2, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  packed = {"tokens": np.zeros((2, 8)), "segment_ids": segment_ids,
            "prompt_lengths": np.zeros((2, 3)), "example_id": np.array([[4, 0, 7], [2, -1, -1]])}
  assert batch_stats(packed, "sft", True) == {"padding_fraction": 2 / 16, "examples_per_row": 2.0}
  assert batch_stats(packed, "pretrain", True) == {"padding_fraction": 2 / 16, "examples_per_row": 2.0}
  pref = {"chosen_segment_ids": segment_ids, "rejected_segment_ids": np.array([[1, 2, 2, 3, 0, 0, 0, 0]] * 2),
          "example_id": np.array([[4, 0, 7], [2, 3, 5]])}
  assert batch_stats(pref, "dpo", True) == {"padding_fraction": (2 + 8) / 32, "examples_per_row": 3.0}
  # Unpacked SFT: padding starts after the first EOS at or after the prompt (an EOS inside the
  # prompt does not count); a row without one (truncated) has none.
  tokens = np.array([[5, eos, 5, 5, eos, eos, eos, eos], [5, 5, 5, 5, 5, 5, 5, 5]])
  unpacked = {"tokens": tokens, "prompt_lengths": np.array([2, 1]), "example_id": np.array([0, 1])}
  assert batch_stats(unpacked, "sft", False, eos_id=eos) == {"padding_fraction": 3 / 16, "examples_per_row": 1.0}
  with pytest.raises(ValueError, match="needs eos_id"):
    batch_stats(unpacked, "sft", False)
  pairs = {"chosen": tokens, "rejected": tokens, "chosen_lengths": np.array([8, 4]),
           "rejected_lengths": np.array([2, 2])}
  assert batch_stats(pairs, "preference", False) == {"padding_fraction": 16 / 32, "examples_per_row": 1.0}
  assert batch_stats({"tokens": tokens}, "pretrain", False) == {"padding_fraction": 0.0, "examples_per_row": 1.0}


def test_packing_cuts_padding_on_long_tailed_lengths(tok, tmp_path):
  seq_len = 128
  per_word = len(tok.encode(" cat cat cat cat")) / 4
  rng = np.random.default_rng(1)
  # Log-normal answer lengths with a median of a quarter of the row.
  lengths = np.clip(rng.lognormal(np.log(seq_len / 4), 0.6, 200) / per_word, 1, None).astype(int)
  rows = [{"prompt": "q", "response": " ".join(["cat"] * int(n))} for n in lengths]
  path = _write_jsonl(tmp_path / "tail.jsonl", rows)
  kw = _kw(seq_len=seq_len, per_process_batch_size=4, chat_template=False, on_too_long="skip", max_segments=16,
           packing_bins=0)

  def padding(packed):
    pipeline = make_dataset("sft", path, tok, **{**kw, "packing": packed})
    stats = [pipeline.batch_stats(b) for b in pipeline]
    return np.mean([s["padding_fraction"] for s in stats]), np.mean([s["examples_per_row"] for s in stats])

  packed, per_row = padding(True)
  unpacked, _ = padding(False)
  assert packed < 0.25 and unpacked > 0.5 and per_row > 2, (packed, unpacked, per_row)
