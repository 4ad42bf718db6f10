"""The training system: sharded steps, resume, preemption, multi-process runs and bad input."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llada_jax.storage import checkpoint as ckpt_lib
from llada_jax import model as model_lib, optim, sharding
from llada_jax.training import build as build_lib, loop, objectives, state as state_lib, step as step_lib
from tests import train_fixtures

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return train_fixtures.write_corpus(tmp_path_factory.mktemp("corpus"))


def synthetic_batch(objective, vocab, b=8, l=48, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, vocab, (b, l)).astype(np.int32)
  if objective == "pretrain":
    return {"tokens": tokens}
  prompt_lengths = rng.integers(4, 12, (b,)).astype(np.int32)
  if objective == "sft":
    return {"tokens": tokens, "prompt_lengths": prompt_lengths, "example_id": np.arange(b, dtype=np.int32)}
  return {"chosen": tokens, "rejected": rng.integers(4, vocab, (b, l)).astype(np.int32),
          "prompt_lengths": prompt_lengths, "chosen_lengths": rng.integers(16, l + 1, (b,)).astype(np.int32),
          "rejected_lengths": rng.integers(16, l + 1, (b,)).astype(np.int32),
          "example_id": np.arange(b, dtype=np.int32)}


def one_step(config, mesh_config, devices, batch, grad_accum_steps=1):
  # A real update at step 0, and Adam made linear in the gradient (eps >> sqrt(v)): the update is
  # then ~ lr * g, so comparing parameters compares gradients without Adam's sign amplification.
  config.optimizer.warmup_steps, config.optimizer.eps, config.optimizer.lr = 0, 1.0, 1.0
  model_cfg = model_lib.ModelConfig.from_dict(config.model)
  objective = build_lib.objective_from_config(config, model_cfg)
  tx = optim.make_optimizer(config.optimizer)
  mesh = sharding.make_mesh(mesh_config, devices)
  rules = sharding.rules_from_config(config.sharding_rules)
  _, state_sh = state_lib.state_shardings(model_cfg, tx, mesh, rules)
  state = state_lib.create_train_state(model_cfg, tx, jax.random.key(1), mesh, rules)
  reference, reference_sh = None, None
  if objective.needs_reference:
    reference_sh = state_sh.params
    perturb = lambda p: p * 0.97 + 0.003  # a reference near the policy, placed like it
    reference = jax.jit(lambda p: jax.tree_util.tree_map(perturb, p), out_shardings=reference_sh)(state.params)
  batch_sh = sharding.batch_sharding(mesh, rules)
  step = step_lib.jit_train_step(
      step_lib.make_train_step(objective, tx, grad_accum_steps=grad_accum_steps), state_sh, batch_sh, mesh,
      reference_sh, rules=rules)
  init_params = jax.device_get(state.params)  # the state is donated to the step
  new_state, metrics = step(state, sharding.global_batch(batch, batch_sh), jax.random.key(2), reference)
  return new_state, jax.device_get(metrics), init_params


# naive DPO runs the VRPO code with another budget, pretraining the SFT step's path: slow by default.
@pytest.mark.parametrize("objective", [pytest.param("pretrain", marks=pytest.mark.slow), "sft", "vrpo",
                                       pytest.param("naive_dpo", marks=pytest.mark.slow)])
def test_sharded_step_matches_unsharded(corpus, tmp_path, objective):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  config = train_fixtures.make_config(corpus, tmp_path, objective)
  batch = synthetic_batch(objective, config.model.vocab_size)
  single, m1, init1 = one_step(config, {"data": 1}, jax.devices()[:1], batch)
  sharded, m8, init8 = one_step(config, {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices(), batch)

  chex.assert_trees_all_close(init1, init8, rtol=0, atol=0)
  moved = jax.tree_util.tree_map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), single.params, init1)
  assert min(jax.tree_util.tree_leaves(moved)) > 0  # every parameter was updated
  for name in ("loss", "grad_norm"):
    assert m1[name] == pytest.approx(m8[name], rel=2e-5), name
  chex.assert_trees_all_close(jax.device_get(single.params), jax.device_get(sharded.params), rtol=1e-5,
                              atol=1e-6)
  # The parameters really are sharded as the rules say.
  q = sharded.params["blocks_0"]["attn"]["q_proj"]
  assert q.sharding.spec == P("fsdp", "tensor", None)
  assert sharded.params["wte"].sharding.spec == P("tensor", "fsdp")
  assert sharded.params["blocks_0"]["mlp"]["ff_out"].sharding.spec == P("tensor", "fsdp")
  assert q.addressable_shards[0].data.shape == (q.shape[0] // 2, q.shape[1] // 2, q.shape[2])
  # Optimizer moments follow the params.
  moments = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(sharded.opt_state)[0]
             if "blocks_0" in jax.tree_util.keystr(path) and "q_proj" in jax.tree_util.keystr(path)]
  assert len(moments) == 2 and all(m.sharding.spec == P("fsdp", "tensor", None) for m in moments)


@pytest.mark.slow  # over 40 s on 2 cores; tests/test_packed_training.py covers micro-batches by default
def test_gradient_accumulation_equals_full_batch_for_vrpo(corpus, tmp_path):
  config = train_fixtures.make_config(corpus, tmp_path, "vrpo")
  batch = synthetic_batch("vrpo", config.model.vocab_size)
  full, m_full, _ = one_step(config, {"data": 1}, jax.devices()[:1], batch)
  accum, m_acc, _ = one_step(config, {"data": 1}, jax.devices()[:1], batch, grad_accum_steps=2)
  assert m_full["loss"] == pytest.approx(m_acc["loss"], rel=1e-5)
  chex.assert_trees_all_close(jax.device_get(full.params), jax.device_get(accum.params), rtol=1e-5, atol=1e-6)


def test_nonfinite_update_is_skipped_and_counted():
  params = {"w": jnp.ones((3,))}
  objective = objectives.Objective("toy", lambda p, b, k, r=None: ((p["w"] * b["x"]).sum(), {}))
  opt_cfg = optim.default_optimizer_config("sft")
  opt_cfg.warmup_steps = 0
  tx = optim.make_optimizer(opt_cfg)
  zero = jnp.zeros((), jnp.int32)
  state = state_lib.TrainState(step=zero, params=params, opt_state=tx.init(params), nonfinite_in_a_row=zero,
                             max_nonfinite_in_a_row=zero, nonfinite_total=zero)
  step = jax.jit(step_lib.make_train_step(objective, tx))
  key = jax.random.key(0)
  bad = {"x": jnp.array([1.0, jnp.nan, 1.0])}
  s1, m1 = step(state, bad, key)
  s2, _ = step(s1, bad, key)
  chex.assert_trees_all_equal(s2.params, params)
  chex.assert_trees_all_equal(s2.opt_state, state.opt_state)
  assert (int(s2.step), int(s2.nonfinite_in_a_row), int(s2.nonfinite_total), float(m1["skipped"])) == (2, 2, 2, 1.0)
  s3, m3 = step(s2, {"x": jnp.ones((3,))}, key)
  assert int(s3.nonfinite_in_a_row) == 0 and int(s3.max_nonfinite_in_a_row) == 2 and float(m3["skipped"]) == 0
  assert not np.allclose(np.asarray(s3.params["w"]), 1.0)
  assert float(m3["lr"]) == pytest.approx(opt_cfg.lr)


def _final_params(workdir, config):
  model_cfg = model_lib.ModelConfig.from_dict(config.model)
  return ckpt_lib.load_params(f"{workdir}/checkpoints", model_lib.abstract_params(model_cfg))


@pytest.mark.parametrize("objective", ["pretrain", pytest.param("sft", marks=pytest.mark.slow)])
def test_resume_gives_the_same_parameters(corpus, tmp_path, objective):
  straight = train_fixtures.make_config(corpus, tmp_path / "straight", objective)
  result = loop.run(straight)
  assert result.final_step == 6 and not result.preempted
  losses = [r["loss"] for r in result.metrics]
  assert len(losses) == 6 and all(np.isfinite(losses))

  resumed = train_fixtures.make_config(corpus, tmp_path / "resumed", objective)
  first = loop.run(resumed, stop_after=3, final_save=False)  # stops like a killed run after step 3's save
  assert first.final_step == 3
  assert ckpt_lib.CheckpointManager(f"{resumed.workdir}/checkpoints").all_steps() == [3]
  reports = []
  second = loop.run(resumed, on_progress=lambda step, total: reports.append((step, total)))
  assert second.final_step == 6
  # The resumed start, then each log step (every 2 steps here), once the steps before it are done.
  assert resumed.logging.every_steps == 2 and reports == [(3, 6), (4, 6), (6, 6)]
  chex.assert_trees_all_equal(_final_params(straight.workdir, straight), _final_params(resumed.workdir, resumed))
  # A run directory is enough to get the model back (config from the checkpoint's metadata).
  model_cfg, params, run_config = ckpt_lib.load_model(straight.workdir)
  assert model_cfg == model_lib.ModelConfig.from_dict(straight.model) and run_config["objective"] == objective
  chex.assert_trees_all_equal(params, _final_params(straight.workdir, straight))
  # Metrics of the resumed half match the uninterrupted run's.
  lines = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([r["loss"] for r in lines if "loss" in r], losses, rtol=1e-6)


@pytest.mark.slow  # over 40 s on 2 cores; the demo smoke chain runs SFT -> VRPO by default
def test_vrpo_from_an_sft_checkpoint(corpus, tmp_path):
  sft = train_fixtures.make_config(corpus, tmp_path / "sft", "sft", total_steps=3)
  loop.run(sft)
  for objective in ("vrpo", "naive_dpo"):
    cfg = train_fixtures.make_config(corpus, tmp_path / objective, objective, total_steps=2)
    cfg.checkpoint.init_from = f"{sft.workdir}/checkpoints"
    result = loop.run(cfg)
    first = result.metrics[0]
    # Policy == reference at step 0: with antithetic sampling the score is 0 up to float32 rounding
    # (the differentiated policy pass and the reference pass are compiled differently).
    if objective == "vrpo":
      assert abs(first["score"]) < 1e-5 and first["preference_loss"] == pytest.approx(np.log(2), rel=1e-5)
    for k in ("reward_margin", "preference_accuracy", "chosen_reward", "rejected_reward", "lr", "grad_norm"):
      assert k in first


def _run_cli(args, env=None, **kw):
  env = {**os.environ, **(env or {})}
  return subprocess.run([sys.executable, "-m", "llada_jax.train", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, **kw)


def _write_config_file(path, corpus, workdir, objective="pretrain", **overrides):
  """A config file for the CLI that builds the same config as train_fixtures.make_config."""
  path.write_text(
      "import json\nfrom tests import train_fixtures\n\n"
      "def get_config():\n"
      f"  return train_fixtures.make_config(json.loads({json.dumps(corpus)!r}), {str(workdir)!r}, {objective!r},\n"
      f"                                    **json.loads({json.dumps(overrides)!r}))\n")
  return path


def test_mistyped_config_key_is_named(corpus, tmp_path):
  cfg_file = _write_config_file(tmp_path / "cfg.py", corpus, tmp_path / "w")
  out = _run_cli([f"--config={cfg_file}", "--config.optimizer.lrr=1e-4"])
  assert out.returncode != 0
  assert "lrr" in out.stderr


def test_bad_data_and_config_leave_checkpoints_intact(corpus, tmp_path):
  cfg = train_fixtures.make_config(corpus, tmp_path / "run", "sft", total_steps=3)
  loop.run(cfg)
  ckpt_dir = pathlib.Path(cfg.workdir) / "checkpoints"
  before = {p: p.read_bytes() for p in ckpt_dir.rglob("*") if p.is_file()}

  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "what is 1 plus 2", "response": "3"}\n{"prompt": "x", "response": ""}\n')
  cfg_bad = train_fixtures.make_config(corpus, tmp_path / "run", "sft", total_steps=6)
  cfg_bad.data.train_files = (str(bad),)
  with pytest.raises(ValueError, match=r"bad\.jsonl.*line 2.*response"):
    loop.run(cfg_bad)

  cfg_vocab = train_fixtures.make_config(corpus, tmp_path / "run", "sft", total_steps=6)
  cfg_vocab.model.vocab_size = 64
  with pytest.raises(ValueError, match="vocab"):
    loop.run(cfg_vocab)

  cfg_batch = train_fixtures.make_config(corpus, tmp_path / "run", "sft", total_steps=6)
  cfg_batch.data.global_batch_size = 4  # 8 devices on the batch axis
  with pytest.raises(ValueError, match=r"global_batch_size=4.*8 batch shards"):
    loop.run(cfg_batch)

  after = {p: p.read_bytes() for p in ckpt_dir.rglob("*") if p.is_file()}
  assert before == after


def test_nonfinite_run_stops_with_a_clear_message(corpus, tmp_path, monkeypatch):
  real = build_lib.objective_from_config

  def nan_objective(config, model_cfg):
    obj = real(config, model_cfg)
    return objectives.Objective(obj.name, lambda p, b, k, r=None: jax.tree_util.tree_map(
        lambda x: x * jnp.nan, obj.loss_fn(p, b, k, r)))

  monkeypatch.setattr(build_lib, "objective_from_config", nan_objective)
  cfg = train_fixtures.make_config(corpus, tmp_path / "nan", "pretrain", max_nonfinite_in_a_row=2)
  with pytest.raises(loop.TrainingError, match="non-finite"):
    loop.run(cfg)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(corpus, tmp_path):
  overrides = {"total_steps": 100000, "checkpoint.every_steps": 100000, "logging.every_steps": 1}
  cfg = train_fixtures.make_config(corpus, tmp_path / "run", "pretrain", **overrides)
  cfg_file = _write_config_file(tmp_path / "cfg.py", corpus, tmp_path / "run", "pretrain", **overrides)
  proc = subprocess.Popen([sys.executable, "-m", "llada_jax.train", f"--config={cfg_file}"], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  metrics = pathlib.Path(cfg.workdir) / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  steps = ckpt_lib.CheckpointManager(f"{cfg.workdir}/checkpoints").all_steps()
  assert len(steps) == 1 and 2 <= steps[0] < 100000, (steps, out)


MULTIPROCESS_SCRIPT = """
import json, os, sys
from llada_jax.training import loop
from tests import train_fixtures
corpus, workdir, pid, nproc, port = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
cfg = train_fixtures.make_config(corpus, workdir, "sft", total_steps=4)
cfg.mesh.data, cfg.mesh.fsdp = 2, 2
if nproc > 1:
  cfg.distributed.initialize = True
  cfg.distributed.coordinator_address = "127.0.0.1:" + port
  cfg.distributed.num_processes = nproc
  cfg.distributed.process_id = pid
loop.run(cfg)
"""


@pytest.mark.slow
def test_two_processes_equal_one_process_with_four_devices(corpus, tmp_path):
  script = tmp_path / "mp.py"
  script.write_text(MULTIPROCESS_SCRIPT)
  port = str(_free_port())

  def launch(workdir, pid, nproc, devices):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(script), json.dumps(corpus), str(workdir), str(pid), str(nproc),
                             port], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  procs = [launch(tmp_path / "two", i, 2, 2) for i in range(2)]
  single = launch(tmp_path / "one", 0, 1, 4)
  for p in procs + [single]:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
  cfg = train_fixtures.make_config(corpus, tmp_path / "one", "sft")
  chex.assert_trees_all_close(_final_params(tmp_path / "two", cfg), _final_params(tmp_path / "one", cfg),
                              rtol=1e-5, atol=1e-6)


def test_step_applies_the_models_activation_constraints(corpus, tmp_path):
  """Without the mesh and rules in the trace, `nn.with_logical_constraint` is a no-op and XLA is
  free to shard activations like the weights (terabytes per device at 8B)."""
  config = train_fixtures.make_config(corpus, tmp_path, "sft")
  model_cfg = model_lib.ModelConfig.from_dict(config.model)
  tx = optim.make_optimizer(config.optimizer)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4}, jax.devices())
  rules = sharding.rules_from_config(config.sharding_rules)
  abstract_state, state_sh = state_lib.state_shardings(model_cfg, tx, mesh, rules)
  batch_sh = sharding.batch_sharding(mesh, rules)
  batch = synthetic_batch("sft", config.model.vocab_size)
  batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=batch_sh) for k, v in batch.items()}
  step = step_lib.make_train_step(build_lib.objective_from_config(config, model_cfg), tx)

  def constraints(**kw):
    lowered = step_lib.jit_train_step(step, state_sh, batch_sh, mesh, **kw).lower(
        abstract_state, batch, jax.random.key(0), None)
    return [l for l in lowered.as_text().splitlines() if "sharding_constraint" in l]

  assert not constraints()
  found = constraints(rules=rules)
  # Activations [batch, ...] are constrained to batch over data x fsdp.
  assert any('[{"data", "fsdp"}' in l for l in found), found[:3]
