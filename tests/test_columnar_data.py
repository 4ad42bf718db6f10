"""Tests of the columnar data formats (llada_jax.data.columnar): Parquet, Arrow and `datasets` directories give
the same examples and batches as the same records in JSONL, resume exactly, and bad input fails in one line."""

import json
import random
import re
import sys

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

from llada_jax.data import DataError, make_pipeline, make_source, train_sentencepiece, write_array_record  # noqa: E402
from llada_jax.data import columnar, readers  # noqa: E402
from llada_jax.data.errors import Record  # noqa: E402

WORDS = "the a cat dog runs jumps over under big small red blue seven eleven café 数据 hello world.".split()
FORMATS = ("parquet", "arrow", "dataset", "dataset_dict")


def _sentence(rng, lo=1, hi=10):
  return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _columns(rows):
  """Column-wise values over the union of the rows' keys (None where a row has no such field)."""
  keys = list(dict.fromkeys(k for row in rows for k in row))
  return {k: [row.get(k) for row in rows] for k in keys}


def _write(directory, name, rows, fmt):
  """The rows as one data file (or directory) of format `fmt`; returns the path to pass."""
  base = directory / name
  if fmt == "jsonl":
    with open(f"{base}.jsonl", "w", encoding="utf-8") as f:
      f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return f"{base}.jsonl"
  if fmt == "parquet":  # row groups of 3 rows: reading must run across them in order
    pq.write_table(pa.table(_columns(rows)), f"{base}.parquet", row_group_size=3)
    return f"{base}.parquet"
  ds = datasets.Dataset.from_dict(_columns(rows))
  if fmt == "arrow":  # the single shard of a saved Dataset, read as a file
    ds.save_to_disk(f"{base}_arrow", num_shards=1)
    return f"{base}_arrow/data-00000-of-00001.arrow"
  if fmt == "dataset":  # two shards: record indices run across them
    ds.save_to_disk(f"{base}_ds", num_shards=2)
    return f"{base}_ds"
  rest = datasets.Dataset.from_dict(_columns(rows[:2]))
  datasets.DatasetDict({"train": ds, "test": rest}).save_to_disk(f"{base}_dd")
  return f"{base}_dd:train"


@pytest.fixture(scope="module", autouse=True)
def quiet_datasets():
  datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("columnar")
  rng = random.Random(0)
  docs = [{"text": _sentence(rng, 3, 40)} for _ in range(40)]
  token_docs = [{"tokens": [rng.randint(10, 200) for _ in range(rng.randint(1, 30))]} for _ in range(20)]
  sft = [{"prompt": _sentence(rng), "response": _sentence(rng)} for _ in range(10)]
  # Dialogues in the same table: their prompt/response columns are null, and theirs messages.
  sft[3:3] = [{"messages": [{"role": "user", "content": "hello cat"}, {"role": "assistant", "content": "hi dog"},
                            {"role": "user", "content": "big red"}, {"role": "assistant", "content": "blue"}]}]
  sft.append({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "seven"},
                           {"role": "assistant", "content": "eleven"}]})
  pref = [{"prompt": _sentence(rng), "chosen": _sentence(rng), "rejected": _sentence(rng)} for _ in range(12)]
  rows = {"pretrain": docs, "tokens": token_docs, "sft": sft, "preference": pref}
  paths = {fmt: {kind: _write(d, f"{kind}_{fmt}", r, fmt) for kind, r in rows.items()}
           for fmt in ("jsonl", *FORMATS)}
  tok = train_sentencepiece([paths["jsonl"]["pretrain"]], d / "tok" / "sp", vocab_size=300)
  return {"dir": d, "paths": paths, "rows": rows, "tok": tok}


def _kw(**overrides):
  kw = dict(seq_len=128, per_process_batch_size=3, seed=0, num_epochs=2, process_index=0, process_count=1,
            read_threads=1)
  kw.update(overrides)
  return kw


def _batches(it):
  return list(it)


def _assert_same_batches(a, b):
  assert len(a) == len(b) and a
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _assert_same_examples(a, b):
  assert len(a) == len(b) and len(a)
  for i in range(len(a)):
    x, y = a[i], b[i]
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=f"{i} {k}")


CASES = [  # kind, rows, packing
    ("pretrain", "pretrain", False),
    ("pretrain", "pretrain", True),
    ("pretrain", "tokens", False),
    ("pretrain", "tokens", True),
    ("sft", "sft", False),
    ("sft", "sft", True),
    ("preference", "preference", False),
    ("preference", "preference", True),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind, rows, packing", CASES)
def test_same_examples_and_batches_as_jsonl(data, fmt, kind, rows, packing):
  tok, paths = data["tok"], data["paths"]
  kw = _kw(packing=packing, max_segments=4)
  expected = make_source(kind, paths["jsonl"][rows], tok, seq_len=kw["seq_len"], packing=packing)
  got = make_source(kind, paths[fmt][rows], tok, seq_len=kw["seq_len"], packing=packing)
  assert got.stats == expected.stats
  _assert_same_examples(got, expected)
  _assert_same_batches(_batches(make_pipeline(kind, paths[fmt][rows], tok, **kw)),
                       _batches(make_pipeline(kind, paths["jsonl"][rows], tok, **kw)))


def test_dialogues_and_prompts_share_a_table(data):
  # 12 prompt/response-or-dialogue rows: the dialogue at record 3 gives two examples (3 and 4).
  source = make_source("sft", data["paths"]["parquet"]["sft"], data["tok"], seq_len=128)
  assert len(source) == 13 and list(source.example_ids) == list(range(13))
  header = data["tok"].encode_chat([{"role": "user", "content": "hello cat"}])
  np.testing.assert_array_equal(source[3]["tokens"][:len(header)], header)


@pytest.mark.parametrize("fmt", ("parquet", "dataset"))
@pytest.mark.parametrize("kind", ("sft", "preference", "pretrain"))
def test_resume_is_exact(data, fmt, kind):
  path = data["paths"][fmt][kind]
  kw = _kw(num_epochs=None, per_process_batch_size=2, process_index=1, process_count=2, read_threads=2,
           seq_len=16 if kind == "pretrain" else 128)
  it = make_pipeline(kind, path, data["tok"], **kw)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as grain.checkpoint stores it
  expected = [next(it) for _ in range(7)]  # runs across epoch boundaries
  fresh = make_pipeline(kind, path, data["tok"], **kw)
  fresh.set_state(state)
  _assert_same_batches([next(fresh) for _ in range(7)], expected)


def test_mixed_formats_in_one_source(data):
  paths, tok = data["paths"], data["tok"]
  mixed = make_source("sft", [paths["jsonl"]["sft"], paths["parquet"]["sft"], paths["dataset"]["sft"]], tok,
                      seq_len=128)
  single = make_source("sft", paths["jsonl"]["sft"], tok, seq_len=128)
  assert len(mixed) == 3 * len(single)
  np.testing.assert_array_equal(mixed[len(single) + 5]["tokens"], single[5]["tokens"])


def test_write_array_record_from_columnar(data, tmp_path):
  tok, paths = data["tok"], data["paths"]
  pytest.importorskip("array_record")
  stats = [write_array_record([paths[fmt]["pretrain"], paths[fmt]["tokens"]], tmp_path / f"{fmt}.array_record",
                              tok, chunk_len=32) for fmt in ("jsonl", "parquet", "dataset")]
  assert stats[0] == stats[1] == stats[2] and stats[0]["documents"] == 60
  contents = {(tmp_path / f"{fmt}.array_record").read_bytes() for fmt in ("jsonl", "parquet", "dataset")}
  assert len(contents) == 1


def test_records_are_read_a_batch_at_a_time(data, monkeypatch):
  monkeypatch.setattr(columnar, "BATCH_ROWS", 4)
  sizes = []
  rows = columnar._rows  # pylint: disable=protected-access
  monkeypatch.setattr(columnar, "_rows", lambda batch: sizes.append(batch.num_rows) or rows(batch))
  records = list(readers.iter_records(data["paths"]["parquet"]["pretrain"]))
  assert [int(r) for r, _ in records] == list(range(40)) and all(isinstance(r, Record) for r, _ in records)
  assert max(sizes) <= 4 and sum(sizes) == 40


def test_split_directory_and_spec_agree(data):
  spec = data["paths"]["dataset_dict"]["sft"]
  directory = spec.replace(":train", "/train")
  assert list(readers.iter_records(spec)) == list(readers.iter_records(directory))


def test_missing_pyarrow_names_the_extra(data, monkeypatch):
  monkeypatch.setitem(sys.modules, "pyarrow", None)
  with pytest.raises(DataError, match=re.escape("pip install llada_jax[data]")):
    make_source("sft", data["paths"]["parquet"]["sft"], data["tok"], seq_len=128)


# ------------------------------------------------------------------------------ bad data.

GOOD = {"sft": {"prompt": "a", "response": "b"}, "preference": {"prompt": "a", "chosen": "b", "rejected": "c"},
        "pretrain": {"text": "a b c"}}


def _parquet(tmp, columns, schema=None):
  path = str(tmp / "bad.parquet")
  pq.write_table(pa.table(columns, schema=schema), path, row_group_size=2)
  return path, path


def _dataset(tmp, rows, num_shards=2):
  datasets.Dataset.from_dict(_columns(rows)).save_to_disk(str(tmp / "ds"), num_shards=num_shards)
  return str(tmp / "ds"), str(tmp / "ds")


def _dataset_dict(tmp, split):
  ds = datasets.Dataset.from_list([GOOD["sft"]] * 2)
  datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp / "dd"))
  return (str(tmp / "dd") + (f":{split}" if split else "")), str(tmp / "dd")


def _raw(tmp, name, content):
  (tmp / name).write_bytes(content)
  return str(tmp / name), str(tmp / name)


def _truncated_parquet(tmp):
  path, _ = _parquet(tmp, {"prompt": ["a"] * 10, "response": ["b"] * 10})
  data = open(path, "rb").read()
  return _raw(tmp, "cut.parquet", data[:len(data) // 2])


def _missing_shard(tmp):
  path, shown = _dataset(tmp, [GOOD["sft"]] * 4)
  (tmp / "ds" / "data-00001-of-00002.arrow").unlink()
  return path, shown


BAD = [  # id, kind, builder(tmp) -> (path passed, path in the message), what follows the path
    ("corrupt parquet", "sft", lambda t: _raw(t, "x.parquet", b"PAR1 not really"), r": cannot read as Parquet \("),
    ("truncated parquet", "sft", _truncated_parquet, r": cannot read as Parquet \("),
    ("empty parquet", "sft", lambda t: _raw(t, "x.parquet", b""), r": is empty; expected a Parquet file"),
    ("empty arrow", "sft", lambda t: _raw(t, "x.arrow", b""), r": is empty; expected an? Arrow file"),
    ("corrupt arrow", "sft", lambda t: _raw(t, "x.arrow", b"\x00" * 64), r": cannot read as Arrow \("),
    ("missing column", "sft", lambda t: _parquet(t, {"prompt": ["a", "b", "c"]}),
     r", record 0, field 'response': missing; expected a non-empty string"),
    ("wrong column type", "sft", lambda t: _parquet(t, {"prompt": [1, 2, 3], "response": ["a", "b", "c"]}),
     r", record 0, field 'prompt': expected a non-empty string, got int"),
    ("null in a row", "preference", lambda t: _parquet(
        t, {"prompt": ["a", "b", "c"], "chosen": ["d", "e", "f"], "rejected": ["g", "h", None]}),
     r", record 2, field 'rejected': missing; expected a non-empty string"),
    ("empty string", "sft", lambda t: _parquet(t, {"prompt": ["a", "b", ""], "response": ["a", "b", "c"]}),
     r", record 2, field 'prompt': empty"),
    ("too long", "sft", lambda t: _parquet(t, {"prompt": ["a", "cat"], "response": ["b", "dog " * 60]}),
     r", record 1, field 'response': prompt \(\d+\) \+ answer"),
    ("bad role across shards", "sft", lambda t: _dataset(t, [GOOD["sft"]] * 3 + [
        {"messages": [{"role": "bot", "content": "x"}]}]),
     r", record 3, field 'messages\[0\].role': role 'bot'"),
    ("token outside vocabulary", "pretrain", lambda t: _parquet(t, {"tokens": [[10, 11], [12, 99999]]}),
     r", record 1, field 'tokens': token id 99999 at position 1 is outside the vocabulary"),
    ("tokens of strings", "pretrain", lambda t: _parquet(t, {"tokens": [["a"]]}),
     r", record 0, field 'tokens': element 0 is str"),
    ("no text column", "pretrain", lambda t: _parquet(t, {"txt": ["a"]}), r", record 0, field 'text': missing"),
    ("DatasetDict without a split", "sft", lambda t: _dataset_dict(t, None),
     r": is a DatasetDict with splits train, test; expected one split, as .*dd:SPLIT"),
    ("unknown split", "sft", lambda t: _dataset_dict(t, "val"), r": unknown split 'val'; expected one of train, test"),
    ("missing shard", "sft", _missing_shard, r": shard data-00001-of-00002.arrow listed in state.json is missing"),
    ("plain directory", "sft", lambda t: (str(t), str(t)), r": is a directory; expected a regular file"),
]


@pytest.mark.parametrize("kind, build, pattern", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_located_line(data, tmp_path, kind, build, pattern):
  path, shown = build(tmp_path)
  with pytest.raises(DataError) as e:
    make_source(kind, path, data["tok"], seq_len=32)
  message = str(e.value)
  assert "\n" not in message
  assert re.match(f"^{re.escape(shown)}{pattern}", message), message
