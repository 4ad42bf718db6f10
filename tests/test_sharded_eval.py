"""Sharded generation and evaluation (8 fake CPU devices) give one device's results.

Runs are written straight to checkpoints (random tiny weights, no training): a plain one and a LoRA
one on it as its base. Greedy tokens must be identical; ELBO scores equal up to float32 rounding of
the sharded reductions. Batches of 3 examples do not divide any mesh's batch shards, so padding is
always exercised.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import evaluate, generate, lora, model as M, placement as placement_lib, sampling
from llada_jax.eval import likelihood
from llada_jax.storage import checkpoint as ckpt_lib
from tests import train_fixtures

MESHES = {"data8": dict(data=8), "fsdp4_data2": dict(data=2, fsdp=4),
          "fsdp2_tensor2_data2": dict(data=2, fsdp=2, tensor=2)}
EXACT = sampling.SamplerConfig(gen_length=8, block_length=4, steps=8)
FAST = {"prefix_cache_guided": EXACT.replace(cache="prefix", cfg_scale=0.5),
        "dual_cache_threshold": EXACT.replace(cache="dual", threshold=0.3, refresh_every=2)}
LORA = {"model.lora_rank": 4, "model.lora_alpha": 8.0}
RTOL = 2e-5  # float32 sums over a sharded model, relative to an ELBO of tens of nats


def _write_run(workdir, config, params):
  metadata = {"config": config.to_dict()}
  with ckpt_lib.CheckpointManager(workdir / "checkpoints", async_save=False, metadata=metadata) as manager:
    manager.save(1, {"params": params}, force=True)
  return workdir


def _random(abstract, seed):
  """Random values of the abstract tree's shapes, drawn in NumPy: no model init to compile. The scale
  makes predictions confident, so greedy picks are far from ties; norm weights stay 1."""
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    if jax.tree_util.keystr(path).endswith("['weight']"):
      return jnp.ones(a.shape, a.dtype)
    return jnp.asarray(0.5 * rng.normal(size=a.shape), a.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return train_fixtures.write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def plain_run(corpus, tmp_path_factory):
  root = tmp_path_factory.mktemp("plain")
  # lora_alpha (unused at rank 0) as the LoRA run's: its merged model has this very config, so the
  # LoRA test reuses these compilations.
  config = train_fixtures.make_config(corpus, root, "sft", **{"model.lora_alpha": LORA["model.lora_alpha"]})
  return _write_run(root, config, _random(M.abstract_params(M.ModelConfig.from_dict(config.model)), 0))


@pytest.fixture(scope="module")
def lora_run(corpus, plain_run, tmp_path_factory):
  """Adapters trained (here: drawn) on the plain run as their base (`checkpoint.init_from`)."""
  root = tmp_path_factory.mktemp("lora")
  config = train_fixtures.make_config(corpus, root, "sft", **LORA, **{"checkpoint.init_from": str(plain_run)})
  adapters = lora.split(M.abstract_params(M.ModelConfig.from_dict(config.model)))[0]
  return _write_run(root, config, _random(adapters, 1))


def _load(run, mesh=None):
  """(model config, params, placement or None)."""
  if mesh is None:
    return (*ckpt_lib.load_model(run)[:2], None)
  place = placement_lib.for_run(ckpt_lib.read_run_config(run)[1], mesh)
  cfg, params, _ = ckpt_lib.load_model(run, mesh=place.mesh, rules=place.rules)
  return cfg, params, place


def _prompts(cfg):
  rng = np.random.default_rng(1)
  return [list(rng.integers(4, cfg.vocab_size, n)) for n in (5, 11, 2)]


def _generate(loaded, config):
  cfg, params, place = loaded
  out = sampling.sample_from_ids(params, cfg, _prompts(cfg), jax.random.key(3), config, placement=place)
  return np.asarray(out.tokens), int(out.nfe)


def _scores(loaded, cfg_scale=0.0):
  cfg, params, place = loaded
  prompts = _prompts(cfg)
  answers = [list(np.random.default_rng(2).integers(4, cfg.vocab_size, n)) for n in (6, 3, 9)]
  return likelihood.score_answers(params, cfg, prompts, answers, jax.random.key(4), mc_num=4, batch_size=2,
                                  cfg_scale=cfg_scale, placement=place)


@pytest.fixture(scope="module")
def single(plain_run):
  return _load(plain_run)


def _assert_placed(params, cfg, place):
  expected = placement_lib.param_shardings(cfg, place)
  for leaf, sh in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
    assert leaf.sharding.is_equivalent_to(sh, leaf.ndim), (leaf.sharding, sh)


@pytest.mark.parametrize("mesh", MESHES.values(), ids=MESHES.keys())
def test_sharded_load_generation_and_scores_match_one_device(plain_run, single, mesh):
  sharded = _load(plain_run, mesh)
  cfg, params, place = sharded
  _assert_placed(params, cfg, place)
  # The samplers and scorers place their parameters; loaded ones are in place already: no copy.
  placed = placement_lib.put_params(params, cfg, place)
  assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(placed), jax.tree_util.tree_leaves(params)))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(single[1]))
  tokens, nfe = _generate(sharded, EXACT)
  want_tokens, want_nfe = _generate(single, EXACT)
  np.testing.assert_array_equal(tokens, want_tokens)
  assert tokens.shape == (3, EXACT.gen_length) and nfe == want_nfe
  np.testing.assert_allclose(_scores(sharded), _scores(single), rtol=RTOL)


@pytest.mark.parametrize("config", [pytest.param(FAST["prefix_cache_guided"], marks=pytest.mark.slow),
                                    FAST["dual_cache_threshold"]], ids=FAST.keys())
def test_fast_samplers_on_a_mesh_match_one_device(plain_run, single, config):
  sharded = _load(plain_run, MESHES["fsdp2_tensor2_data2"])
  tokens, nfe = _generate(sharded, config)
  want_tokens, want_nfe = _generate(single, config)
  np.testing.assert_array_equal(tokens, want_tokens)
  assert nfe == want_nfe


@pytest.mark.slow
def test_guided_scores_on_a_mesh_match_one_device(plain_run, single):
  sharded = _load(plain_run, MESHES["fsdp2_tensor2_data2"])
  np.testing.assert_allclose(_scores(sharded, 0.5), _scores(single, 0.5), rtol=RTOL)


def test_lora_run_loads_merged_on_a_mesh(lora_run):
  single_lora = _load(lora_run)
  sharded = _load(lora_run, MESHES["fsdp2_tensor2_data2"])
  cfg, params, place = sharded
  assert cfg.lora_rank == 0
  _assert_placed(params, cfg, place)
  # The merge's A B sums round differently once sharded: a last-bit difference on weights of order 1.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), jax.device_get(params),
               jax.device_get(single_lora[1]))
  np.testing.assert_array_equal(_generate(sharded, EXACT)[0], _generate(single_lora, EXACT)[0])
  np.testing.assert_allclose(_scores(sharded), _scores(single_lora), rtol=RTOL)


def test_default_mesh_is_the_runs_own_when_it_fits():
  run_config = {"mesh": {"data": -1, "fsdp": 4, "tensor": 1}}
  assert dict(placement_lib.for_run(run_config).mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  # Two devices cannot hold fsdp=4: every device goes on data.
  two = placement_lib.for_run(run_config, devices=jax.devices()[:2])
  assert dict(two.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1}
  asked = placement_lib.for_run(run_config, {"data": -1, "fsdp": 1, "tensor": 2})
  assert dict(asked.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}


def test_cli_tools_on_a_mesh(plain_run, tmp_path):
  prompts = ["what is 2 plus 3", "the cat", "one two three four five six"]
  outputs = []
  for mesh_flags in ([], ["--mesh.fsdp=2", "--mesh.tensor=2"]):
    out = tmp_path / f"gen{len(outputs)}.jsonl"
    args = ["--checkpoint", str(plain_run), "--gen_length", "4", "--batch_size", "3", "--output", str(out)]
    assert generate.main(args + [f"--prompt={p}" for p in prompts] + mesh_flags) == 0
    outputs.append(out.read_text())
  assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 3

  data = tmp_path / "scores.jsonl"
  data.write_text("".join(json.dumps({"prompt": p, "response": "the answer is 5"}) + "\n" for p in prompts))
  out = tmp_path / "scores.json"
  assert evaluate.main(["--checkpoint", str(plain_run), "--task", "scores", "--data", str(data), "--mc_num", "2",
                        "--batch_size", "2", "--output", str(out), "--mesh.fsdp=4"]) == 0
  result = json.loads(out.read_text())
  assert result["settings"]["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert len(result["records"]) == 3 and all(np.isfinite(r["elbo"]) for r in result["records"])


BAD_MESH_FLAGS = [
    (["--mesh.fsdp=0"], "--mesh.fsdp=0: expected a positive number of devices, or -1"),
    (["--mesh.tensor=-2"], "--mesh.tensor=-2: expected a positive number of devices, or -1"),
    (["--mesh.fsdp=3"], "--mesh.fsdp=3: the mesh needs a multiple of 3 devices but found 8; expected sizes "
                        "whose product divides 8 (--mesh.data takes the devices left)"),
    (["--mesh.tensor=-1", "--mesh.fsdp=3"], "--mesh.fsdp=3 --mesh.tensor=-1: the mesh needs a multiple of 3 "
                                            "devices but found 8; expected sizes whose product divides 8 "
                                            "(--mesh.tensor takes the devices left)"),
    (["--mesh.data=-1", "--mesh.fsdp=-1"], "--mesh.data=-1 --mesh.fsdp=-1: expected at most one axis of -1"),
    (["--mesh.data=2", "--mesh.fsdp=2"], "--mesh.data=2 --mesh.fsdp=2: the mesh takes 4 devices but found 8; "
                                         "expected sizes whose product is 8, or one of them -1"),
    (["--mesh.data=16"], "--mesh.data=16: the mesh takes 16 devices but found 8"),
    (["--mesh.tensor=two"], "flag --mesh.tensor=two: invalid literal for int()"),
]


@pytest.mark.parametrize("tool", ["generate", "evaluate"])
@pytest.mark.parametrize("flags,message", BAD_MESH_FLAGS, ids=[" ".join(f) for f, _ in BAD_MESH_FLAGS])
def test_bad_mesh_flags_are_one_line_before_any_work(tmp_path, capsys, tool, flags, message):
  data = tmp_path / "mc.jsonl"
  data.write_text(json.dumps({"prompt": "2 plus 2", "choices": ["4", "5"], "answer": 0}) + "\n")
  missing = str(tmp_path / "no_run")  # only a check made before loading can name the flag
  if tool == "generate":
    rc = generate.main(["--checkpoint", missing, "--prompt", "hi", *flags])
  else:
    rc = evaluate.main(["--checkpoint", missing, "--task", "mc", "--data", str(data), *flags])
  err = capsys.readouterr().err
  assert rc == 1 and "Traceback" not in err
  assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_the_sampler_on_a_mesh_applies_the_models_activation_constraints(plain_run):
  """Without the mesh and rules in the trace the model's constraints are no-ops and XLA may shard
  activations like the weights they meet."""
  cfg, params, place = _load(plain_run, MESHES["fsdp4_data2"])
  fn = sampling._compiled(cfg, EXACT, None, place, jax.random.key_impl(jax.random.key(0)))
  rows = place.shards
  batch = [jax.ShapeDtypeStruct(shape, dtype, sharding=place.batch_sharding)
           for shape, dtype in (((rows, 16), jnp.int32), ((rows,), jnp.int32), ((rows, 2), jnp.uint32))]
  found = [line for line in fn.lower(params, *batch).as_text().splitlines() if "sharding_constraint" in line]
  assert any('[{"data", "fsdp"}' in line for line in found), found[:3]


def test_a_mesh_that_does_not_divide_the_model_is_one_line(plain_run, capsys):
  # The tiny model has 2 key/value heads: tensor=4 cannot split them.
  rc = generate.main(["--checkpoint", str(plain_run), "--prompt", "hi", "--mesh.fsdp=2", "--mesh.tensor=4"])
  err = capsys.readouterr().err
  assert rc == 1 and len(err.strip().splitlines()) == 1, err
  assert "parameter blocks_0.attn.k_proj has size 2 along dimension 1, which the mesh's tensor=4 does not " \
         "divide; expected mesh axis sizes that divide the model's dimensions" in err


WORKER = """
import json, sys
import jax
run, pid, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize("127.0.0.1:" + port, num_processes=2, process_id=pid)
from tests import test_sharded_eval as T
loaded = T._load(run, {"data": 2, "fsdp": 2})  # 4 devices, 2 per process
print("RESULT", json.dumps({"tokens": T._generate(loaded, T.EXACT)[0].tolist(), "scores": T._scores(loaded).tolist()}),
      flush=True)
"""


@pytest.mark.slow
def test_two_processes_generate_and_score_like_one_device(plain_run, single, tmp_path):
  """Every process holds the same inputs, its devices take their rows, and all read the results."""
  import os, subprocess, sys  # noqa: E401, PLC0415
  from tests.test_multihost_resume import REPO, _free_port  # noqa: PLC0415

  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  port = str(_free_port())
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(REPO),
         "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, str(script), str(plain_run), str(pid), port], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0 and "RESULT" in out, out[-3000:]
    result = json.loads(out.split("RESULT", 1)[1].splitlines()[0])
    np.testing.assert_array_equal(result["tokens"], _generate(single, EXACT)[0])
    np.testing.assert_allclose(result["scores"], _scores(single), rtol=RTOL)
