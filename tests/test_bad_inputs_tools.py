"""Bad inputs to the tools `convert`, `tokenizer`, `generate` and `evaluate`, run in-process through `main(argv)`.

Every refusal is exit status 1 with one stderr line `error: ...` naming the thing that was wrong, no
traceback, and whatever was on disk before left byte for byte as it was.
"""

import json
import os
import pathlib
import shutil

import jax
import pytest

from llada_jax import convert, evaluate, generate, tokenizer as tokenizer_cli
from llada_jax.data import tokenizer as tok_lib
from llada_jax.storage import checkpoint as ckpt_lib, files, huggingface
from tests.test_convert import hf_config, hf_tensors, write_hf_dir
from tests import helpers

SECRET = "SECRET-BYTES-0123456789"


@pytest.fixture(autouse=True)
def no_blocking():
  with helpers.fail_if_blocked(120):
    yield


def snapshot(root) -> dict:
  """Every path under `root` with its bytes (a link: its target; a directory or pipe: its kind)."""
  root = pathlib.Path(root)
  out = {}
  for p in sorted(root.rglob("*")):
    if p.is_symlink():
      out[str(p.relative_to(root))] = ("link", os.readlink(p))
    elif p.is_file():
      out[str(p.relative_to(root))] = p.read_bytes()
    else:
      out[str(p.relative_to(root))] = "dir" if p.is_dir() else "special"
  return out


def one_line_error(capsys, rc, *needles) -> str:
  """The tool's stderr, checked to be a single `error:` line holding every needle."""
  err = capsys.readouterr().err
  assert rc == 1, err
  assert "Traceback" not in err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


# --------------------------------------------------------------------------------------------
# convert import: every file read lies inside HF_DIR.


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """A sharded Hugging Face directory with a tokenizer, and a file outside it that must never be read."""
  root = tmp_path_factory.mktemp("hf_src")
  config = hf_config()
  write_hf_dir(root / "hf", config, hf_tensors(config), shards=2, tokenizer=True)
  (root / "secret.safetensors").write_text(SECRET)
  return root


@pytest.fixture
def hf_copy(hf, tmp_path):
  """A fresh copy of the module's Hugging Face directory, to break; returns (its path, the outside file)."""
  shutil.copytree(hf / "hf", tmp_path / "hf")
  shutil.copy(hf / "secret.safetensors", tmp_path / "secret.safetensors")
  return tmp_path / "hf", tmp_path / "secret.safetensors"


def _point_shard(hf_dir, entry):
  """The index lists its first shard's tensors under `entry` instead."""
  index_path = hf_dir / huggingface.INDEX_FILE
  index = json.loads(index_path.read_text())
  first = sorted(set(index["weight_map"].values()))[0]
  index["weight_map"] = {k: entry if v == first else v for k, v in index["weight_map"].items()}
  index_path.write_text(json.dumps(index))
  return first


def _escape_dotdot(hf_dir, secret):
  _point_shard(hf_dir, "../secret.safetensors")
  return "'../secret.safetensors'", "through '..'"


def _escape_absolute(hf_dir, secret):
  _point_shard(hf_dir, str(secret))
  return repr(str(secret)), "is an absolute path"


def _escape_shard_link(hf_dir, secret):
  first = _point_shard(hf_dir, "model-00001-of-00002.safetensors")
  (hf_dir / first).unlink()
  (hf_dir / first).symlink_to(secret)
  return f"'{first}'", "is a link to"


def _escape_nested_dotdot(hf_dir, secret):
  _point_shard(hf_dir, "sub/../../secret.safetensors")
  return "'sub/../../secret.safetensors'", "through '..'"


def _escape_config_link(hf_dir, secret):
  (hf_dir / "config.json").unlink()
  (hf_dir / "config.json").symlink_to(secret)
  return "config.json", "is a link to"


def _escape_tokenizer_link(hf_dir, secret):
  (hf_dir / "tokenizer.json").unlink()
  (hf_dir / "tokenizer.json").symlink_to(secret)
  return "tokenizer.json", "is a link to"


def _escape_index_link(hf_dir, secret):
  (hf_dir / huggingface.INDEX_FILE).rename(hf_dir.parent / "index.json")
  (hf_dir / huggingface.INDEX_FILE).symlink_to(hf_dir.parent / "index.json")
  return huggingface.INDEX_FILE, "is a link to"


def _shard_is_a_directory(hf_dir, secret):
  (hf_dir / "shards").mkdir()
  _point_shard(hf_dir, "shards")
  return "'shards'", "expected a regular file"


def _shard_is_a_fifo(hf_dir, secret):
  os.mkfifo(hf_dir / "pipe.safetensors")
  _point_shard(hf_dir, "pipe.safetensors")
  return "'pipe.safetensors'", "expected a regular file"


@pytest.mark.parametrize("breaker", [_escape_dotdot, _escape_absolute, _escape_nested_dotdot, _escape_shard_link,
                                     _escape_config_link, _escape_tokenizer_link, _escape_index_link,
                                     _shard_is_a_directory, _shard_is_a_fifo])
def test_import_reads_only_files_inside_hf_dir(hf_copy, tmp_path, capsys, breaker):
  hf_dir, secret = hf_copy
  needles = breaker(hf_dir, secret)
  before = snapshot(tmp_path)
  line = one_line_error(capsys, convert.main(["import", str(hf_dir), str(tmp_path / "run")]), *needles)
  assert SECRET not in line and "expected" in line
  assert snapshot(tmp_path) == before  # no run directory, no staging directory


def test_allow_outside_links_follows_a_hub_cache_of_links(hf_copy, tmp_path, capsys):
  """A hub snapshot: every file a link to a blob outside the snapshot directory."""
  hf_dir, _ = hf_copy
  blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
  blobs.mkdir()
  snap.mkdir(parents=True)
  for i, path in enumerate(sorted(hf_dir.iterdir())):
    path.rename(blobs / f"blob{i}")
    (snap / path.name).symlink_to(os.path.relpath(blobs / f"blob{i}", snap))
  one_line_error(capsys, convert.main(["import", str(snap), str(tmp_path / "run")]), "is a link to", "outside",
                 "--allow_outside_links")
  assert not (tmp_path / "run").exists()
  assert convert.main(["import", str(snap), str(tmp_path / "run"), "--allow_outside_links"]) == 0
  assert (tmp_path / "run" / "tokenizer.json").is_file() and (tmp_path / "run" / "checkpoints").is_dir()
  # Entries with '..' stay refused: the flag follows links, not paths the index makes up.
  _point_shard(snap, "../abc/model-00001-of-00002.safetensors")
  one_line_error(capsys, convert.main(["import", str(snap), str(tmp_path / "run2"), "--allow_outside_links"]),
                 "through '..'")
  assert convert.main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--allow_outside_links"]) == 1
  assert "--allow_outside_links applies to import, not export" in capsys.readouterr().err


def test_links_inside_hf_dir_are_followed(hf_copy, tmp_path):
  hf_dir, _ = hf_copy
  first = _point_shard(hf_dir, "renamed.safetensors")
  (hf_dir / "renamed.safetensors").symlink_to(first)
  assert convert.main(["import", str(hf_dir), str(tmp_path / "run")]) == 0


def _garbage_index(hf_dir):
  (hf_dir / huggingface.INDEX_FILE).write_bytes(b"\xff\xfe" + SECRET.encode())
  return huggingface.INDEX_FILE, "not UTF-8 text at byte 0"


def _index_not_json(hf_dir):
  (hf_dir / huggingface.INDEX_FILE).write_text(SECRET)
  return huggingface.INDEX_FILE, "expected JSON"


def _shard_not_safetensors(hf_dir):
  first = sorted(p for p in hf_dir.iterdir() if p.suffix == ".safetensors")[0]
  first.write_text(SECRET * 10)
  return first.name, "not a safetensors file"


def _malformed_header_entry(hf_dir):
  header = json.dumps({"t": {"dtype": "F32", "shape": SECRET, "data_offsets": [0, 4]}}).encode()
  first = sorted(p for p in hf_dir.iterdir() if p.suffix == ".safetensors")[0]
  first.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
  return first.name, "malformed header entry"


def _config_not_utf8(hf_dir):
  (hf_dir / "config.json").write_bytes(b'{"a": "\xff' + SECRET.encode() + b'"}')
  return "config.json", "not UTF-8 text"


@pytest.mark.parametrize("breaker", [_garbage_index, _index_not_json, _shard_not_safetensors, _malformed_header_entry,
                                     _config_not_utf8])
def test_import_errors_never_quote_file_contents(hf_copy, tmp_path, capsys, breaker):
  hf_dir, _ = hf_copy
  needles = breaker(hf_dir)
  line = one_line_error(capsys, convert.main(["import", str(hf_dir), str(tmp_path / "run")]), *needles)
  assert SECRET not in line and "\\x" not in line


# --------------------------------------------------------------------------------------------
# convert: destinations are never overwritten without --overwrite, and then only once the new one is complete.


@pytest.fixture(scope="module")
def run_dir(hf, tmp_path_factory):
  run = tmp_path_factory.mktemp("imported") / "run"
  assert convert.main(["import", str(hf / "hf"), str(run)]) == 0
  return run


def _mine(path):
  path.mkdir()
  (path / "keep.txt").write_text("mine")
  return path


@pytest.mark.parametrize("command", ["import", "export"])
def test_existing_destination_needs_overwrite(hf, run_dir, tmp_path, capsys, command):
  source = hf / "hf" if command == "import" else run_dir
  dest = _mine(tmp_path / "dest")
  before = snapshot(tmp_path)
  one_line_error(capsys, convert.main([command, str(source), str(dest)]), f"{dest} already exists and is not empty",
                 "--overwrite")
  assert snapshot(tmp_path) == before
  assert convert.main([command, str(source), str(dest), "--overwrite"]) == 0
  assert not (dest / "keep.txt").exists()
  assert (dest / ("checkpoints" if command == "import" else "config.json")).exists()
  assert sorted(os.listdir(tmp_path)) == ["dest"]  # no staging or old directory left beside it


@pytest.mark.parametrize("command", ["import", "export"])
def test_a_destination_another_conversion_writes_is_refused(hf, run_dir, tmp_path, capsys, command):
  from llada_jax.storage import lock  # noqa: PLC0415

  source = hf / "hf" if command == "import" else run_dir
  dest = tmp_path / "dest"
  with lock.DirectoryLock.for_output(dest, "another conversion"):
    before = snapshot(tmp_path)
    one_line_error(capsys, convert.main([command, str(source), str(dest)]), f"{dest} is in use by process",
                   "one writer at a time")
    assert snapshot(tmp_path) == before
  assert convert.main([command, str(source), str(dest)]) == 0 and sorted(os.listdir(tmp_path)) == ["dest"]


@pytest.mark.parametrize("command", ["import", "export"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_destination_that_is_a_file(hf, run_dir, tmp_path, capsys, command, overwrite):
  source = hf / "hf" if command == "import" else run_dir
  (tmp_path / "dest").write_text("a file")
  before = snapshot(tmp_path)
  argv = [command, str(source), str(tmp_path / "dest")] + (["--overwrite"] if overwrite else [])
  one_line_error(capsys, convert.main(argv), f"{tmp_path / 'dest'} is a file; expected a directory")
  argv = [command, str(source), str(tmp_path / "dest" / "sub")] + (["--overwrite"] if overwrite else [])
  one_line_error(capsys, convert.main(argv), f"{tmp_path / 'dest'} is a file; expected a directory to hold")
  assert snapshot(tmp_path) == before


def test_overwrite_never_replaces_the_input(hf_copy, tmp_path, capsys):
  hf_dir, _ = hf_copy
  before = snapshot(tmp_path)
  for dest in (hf_dir, tmp_path):
    one_line_error(capsys, convert.main(["import", str(hf_dir), str(dest), "--overwrite"]), f"{dest} holds the input")
  assert snapshot(tmp_path) == before


def test_failed_overwrite_keeps_the_old_directory(hf, tmp_path, capsys, monkeypatch):
  dest = _mine(tmp_path / "dest")
  before = snapshot(tmp_path)
  calls = []
  real = huggingface.read_tensor

  def failing(entry):
    calls.append(entry.name)
    if len(calls) == 4:
      raise huggingface.ConversionError(f"{entry.file}: tensor '{entry.name}' is truncated")
    return real(entry)

  monkeypatch.setattr(huggingface, "read_tensor", failing)
  one_line_error(capsys, convert.main(["import", str(hf / "hf"), str(dest), "--overwrite"]), "is truncated")
  assert len(calls) == 4 and snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------
# tokenizer train: PREFIX.model and PREFIX.vocab are never overwritten without --overwrite.


@pytest.fixture
def corpus(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text("\n".join(f"the cat number {i} sat on the mat {i * 7}" for i in range(200)))
  return str(path)


def _train(corpus, prefix, *extra):
  return tokenizer_cli.main(["train", "--input", corpus, "--model_prefix", str(prefix), "--vocab_size", "300",
                             "--num_threads", "1", *extra])


@pytest.mark.parametrize("existing", [".model", ".vocab"])
def test_tokenizer_refuses_existing_outputs(corpus, tmp_path, capsys, existing):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / f"tok{existing}").write_text("old")
  before = snapshot(tmp_path)
  one_line_error(capsys, _train(corpus, tmp_path / "out" / "tok"), f"{tmp_path / 'out' / 'tok'}{existing} already "
                 "exists", "--overwrite")
  assert snapshot(tmp_path) == before


def test_tokenizer_output_another_training_writes_is_refused(corpus, tmp_path, capsys):
  from llada_jax.storage import lock  # noqa: PLC0415

  prefix = tmp_path / "out" / "tok"
  prefix.parent.mkdir()
  with lock.DirectoryLock.for_output(f"{prefix}.model", "another training"):
    one_line_error(capsys, _train(corpus, prefix), f"{prefix}.model is in use by process")
  assert not pathlib.Path(f"{prefix}.model").exists()


def test_tokenizer_overwrite_replaces_both_files_at_the_end(corpus, tmp_path, capsys, monkeypatch):
  prefix = tmp_path / "out" / "tok"
  assert _train(corpus, prefix) == 0
  before = snapshot(tmp_path)

  def failing(spm, sentences, model_prefix, *args):
    pathlib.Path(model_prefix + ".model").write_text("half")  # a trainer dying after its first file
    raise ValueError("trainer failed")

  monkeypatch.setattr(tok_lib, "_train", failing)
  one_line_error(capsys, _train(corpus, prefix, "--overwrite"), "trainer failed")
  assert snapshot(tmp_path) == before  # the old pair intact, no temporary file left
  monkeypatch.undo()
  (tmp_path / "corpus.txt").write_text("\n".join(f"a dog called {i} ran far {i * 3}" for i in range(200)))
  assert _train(corpus, prefix, "--overwrite") == 0
  assert snapshot(tmp_path)["out/tok.model"] != before["out/tok.model"]
  assert sorted(os.listdir(tmp_path / "out")) == ["tok.model", "tok.vocab"]


@pytest.mark.parametrize("setup,prefix,needle", [
    (lambda d: (d / "tok.model").mkdir(), "tok", "tok.model is a directory; expected a file path"),
    (lambda d: None, "sub/", "ends in a directory separator"),
    (lambda d: (d / "afile").write_text("x"), "afile/tok", "afile is a file; expected a directory"),
    (lambda d: os.mkfifo(d / "in.txt"), "tok", "in.txt: is a named pipe (FIFO); expected a regular file"),
], ids=["model_is_a_directory", "prefix_is_a_directory", "parent_is_a_file", "input_is_a_fifo"])
def test_tokenizer_bad_outputs_and_inputs(corpus, tmp_path, capsys, setup, prefix, needle):
  setup(tmp_path)
  if (tmp_path / "in.txt").exists():
    corpus = str(tmp_path / "in.txt")
  before = snapshot(tmp_path)
  one_line_error(capsys, _train(corpus, f"{tmp_path}/{prefix}"), needle)
  assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------
# generate and evaluate: prompts, the --output path before any work, and running out of device memory.


def _generate(tmp_path, *extra):
  return generate.main(["--checkpoint", str(tmp_path / "no_run"), "--gen_length", "4", *extra])


def _evaluate(tmp_path, data, *extra):
  return evaluate.main(["--checkpoint", str(tmp_path / "no_run"), "--task", "mc", "--data", str(data), *extra])


@pytest.fixture
def mc_data(tmp_path):
  path = tmp_path / "mc.jsonl"
  path.write_text(json.dumps({"prompt": "2 plus 2", "choices": ["4", "5"], "answer": 0}) + "\n")
  return path


def test_empty_prompts_are_refused_from_flags_and_files(tmp_path, capsys):
  one_line_error(capsys, _generate(tmp_path, "--prompt", ""), "--prompt is empty; expected non-empty prompt text")
  one_line_error(capsys, _generate(tmp_path, "--prompt", "fine", "--prompt", ""), "--prompt number 2 is empty")
  (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": ""}) + "\n")
  one_line_error(capsys, _generate(tmp_path, "--input", str(tmp_path / "in.jsonl")),
                 f"{tmp_path / 'in.jsonl'}, line 2, field 'prompt': empty; expected a non-empty string")


# --input_ids records: (second line of the file, what the error line says after "line 2, field ...").
BAD_ID_RECORDS = [
    ({"prompt_ids": "5 6 7"}, "got str; expected a non-empty list of token ids (non-negative integers)"),
    ({"prompt_ids": []}, "empty; expected a non-empty list of token ids"),
    ({"prompt_ids": [5, 6.5]}, "item 1 is 6.5; expected a non-empty list of token ids"),
    ({"prompt_ids": [5, True]}, "item 1 is True; expected a non-empty list of token ids"),
    ({"prompt_ids": [-1, 5]}, "item 0 is -1; expected a non-empty list of token ids"),
    ({"prompt": "text"}, "missing; expected a non-empty list of token ids"),
    ({"prompt_ids": [5, 320]}, "item 1 is 320; expected token ids below the model's vocab_size=320, and not "
                               "its mask id 3"),
    ({"prompt_ids": [3]}, "item 0 is 3; expected token ids below the model's vocab_size=320, and not its mask id 3"),
]


def _tiny_run_config(*args, **kwargs):
  # The ids are checked against the run config's vocabulary before any weight is read.
  model = {"vocab_size": 320, "mask_token_id": 3, "eos_token_id": 2, "bos_token_id": 1, "d_model": 8,
           "n_layers": 1, "n_heads": 1, "mlp_hidden_size": 8}
  return 1, {"model": model}


@pytest.mark.parametrize("record,needle", BAD_ID_RECORDS, ids=["string", "empty", "float", "bool", "negative",
                                                              "missing", "beyond_vocab", "mask_id"])
def test_bad_token_id_records_name_file_line_and_field(tmp_path, capsys, monkeypatch, record, needle):
  monkeypatch.setattr(ckpt_lib, "read_run_config", _tiny_run_config)
  monkeypatch.setattr(ckpt_lib, "load_model", _out_of_memory)  # never reached
  path = tmp_path / "ids.jsonl"
  path.write_text(json.dumps({"prompt_ids": [5, 6]}) + "\n" + json.dumps(record) + "\n")
  one_line_error(capsys, _generate(tmp_path, "--input_ids", str(path)), f"{path}, line 2, field 'prompt_ids': {needle}")


def test_chat_template_with_token_ids_is_refused(tmp_path, capsys):
  path = tmp_path / "ids.jsonl"
  path.write_text(json.dumps({"prompt_ids": [5, 6]}) + "\n")
  one_line_error(capsys, _generate(tmp_path, "--input_ids", str(path), "--chat_template"),
                 "--chat_template wraps prompt text; expected --prompt or --input with it")


def _output_cases(tmp_path):
  """(--output value, expected message part) for outputs that cannot be written; made on disk here."""
  (tmp_path / "adir").mkdir()
  (tmp_path / "afile").write_text("x")
  os.mkfifo(tmp_path / "apipe")
  return [(tmp_path / "adir", "is a directory; expected a file path"),
          (tmp_path / "afile" / "out.json", f"{tmp_path / 'afile'} is a file; expected a directory"),
          (tmp_path / "afile" / "deeper" / "out.json", f"{tmp_path / 'afile'} is a file; expected a directory"),
          (tmp_path / "apipe", "is a special file")]


@pytest.mark.parametrize("tool", ["generate", "evaluate"])
def test_unwritable_output_is_refused_before_any_work(tmp_path, capsys, mc_data, tool):
  cases = _output_cases(tmp_path)
  before = snapshot(tmp_path)
  for output, needle in cases:
    # The checkpoint does not exist: only a check made before any work can name --output.
    rc = (_generate(tmp_path, "--prompt", "hi", "--output", str(output)) if tool == "generate"
          else _evaluate(tmp_path, mc_data, "--output", str(output)))
    one_line_error(capsys, rc, f"--output {output}", needle)
  assert snapshot(tmp_path) == before


def test_output_in_a_read_only_directory(tmp_path, capsys, monkeypatch):
  # Checked with os.access, which a test run as root cannot see fail: the check itself is made to.
  monkeypatch.setattr(files.os, "access", lambda path, mode: False)
  one_line_error(capsys, _generate(tmp_path, "--prompt", "hi", "--output", str(tmp_path / "x" / "out.jsonl")),
                 f"directory {tmp_path} is not writable")
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("tool", ["generate", "evaluate"])
def test_failing_write_leaves_no_temporary_file(tmp_path, capsys, mc_data, monkeypatch, tool):
  output = tmp_path / "out" / "result.json"

  def work(args):  # the output path turns into a directory while the work runs
    output.mkdir(parents=True)
    return ([{"prompt": "hi", "completion": "there"}] if tool == "generate" else
            {"task": "mc", "n": 1, "metrics": {"accuracy": 1.0}, "time_s": 0.0, "settings": {}, "records": []})

  if tool == "generate":
    monkeypatch.setattr(generate, "run", work)
    rc = _generate(tmp_path, "--prompt", "hi", "--output", str(output))
  else:
    monkeypatch.setattr(evaluate, "evaluate", work)
    rc = _evaluate(tmp_path, mc_data, "--output", str(output))
  one_line_error(capsys, rc, f"--output {output}: cannot be written")
  assert os.listdir(output.parent) == ["result.json"] and os.listdir(output) == []


def _out_of_memory(*args, **kwargs):
  raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68719476736 bytes.\n"
                                   "BufferAssignment OOM Debugging.\nmore lines")


def _no_run_config(*args, **kwargs):
  return 1, {}  # a run with no mesh of its own: the tools then put every device on data


@pytest.mark.parametrize("tool", ["generate", "evaluate"])
def test_out_of_device_memory_is_one_line_with_a_hint(tmp_path, capsys, mc_data, monkeypatch, tool):
  monkeypatch.setattr(ckpt_lib, "read_run_config", _no_run_config)
  if tool == "generate":
    monkeypatch.setattr(generate.checkpoint, "load_model", _out_of_memory)
    rc = _generate(tmp_path, "--prompt", "hi")
  else:
    monkeypatch.setattr(evaluate.ckpt_lib, "load_model", _out_of_memory)
    rc = _evaluate(tmp_path, mc_data)
  one_line_error(capsys, rc, "out of device memory (RESOURCE_EXHAUSTED: Out of memory while trying to allocate",
                 "--batch_size", "--dtype bfloat16")


def test_other_runtime_errors_are_not_disguised(tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("INTERNAL: something else")

  monkeypatch.setattr(ckpt_lib, "read_run_config", _no_run_config)
  monkeypatch.setattr(generate.checkpoint, "load_model", broken)
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    _generate(tmp_path, "--prompt", "hi")


def test_write_text_atomic_cleans_up_after_a_failed_rename(tmp_path):
  (tmp_path / "target").mkdir()
  with pytest.raises(OSError):
    files.write_text_atomic(tmp_path / "target", "text")
  assert os.listdir(tmp_path) == ["target"] and os.listdir(tmp_path / "target") == []

