"""Ahead-of-time planning: the train step compiled from abstract arrays, memory and time estimates."""

import json
import pathlib
import subprocess
import sys

import jax
import pytest

from llada_jax import configs, metrics, model as model_lib
from llada_jax.training import planning as plan

REPO = pathlib.Path(__file__).resolve().parent.parent
LLADA_8B_PARAMS = 8_015_581_184


def tiny_config(objective="sft", **mesh):
  c = configs.base_config()
  c.workdir = "unused"
  c.objective = objective
  c.data.seq_len = 16
  c.data.global_batch_size = 8
  c.optimizer.warmup_steps = 2
  c.vrpo.n_timesteps = 2
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh.get("data", 1), mesh.get("fsdp", 1), mesh.get("tensor", 1)
  return c


def test_plan_numbers_are_consistent_with_the_shardings_and_the_flop_count():
  assert jax.device_count() == 8
  config = tiny_config("sft", fsdp=8)
  p = plan.make_plan(config, accelerators=("v5p", "h100"), assumed_mfu=0.5)
  mem, comp = p["memory_per_device_bytes"], p["compiled_memory_per_device_bytes"]
  model_cfg = model_lib.ModelConfig.from_dict(config.model)

  assert p["n_devices"] == 8 and p["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and p["batch_shards"] == 8
  # Every tiny parameter has an `embed` axis (32, divisible by 8) mapped to fsdp: an exact eighth each.
  assert p["params_bytes_total"] == 4 * model_cfg.num_params()
  assert mem["params"] * 8 == p["params_bytes_total"]
  # Adam's two moments follow the parameters; the rest of the optimizer state is a few scalars.
  assert 0 <= mem["opt_state"] - 2 * mem["params"] <= 64
  assert mem["reference_params"] == 0 and mem["analytic_total"] == mem["params"] + mem["opt_state"]
  # The compiled program's arguments are exactly the shards the analytic count adds up, and the
  # donated state (all but the batch and key) is aliased to the outputs.
  assert comp["argument"] == mem["analytic_arguments"]
  assert comp["alias"] == mem["params"] + mem["opt_state"] + mem["state_counters"]
  assert comp["peak_estimate"] == comp["argument"] + comp["output"] - comp["alias"] + comp["temp"]

  flops = metrics.lm_step_flops(model_cfg, batch_size=8, seq_len=16)
  assert p["flops_per_step"] == flops and p["flops_per_device_per_step"] == flops / 8
  v5p = p["accelerators"]["v5p"]
  assert v5p["step_time_s_at_100pct_mfu"] == pytest.approx(flops / (8 * 459e12))
  assert v5p["step_time_s_at_assumed_mfu"] == pytest.approx(flops / (8 * 459e12 * 0.5))
  assert v5p["tokens_per_s_at_assumed_mfu"] == pytest.approx(8 * 16 / v5p["step_time_s_at_assumed_mfu"])
  assert v5p["fits"] and v5p["hbm_fraction"] == pytest.approx(comp["peak_estimate"] / 95e9)
  assert p["accelerators"]["h100"]["peak_bf16_flops_per_device"] == pytest.approx(989.5e12)
  text = plan.format_plan(p)
  assert "TPU v5p" in text and "H100 SXM" in text and "fits" in text


def test_a_batch_the_mesh_cannot_split_is_refused_before_compiling():
  config = tiny_config("sft", fsdp=8)
  config.data.global_batch_size = 12
  with pytest.raises(ValueError, match=r"global_batch_size=12.*8 batch shards"):
    plan.make_plan(config)


def test_an_unknown_accelerator_is_named():
  with pytest.raises(ValueError, match="tpu9"):
    plan.accelerator_estimate("tpu9", flops_per_step=1.0, n_devices=1, tokens_per_step=1, peak_bytes=None,
                              assumed_mfu=0.4)


CLI_CONFIG = """
from llada_jax import configs

def get_config(mesh="4"):
  c = configs.base_config()
  c.objective = "vrpo"
  c.data.seq_len = 16
  c.data.global_batch_size = 4
  c.optimizer.warmup_steps = 2
  c.vrpo.n_timesteps = 1
  c.vrpo.sft_weight = 0.0
  c.mesh.data, c.mesh.fsdp = 1, int(mesh)
  return c
"""


def test_cli_sets_up_its_own_devices_and_writes_json(tmp_path):
  cfg = tmp_path / "tiny_vrpo.py"
  cfg.write_text(CLI_CONFIG)
  out = tmp_path / "plan.json"
  proc = subprocess.run([sys.executable, "-m", "llada_jax.plan", f"--config={cfg}:2", "--devices=2",
                         "--accelerator=v5e,a100", f"--out={out}", "--config.vrpo.beta=0.1"], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  p = json.loads(out.read_text())
  assert p["n_devices"] == 2 and p["platform"] == "cpu" and p["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
  mem = p["memory_per_device_bytes"]
  # The frozen reference is sharded like the policy.
  assert mem["reference_params"] == mem["params"] > 0
  assert p["compiled_memory_per_device_bytes"]["argument"] == mem["analytic_arguments"]
  assert set(p["accelerators"]) == {"v5e", "a100"}
  assert "TPU v5e" in proc.stdout and "A100" in proc.stdout


def test_cli_requires_devices():
  proc = subprocess.run([sys.executable, "-m", "llada_jax.plan", "--config=llada_8b_sft"], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0 and "--devices" in proc.stderr


@pytest.mark.parametrize("name", ["llada_8b_sft", "llada_8b_vrpo"])
@pytest.mark.parametrize("variant", ["v5p", "h100x8"])
def test_8b_recipes_follow_the_paper(name, variant):
  c = configs.load(f"{name}:{variant}")
  model_cfg = model_lib.ModelConfig.from_dict(c.model)
  assert model_cfg.num_params() == LLADA_8B_PARAMS
  assert (c.model.dtype, c.model.param_dtype, c.model.remat, c.model.scan_layers) == ("bfloat16", "float32", "full",
                                                                                       True)
  assert c.optimizer.total_steps == c.total_steps
  if name == "llada_8b_sft":
    assert (c.objective, c.data.global_batch_size, c.data.seq_len, c.data.packing) == ("sft", 256, 4096, True)
    assert (c.optimizer.schedule, c.optimizer.lr, c.optimizer.warmup_steps, c.optimizer.final_lr) == (
        "sft", 2.5e-5, 50, 2.5e-6)
    assert c.optimizer.weight_decay == 0.1 and c.total_steps == -(-4_500_000 * 3 // 256)
  else:
    assert (c.objective, c.data.global_batch_size, c.data.seq_len, c.data.packing) == ("vrpo", 64, 4096, True)
    assert 8 % c.vrpo.copy_chunks == 0 and c.vrpo.copy_chunks > 1
    assert (c.optimizer.schedule, c.optimizer.lr, c.optimizer.warmup_steps) == ("cosine", 5e-7, 15)
    assert (c.optimizer.weight_decay, c.optimizer.b1, c.optimizer.b2) == (0.01, 0.9, 0.95)
    assert (c.vrpo.beta, c.vrpo.n_timesteps, c.vrpo.masks_per_timestep, c.vrpo.antithetic, c.vrpo.sft_weight) == (
        0.2, 8, 1, True, 0.05)
    assert c.total_steps == -(-350_000 // 64)
  per_node = variant == "h100x8" and name == "llada_8b_sft"  # VRPO needs FSDP over every GPU
  assert dict(c.mesh) == ({"data": -1, "fsdp": 8, "tensor": 1, "dcn_data": 1} if per_node
                          else {"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 1})


@pytest.mark.parametrize("variant", ["sft_h100x8", "vrpo_h100x8", "sft_v5e", "vrpo_v5e", "sft_v6e", "vrpo_v6e"])
def test_8b_lora_recipes_are_the_full_recipes_with_adapters(variant):
  c = configs.load(f"llada_8b_lora:{variant}")
  objective, platform = variant.split("_")
  full = configs.load(f"llada_8b_{objective}:v5p")
  assert (c.model.lora_rank, c.model.lora_alpha, c.model.lora_base_dtype) == (16, 32.0, "bfloat16")
  assert c.objective == full.objective and c.data.to_dict() == full.data.to_dict()
  assert c.vrpo.n_timesteps == full.vrpo.n_timesteps and c.total_steps == full.total_steps
  devices = 8 if platform == "h100x8" else 64
  assert c.grad_accum_steps * devices == c.data.global_batch_size


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="tpu9.*v5p"):
    configs.load("llada_8b_vrpo:tpu9")


# --------------------------------------------------------------------------------------------
# The 8B recipes on 64 devices, compiled ahead of time on fake CPU devices (about 15-60 s each).

MESHES = {
    "fsdp64": ["--config.mesh.fsdp=64"],
    "fsdp16_tensor4": ["--config.mesh.fsdp=16", "--config.mesh.tensor=4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["llada_8b_sft", "llada_8b_vrpo"])
@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_8b_step_compiles_for_64_devices_and_fits_v5p_and_h100(recipe, mesh, tmp_path):
  out = tmp_path / "plan.json"
  extra = list(MESHES[mesh])
  if recipe == "llada_8b_vrpo" and mesh == "fsdp16_tensor4":
    extra.append("--config.grad_accum_steps=4")  # 16 batch shards: 4 micro-batches of one pair per shard
  # The model's activation constraints must be in effect: without them XLA shards activations along
  # `embed` and a step needs terabytes per device.
  proc = subprocess.run([sys.executable, "-m", "llada_jax.plan", f"--config={recipe}:v5p", "--devices=64",
                         "--accelerator=v5p,h100", f"--out={out}", *extra], cwd=REPO,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  print(proc.stdout)
  p = json.loads(out.read_text())
  assert p["n_params"] == LLADA_8B_PARAMS and p["n_devices"] == 64
  mem = p["memory_per_device_bytes"]
  # float32 weights split 64 ways (norm weights are not split over `tensor`: a few KB more).
  assert 0 <= mem["params"] - p["params_bytes_total"] / 64 < 1e6
  assert p["compiled_memory_per_device_bytes"]["argument"] == mem["analytic_arguments"]
  if recipe == "llada_8b_vrpo":
    assert mem["reference_params"] == mem["params"]
  for name in ("v5p", "h100"):
    assert p["accelerators"][name]["fits"], (name, p["compiled_memory_per_device_bytes"])
    if mesh == "fsdp64":  # the shipped meshes keep 10% of HBM free
      assert p["accelerators"][name]["hbm_fraction"] <= 0.9, (name, p["compiled_memory_per_device_bytes"])


def test_generate_plan_compiles_the_sampler_on_abstract_sharded_params():
  from llada_jax import gen_planning, sampling

  model_cfg = model_lib.ModelConfig.from_dict(tiny_config().model)
  sampler = sampling.SamplerConfig(gen_length=8, block_length=4, steps=8, cache="dual")
  p = gen_planning.make_generate_plan(model_cfg, sampler, mesh={"data": 2, "fsdp": 4, "tensor": 1}, gen_batch=6,
                                      prompt_length=16, accelerators=("v5e", "h100"))
  mem, comp = p["memory_per_device_bytes"], p["compiled_memory_per_device_bytes"]
  assert p["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and p["padded_batch"] == 8  # 6 rows over 8 shards
  # float32 parameters, each split over fsdp=4 and copied over data: a quarter of them per device.
  assert mem["params"] * 4 == 4 * model_cfg.num_params()
  assert comp["argument"] == mem["params"] + mem["batch"]  # the program holds exactly these shards
  assert comp["temp"] > 0 and comp["peak_estimate"] == comp["argument"] + comp["output"] - comp["alias"] + comp["temp"]
  v5e = p["accelerators"]["v5e"]
  assert v5e["fits"] and v5e["hbm_fraction"] == pytest.approx(comp["peak_estimate"] / 16e9)
  assert "TPU v5e" in gen_planning.format_generate_plan(p) and "cache dual" in gen_planning.format_generate_plan(p)
  with pytest.raises(ValueError, match="--device=tpu9: expected some of"):
    gen_planning.make_generate_plan(model_cfg, sampler, mesh={"data": -1}, gen_batch=1, prompt_length=4,
                                    accelerators=("tpu9",))


def test_generate_plan_cli_takes_its_devices_from_the_mesh(tmp_path):
  out = tmp_path / "plan.json"
  proc = subprocess.run([sys.executable, "-m", "llada_jax.plan", "--config=demo_sft", "--mode=generate",
                         "--mesh.fsdp=2", "--device=v5e", "--gen_batch=2", "--prompt_length=16", "--gen_length=8",
                         "--block_length=4", "--cache=dual", f"--out={out}"], cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  p = json.loads(out.read_text())
  assert p["mode"] == "generate" and p["n_devices"] == 2 and p["mesh"]["fsdp"] == 2
  assert "TPU v5e" in proc.stdout and "fits" in proc.stdout
