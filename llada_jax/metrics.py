"""Analytic FLOP counts, device peak FLOP/s, throughput/MFU, and the metric writer.

FLOPs follow the convention of the field (PaLM appendix B, MaxText, Levanter): 2 FLOPs per
multiply-accumulate of every matmul parameter (all projections and the LM head; the embedding is a
lookup and norms are elementwise, so neither counts), plus the attention score and value matmuls,
4 x n_layers x seq_len x (n_heads x head_dim) per token. The mask predictor is bidirectional, so
every query sees all seq_len keys and nothing is halved. Training costs 3 forward passes (forward,
and a backward pass twice as expensive). Rematerialisation is not counted: MFU measures model
FLOPs, not hardware FLOPs. `count_embedding=True` adds the embedding table as if it were a matmul
(6 x all parameters per trained token): the count behind the reference PyTorch figures, for
like-for-like comparison with them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np

from llada_jax import wandb_writer
from llada_jax.model import ModelConfig

# --------------------------------------------------------------------------------------------
# FLOPs.


def _model_config(model_cfg) -> ModelConfig:
  if isinstance(model_cfg, ModelConfig):
    return model_cfg
  return ModelConfig.from_dict(dict(model_cfg))


def matmul_params(model_cfg) -> int:
  """Parameters that enter a matmul: all of them but the embedding table and the norm weights."""
  cfg = _model_config(model_cfg)
  d, hd, m = cfg.d_model, cfg.resolved_head_dim, cfg.mlp_hidden_size
  attention = d * hd * (2 * cfg.n_heads + 2 * cfg.kv_heads)  # q, attn_out; k, v
  mlp = 3 * d * m
  return cfg.n_layers * (attention + mlp) + d * cfg.vocab_size  # + LM head


def attention_flops_per_token(model_cfg, seq_len: int) -> int:
  """QK^T and AV for one query against seq_len keys, all layers (no causal halving)."""
  cfg = _model_config(model_cfg)
  return 4 * cfg.n_layers * seq_len * cfg.n_heads * cfg.resolved_head_dim


def forward_flops_per_token(model_cfg, seq_len: int, count_embedding: bool = False) -> int:
  """Forward FLOPs per token of a row of seq_len tokens."""
  _check_positive("seq_len", seq_len)
  cfg = _model_config(model_cfg)
  params = matmul_params(cfg) + (cfg.vocab_size * cfg.d_model if count_embedding else 0)
  return 2 * params + attention_flops_per_token(cfg, seq_len)


def train_flops_per_token(model_cfg, seq_len: int, count_embedding: bool = False) -> int:
  """Forward plus backward (twice the forward) per token."""
  return 3 * forward_flops_per_token(model_cfg, seq_len, count_embedding)


def lm_step_flops(model_cfg, *, batch_size: int, seq_len: int, count_embedding: bool = False) -> int:
  """One pretraining or SFT step: one noised copy of each [batch_size, seq_len] row, with gradients.

  SFT runs the prompt through the model too, so every token of the row counts.
  """
  _check_positive("batch_size", batch_size)
  return train_flops_per_token(model_cfg, seq_len, count_embedding) * batch_size * seq_len


class VRPOFlops(NamedTuple):
  policy: int  # forward + backward over the 2 x n noised copies of every pair
  reference: int  # forward only over the same copies; 0 when reference ELBOs are precomputed
  sft: int  # forward + backward over one noised copy of each chosen row; 0 when sft_weight == 0

  @property
  def total(self) -> int:
    return self.policy + self.reference + self.sft


def vrpo_step_flops(model_cfg, *, n_pairs: int, seq_len: int, n_timesteps: int, masks_per_timestep: int,
                    reference_precomputed: bool = False, sft_weight: float = 0.0,
                    count_embedding: bool = False) -> VRPOFlops:
  """One VRPO (or naive-DPO) step on n_pairs (chosen, rejected) rows of seq_len tokens each."""
  for name, value in (("n_pairs", n_pairs), ("n_timesteps", n_timesteps),
                      ("masks_per_timestep", masks_per_timestep)):
    _check_positive(name, value)
  forward = forward_flops_per_token(model_cfg, seq_len, count_embedding)
  copy_tokens = 2 * n_timesteps * masks_per_timestep * n_pairs * seq_len
  return VRPOFlops(
      policy=3 * forward * copy_tokens,
      reference=0 if reference_precomputed else forward * copy_tokens,
      sft=3 * forward * n_pairs * seq_len if sft_weight > 0 else 0,
  )


def _check_positive(name, value):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name}={value!r}: expected a positive integer")


# --------------------------------------------------------------------------------------------
# Device peaks: dense (no 2:4 sparsity) 16-bit matrix FLOP/s of one JAX device.
#
# Sources: vendor datasheets. Google Cloud TPU system-architecture pages (per chip; TPU v2/v3 and
# TPU7x show each of a chip's two TensorCores as its own JAX device, v4/v5/v6 one device per chip).
# NVIDIA datasheets (H100/H200 "Tensor Core GPU" datasheet, A100, A10, L4, L40S, HGX B200 pages),
# which quote bf16 "with sparsity": the dense figure is half. Entries marked (?) are less certain.

_TPU_PEAKS = {
    "tpu v2": 45e12 / 2,
    "tpu v3": 123e12 / 2,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5": 459e12,  # v5p
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,  # v6e, Trillium
    "tpu v6e": 918e12,
    "tpu7x": 2307e12 / 2,  # Ironwood (?): 2,307 TFLOP/s bf16 per chip, two devices per chip
}

# First match wins, so the more specific names come first.
_GPU_PEAKS = [
    (r"\bgh200\b", 1979e12 / 2),
    (r"\bh200\b.*\bnvl\b", 1671e12 / 2),  # (?)
    (r"\bh200\b", 1979e12 / 2),
    (r"\bh100\b.*\bnvl\b", 1671e12 / 2),  # (?)
    (r"\bh100\b.*\bpcie\b", 1513e12 / 2),
    (r"\bh100\b", 1979e12 / 2),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"\bb200\b", 4.5e15 / 2),  # (?)
    (r"\ba100\b", 312e12),  # SXM and PCIe alike; A100 quotes dense and sparse separately
    (r"\bl40s\b", 362.05e12),  # the L40S datasheet quotes the dense figure as well
    (r"\bl4\b", 242e12 / 2),
    (r"\ba10\b", 125e12),  # not the A10G, whose figure AWS, not NVIDIA, publishes
]
# Volta has float16 tensor cores only.
_FLOAT16_ONLY = [(r"\bv100\b.*\bpcie\b", 112e12), (r"\bv100\b", 125e12)]

_SIXTEEN_BIT = ("bfloat16", "float16")


def peak_flops_per_device(device_kind: str | None = None, dtype="bfloat16", *,
                          override: float | None = None) -> float | None:
  """Peak dense FLOP/s of one device for 16-bit matmuls, None when unknown (CPU, float32, ...).

  device_kind defaults to `jax.devices()[0].device_kind`; `override` (FLOP/s) wins over the table,
  for devices it lacks.
  """
  if override is not None:
    if isinstance(override, bool) or not isinstance(override, (int, float)) or not override > 0:
      raise ValueError(f"peak_flops_per_device override={override!r}: expected a positive number of FLOP/s")
    return float(override)
  if device_kind is None:
    device_kind = jax.devices()[0].device_kind
  dtype = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
  if dtype not in _SIXTEEN_BIT:
    return None
  kind = device_kind.strip().lower()
  if kind in _TPU_PEAKS:
    return _TPU_PEAKS[kind]
  table = _GPU_PEAKS + (_FLOAT16_ONLY if dtype == "float16" else [])
  for pattern, peak in table:
    if re.search(pattern, kind):
      return peak
  return None


# --------------------------------------------------------------------------------------------
# Throughput.


def throughput(*, steps: int, wall_time_s: float, tokens_per_step: float, flops_per_step: float,
               n_devices: int, peak_flops_per_device: float | None = None) -> dict[str, float | None]:
  """Rates over `steps` steps that took `wall_time_s` seconds on `n_devices` devices.

  mfu is a fraction (model FLOP/s over peak FLOP/s), None without a peak.
  """
  if not wall_time_s > 0 or steps <= 0 or n_devices <= 0:
    raise ValueError(f"throughput: expected steps > 0, wall_time_s > 0 and n_devices > 0, got "
                     f"steps={steps}, wall_time_s={wall_time_s}, n_devices={n_devices}")
  steps_per_s = steps / wall_time_s
  flops_per_device_s = flops_per_step * steps_per_s / n_devices
  return {
      "steps_per_sec": steps_per_s,
      "tokens_per_sec": tokens_per_step * steps_per_s,
      "tokens_per_sec_per_device": tokens_per_step * steps_per_s / n_devices,
      "tflops_per_device": flops_per_device_s / 1e12,
      "mfu": flops_per_device_s / peak_flops_per_device if peak_flops_per_device else None,
  }


class StepTimer:
  """Wall-clock throughput between `start(step)` and `lap(step)`.

  JAX dispatches asynchronously: block on a step's output (e.g. fetch its loss) before `lap`, and
  call `start` after the first (compiling) step and after pauses such as evaluation or saving.
  """

  def __init__(self, *, tokens_per_step: float, flops_per_step: float, n_devices: int | None = None,
               peak_flops_per_device: float | None = None, clock: Callable[[], float] = time.perf_counter):
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_per_step
    self.n_devices = n_devices or jax.device_count()
    self.peak_flops_per_device = peak_flops_per_device
    self._clock = clock
    self._start: tuple[int, float] | None = None

  def start(self, step: int) -> None:
    self._start = (step, self._clock())

  def lap(self, step: int) -> dict[str, float | None] | None:
    """Rates since the last start/lap (None if not started or no step since), then restarts."""
    now = self._clock()
    if self._start is None or step <= self._start[0] or now <= self._start[1]:
      self._start = (step, now)
      return None
    start_step, start_time = self._start
    self._start = (step, now)
    return throughput(steps=step - start_step, wall_time_s=now - start_time, tokens_per_step=self.tokens_per_step,
                      flops_per_step=self.flops_per_step, n_devices=self.n_devices,
                      peak_flops_per_device=self.peak_flops_per_device)


# --------------------------------------------------------------------------------------------
# Writing metrics.


def _scalar(name: str, value) -> int | float:
  array = np.asarray(jax.device_get(value))
  if array.size != 1:
    raise ValueError(f"metric {name!r}: expected a scalar, got an array of shape {array.shape}")
  array = array.reshape(())
  if array.dtype.kind in "biu":
    return int(array)
  if array.dtype.kind == "c":
    raise ValueError(f"metric {name!r}: expected a real scalar, got {array.dtype}")
  return float(array)  # also bfloat16 (numpy kind 'V')


def _jsonable(config) -> Any:
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
    config = config.to_dict()
  elif dataclasses.is_dataclass(config) and not isinstance(config, type):
    config = dataclasses.asdict(config)
  return json.loads(json.dumps(config, default=str))


class MetricWriter:
  """Scalars to `workdir/metrics.jsonl` (one `{"step": ..., name: value}` object a line) and to
  TensorBoard event files under `workdir/tensorboard`.

  Only process 0 writes by default (enabled=None), so multi-process runs log once. Values may be
  Python, NumPy or (replicated) JAX scalars; None values are skipped. Non-finite values are written
  as NaN/Infinity, which Python's json reads back. Lines are appended: after a resume from an
  earlier step, the last line for a step is the current one. `workdir` is a local or mounted path.
  With `wandb` settings, scalars, text and the config go to Weights & Biases too (`wandb_writer`).
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None, tensorboard: bool = True,
               flush_secs: int = 30, wandb: wandb_writer.WandbSettings | None = None):
    self.workdir = os.fspath(workdir)
    self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
    self._jsonl = None
    self._tb = None
    self._wandb = None
    if not self.enabled:
      return
    os.makedirs(self.workdir, exist_ok=True)
    if wandb is not None:  # first: if W&B cannot start, no file has been opened yet
      self._wandb = wandb_writer.WandbWriter(self.workdir, wandb)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError as e:
        raise ImportError("MetricWriter: TensorBoard output needs tensorboardX (pip install tensorboardX), "
                          "or pass tensorboard=False") from e
      self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"), flush_secs=flush_secs)
    self._jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a", encoding="utf-8")

  @property
  def metrics_path(self) -> str:
    return os.path.join(self.workdir, "metrics.jsonl")

  def _check_open(self) -> bool:
    if self.enabled and self._jsonl is None:
      raise RuntimeError(f"MetricWriter({self.workdir!r}) is closed")
    return self.enabled

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self._check_open():
      return
    step = int(step)
    values = {name: _scalar(name, value) for name, value in scalars.items() if value is not None}
    if "step" in values:
      raise ValueError("metric name 'step' is reserved for the step number")
    # One line per call, flushed, so a crash loses at most the step being written.
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(name, value, step)
    if self._wandb is not None:
      self._wandb.write_scalars(step, values)

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Text to TensorBoard and to `workdir/text.jsonl`."""
    if not self._check_open():
      return
    with open(os.path.join(self.workdir, "text.jsonl"), "a", encoding="utf-8") as f:
      f.write(json.dumps({"step": int(step), "tag": tag, "text": text}) + "\n")
    if self._tb is not None:
      self._tb.add_text(tag, text, int(step))
    if self._wandb is not None:
      self._wandb.write_text(int(step), tag, text)

  def write_config(self, config, *, step: int = 0) -> str | None:
    """Saves the config as JSON (ConfigDict, dataclass or mapping) and shows it in TensorBoard.

    Writes `config.json`; if one already exists with other contents (a resumed run with changed
    settings) it is kept and this one goes to `config.step{step}.json`. Returns the path written.
    """
    if not self._check_open():
      return None
    content = json.dumps(_jsonable(config), indent=2, sort_keys=True) + "\n"
    path = os.path.join(self.workdir, "config.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        if f.read() != content:
          path = os.path.join(self.workdir, f"config.step{int(step)}.json")
    with open(path, "w", encoding="utf-8") as f:
      f.write(content)
    if self._tb is not None:
      # Indented by four spaces: TensorBoard renders text as Markdown, this keeps it verbatim.
      self._tb.add_text("config", "\n".join("    " + line for line in content.splitlines()), int(step))
    if self._wandb is not None:
      self._wandb.write_config(json.loads(content))
    return path

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.close()
      self._wandb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
