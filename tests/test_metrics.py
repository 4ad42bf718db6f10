"""Tests of `llada_jax/metrics.py`: FLOP counts evaluated by hand, the peak table, throughput/MFU
and the JSONL/TensorBoard writer (event files are read back with tensorboardX's protobufs)."""

from __future__ import annotations

import json
import os
import struct

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from llada_jax import metrics
from llada_jax.model import ModelConfig, abstract_params

from tests.helpers import preset


def _config(name: str, **changes) -> ModelConfig:
  return ModelConfig(**{**preset(name), **changes})


# --------------------------------------------------------------------------------------------
# FLOPs.


def test_llada_8b_forward_flops_by_hand():
  cfg = _config("llada_8b")
  assert cfg.num_params() == 8_015_581_184
  norm_weights = 2 * 32 * 4096 + 4096  # attn_norm and ff_norm per layer, ln_f
  matmul = 8_015_581_184 - 126464 * 4096 - norm_weights
  assert matmul == 7_497_318_400
  assert metrics.matmul_params(cfg) == matmul
  T = 4096
  attention = 4 * 32 * T * 4096
  assert attention == 2_147_483_648
  expected = 2 * matmul + attention
  assert expected == 17_142_120_448
  assert metrics.forward_flops_per_token(cfg, T) == expected
  assert metrics.train_flops_per_token(cfg, T) == 3 * expected
  # A ConfigDict (as in llada_jax.configs.models) gives the same count.
  assert metrics.forward_flops_per_token(ml_collections.ConfigDict(preset("llada_8b")), T) == expected
  # LLaDA pretraining step: 1280 x 4096 tokens, about 2.7e17 FLOPs.
  assert metrics.lm_step_flops(cfg, batch_size=1280, seq_len=T) == 3 * expected * 1280 * T


def test_count_embedding_reproduces_the_reference_figures():
  # The reference PyTorch step (d_model 512, 8 layers, MLP 1536, vocab 8192, 35.7M parameters,
  # 256 tokens) at 690 tokens/s is quoted as about 155 GFLOP/s, counting 6 x all parameters.
  d, v, T = 512, 8192, 256
  cfg = _config("demo", d_model=d, n_layers=8, n_heads=8, mlp_hidden_size=1536, vocab_size=v)
  assert cfg.num_params() == pytest.approx(35.7e6, rel=2e-3)
  assert metrics.matmul_params(cfg) + v * d == cfg.num_params() - (2 * 8 + 1) * d  # all but the norms
  extra = metrics.train_flops_per_token(cfg, T, count_embedding=True) - metrics.train_flops_per_token(cfg, T)
  assert extra == 6 * v * d
  assert metrics.train_flops_per_token(cfg, T, count_embedding=True) * 690 / 1e9 == pytest.approx(155, rel=0.02)
  assert metrics.lm_step_flops(cfg, batch_size=8, seq_len=T, count_embedding=True) == (
      metrics.train_flops_per_token(cfg, T, count_embedding=True) * 8 * T)
  vrpo = metrics.vrpo_step_flops(cfg, n_pairs=8, seq_len=T, n_timesteps=2, masks_per_timestep=1, count_embedding=True)
  assert vrpo.policy == 3 * metrics.forward_flops_per_token(cfg, T, count_embedding=True) * 2 * 2 * 8 * T


@pytest.mark.parametrize("scan_layers", [False, True])
def test_matmul_params_match_the_parameter_shapes(scan_layers):
  # tiny uses grouped-query attention (4 heads, 2 kv heads), which the count must respect.
  cfg = _config("tiny", scan_layers=scan_layers)
  leaves = jax.tree_util.tree_leaves_with_path(abstract_params(cfg))
  counted = sum(int(np.prod(x.shape)) for path, x in leaves
                if "wte" not in jax.tree_util.keystr(path) and "norm" not in jax.tree_util.keystr(path)
                and "ln_f" not in jax.tree_util.keystr(path))
  assert metrics.matmul_params(cfg) == counted
  T = 16
  assert metrics.forward_flops_per_token(cfg, T) == 2 * counted + 4 * cfg.n_layers * T * cfg.n_heads * 8


def test_vrpo_flops_are_the_sum_of_their_parts():
  cfg = _config("llada_8b")
  B, L, n_t, n_yt = 64, 1024, 4, 2
  fwd = metrics.forward_flops_per_token(cfg, L)
  flops = metrics.vrpo_step_flops(cfg, n_pairs=B, seq_len=L, n_timesteps=n_t, masks_per_timestep=n_yt,
                                  sft_weight=0.05)
  copies = 2 * n_t * n_yt * B  # chosen and rejected, n noised copies each
  assert flops.policy == 3 * fwd * copies * L
  assert flops.reference == fwd * copies * L
  assert flops.sft == 3 * fwd * B * L
  assert flops.total == flops.policy + flops.reference + flops.sft == fwd * L * (4 * copies + 3 * B)

  precomputed = metrics.vrpo_step_flops(cfg, n_pairs=B, seq_len=L, n_timesteps=n_t, masks_per_timestep=n_yt,
                                        reference_precomputed=True)
  assert precomputed == metrics.VRPOFlops(policy=flops.policy, reference=0, sft=0)
  assert precomputed.total == flops.policy
  # Naive DPO (n = 1) costs 1/8 of the policy and reference passes of n = 8.
  naive = metrics.vrpo_step_flops(cfg, n_pairs=B, seq_len=L, n_timesteps=1, masks_per_timestep=1)
  vrpo = metrics.vrpo_step_flops(cfg, n_pairs=B, seq_len=L, n_timesteps=8, masks_per_timestep=1)
  assert 8 * naive.total == vrpo.total


@pytest.mark.parametrize("kwargs", [dict(n_pairs=0), dict(seq_len=0), dict(n_timesteps=-1),
                                    dict(masks_per_timestep=1.5)])
def test_flop_helpers_reject_bad_sizes(kwargs):
  args = {**dict(n_pairs=2, seq_len=8, n_timesteps=1, masks_per_timestep=1), **kwargs}
  with pytest.raises(ValueError, match=f"{next(iter(kwargs))}=.*: expected a positive integer"):
    metrics.vrpo_step_flops(_config("tiny"), **args)


# --------------------------------------------------------------------------------------------
# Device peaks.


@pytest.mark.parametrize("kind, peak", [
    ("TPU v2", 22.5e12),
    ("TPU v3", 61.5e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("NVIDIA H100 80GB HBM3", 989.5e12),
    ("NVIDIA H100 PCIe", 756.5e12),
    ("NVIDIA H100 NVL", 835.5e12),
    ("NVIDIA H200", 989.5e12),
    ("NVIDIA GH200 480GB", 989.5e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362.05e12),
    ("NVIDIA A10", 125e12),
    ("cpu", None),
    ("NVIDIA A10G", None),
    ("Tesla V100-SXM2-16GB", None),  # no bfloat16 tensor cores
])
def test_peak_table(kind, peak):
  got = metrics.peak_flops_per_device(kind, "bfloat16")
  assert got == (pytest.approx(peak) if peak else None)


def test_peak_dtypes_and_override():
  assert metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3", jnp.bfloat16) == pytest.approx(989.5e12)
  assert metrics.peak_flops_per_device("TPU v4", "float16") == 275e12
  assert metrics.peak_flops_per_device("Tesla V100-SXM2-16GB", "float16") == 125e12
  assert metrics.peak_flops_per_device("Tesla V100-PCIE-16GB", "float16") == 112e12
  assert metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3", "float32") is None
  # Tests run on the CPU, which has no entry.
  assert metrics.peak_flops_per_device() is None
  assert metrics.peak_flops_per_device("cpu", override=1.5e12) == 1.5e12
  assert metrics.peak_flops_per_device("TPU v4", override=100e12) == 100e12
  with pytest.raises(ValueError, match="override=-1"):
    metrics.peak_flops_per_device("cpu", override=-1)


# --------------------------------------------------------------------------------------------
# Throughput.


def test_throughput_and_mfu_by_hand():
  out = metrics.throughput(steps=10, wall_time_s=4.0, tokens_per_step=8192, flops_per_step=2e15, n_devices=8,
                           peak_flops_per_device=1e14)
  assert out["steps_per_sec"] == 2.5
  assert out["tokens_per_sec"] == 20480.0
  assert out["tokens_per_sec_per_device"] == 2560.0
  assert out["tflops_per_device"] == pytest.approx(2e15 * 2.5 / 8 / 1e12)  # 625
  assert out["mfu"] == pytest.approx(6.25)  # 625 TFLOP/s of a 100 TFLOP/s peak
  assert metrics.throughput(steps=1, wall_time_s=1.0, tokens_per_step=1, flops_per_step=1, n_devices=1)["mfu"] is None
  with pytest.raises(ValueError, match="wall_time_s"):
    metrics.throughput(steps=1, wall_time_s=0.0, tokens_per_step=1, flops_per_step=1, n_devices=1)


def test_step_timer_with_a_fake_clock():
  now = [100.0]
  timer = metrics.StepTimer(tokens_per_step=1000, flops_per_step=4e12, n_devices=2, peak_flops_per_device=1e12,
                            clock=lambda: now[0])
  assert timer.lap(5) is None  # not started
  timer.start(10)
  now[0] += 2.0
  out = timer.lap(14)
  assert out["steps_per_sec"] == 2.0 and out["tokens_per_sec"] == 2000.0
  assert out["tflops_per_device"] == pytest.approx(4.0) and out["mfu"] == pytest.approx(4.0)
  now[0] += 1.0
  assert timer.lap(15)["steps_per_sec"] == 1.0  # measured from the previous lap
  assert timer.lap(15) is None  # no step since
  assert metrics.StepTimer(tokens_per_step=1, flops_per_step=1).n_devices == jax.device_count()


# --------------------------------------------------------------------------------------------
# MetricWriter.


def _read_events(directory):
  """(tag, step, value) of every scalar and text summary in the TFRecord event files under `directory`."""
  from tensorboardX.proto import event_pb2

  found = []
  files = [os.path.join(directory, f) for f in sorted(os.listdir(directory)) if "tfevents" in f]
  assert files, f"no event file in {directory}"
  for path in files:
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      # TFRecord: uint64 length, uint32 crc of the length, payload, uint32 crc of the payload.
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        if value.HasField("simple_value"):
          found.append((value.tag, event.step, value.simple_value))
        elif value.HasField("tensor"):
          found.append((value.tag, event.step, value.tensor.string_val[0].decode()))
  return found


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
  workdir = tmp_path / "run"
  with metrics.MetricWriter(workdir, enabled=True) as writer:
    writer.write_scalars(1, {"loss": 2.5, "lr": np.float32(1e-4), "grad_norm": jnp.asarray(0.75),
                             "tokens": np.int64(4096), "nonfinite": jnp.asarray(True), "mfu": None,
                             "bf16": jnp.asarray(1.5, jnp.bfloat16), "one_element": jnp.ones((1,))})
    writer.write_scalars(jnp.asarray(2), {"loss": jnp.float32(2.25), "train/accuracy": 0.5})
    writer.write_text(0, "sample", "hello <mask>")

  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  assert records[0] == {"step": 1, "loss": 2.5, "lr": pytest.approx(1e-4), "grad_norm": 0.75, "tokens": 4096,
                        "nonfinite": 1, "bf16": 1.5, "one_element": 1.0}
  assert isinstance(records[0]["tokens"], int)
  assert records[1] == {"step": 2, "loss": 2.25, "train/accuracy": 0.5}
  assert json.loads((workdir / "text.jsonl").read_text()) == {"step": 0, "tag": "sample", "text": "hello <mask>"}

  events = _read_events(workdir / "tensorboard")
  scalars = {(tag, step): value for tag, step, value in events if not isinstance(value, str)}
  assert scalars[("loss", 1)] == 2.5 and scalars[("loss", 2)] == 2.25
  assert scalars[("lr", 1)] == pytest.approx(1e-4)
  assert scalars[("train/accuracy", 2)] == 0.5
  assert ("mfu", 1) not in scalars
  assert any(tag.startswith("sample") and value == "hello <mask>" for tag, _, value in events)


def test_metric_writer_non_finite_values_round_trip(tmp_path):
  with metrics.MetricWriter(tmp_path, tensorboard=False, enabled=True) as writer:
    writer.write_scalars(3, {"loss": float("nan"), "ratio": np.inf})
  record = json.loads((tmp_path / "metrics.jsonl").read_text())
  assert np.isnan(record["loss"]) and record["ratio"] == np.inf
  assert not (tmp_path / "tensorboard").exists()


def test_metric_writer_appends_across_writers(tmp_path):
  for step in (1, 2):
    with metrics.MetricWriter(tmp_path, tensorboard=False, enabled=True) as writer:
      writer.write_scalars(step, {"loss": float(step)})
  assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def _load(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def test_metric_writer_config(tmp_path):
  config = ml_collections.ConfigDict({"model": {"d_model": 32}, "optimizer": {"lr": 1e-3}, "name": "demo"})
  with metrics.MetricWriter(tmp_path, enabled=True) as writer:
    path = writer.write_config(config)
    assert path == os.path.join(tmp_path, "config.json")
    assert _load(path) == config.to_dict()
    # The same config again (a resume) keeps the one file; a changed one does not overwrite it.
    assert writer.write_config(config, step=50) == path
    config.optimizer.lr = 5e-4
    changed = writer.write_config(config, step=100)
    assert changed == os.path.join(tmp_path, "config.step100.json")
    assert _load(path)["optimizer"]["lr"] == 1e-3
    assert _load(changed)["optimizer"]["lr"] == 5e-4
    # Dataclass configs work too.
    writer.write_config(ModelConfig(**preset("tiny")), step=7)
    assert json.loads((tmp_path / "config.step7.json").read_text())["d_model"] == 32
  texts = [value for tag, _, value in _read_events(tmp_path / "tensorboard") if tag.startswith("config")]
  assert texts and '"d_model": 32' in texts[0]


def test_metric_writer_disabled_writes_nothing(tmp_path):
  workdir = tmp_path / "other_process"
  with metrics.MetricWriter(workdir, enabled=False) as writer:
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_text(1, "t", "x")
    assert writer.write_config({"a": 1}) is None
  assert not workdir.exists()
  # The default enables only process 0, which a single-process run is.
  with metrics.MetricWriter(tmp_path / "default", tensorboard=False) as writer:
    assert writer.enabled == (jax.process_index() == 0)


def test_metric_writer_rejects_bad_input(tmp_path):
  writer = metrics.MetricWriter(tmp_path, tensorboard=False, enabled=True)
  with pytest.raises(ValueError, match=r"metric 'logits': expected a scalar, got an array of shape \(2,\)"):
    writer.write_scalars(1, {"logits": np.zeros(2)})
  with pytest.raises(ValueError, match="'step' is reserved"):
    writer.write_scalars(1, {"step": 3})
  writer.close()
  with pytest.raises(RuntimeError, match="closed"):
    writer.write_scalars(2, {"loss": 1.0})
  assert (tmp_path / "metrics.jsonl").read_text() == ""
