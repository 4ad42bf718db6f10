"""Tests for llada_jax.checkpoint: save/restore, intervals, resharding, data state, preemption."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llada_jax.storage import checkpoint
from llada_jax.training import preemption

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def make_state(seed=0, step=3):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {
      "dense": {
          "kernel": jax.random.normal(k1, (4, 3)),
          "bias": jax.random.normal(k2, (3,)).astype(jnp.bfloat16),
      },
      "embed": jax.random.normal(k3, (5, 4)),
  }
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-zero moments and count
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def run_script(tmp_path, source, *args, env=None, timeout=120):
  script = tmp_path / "script.py"
  script.write_text(textwrap.dedent(source))
  full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
  return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=REPO_ROOT,
                        env=full_env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Save and restore


def test_relative_directory_saves_asynchronously_and_loads(tmp_path, monkeypatch):
  # `--workdir runs/demo` is relative; Orbax's array writer needs absolute paths.
  monkeypatch.chdir(tmp_path)
  state = make_state()
  with checkpoint.CheckpointManager("runs/x/checkpoints", async_save=True) as mngr:
    assert mngr.save(3, state)
    mngr.wait_until_finished()
    assert mngr.directory.is_absolute()
  with checkpoint.CheckpointManager("runs/x/checkpoints", read_only=True) as mngr:
    assert mngr.all_steps() == [3]
    assert_trees_equal(mngr.restore(abstract_state=checkpoint.abstract_like(state)), state)
  params = checkpoint.load_params("runs/x/checkpoints", checkpoint.abstract_like(state.params))
  assert_trees_equal(params, state.params)


def test_round_trip_struct_dataclass_and_adamw_state(tmp_path):
  state = make_state()
  config = {"model": {"d_model": 4}, "lr": 1e-2, "name": "demo", "shape": (2, 3)}
  with checkpoint.CheckpointManager(tmp_path / "ckpt", save_interval_steps=1,
                                    metadata=config) as mngr:
    assert mngr.latest_step() is None
    assert mngr.save(3, state, metadata={"note": "first"})
    mngr.wait_until_finished()
    restored = mngr.restore(abstract_state=checkpoint.abstract_like(state))
    assert isinstance(restored, TrainState)
    assert_trees_equal(restored, state)
    assert restored.params["dense"]["bias"].dtype == jnp.bfloat16
    meta = mngr.read_metadata(3)
    assert meta == {"model": {"d_model": 4}, "lr": 1e-2, "name": "demo", "shape": [2, 3],
                    "note": "first"}


def test_restore_with_eval_shape_target_and_fresh_manager(tmp_path):
  state = make_state()
  with checkpoint.CheckpointManager(tmp_path, save_interval_steps=5) as mngr:
    mngr.save(5, state)
  abstract = jax.eval_shape(make_state)  # as the loop builds it: no arrays allocated
  with checkpoint.CheckpointManager(tmp_path, save_interval_steps=5) as mngr:
    assert mngr.all_steps() == [5]
    assert_trees_equal(mngr.restore(5, abstract_state=abstract), state)


def test_interval_max_to_keep_and_force(tmp_path):
  mngr = checkpoint.CheckpointManager(tmp_path, save_interval_steps=2, max_to_keep=2)
  saved = [step for step in range(1, 8) if mngr.save(step, make_state(step=step))]
  assert saved == [2, 4, 6]  # no save at step 1 although nothing exists yet
  mngr.wait_until_finished()
  assert mngr.all_steps() == [4, 6]
  assert mngr.latest_step() == 6
  assert mngr.save(7, make_state(step=7), force=True)
  mngr.close()
  assert mngr.all_steps() == [6, 7]
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["6", "7"]


def test_existing_step_is_never_overwritten(tmp_path):
  original, other = make_state(seed=0, step=4), make_state(seed=1, step=4)
  with checkpoint.CheckpointManager(tmp_path, save_interval_steps=2) as mngr:
    assert mngr.save(4, original)
    # The same step again, e.g. a preemption save right after an interval save.
    assert not mngr.save(4, other, force=True)
    assert not mngr.save(4, other)
  # And from a new run over the same directory.
  with checkpoint.CheckpointManager(tmp_path, save_interval_steps=2) as mngr:
    assert not mngr.save(4, other, force=True)
    assert not mngr.save(2, other)  # older than the latest checkpoint
    assert_trees_equal(mngr.restore(4, abstract_state=checkpoint.abstract_like(original)),
                       original)


def test_async_save_then_wait(tmp_path):
  big = {"params": {"w": jnp.ones((512, 512))}, "step": jnp.asarray(2)}
  mngr = checkpoint.CheckpointManager(tmp_path, save_interval_steps=1, async_save=True)
  assert mngr.save(2, big)
  assert mngr.latest_step() == 2  # known while being written
  mngr.wait_until_finished()
  assert (tmp_path / "2" / "state").is_dir()
  assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]
  assert_trees_equal(mngr.restore(abstract_state=checkpoint.abstract_like(big)), big)
  mngr.close()


def test_synchronous_save(tmp_path):
  state = make_state()
  with checkpoint.CheckpointManager(tmp_path, save_interval_steps=1, async_save=False) as mngr:
    assert mngr.save(1, state)
    assert (tmp_path / "1" / "state").is_dir()


def test_restore_errors_name_directory_and_step(tmp_path):
  state = make_state()
  with checkpoint.CheckpointManager(tmp_path / "run", save_interval_steps=1) as mngr:
    with pytest.raises(FileNotFoundError, match="No checkpoint to restore in .*run"):
      mngr.restore(abstract_state=checkpoint.abstract_like(state))
    mngr.save(1, state)
    mngr.wait_until_finished()
    with pytest.raises(FileNotFoundError, match=r"step 9 .*available steps: \[1\]"):
      mngr.restore(9, abstract_state=checkpoint.abstract_like(state))

    wrong_shape = checkpoint.abstract_like(state).replace(params={
        **state.params, "embed": jax.ShapeDtypeStruct((6, 4), jnp.float32)})
    with pytest.raises(ValueError) as e:
      mngr.restore(1, abstract_state=wrong_shape)
    msg = str(e.value)
    assert "step 1" in msg and str(tmp_path / "run") in msg
    assert "params.embed" in msg and "(6, 4)" in msg and "(5, 4)" in msg

    missing_leaf = checkpoint.abstract_like(state).replace(params={"embed": state.params["embed"]})
    with pytest.raises(ValueError, match=r"step 1 .*'params\.dense\.bias'"):
      mngr.restore(1, abstract_state=missing_leaf)

    it = iter(grain.MapDataset.range(4).to_iter_dataset())
    with pytest.raises(ValueError, match="no data-iterator state"):
      mngr.restore(1, abstract_state=checkpoint.abstract_like(state), data_iterator=it)


# ---------------------------------------------------------------------------------------------
# Data iterator


def make_iterator():
  ds = grain.MapDataset.range(100).seed(7).shuffle().map(lambda x: x * 10).batch(4)
  return iter(ds.to_iter_dataset())


def test_grain_iterator_position_saved_and_restored(tmp_path):
  state = make_state()
  it = make_iterator()
  for _ in range(3):
    next(it)
  mngr = checkpoint.CheckpointManager(tmp_path, save_interval_steps=1, async_save=True)
  assert mngr.save(3, state, data_iterator=it)
  # The loop keeps consuming while the arrays are written in the background.
  expected = [next(it) for _ in range(4)]
  mngr.close()

  fresh = make_iterator()
  with checkpoint.CheckpointManager(tmp_path, save_interval_steps=1) as mngr:
    restored = mngr.restore(abstract_state=checkpoint.abstract_like(state), data_iterator=fresh)
  assert_trees_equal(restored, state)
  for want in expected:
    np.testing.assert_array_equal(next(fresh), want)


# ---------------------------------------------------------------------------------------------
# Loading parameters only


def test_load_params_from_train_state_checkpoint(tmp_path):
  state = make_state()
  with checkpoint.CheckpointManager(tmp_path, save_interval_steps=1) as mngr:
    mngr.save(1, state)
    mngr.save(2, make_state(seed=1, step=2))
  # Abstract params only: the optimizer state of that run is not needed.
  abstract = jax.eval_shape(lambda: make_state().params)
  assert_trees_equal(checkpoint.load_params(tmp_path, abstract, step=1), state.params)
  latest = checkpoint.load_params(str(tmp_path), abstract)
  assert_trees_equal(latest, make_state(seed=1).params)

  # A sub-tree, and a cast to another dtype.
  dense_bf16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
                            abstract["dense"])
  dense = checkpoint.load_params(tmp_path, dense_bf16, step=1, params_path=("params", "dense"))
  assert dense["kernel"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dense["kernel"], np.float32),
                             np.asarray(state.params["dense"]["kernel"]), rtol=1e-2)


def test_load_params_errors(tmp_path):
  abstract = jax.eval_shape(lambda: make_state().params)
  missing = tmp_path / "no_such_run"
  with pytest.raises(FileNotFoundError, match=f"No checkpoint directory at {missing}"):
    checkpoint.load_params(missing, abstract)
  empty = tmp_path / "empty_run"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=f"{empty}: it holds no finished checkpoint"):
    checkpoint.load_params(empty, abstract)

  run = tmp_path / "run"
  with checkpoint.CheckpointManager(run, save_interval_steps=1) as mngr:
    mngr.save(1, make_state())
  with pytest.raises(FileNotFoundError, match=r"step 5 .*available steps: \[1\]"):
    checkpoint.load_params(run, abstract, step=5)

  bigger = {**abstract, "embed": jax.ShapeDtypeStruct((8, 4), jnp.float32)}
  with pytest.raises(ValueError) as e:
    checkpoint.load_params(run, bigger)
  msg = str(e.value)
  assert str(run) in msg and "step 1" in msg
  assert "'embed': expected shape (8, 4), found (5, 4)" in msg

  extra = {**abstract, "lm_head": jax.ShapeDtypeStruct((4, 5), jnp.float32)}
  with pytest.raises(ValueError, match="'lm_head' .* is not in the checkpoint"):
    checkpoint.load_params(run, extra)
  fewer = {"embed": abstract["embed"]}
  with pytest.raises(ValueError, match="'dense.bias' .* is in the checkpoint but not in the"):
    checkpoint.load_params(run, fewer)
  with pytest.raises(ValueError, match=r"no 'policy' \(found: \['opt_state', 'params', 'step'\]"):
    checkpoint.load_params(run, abstract, params_path=("policy",))


# ---------------------------------------------------------------------------------------------
# Interrupted saves


def test_leftover_temporary_checkpoint_is_ignored(tmp_path):
  state = make_state()
  with checkpoint.CheckpointManager(tmp_path, save_interval_steps=2) as mngr:
    mngr.save(2, state)
  # What a run killed while writing step 4 leaves behind (local filesystems: rename on commit).
  leftover = tmp_path / "4.orbax-checkpoint-tmp-1700000000000000"
  (leftover / "state").mkdir(parents=True)
  (leftover / "state" / "partial").write_bytes(b"\0" * 16)

  abstract = checkpoint.abstract_like(state)
  # Read-only loading does not clean up, and must still skip it.
  assert_trees_equal(checkpoint.load_params(tmp_path, abstract.params), state.params)
  with checkpoint.CheckpointManager(tmp_path, save_interval_steps=2) as mngr:
    assert mngr.latest_step() == 2
    assert mngr.all_steps() == [2]
    assert_trees_equal(mngr.restore(abstract_state=abstract), state)
    # The resumed run reaches step 4 again and saves it normally.
    assert mngr.save(4, make_state(step=4))
  assert not leftover.exists()
  assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["2", "4"]


# ---------------------------------------------------------------------------------------------
# Preemption


def test_watcher_flag_and_handler_restored():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionWatcher() as watcher:
    assert signal.getsignal(signal.SIGTERM) != previous
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not watcher.requested and time.time() < deadline:
      time.sleep(0.01)
    assert watcher.requested
    assert watcher.should_stop(2)
    assert watcher.should_stop(3)  # stays set
  assert signal.getsignal(signal.SIGTERM) == previous


def test_watcher_multiprocess_without_preemption_service(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(preemption, "_preemption_sync_manager", lambda: None)
  calls = []
  # Another process got the signal: the all-gathered flag is set even though ours is not.
  monkeypatch.setattr(preemption, "_any_process", lambda flag: calls.append(flag) or True)
  with preemption.PreemptionWatcher(check_every=4) as watcher:
    assert not watcher.should_stop(1)  # not a check step: no collective
    assert not watcher.should_stop(3)
    assert calls == []
    assert watcher.should_stop(4)
    assert calls == [False]


def test_watcher_multiprocess_uses_jax_preemption_sync(monkeypatch):
  from jax.experimental import multihost_utils
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(preemption, "_preemption_sync_manager", lambda: object())
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: step == 5)
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionWatcher() as watcher:
    assert signal.getsignal(signal.SIGTERM) == previous  # JAX owns SIGTERM here
    assert [watcher.should_stop(s) for s in range(3, 8)] == [False, False, True, True, True]


SIGTERM_LOOP = """
import pathlib, sys, time
import jax.numpy as jnp
from llada_jax.storage import checkpoint
from llada_jax.training import preemption

directory, ready = sys.argv[1], pathlib.Path(sys.argv[2])
state = {"step": jnp.asarray(0), "params": {"w": jnp.zeros((8,))}}
mngr = checkpoint.CheckpointManager(directory, save_interval_steps=10**6, max_to_keep=2)
with preemption.PreemptionWatcher() as watcher:
  for step in range(1, 100_000):
    state = {"step": jnp.asarray(step), "params": {"w": state["params"]["w"] + 1}}
    mngr.save(step, state)
    ready.touch()
    if watcher.should_stop(step):
      mngr.save(step, state, force=True)
      break
    time.sleep(0.005)
  else:
    sys.exit(3)
mngr.close()
print("stopped at", step)
"""


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  script = tmp_path / "loop.py"
  script.write_text(SIGTERM_LOOP)
  ready, ckpt = tmp_path / "ready", tmp_path / "ckpt"
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
  proc = subprocess.Popen([sys.executable, str(script), str(ckpt), str(ready)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 60
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert ready.exists(), proc.communicate(timeout=5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  stopped_at = int(out.split("stopped at")[1])
  with checkpoint.CheckpointManager(ckpt, save_interval_steps=1) as mngr:
    assert mngr.all_steps() == [stopped_at]
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32),
                "params": {"w": jax.ShapeDtypeStruct((8,), jnp.float32)}}
    restored = mngr.restore(abstract_state=abstract)
  assert int(restored["step"]) == stopped_at
  np.testing.assert_array_equal(restored["params"]["w"], np.full((8,), stopped_at, np.float32))


# ---------------------------------------------------------------------------------------------
# Another mesh (8 fake CPU devices in a subprocess: XLA_FLAGS must be set before jax starts)


RESHARD = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from llada_jax.storage import checkpoint
from llada_jax.training import preemption

assert jax.device_count() == 8, jax.devices()
directory = sys.argv[1]
auto = (AxisType.Auto,) * 2
mesh_a = jax.make_mesh((4, 2), ("data", "model"), axis_types=auto)
mesh_b = jax.make_mesh((2, 4), ("data", "model"), axis_types=auto)

w = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16)
state = {
    "step": jnp.asarray(10),
    "params": {"w": jax.device_put(w, NamedSharding(mesh_a, P("data", "model"))),
               "b": jax.device_put(jnp.arange(16.0), NamedSharding(mesh_a, P("model")))},
}
state["opt"] = {"mu": jax.tree.map(lambda x: x * 2, state["params"])}
with checkpoint.CheckpointManager(directory, save_interval_steps=10) as mngr:
  assert mngr.save(10, state)

def target(x, spec):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh_b, spec))

wanted = {
    "step": target(state["step"], P()),
    "params": {"w": target(w, P("model", "data")), "b": target(state["params"]["b"], P())},
    "opt": {"mu": {"w": target(w, P(None, "model")), "b": target(state["params"]["b"], P("model"))}},
}
with checkpoint.CheckpointManager(directory, save_interval_steps=10) as mngr:
  restored = mngr.restore(abstract_state=wanted)
for got, want, orig in zip(jax.tree.leaves(restored), jax.tree.leaves(wanted), jax.tree.leaves(state)):
  assert got.sharding == want.sharding, (got.sharding, want.sharding)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(orig))

replicated = jax.tree.map(lambda x: target(x, P()), state["params"])
params = checkpoint.load_params(directory, replicated)
for got, want, orig in zip(jax.tree.leaves(params), jax.tree.leaves(replicated),
                           jax.tree.leaves(state["params"])):
  assert got.sharding == want.sharding and got.sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(got), np.asarray(orig))
print("OK")
"""


def test_restore_onto_a_different_mesh(tmp_path):
  result = run_script(tmp_path, RESHARD, tmp_path / "ckpt",
                      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                           "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("OK")


# ---------------------------------------------------------------------------------------------
# Two real processes (jax.distributed on CPU): slow, run with -m slow


TWO_PROCESS_LOOP = """
import pathlib, sys, time
import jax
process_id, port, directory, service = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_enable_preemption_service", service == "on")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from llada_jax.storage import checkpoint
from llada_jax.training import preemption

mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
sharding = NamedSharding(mesh, P("data"))
mngr = checkpoint.CheckpointManager(directory, save_interval_steps=10**6)
with preemption.PreemptionWatcher() as watcher:
  for step in range(1, 100_000):
    w = jax.make_array_from_callback((4,), sharding, lambda i: np.full((4,), step, np.float32)[i])
    pathlib.Path(f"{directory}.ready{process_id}").touch()
    if watcher.should_stop(step):
      mngr.save(step, {"w": w}, force=True)
      break
    time.sleep(0.005 * (process_id + 1))  # the processes run at different speeds
  else:
    sys.exit(3)
mngr.close()
print("stopped at", step)
"""


@pytest.mark.slow
@pytest.mark.parametrize("service", ["on", "off"])
def test_two_processes_agree_on_the_preemption_step(tmp_path, service):
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  script = tmp_path / "loop.py"
  script.write_text(TWO_PROCESS_LOOP)
  ckpt = tmp_path / "ckpt"
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(ckpt), service],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    deadline = time.time() + 90
    while time.time() < deadline and not all(
        pathlib.Path(f"{ckpt}.ready{i}").exists() for i in range(2)):
      assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # only one process is told
    outputs = [p.communicate(timeout=90) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  stopped = {int(out.split("stopped at")[1]) for out, _ in outputs}
  assert len(stopped) == 1, outputs
  step = stopped.pop()
  with checkpoint.CheckpointManager(ckpt, save_interval_steps=1) as mngr:
    assert mngr.all_steps() == [step]
    restored = mngr.restore(abstract_state={"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
  np.testing.assert_array_equal(restored["w"], np.full((4,), step, np.float32))
