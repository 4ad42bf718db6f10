"""Bad data, task and tokenizer files: paths that are not regular files, and preference pairs that state no preference.

A FIFO given as a data file used to block forever in open(); every reader now refuses a path that
is not a regular file before opening it, with a DataError naming the path.
"""

import json
import os
import re

import pytest

from llada_jax import evaluate, generate, tokenizer as tokenizer_cli
from llada_jax.data import DataError, demo_task, make_dataset, make_source, pipelines, readers, write_array_record
from llada_jax.data import tokenizer as tok_lib
from llada_jax.eval import tasks
from tests.test_convert import build_tokenizer
from tests import helpers


@pytest.fixture(autouse=True)
def no_blocking():
  with helpers.fail_if_blocked(60):
    yield


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tok_lib.load_tokenizer(build_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def _not_regular(tmp_path, kind, name):
  """A path `name` under tmp_path that is a `kind` (fifo, directory, device), and the words naming that kind."""
  path = tmp_path / name
  if kind == "fifo":
    os.mkfifo(path)
    return str(path), "is a named pipe (FIFO); expected a regular file"
  if kind == "directory":
    path.mkdir()
    return str(path), "is a directory; expected a regular file"
  if kind == "device":
    return "/dev/null", "is a character device; expected a regular file"
  raise ValueError(kind)


READERS = [
    (lambda p, tok: list(readers.iter_jsonl(p)), "a.jsonl"),
    (lambda p, tok: list(readers.iter_text_documents(p)), "a.txt"),
    (lambda p, tok: make_source("pretrain", p, tok, seq_len=8), "a.txt"),
    (lambda p, tok: make_source("pretrain", p, tok, seq_len=8), "a.array_record"),
    (lambda p, tok: make_source("sft", p, tok, seq_len=8), "a.jsonl"),
    (lambda p, tok: make_source("preference", [p], tok, seq_len=8), "a.jsonl"),
    (lambda p, tok: tasks.load_task("mc", p), "a.jsonl"),
    (lambda p, tok: tasks.load_task("ppl", p), "a.txt"),
    (lambda p, tok: demo_task.read_jsonl(p), "test.jsonl"),
    (lambda p, tok: tok_lib.load_tokenizer(p), "tokenizer.json"),
    (lambda p, tok: tok_lib.load_tokenizer(p), "tok.model"),
    (lambda p, tok: tok_lib.train_sentencepiece([p], os.path.dirname(p) + "/sp", 300), "a.txt"),
]
READER_NAMES = ["iter_jsonl", "iter_text", "pretrain_text", "pretrain_array_record", "sft", "preference", "task_mc",
                "task_ppl", "demo_task", "hf_tokenizer", "sp_tokenizer", "train_tokenizer"]


@pytest.mark.parametrize("reader,name,kind", [
    pytest.param(reader, name, kind, id=f"{label}-{kind}")
    for (reader, name), label in zip(READERS, READER_NAMES) for kind in ("fifo", "directory", "device")
    if not (kind == "directory" and label in ("hf_tokenizer", "sp_tokenizer"))])  # load_tokenizer takes a directory
def test_readers_refuse_what_is_not_a_regular_file(tmp_path, tok, reader, name, kind):
  path, words = _not_regular(tmp_path, kind, name)
  with pytest.raises(DataError, match="^" + re.escape(f"{path}: {words}")):
    reader(path, tok)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_glob_matches_must_be_regular_files(tmp_path, kind):
  (tmp_path / "a-1.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
  path, words = _not_regular(tmp_path, kind, "a-2.jsonl")
  with pytest.raises(DataError, match=re.escape(f"{path}: {words}")):
    pipelines.expand_files(str(tmp_path / "a-*.jsonl"))


def test_tokenizer_directory_whose_tokenizer_json_is_a_fifo(tmp_path):
  os.mkfifo(tmp_path / "tokenizer.json")
  with pytest.raises(DataError, match="tokenizer.json: is a named pipe"):
    tok_lib.load_tokenizer(tmp_path)


def test_missing_files_still_read_as_not_found(tmp_path):
  with pytest.raises(DataError, match="nope.jsonl: file not found; expected an existing data file"):
    list(readers.iter_jsonl(tmp_path / "nope.jsonl"))
  (tmp_path / "f").write_text("x")
  with pytest.raises(DataError, match=r"f/x.jsonl: cannot be read \(Not a directory\)"):
    list(readers.iter_jsonl(tmp_path / "f" / "x.jsonl"))


def test_remote_paths_go_through_epath(monkeypatch):
  seen = []

  class FakePath:
    def __init__(self, path):
      seen.append(path)

    def is_file(self):
      return True

  monkeypatch.setattr(readers.epath, "Path", FakePath)
  readers.check_exists("gs://bucket/train.jsonl")
  assert seen == ["gs://bucket/train.jsonl"]


def _one_line_error(capsys, rc, needle):
  err = capsys.readouterr().err
  assert rc == 1 and "Traceback" not in err and err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("tool", ["evaluate", "generate", "generate_tokenizer", "tokenizer"])
def test_tools_refuse_a_fifo_in_one_line(tmp_path, capsys, tool):
  fifo = tmp_path / "data.jsonl"
  os.mkfifo(fifo)
  needle = f"{fifo}: is a named pipe (FIFO); expected a regular file"
  if tool == "evaluate":
    rc = evaluate.main(["--checkpoint", str(tmp_path), "--task", "mc", "--data", str(fifo)])
  elif tool == "generate":
    rc = generate.main(["--checkpoint", str(tmp_path), "--input", str(fifo)])
  elif tool == "generate_tokenizer":
    # The tokenizer is loaded after the model: a real run directory is needed to get that far.
    from llada_jax import convert
    from tests.test_convert import hf_config, hf_tensors, write_hf_dir

    config = hf_config()
    hf = write_hf_dir(tmp_path / "hf", config, hf_tensors(config))
    assert convert.main(["import", str(hf), str(tmp_path / "run")]) == 0
    capsys.readouterr()
    os.remove(fifo)
    fifo = tmp_path / "tokenizer.json"
    os.mkfifo(fifo)
    needle = f"{fifo}: is a named pipe (FIFO); expected a regular file"
    rc = generate.main(["--checkpoint", str(tmp_path / "run"), "--prompt", "hi", "--tokenizer", str(fifo)])
  else:
    rc = tokenizer_cli.main(["train", "--input", str(fifo), "--model_prefix", str(tmp_path / "tok"),
                             "--vocab_size", "300"])
  _one_line_error(capsys, rc, needle)


# --------------------------------------------------------------------------------------------
# Preference pairs


@pytest.mark.parametrize("pair,ok", [
    ({"chosen": "the cat", "rejected": "the cat"}, False),
    ({"chosen": "the cat", "rejected": "the cat "}, True),  # differ by a space: still two answers
    ({"chosen": "the cat", "rejected": "the dog"}, True),
])
def test_identical_chosen_and_rejected_are_refused(tmp_path, tok, pair, ok):
  path = tmp_path / "pairs.jsonl"
  rows = [{"prompt": "which", "chosen": "a", "rejected": "b"}, {"prompt": "which", **pair}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  if ok:
    assert len(make_source("preference", str(path), tok, seq_len=32)) == 2
    return
  with pytest.raises(DataError, match=f"^{path}, line 2, field 'rejected': chosen and rejected are identical; "
                                      "expected two different answers$"):
    make_source("preference", str(path), tok, seq_len=32)


# --------------------------------------------------------------------------------------------
# Packing arguments

PACKING_REFUSALS = [
    # id, make_dataset keywords, data file, error, message ({path}: the data file)
    ("array_record", {}, "array_record", DataError,
     "{path}: packed pretraining needs document boundaries, which an ArrayRecord token stream does not keep; "
     "expected text or JSONL files, or Parquet, Arrow or datasets tables (or packing=False)"),
    ("max_segments_0", {"max_segments": 0}, "text", ValueError,
     "max_segments must be at least 1 (examples per packed row), got 0"),
    ("packing_bins_negative", {"packing_bins": -1}, "text", ValueError,
     "packing_bins must be 0 (automatic) or positive, got -1"),
    ("finite_epochs_two_processes", {"num_epochs": 1, "process_count": 2}, "text", ValueError,
     "num_epochs=1 with packing and 2 processes: each process packs its own examples, so the processes would "
     "disagree on the number of steps; expected num_epochs=None (packed data repeats forever; the run length is "
     "set by the steps)"),
]


@pytest.mark.parametrize("keywords,data,error,message", [pytest.param(*row[1:], id=row[0]) for row in PACKING_REFUSALS])
def test_packing_refusals_are_one_line(tmp_path, tok, keywords, data, error, message):
  path = tmp_path / "docs.txt"
  path.write_text("the cat\n\nsat on the mat\n")
  if data == "array_record":
    write_array_record([path], tmp_path / "docs.array_record", tok)
    path = tmp_path / "docs.array_record"
  kw = dict(seq_len=16, per_process_batch_size=1, seed=0, process_index=0, process_count=1, packing=True)
  with pytest.raises(error) as e:
    make_dataset("pretrain", str(path), tok, **{**kw, **keywords})
  assert str(e.value) == message.format(path=path)
