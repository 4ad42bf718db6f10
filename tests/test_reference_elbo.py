"""VRPO with reference ELBOs computed ahead of time: same loss and gradients as the online step, no
reference weights in the step, and the run's table saved, reused and checked."""

import re

import jax
import numpy as np
import pytest

from llada_jax.storage import checkpoint as ckpt_lib
from llada_jax import model as model_lib, optim, sharding
from llada_jax.training import build as build_lib, loop, reference_elbo, state as state_lib, step as step_lib
from tests import train_fixtures

MESH = {"data": 2, "fsdp": 2, "tensor": 2}
ROOT_KEY_SEED = 7


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return train_fixtures.write_corpus(tmp_path_factory.mktemp("corpus"))


def preference_batch(vocab, example_ids, l=48, seed=0):
  rng = np.random.default_rng(seed)
  b = len(example_ids)
  return {"chosen": rng.integers(4, vocab, (b, l)).astype(np.int32),
          "rejected": rng.integers(4, vocab, (b, l)).astype(np.int32),
          "prompt_lengths": rng.integers(4, 12, (b,)).astype(np.int32),
          "chosen_lengths": rng.integers(16, l + 1, (b,)).astype(np.int32),
          "rejected_lengths": rng.integers(16, l + 1, (b,)).astype(np.int32),
          "example_id": np.asarray(example_ids, np.int32)}


# Three steps; example 3 comes back at step 2 (a later epoch): its draws there are new.
BATCH_IDS = [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15], [3, 16, 17, 18, 19, 20, 21, 22]]


class Setup:
  """Online and precomputed VRPO objectives on one sharded tiny model, a policy and a reference."""

  def __init__(self, corpus, tmp_path, objective="vrpo", packing=False):
    config = train_fixtures.make_config(corpus, tmp_path, objective, **{"data.packing": packing})
    # Adam made linear in the gradient (eps >> sqrt(v)): parameters then compare gradients.
    config.optimizer.warmup_steps, config.optimizer.eps, config.optimizer.lr = 0, 1.0, 1.0
    self.config = config
    self.model_cfg = model_lib.ModelConfig.from_dict(config.model)
    self.online = build_lib.objective_from_config(config, self.model_cfg)
    config.vrpo.precompute_reference = True
    self.precomputed = build_lib.objective_from_config(config, self.model_cfg)
    self.tx = optim.make_optimizer(config.optimizer)
    self.mesh = sharding.make_mesh(MESH)
    self.rules = sharding.rules_from_config(config.sharding_rules)
    _, self.state_sh = state_lib.state_shardings(self.model_cfg, self.tx, self.mesh, self.rules)
    self.batch_sh = sharding.batch_sharding(self.mesh, self.rules)
    self.root_key = jax.random.key(ROOT_KEY_SEED)
    self.batches = [preference_batch(self.model_cfg.vocab_size, ids, seed=i) for i, ids in enumerate(BATCH_IDS)]
    policy = state_lib.create_train_state(self.model_cfg, self.tx, jax.random.key(1), self.mesh, self.rules).params
    self.policy = jax.device_get(policy)
    self.reference = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x * 0.9 + 0.01, p),
                             out_shardings=self.state_sh.params)(policy)

  def state(self):
    params = jax.device_put(self.policy, self.state_sh.params)
    return state_lib.create_train_state(self.model_cfg, self.tx, None, self.mesh, self.rules, params=params)

  def step_fn(self, objective):
    reference_sh = self.state_sh.params if objective.needs_reference else None
    return step_lib.jit_train_step(step_lib.make_train_step(objective, self.tx), self.state_sh, self.batch_sh,
                                  self.mesh, reference_sh, rules=self.rules)

  def table(self, batches=None):
    return reference_elbo.compute(self.online.loss_fn, self.reference, batches or self.batches, self.root_key,
                                  batch_sharding=self.batch_sh, reference_shardings=self.state_sh.params,
                                  num_steps=len(self.batches), rules=self.rules)

  def global_batch(self, batch):
    return sharding.global_batch(batch, self.batch_sh)


@pytest.fixture(scope="module")
def setup(corpus, tmp_path_factory):
  return Setup(corpus, tmp_path_factory.mktemp("setup"))


def test_objective_modes(setup):
  assert setup.online.needs_reference and not setup.online.reference_in_batch
  assert not setup.precomputed.needs_reference and setup.precomputed.reference_in_batch
  # The same loss; only where B_ref comes from differs.
  assert setup.online.loss_fn.config == setup.precomputed.loss_fn.config


def test_table_holds_the_online_reference_elbos(setup):
  table = setup.table()
  assert len(table) == sum(map(len, BATCH_IDS)) and table.metadata["steps"] == 3
  assert not table.metadata["exhausted"]
  for step, batch in enumerate(setup.batches):
    key = jax.random.fold_in(setup.root_key, step)
    chosen, rejected = jax.jit(setup.online.loss_fn.reference_elbos)(setup.reference, batch, key)
    got_chosen, got_rejected = table.lookup(step, batch["example_id"])
    np.testing.assert_allclose(got_chosen, chosen, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_rejected, rejected, rtol=1e-6, atol=1e-6)
  # Keys depend on the step: the same example at another step has other masks, hence another value.
  first, _ = table.lookup(0, [3])
  again, _ = table.lookup(2, [3])
  assert abs(float(first[0]) - float(again[0])) > 1e-3


def test_micro_batches_do_not_change_the_values(setup):
  fn = jax.jit(reference_elbo.reference_elbo_fn(setup.online.loss_fn))
  fn4 = jax.jit(reference_elbo.reference_elbo_fn(setup.online.loss_fn, micro_batches=4))
  batch = setup.batches[1]
  for a, b in zip(fn(setup.reference, batch, setup.root_key, 1), fn4(setup.reference, batch, setup.root_key, 1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def _leaves_close(a, b, rel=1e-5):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(float(np.abs(x).max()), 1e-30)
    assert float(np.abs(x - y).max()) <= rel * scale, jax.tree_util.keystr(path)


@pytest.mark.slow  # over 40 s on 2 cores; four training steps compiled twice
def test_precomputed_steps_equal_online_steps(setup):
  table = setup.table()
  online_step, pre_step = setup.step_fn(setup.online), setup.step_fn(setup.precomputed)
  online, pre = setup.state(), setup.state()
  for step, batch in enumerate(setup.batches):
    with_reference = table.attach(batch, step)
    # Adam is linear in the gradient here (Setup), so equal parameters after each step mean equal
    # gradients; the gradient norm is compared as well.
    online, m_online = online_step(online, setup.global_batch(batch), setup.root_key, setup.reference)
    pre, m_pre = pre_step(pre, setup.global_batch(with_reference), setup.root_key, None)
    m_online, m_pre = jax.device_get((m_online, m_pre))
    for name in ("loss", "preference_loss", "score", "reward_margin", "grad_norm", "sft_loss"):
      assert m_pre[name] == pytest.approx(m_online[name], rel=1e-5, abs=1e-6), (step, name)
    assert m_pre["skipped"] == 0
    _leaves_close(jax.device_get(online.params), jax.device_get(pre.params))
  assert int(pre.step) == 3


def test_a_table_for_other_steps_gives_another_loss(setup):
  """The comparison above can fail: reference ELBOs drawn with the wrong step's keys differ."""
  shifted = setup.table(batches=[setup.batches[1], setup.batches[1], setup.batches[1]])
  batch = setup.batches[1]
  key = jax.random.fold_in(setup.root_key, 1)
  loss_fn = jax.jit(setup.online.loss_fn)
  right, _ = loss_fn(setup.policy, batch, key, setup.reference)
  wrong, _ = loss_fn(setup.policy, shifted.attach(batch, 0), key)
  assert abs(float(right) - float(wrong)) > 1e-4


def _count_dots(jaxpr) -> int:
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == "dot_general"
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          count += _count_dots(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          count += _count_dots(sub)
  return count


def test_precomputed_step_runs_no_reference_model(setup):
  table = setup.table()
  batch = setup.batches[0]
  online_step = step_lib.make_train_step(setup.online, setup.tx)
  pre_step = step_lib.make_train_step(setup.precomputed, setup.tx)
  state = setup.state()
  online = jax.make_jaxpr(online_step)(state, batch, setup.root_key, setup.reference)
  pre = jax.make_jaxpr(pre_step)(state, table.attach(batch, 0), setup.root_key, None)
  forward = jax.make_jaxpr(model_lib.logits_fn(setup.model_cfg))(setup.policy, batch["chosen"])
  # The online step runs the reference's forward pass on top of the policy's; the other does not.
  assert _count_dots(online.jaxpr) - _count_dots(pre.jaxpr) == _count_dots(forward.jaxpr) > 0
  # Its inputs hold the policy's state, the batch and the key: no reference parameters.
  n_state = len(jax.tree_util.tree_leaves(state))
  assert len(pre.jaxpr.invars) == n_state + len(table.attach(batch, 0)) + 1
  assert len(online.jaxpr.invars) == len(pre.jaxpr.invars) - 2 + len(jax.tree_util.tree_leaves(setup.policy))
  # Without the ELBOs in the batch it cannot fall back to a reference model.
  with pytest.raises(ValueError, match="reference_chosen_elbo"):
    jax.eval_shape(pre_step, state, batch, setup.root_key, None)


def test_table_lookup_save_and_load(tmp_path):
  table = reference_elbo.ReferenceELBOs(
      steps=np.array([0, 0, 1, 1, 1]), example_ids=np.array([5, 2, 5, 7, 7]),
      chosen=np.array([-1.0, -2.0, -3.0, -4.0, -4.0], np.float32),
      rejected=np.array([-10.0, -20.0, -30.0, -40.0, -40.0], np.float32), metadata={"steps": 2, "x": [1, 2]})
  assert len(table) == 4  # the repeated (1, 7) is one entry
  chosen, rejected = table.lookup(1, np.array([7, 5]))
  np.testing.assert_array_equal(chosen, [-4.0, -3.0])
  np.testing.assert_array_equal(rejected, [-40.0, -30.0])
  batch = table.attach({"example_id": np.array([2, 5], np.int32), "chosen": np.zeros((2, 3))}, 0)
  np.testing.assert_array_equal(batch["reference_chosen_elbo"], [-2.0, -1.0])
  assert batch["reference_rejected_elbo"].dtype == np.float32
  with pytest.raises(ValueError, match="no reference ELBO for step 1, example_id 2"):
    table.lookup(1, [5, 2])
  with pytest.raises(ValueError, match="example_id 0"):
    table.lookup(3, [0])
  path = tmp_path / "sub" / "ref.npz"
  table.save(path)
  loaded = reference_elbo.ReferenceELBOs.load(path)
  assert loaded.metadata == {"steps": 2, "x": [1, 2]} and loaded.source == str(path)
  np.testing.assert_array_equal(loaded.lookup(1, [5, 7])[0], [-3.0, -4.0])
  assert [p.name for p in path.parent.iterdir()] == ["ref.npz"]  # no temporary left
  (tmp_path / "bad.npz").write_bytes(b"not a table")
  with pytest.raises(ValueError, match="bad.npz: expected a reference-ELBO table"):
    reference_elbo.ReferenceELBOs.load(tmp_path / "bad.npz")


# --------------------------------------------------------------------------------------------
# Through the training loop.


def _save_params(directory, params):
  manager = ckpt_lib.CheckpointManager(directory, async_save=False)
  manager.save(0, {"params": params}, force=True)
  manager.close()


@pytest.fixture(scope="module")
def weights(setup, tmp_path_factory):
  """A policy and a different reference checkpoint, for loop.run."""
  root = tmp_path_factory.mktemp("weights")
  _save_params(root / "policy", setup.state().params)
  _save_params(root / "reference", setup.reference)
  return str(root / "policy"), str(root / "reference")


def vrpo_config(corpus, workdir, weights, precompute, **overrides):
  cfg = train_fixtures.make_config(corpus, workdir, "vrpo", **{"total_steps": 3, **overrides})
  cfg.checkpoint.init_from, cfg.checkpoint.reference_from = weights
  cfg.vrpo.precompute_reference = precompute
  return cfg


class _Spy:
  """Wraps step.jit_train_step to record the reference shardings and weights the step gets."""

  def __init__(self, monkeypatch):
    self.seen = []
    real = step_lib.jit_train_step

    def jit_train_step(step_fn, state_sh, batch_sh, mesh, reference_sh=None, **kwargs):
      jitted = real(step_fn, state_sh, batch_sh, mesh, reference_sh, **kwargs)
      self.seen.append(reference_sh)

      def call(state, batch, key, reference_params=None):
        self.seen.append(reference_params)
        assert set(batch) >= {"reference_chosen_elbo", "reference_rejected_elbo"}
        return jitted(state, batch, key, reference_params)
      return call

    monkeypatch.setattr(step_lib, "jit_train_step", jit_train_step)


def _load_or_compute(config, setup):
  """The table loop.run would use for `config` (computing it is not expected here)."""
  objective = build_lib.objective_from_config(config, setup.model_cfg)
  return reference_elbo.load_or_compute(
      loop.reference_table_path(config), loop.reference_table_metadata(config, objective), objective.loss_fn,
      total_steps=config.total_steps, root_key=jax.random.key(config.seed), batch_sharding=setup.batch_sh,
      reference_shardings=setup.state_sh.params, make_batches=lambda: iter(()), load_reference=lambda: None)


def test_run_computes_saves_reuses_and_checks_the_table(corpus, tmp_path, weights, setup, monkeypatch):
  spy = _Spy(monkeypatch)
  config = vrpo_config(corpus, tmp_path / "run", weights, True)
  result = loop.run(config)
  assert result.final_step == 3 and all(np.isfinite(m["loss"]) for m in result.metrics)
  assert spy.seen and all(x is None for x in spy.seen)  # built and called without reference weights
  path = tmp_path / "run" / "reference_elbos.npz"
  table = reference_elbo.ReferenceELBOs.load(path)
  assert len(table) == 3 * 8 and table.metadata["steps"] == 3 and not table.metadata["exhausted"]
  assert table.metadata["reference"]["from"] == weights[1]
  saved = path.read_bytes()

  def no_recompute(*args, **kwargs):
    raise AssertionError("the saved table should have been read")

  monkeypatch.setattr(reference_elbo, "compute", no_recompute)
  # Another run with the same data, keys and reference (here: another learning rate and beta) reads it.
  other = vrpo_config(corpus, tmp_path / "other", weights, True)
  other.vrpo.reference_elbos_file = str(path)
  other.optimizer.lr, other.vrpo.beta = 1e-4, 0.5
  np.testing.assert_array_equal(_load_or_compute(other, setup).chosen, table.chosen)
  # A run the table was not computed for is refused, naming the differences; the file is kept.
  for field, value, message in (("seed", 1, "seed: file 0, run 1"),
                                ("vrpo.n_timesteps", 3, "estimator.n_timesteps: file 2, run 3"),
                                ("data.global_batch_size", 16, "data.global_batch_size: file 8, run 16"),
                                ("total_steps", 5, "covers steps [0, 3), the run needs config.total_steps=5")):
    bad = vrpo_config(corpus, tmp_path / "bad", weights, True, **{field: value})
    bad.vrpo.reference_elbos_file = str(path)
    with pytest.raises(ValueError, match=re.escape(message)):
      _load_or_compute(bad, setup)
  assert path.read_bytes() == saved


@pytest.mark.slow
def test_run_with_precomputed_reference_matches_online(corpus, tmp_path, weights, monkeypatch):
  online = loop.run(vrpo_config(corpus, tmp_path / "online", weights, False))
  spy = _Spy(monkeypatch)
  pre = loop.run(vrpo_config(corpus, tmp_path / "pre", weights, True))
  assert spy.seen and all(x is None for x in spy.seen)
  for a, b in zip(online.metrics, pre.metrics, strict=True):
    for name in ("loss", "score", "grad_norm"):
      assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), name
  _leaves_close(jax.device_get(online.state.params), jax.device_get(pre.state.params))
  # Killed after step 2 and restarted, the run reads its table back and ends where the others did.
  config = vrpo_config(corpus, tmp_path / "killed", weights, True, **{"checkpoint.every_steps": 1})
  assert loop.run(config, stop_after=2, final_save=False).final_step == 2
  monkeypatch.setattr(reference_elbo, "compute", lambda *a, **k: pytest.fail("the table was recomputed"))
  resumed = loop.run(config)
  assert resumed.final_step == 3
  _leaves_close(jax.device_get(online.state.params), jax.device_get(resumed.state.params))


@pytest.mark.slow  # a precompute and two short runs: about 40 s on 2 cores
def test_packed_precomputed_steps_equal_online_steps(corpus, tmp_path):
  """Packed row pairs: the table is keyed per pair (empty slots skipped) and fills [rows, K] batches."""
  from tests.test_packed_training import packed_batch  # noqa: PLC0415

  packed_setup = Setup(corpus, tmp_path, packing=True)
  batches = [packed_batch("vrpo", packed_setup.model_cfg.vocab_size, seed=s) for s in range(2)]
  table = packed_setup.table(batches)
  assert len(table) == sum(int((b["example_id"] >= 0).sum()) for b in batches)
  online_step, pre_step = packed_setup.step_fn(packed_setup.online), packed_setup.step_fn(packed_setup.precomputed)
  online, pre = packed_setup.state(), packed_setup.state()
  for step, batch in enumerate(batches):
    with_reference = table.attach(batch, step)
    assert with_reference[reference_elbo.REFERENCE_CHOSEN].shape == batch["example_id"].shape
    online, m_online = online_step(online, packed_setup.global_batch(batch), packed_setup.root_key,
                                   packed_setup.reference)
    pre, m_pre = pre_step(pre, packed_setup.global_batch(with_reference), packed_setup.root_key, None)
    m_online, m_pre = jax.device_get((m_online, m_pre))
    for name in ("loss", "preference_loss", "score", "grad_norm"):
      assert m_pre[name] == pytest.approx(m_online[name], rel=1e-5, abs=1e-6), (step, name)
    _leaves_close(jax.device_get(online.params), jax.device_get(pre.params))
