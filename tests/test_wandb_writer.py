"""W&B output of MetricWriter, read back from offline runs (no network), and the missing-extra error."""

from __future__ import annotations

import json
import struct
import sys
import time

import numpy as np
import pytest

from llada_jax import configs, metrics, wandb_writer


@pytest.fixture
def offline(monkeypatch, tmp_path):
  """W&B offline and quiet, its settings and caches under tmp_path, nothing read from the home dir."""
  for name in ("CONFIG_DIR", "CACHE_DIR", "DATA_DIR", "ARTIFACT_DIR"):
    monkeypatch.setenv(f"WANDB_{name}", str(tmp_path / "wandb_home" / name.lower()))
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.delenv("WANDB_DIR", raising=False)
  monkeypatch.delenv("WANDB_RUN_ID", raising=False)
  monkeypatch.delenv("WANDB_RESUME", raising=False)


def _records(path):
  """The Record protos of a `.wandb` file: a 7-byte header (":W&B", magic, version), then 32 KiB
  blocks of chunks (crc32c, uint16 length, type: 1 full, 2 first, 3 middle, 4 last)."""
  from wandb.proto import wandb_internal_pb2  # noqa: PLC0415

  data = path.read_bytes()
  assert data[:4] == b":W&B"
  block, pos, pending = 32768, 7, b""
  while pos + 7 <= len(data):
    room = block - pos % block
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if room < 7 or (kind == 0 and length == 0):  # the rest of the block is padding
      pos += room
      continue
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      yield wandb_internal_pb2.Record.FromString(pending)
      pending = b""


def _read_run(path):
  """(run id, {step: {key: value}}, {config key: value}) of one offline run file."""
  run_id, history, config = None, {}, {}
  for record in _records(path):
    kind = record.WhichOneof("record_type")
    if kind == "run":
      run_id = record.run.run_id
      config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    elif kind == "config":
      config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    elif kind == "history":
      items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
      history.setdefault(record.history.step.num, {}).update(items)
  return run_id, history, config


def _run_files(workdir):
  return sorted((workdir / "wandb").glob("offline-run-*/run-*.wandb"))


def _finished_runs(workdir, n, timeout_s=60.0):
  """The `n` offline runs under `workdir`, read back once each holds its history. W&B's service
  process writes the files; on a loaded machine the last records can land after `finish()` returns."""
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      runs = [_read_run(path) for path in _run_files(workdir)]
    except Exception:  # noqa: BLE001 - a record still being written does not parse yet
      runs = []
    if (len(runs) == n and all(history for _, history, _ in runs)) or time.monotonic() > deadline:
      return runs
    time.sleep(0.5)


def test_offline_run_holds_scalars_text_and_config_and_resumes_the_same_run(offline, tmp_path):
  pytest.importorskip("wandb")
  workdir = tmp_path / "run"
  settings = wandb_writer.WandbSettings(project="tests", tags=("unit",))
  with metrics.MetricWriter(workdir, enabled=True, tensorboard=False, wandb=settings) as writer:
    writer.write_config({"model": {"d_model": 32}, "objective": "sft"})
    writer.write_scalars(1, {"loss": 2.5, "lr": np.float32(0.25), "mfu": None})
    writer.write_scalars(2, {"loss": 2.0, "tokens": np.int64(4096)})
    writer.write_text(2, "sample", "a <mask> & b")
  with metrics.MetricWriter(workdir, enabled=True, tensorboard=False, wandb=settings) as writer:  # a resume
    writer.write_scalars(3, {"loss": 1.5})

  runs = _finished_runs(workdir, 2)
  assert len(runs) == 2
  # Directory names hold the start second (and "-1" when two share it), so order runs by their steps.
  first, second = sorted(runs, key=lambda run: min(run[1]))
  saved_id = (workdir / wandb_writer.RUN_ID_FILE).read_text().strip()
  assert first[0] == second[0] == saved_id  # one W&B run across the resume
  steps = {step: {k: v for k, v in row.items() if not k.startswith("_")} for step, row in first[1].items()}
  assert steps[1] == {"loss": 2.5, "lr": 0.25}
  assert steps[2]["loss"] == 2.0 and steps[2]["tokens"] == 4096 and steps[2]["sample/_type"] == "html-file"
  html = next((workdir / "wandb").glob("offline-run-*/files/" + steps[2]["sample/path"])).read_text()
  assert "a &lt;mask&gt; &amp; b" in html
  assert {k: v for k, v in second[1][3].items() if not k.startswith("_")} == {"loss": 1.5}
  assert first[2]["model"] == {"d_model": 32} and first[2]["objective"] == "sft"
  # The files of the other backends are written as before.
  assert [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_settings_follow_the_config():
  config = configs.base_config()
  assert wandb_writer.settings_from_config(config.logging) is None  # off by default
  config.logging.wandb = True
  config.logging.wandb_mode = "offline"
  config.logging.wandb_tags = ("a", "b")
  settings = wandb_writer.settings_from_config(config.logging)
  assert settings == wandb_writer.WandbSettings(project="llada_jax", mode="offline", tags=("a", "b"))


def test_run_id_is_kept_in_the_workdir(tmp_path):
  first = wandb_writer.run_id(str(tmp_path))
  assert wandb_writer.run_id(str(tmp_path)) == first
  assert wandb_writer.run_id(str(tmp_path / "..")) != first  # another workdir, another run


def test_bad_wandb_mode_is_refused(tmp_path):
  config = configs.base_config()
  config.workdir = str(tmp_path)
  config.logging.wandb_mode = "cloud"
  with pytest.raises(ValueError, match=r"config\.logging\.wandb_mode='cloud': expected one of"):
    configs.validate(config)


def test_missing_wandb_stops_train_before_it_starts(monkeypatch, tmp_path, capsys):
  """logging.wandb=True without the package: one line naming the extra, exit status 1, nothing written."""
  from llada_jax import train  # noqa: PLC0415

  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError

  class Holder:
    value = configs.base_config()

  Holder.value.workdir = str(tmp_path / "run")
  Holder.value.logging.wandb = True
  monkeypatch.setattr(train, "_CONFIG", Holder())
  assert train.main(["train"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: config.logging.wandb=True:"), err
  assert "pip install 'llada_jax[wandb]'" in err[0]
  assert not (tmp_path / "run").exists()
  with pytest.raises(ImportError, match=r"llada_jax\[wandb\]"):
    metrics.MetricWriter(tmp_path / "direct", enabled=True, tensorboard=False,
                         wandb=wandb_writer.WandbSettings())
