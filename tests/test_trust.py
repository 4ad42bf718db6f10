"""Runs that can be trusted: damaged checkpoints are never continued, one writer per workdir,
unwritable checkpoint directories fail at once, and a resume keeps the run's config."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from llada_jax.storage import checkpoint as ckpt_lib, lock as lock_lib
from llada_jax.training import loop
from tests import train_fixtures


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return train_fixtures.write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
  """An SFT workdir with checkpoints at steps 3 and 6."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  loop.run(train_fixtures.make_config(corpus, workdir, "sft", total_steps=6))
  return workdir


def _copy(trained, tmp_path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  return workdir


def _files(directory) -> dict:
  return {p: p.read_bytes() for p in pathlib.Path(directory).rglob("*") if p.is_file()}


def _all_finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.inexact))


def _damage(step_dir: pathlib.Path, everywhere: bool = False) -> pathlib.Path:
  """64 bytes overwritten in the middle of the step's largest state file (`everywhere`: at a
  quarter, a half and three quarters of every state data file)."""
  files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  targets = [p for p in files if p.parent.name == "d"] if everywhere else files[-1:]
  for target in targets:
    data = bytearray(target.read_bytes())
    for at in ((len(data) // 4, len(data) // 2, 3 * len(data) // 4) if everywhere else (len(data) // 2,)):
      data[at:at + 64] = bytes(range(64))
    target.write_bytes(bytes(data))
  return files[-1]


def test_damaged_latest_step_is_set_aside_and_the_run_resumes_from_the_one_before(corpus, trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  damaged = _damage(workdir / "checkpoints" / "6", everywhere=True)
  damaged_bytes = damaged.read_bytes()
  config = train_fixtures.make_config(corpus, workdir, "sft", total_steps=8)
  config.checkpoint.on_damaged = "error"
  with pytest.raises(ValueError, match=r"step 6 .*on_damaged='error'"):
    loop.run(config)
  assert (workdir / "checkpoints" / "6").is_dir()  # the policy "error" leaves everything in place

  config.checkpoint.on_damaged = "previous"
  result = loop.run(config)
  assert result.final_step == 8 and _all_finite(result.state)
  moved = list((workdir / "checkpoints.damaged").iterdir())
  assert len(moved) == 1 and moved[0].name.startswith("6.")
  assert (moved[0] / damaged.relative_to(workdir / "checkpoints" / "6")).read_bytes() == damaged_bytes
  # Steps 6 (again) and 8 were saved from the intact step 3 and restore intact.
  with ckpt_lib.CheckpointManager(workdir / "checkpoints", read_only=True) as manager:
    assert manager.all_steps() == [3, 6, 8]
    for step in (6, 8):
      restored = manager.restore(step, abstract_state=ckpt_lib.abstract_like(result.state))
      assert _all_finite(restored)


def test_a_step_without_its_state_is_set_aside(corpus, trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  shutil.rmtree(workdir / "checkpoints" / "6" / "state")
  result = loop.run(train_fixtures.make_config(corpus, workdir, "sft", total_steps=6))
  assert result.final_step == 6 and _all_finite(result.state)
  assert [p.name.split(".")[0] for p in (workdir / "checkpoints.damaged").iterdir()] == ["6"]


def test_damaged_initial_weights_are_refused(corpus, trained, tmp_path):
  source = _copy(trained, tmp_path)
  _damage(source / "checkpoints" / "6", everywhere=True)
  config = train_fixtures.make_config(corpus, tmp_path / "vrpo", "vrpo", total_steps=2)
  config.checkpoint.init_from = str(source / "checkpoints")
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match="step 6"):
    loop.run(config)


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(corpus, trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  config = train_fixtures.make_config(corpus, workdir, "sft", total_steps=7)
  with lock_lib.DirectoryLock(workdir, "another run"):
    before = _files(workdir)
    with pytest.raises(lock_lib.LockedError, match=rf"in use by process {os.getpid()} on"):
      loop.run(config)
    assert _files(workdir) == before

  # A lock left by a process that died (kill -9) is taken over.
  dead = subprocess.Popen(["true"])
  dead.wait()
  (workdir / lock_lib.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                         "since": "earlier"}))
  assert loop.run(config).final_step == 7
  assert not (workdir / lock_lib.LOCK_NAME).exists()  # released at the end


def test_resume_with_another_model_or_objective_is_refused(corpus, trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  before = _files(workdir)
  for field, value, message in (("model.mlp_hidden_size", 32, r"model\.mlp_hidden_size 64 -> 32"),
                                ("data.seq_len", 40, r"data\.seq_len 48 -> 40")):
    config = train_fixtures.make_config(corpus, workdir, "sft", total_steps=8, **{field: value})
    with pytest.raises(ValueError, match=message + ".*allow_config_change"):
      loop.run(config)
  pretrain = train_fixtures.make_config(corpus, workdir, "pretrain", total_steps=8)
  with pytest.raises(ValueError, match="objective 'sft' -> 'pretrain'"):
    loop.run(pretrain)
  assert _files(workdir) == before
  # Numerics-only fields may change; told to, another batch size continues the run too.
  config = train_fixtures.make_config(corpus, workdir, "sft", total_steps=7, **{"model.dtype": "bfloat16"})
  assert loop.run(config).final_step == 7


def test_unwritable_checkpoint_directory_fails_at_once_naming_it(corpus, tmp_path):
  config = train_fixtures.make_config(corpus, "/sys/llada_jax_run", "sft", total_steps=2)
  start = time.perf_counter()
  with pytest.raises(OSError, match="/sys/llada_jax_run"):
    loop.run(config)
  assert time.perf_counter() - start < 60


def _make_read_only(directory: pathlib.Path) -> bool:
  """A read-only bind mount of `directory` over itself, as a volume remounted read-only."""
  done = subprocess.run(["mount", "--bind", str(directory), str(directory)], capture_output=True).returncode == 0
  return done and subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)],
                                 capture_output=True).returncode == 0


def test_checkpoint_directory_that_becomes_read_only_fails_within_seconds(corpus, tmp_path, monkeypatch):
  config = train_fixtures.make_config(corpus, tmp_path / "run", "sft", total_steps=6)
  checkpoints = tmp_path / "run" / "checkpoints"
  real_save = ckpt_lib.CheckpointManager.save
  frozen = []

  def save_then_freeze(self, step, *args, **kwargs):
    saved = real_save(self, step, *args, **kwargs)
    if saved and step == 3:
      self.wait_until_finished()
      frozen.append(_make_read_only(checkpoints))
    return saved

  monkeypatch.setattr(ckpt_lib.CheckpointManager, "save", save_then_freeze)
  start = time.perf_counter()
  try:
    with pytest.raises(Exception) as raised:
      loop.run(config)
  finally:
    subprocess.run(["umount", "-l", str(checkpoints)], capture_output=True)
  if not frozen or not frozen[0]:
    pytest.skip("a read-only bind mount needs privileges this machine does not give")
  assert isinstance(raised.value, OSError), raised.value
  assert f"cannot write checkpoints to {checkpoints}" in str(raised.value) and "Read-only" in str(raised.value)
  assert time.perf_counter() - start < 120
  assert (checkpoints / "3" / "state").is_dir()
