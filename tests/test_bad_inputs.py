"""Bad input to `llada_jax.train` and `llada_jax.plan`, as a user types it: each case exits 1
with one line `error: ...` that names the flag, field or file and says what was expected, prints
no traceback, and leaves the run directory byte for byte as it was. (The tools' own tables:
tests/test_bad_inputs_tools.py; the list of cases: docs/errors.md.)"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from tests import train_fixtures

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return train_fixtures.write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
  """A finished 2-step SFT run: resuming it with a changed config must leave it untouched."""
  from llada_jax.training import loop  # noqa: PLC0415

  workdir = tmp_path_factory.mktemp("trained") / "run"
  loop.run(train_fixtures.make_config(corpus, workdir, "sft", total_steps=2, **{"checkpoint.every_steps": 2}))
  return workdir


def _user_config(path: pathlib.Path, corpus: dict, workdir) -> pathlib.Path:
  """A config file building what train_fixtures.make_config builds (SFT on the test corpus)."""
  path.write_text(
      "import json\nfrom tests import train_fixtures\n\n"
      "def get_config():\n"
      f"  return train_fixtures.make_config(json.loads({json.dumps(corpus)!r}), {str(workdir)!r}, 'sft',\n"
      "                                     total_steps=4, **{'checkpoint.every_steps': 2})\n")
  return path


def _files(directory) -> dict:
  directory = pathlib.Path(directory)
  return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} if directory.exists() else {}


def _run(module: str, args, cwd) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=300, env=env)


_LOG_LINE = re.compile(r"^[IWD]\d{4} ")  # absl/JAX log lines (INFO, WARNING, DEBUG), not errors


def assert_one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> str:
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip() and not _LOG_LINE.match(line)]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  assert re.search(pattern, lines[0]), (pattern, lines[0])
  return lines[0]


# (id, extra train flags, expected message). `--config=` comes first unless the case names one.
TRAIN_CASES = [
    ("unknown_recipe", ["--config=nosuch"], r"no shipped recipe named 'nosuch'.*demo_sft"),
    ("bad_recipe_variant", ["--config=llada_8b_sft:tpu9"], r"variant 'tpu9'.*v5p"),
    ("missing_config_file", ["--config=missing/cfg.py"], r"missing/cfg\.py"),
    ("unknown_top_field", ["--config.lrr=1"], r"--config\.lrr: config has no field 'lrr'"),
    ("mistyped_field", ["--config.optimizer.lrr=1"], r"did you mean --config\.optimizer\.lr\?"),
    ("not_a_number", ["--config.optimizer.lr=abc"], r"--config\.optimizer\.lr=abc"),
    ("lr_too_large", ["--config.optimizer.lr=1e30"], r"optimizer\.lr=1e\+30: expected a number > 0 and <= 1"),
    ("negative_beta", ["--config.vrpo.beta=-1"], r"config\.vrpo\.beta=-1\.0: expected a positive"),
    ("eps_above_one", ["--config.diffusion.eps=2"], r"config\.diffusion\.eps=2\.0: expected a number in \(0, 1\)"),
    ("zero_nonfinite_limit", ["--config.max_nonfinite_in_a_row=0"], r"config\.max_nonfinite_in_a_row=0"),
    ("zero_batch", ["--config.data.global_batch_size=0"], r"config\.data\.global_batch_size=0: expected a positive"),
    ("zero_steps", ["--config.total_steps=0"], r"config\.total_steps=0"),
    ("batch_not_divisible", ["--config.grad_accum_steps=3"], r"global_batch_size=8: expected a multiple of grad"),
    ("batch_over_shards", ["--config.data.global_batch_size=4"], r"global_batch_size=4.*batch shards"),
    ("seq_len_one", ["--config.data.seq_len=1"], r"config\.data\.seq_len=1: expected at least 2"),
    ("unknown_objective", ["--config.objective=ppo"], r"config\.objective='ppo'"),
    ("on_too_long", ["--config.data.on_too_long=drop"], r"config\.data\.on_too_long='drop'"),
    ("on_damaged", ["--config.checkpoint.on_damaged=ignore"], r"config\.checkpoint\.on_damaged='ignore'"),
    ("estimator", ["--config.vrpo.estimator=mc"], r"config\.vrpo\.estimator='mc'"),
    ("distributed_mode", ["--config.distributed.initialize=maybe"], r"config\.distributed\.initialize='maybe'"),
    ("zero_timesteps", ["--config.vrpo.n_timesteps=0"], r"config\.vrpo\.n_timesteps=0"),
    ("no_workdir", ["--config.workdir="], r"config\.workdir='': expected a directory"),
    ("no_train_files", ["--config.data.train_files=()"], r"config\.data\.train_files=\(\): expected at least one"),
    ("missing_train_file", ["--config.data.train_files=('nope.jsonl',)"], r"nope\.jsonl"),
    ("missing_tokenizer", ["--config.data.tokenizer=nope.model"], r"nope\.model"),
    ("missing_init_from", ["--config.checkpoint.init_from=no_such_run"], r"no_such_run"),
    ("unwritable_workdir", ["--config.workdir=/sys/llada_jax_run"], r"/sys/llada_jax_run"),
    ("positional_argument", ["extra"], r"unexpected arguments \['extra'\]: flags only"),
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_input(case, corpus, trained, tmp_path):
  _, extra, pattern = case
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)  # a run with a checkpoint, which the failing command continues
  config_file = _user_config(tmp_path / "cfg.py", corpus, workdir)
  args = extra if any(a.startswith("--config=") for a in extra) else [f"--config={config_file}", *extra]
  before = _files(workdir), sorted(workdir.rglob("*"))
  proc = _run("llada_jax.train", args, REPO)
  assert_one_line_error(proc, pattern)
  assert (_files(workdir), sorted(workdir.rglob("*"))) == before


def test_config_file_errors_are_one_line(tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  assert_one_line_error(_run("llada_jax.train", [f"--config={broken}"], tmp_path), r"SyntaxError")
  empty = tmp_path / "empty.py"
  empty.write_text("x = 1\n")
  assert_one_line_error(_run("llada_jax.train", [f"--config={empty}"], tmp_path), r"get_config")


def test_resume_with_a_changed_model_leaves_the_run_as_it_was(corpus, trained, tmp_path):
  config_file = _user_config(tmp_path / "cfg.py", corpus, trained)
  before = _files(trained)
  proc = _run("llada_jax.train", [f"--config={config_file}", "--config.model.mlp_hidden_size=32"], REPO)
  assert_one_line_error(proc, r"model\.mlp_hidden_size 64 -> 32.*allow_config_change")
  assert _files(trained) == before


def test_a_second_run_in_a_held_workdir_is_refused(corpus, trained, tmp_path):
  from llada_jax.storage import lock  # noqa: PLC0415

  config_file = _user_config(tmp_path / "cfg.py", corpus, trained)
  with lock.DirectoryLock(trained, "a test"):
    before = _files(trained)
    proc = _run("llada_jax.train", [f"--config={config_file}", "--config.total_steps=4"], REPO)
    assert_one_line_error(proc, rf"{trained} is in use by process {os.getpid()}")
    assert _files(trained) == before


PLAN_CASES = [
    ("no_devices", ["--config=llada_8b_sft"], r"--devices=N is required"),
    ("zero_devices", ["--config=llada_8b_sft", "--devices=0"], r"--devices='0'"),
    ("unknown_accelerator", ["--config=demo_sft", "--devices=1", "--accelerator=tpu9"], r"--accelerator=tpu9"),
    ("mfu_above_one", ["--config=demo_sft", "--devices=1", "--mfu=2"], r"--mfu=2\.0"),
    ("plan_unknown_recipe", ["--config=nosuch", "--devices=1"], r"no shipped recipe named 'nosuch'"),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan_bad_input(case, tmp_path):
  _, args, pattern = case
  assert_one_line_error(_run("llada_jax.plan", args, tmp_path), pattern)


def test_plan_help_prints_help(tmp_path):
  proc = _run("llada_jax.plan", ["--help"], tmp_path)
  assert "--devices" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def test_train_out_of_device_memory_is_one_line_with_a_hint(monkeypatch, capsys):
  """An XLA RESOURCE_EXHAUSTED from the run (a seq_len too large for the device) names what to lower."""
  import jax  # noqa: PLC0415

  from llada_jax import train  # noqa: PLC0415
  from llada_jax.training import loop  # noqa: PLC0415

  def exhausted(config):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 99.0GiB.\nmore")

  class Holder:
    value = object()

  monkeypatch.setattr(loop, "run", exhausted)
  monkeypatch.setattr(train, "_CONFIG", Holder())
  assert train.main(["train"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: out of device memory (RESOURCE_EXHAUSTED: Out of memory")
  assert "config.data.seq_len" in err[0] and "config.grad_accum_steps" in err[0] and "bfloat16" in err[0]


DEMO_CASES = [  # (id, {record file: content}, flags, expected error)
    ("demo_unknown_dtype", {}, ["--dtype=fp16"], r"--dtype=fp16: expected auto, float32 or bfloat16"),
    ("demo_other_dtype", {"demo_dtype.json": '{"dtype": "float32"}'}, ["--dtype=bfloat16"],
     r"compute in float32; expected --dtype=float32"),
    ("demo_damaged_dtype_record", {"demo_dtype.json": '{"dtype": 3'}, [], r"demo_dtype\.json: unreadable"),
    ("demo_two_recipes", {}, ["--full"], r"--full and --smoke: expected at most one recipe flag"),
    ("demo_other_recipe", {"demo_recipe.json": '{"recipe": "full"}'}, [],
     r"demo_recipe\.json: the runs in .* come from the full recipe; expected the same recipe to resume them \(--full\)"),
    ("demo_unknown_recipe", {"demo_recipe.json": '{"recipe": "huge"}'}, [],
     r"demo_recipe\.json: recipe 'huge'; expected one of lean, full, smoke"),
    ("demo_damaged_recipe_record", {"demo_recipe.json": "[]"}, [], r"demo_recipe\.json: unreadable"),
    ("demo_bad_seeds", {}, ["--seeds=0,x"], r"--seeds=0,x: expected integers >= 0, comma-separated"),
]


@pytest.mark.parametrize("case", DEMO_CASES, ids=[c[0] for c in DEMO_CASES])
def test_demo_bad_input(case, tmp_path):
  _, records, args, pattern = case
  workdir = tmp_path / "demo"
  workdir.mkdir()
  for name, content in records.items():
    (workdir / name).write_text(content)
  before = _files(workdir)
  assert_one_line_error(_run("llada_jax.demo", ["--smoke", f"--workdir={workdir}", *args], tmp_path), pattern)
  assert _files(workdir) == before  # nothing started, nothing written
