"""Runs that stop and come back: on a gs:// workdir, and as two processes killed with SIGKILL."""

import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import chex
import numpy as np
import pytest
from etils import epath

from llada_jax.storage import checkpoint as ckpt_lib
from llada_jax import model as model_lib
from llada_jax.training import loop
from tests import train_fixtures

REPO = pathlib.Path(__file__).resolve().parent.parent
BUCKET = "llada-fake-bucket"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return train_fixtures.write_corpus(tmp_path_factory.mktemp("corpus"))


def _final_params(workdir, config):
  model_cfg = model_lib.ModelConfig.from_dict(config.model)
  return ckpt_lib.load_params(f"{workdir}/checkpoints", model_lib.abstract_params(model_cfg))


# --------------------------------------------------------------------------------------------
# A fake gs:// bucket: every etils.epath backend call and TensorStore's GCS driver are pointed at a
# local directory, so `gs://` paths take the code paths they take on Cloud Storage (Orbax then
# uses its GCS commit protocol) while the bytes land in `root`. Code that bypassed epath (open,
# os.makedirs, glob) would read nothing or write a `gs:` directory into the working directory.


@contextlib.contextmanager
def fake_gcs(root: pathlib.Path):
  from orbax.checkpoint._src.path import gcs_utils  # noqa: PLC0415 - the seam Orbax builds GCS specs at

  prefix = f"{root}/"

  def local(path):
    path = os.fspath(path)
    return prefix + path[len("gs://"):] if path.startswith("gs://") else path

  def remote(path):
    path = os.fspath(path)
    return "gs://" + path[len(prefix):] if path.startswith(prefix) else path

  def mapped(result=None):
    def call(original, path, *args, **kwargs):
      args = [local(a) if isinstance(a, (str, os.PathLike)) else a for a in args]
      out = original(local(path), *args, **kwargs)
      return out if result is None else result(out)
    return call

  def walk(original, top, **kwargs):
    for root_, dirs, files in original(local(top), **kwargs):
      yield remote(root_), dirs, files

  fns = {name: mapped() for name in ("copy", "exists", "isdir", "listdir", "makedirs", "mkdir", "open", "remove",
                                      "rename", "replace", "rmtree", "stat")}
  fns["glob"] = mapped(lambda paths: [remote(p) for p in paths])
  fns["walk"] = walk
  kvstore = lambda path: {"driver": "file", "path": local(path)}  # noqa: E731
  with epath.testing.mock_epath(**fns), \
       _patched(gcs_utils, get_kvstore_for_gcs=kvstore, is_hierarchical_namespace_enabled=lambda path: False):
    yield


@contextlib.contextmanager
def _patched(module, **attrs):
  old = {k: getattr(module, k) for k in attrs}
  for k, v in attrs.items():
    setattr(module, k, v)
  try:
    yield
  finally:
    for k, v in old.items():
      setattr(module, k, v)


@pytest.mark.slow  # over 40 s on 2 cores; a resume on a fake bucket
def test_gs_workdir_data_and_tokenizer_resume_like_a_local_run(corpus, tmp_path, monkeypatch):
  bucket = tmp_path / "gcs" / BUCKET
  (bucket / "data").mkdir(parents=True)
  for key in ("sft", "tokenizer"):
    shutil.copy(corpus[key], bucket / "data")
  for d in ("cwd", "tmp"):
    (tmp_path / d).mkdir()
  monkeypatch.chdir(tmp_path / "cwd")
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the tokenizer copy and the metrics mirror

  local_cfg = train_fixtures.make_config(corpus, tmp_path / "local", "sft", total_steps=4, **{"checkpoint.every_steps": 2})
  straight = loop.run(local_cfg)
  assert straight.final_step == 4

  workdir = f"gs://{BUCKET}/runs/sft"
  remote_cfg = train_fixtures.make_config(corpus, workdir, "sft", total_steps=4, **{"checkpoint.every_steps": 2})
  remote_cfg.data.train_files = (f"gs://{BUCKET}/data/sft*.jsonl",)  # a glob, expanded through epath
  remote_cfg.data.tokenizer = f"gs://{BUCKET}/data/{pathlib.Path(corpus['tokenizer']).name}"
  with fake_gcs(tmp_path / "gcs"):
    first = loop.run(remote_cfg, stop_after=2, final_save=False)
    assert first.final_step == 2
    assert ckpt_lib.CheckpointManager(f"{workdir}/checkpoints").all_steps() == [2]
    second = loop.run(remote_cfg)
    assert second.final_step == 4
    resumed = _final_params(workdir, remote_cfg)

  chex.assert_trees_all_equal(resumed, _final_params(local_cfg.workdir, local_cfg))
  run_dir = bucket / "runs" / "sft"
  # Orbax took its GCS path: a step is committed by a marker file, not by a rename.
  assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
  assert (run_dir / "checkpoints" / "4" / "commit_success.txt").exists()
  # Metrics were mirrored up, the resumed half appended to the first half's lines.
  lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
  np.testing.assert_allclose([r["loss"] for r in lines if "loss" in r], [r["loss"] for r in straight.metrics],
                             rtol=1e-6)
  assert (run_dir / "config.json").exists() and list((run_dir / "tensorboard").iterdir())
  # Nothing went to the local filesystem under a "gs:" name.
  assert not (tmp_path / "cwd" / "gs:").exists()


def test_remote_arrayrecord_is_refused_with_a_clear_error(corpus):
  from llada_jax.data import sources, tokenizer as tok_lib  # noqa: PLC0415

  tok = tok_lib.load_tokenizer(corpus["tokenizer"])
  with pytest.raises(ValueError, match=r"gs://b/x\.array_record.*local path"):
    sources.ArrayRecordRowSource([f"gs://b/x.array_record"], tok, 16)


# --------------------------------------------------------------------------------------------
# Two processes, SIGKILL after a checkpoint, resume.

WORKER = """
import json, sys, time
from llada_jax import sharding
from llada_jax.training import loop
from tests import train_fixtures
corpus, workdir, pid, nproc, port, total, slow_after = json.loads(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:5]), \\
    sys.argv[5], *map(int, sys.argv[6:8])
cfg = train_fixtures.make_config(corpus, workdir, "sft", total_steps=total,
                                 **{"checkpoint.every_steps": 2, "checkpoint.async_save": True,
                                    "logging.every_steps": 1})
cfg.mesh.data, cfg.mesh.fsdp = 2, 2
cfg.distributed.initialize = True
cfg.distributed.coordinator_address = "127.0.0.1:" + port
cfg.distributed.num_processes = nproc
cfg.distributed.process_id = pid
if slow_after >= 0:  # steps after `slow_after` wait, so the run is surely still going when it is killed
  real, calls = sharding.global_batch, [0]
  def slow(local, sh):
    calls[0] += 1
    if calls[0] > slow_after:
      time.sleep(0.3)
    return real(local, sh)
  sharding.global_batch = slow
loop.run(cfg)
print("FINISHED", flush=True)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(script, corpus, workdir, total, slow_after=-1):
  port = str(_free_port())
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(REPO),
         "JAX_PLATFORMS": "cpu"}
  return [subprocess.Popen([sys.executable, str(script), json.dumps(corpus), str(workdir), str(pid), "2", port,
                            str(total), str(slow_after)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for pid in range(2)]


def _wait(procs, timeout=300):
  outs = []
  for p in procs:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0 and "FINISHED" in out, out[-3000:]
    outs.append(out)
  return outs


def _committed_steps(checkpoints: pathlib.Path):
  return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.exists() else []


@pytest.mark.slow
def test_two_processes_killed_after_a_checkpoint_resume_to_the_same_parameters(corpus, tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  total = 12
  _wait(_launch(script, corpus, tmp_path / "straight", total))

  killed = tmp_path / "killed"
  procs = _launch(script, corpus, killed, total, slow_after=4)
  deadline = time.time() + 300
  while time.time() < deadline and not any(s >= 4 for s in _committed_steps(killed / "checkpoints")):
    assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs]
    time.sleep(0.1)
  time.sleep(0.5)  # a step or two further, possibly mid-save
  assert all(p.poll() is None for p in procs), "the run ended before it could be killed"
  for p in procs:
    os.kill(p.pid, signal.SIGKILL)
  for p in procs:
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
  at_kill = _committed_steps(killed / "checkpoints")
  assert at_kill and max(at_kill) < total

  _wait(_launch(script, corpus, killed, total))
  # The second run went on from the last committed step: metrics.jsonl holds the killed run's steps,
  # then the resumed ones from that step on (a restart from scratch would begin again at 1).
  steps = []
  for line in (killed / "metrics.jsonl").read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by the kill
      continue
    if "loss" in row:  # training steps; each (re)start also logs the data's counts at its first step
      steps.append(row["step"])
  restart = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)
  resumed = steps[restart:] if restart is not None else [s for s in steps if s > max(at_kill)]
  assert resumed == list(range(max(at_kill) + 1, total + 1)), steps
  print(f"killed with checkpoints {at_kill}; logged steps {steps}")
  cfg = train_fixtures.make_config(corpus, killed, "sft")
  chex.assert_trees_all_equal(_final_params(killed, cfg), _final_params(tmp_path / "straight", cfg))
  assert _committed_steps(killed / "checkpoints")[-1] == total
