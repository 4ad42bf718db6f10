"""The mask predictor and its pretraining step in plain PyTorch: the baseline of the `torch_baseline`
benchmark section.

The same architecture and numerics as `llada_jax.model` (tests/test_torch_baseline.py checks the
logits against it with the same weights): token embedding, pre-norm blocks of RMSNorm (no bias),
bidirectional attention with half-split ("rotate_half") RoPE and grouped-query heads, a SwiGLU MLP,
a final RMSNorm and an untied head with float32 logits. No biases anywhere.

The dtype policy mirrors the JAX model's: parameters stay float32; with a bfloat16 compute dtype the
embedding (and so the residual stream) is cast to bfloat16 and the projections run under
`torch.autocast`, while RMSNorm and RoPE compute in float32 and cast back, as `llada_jax.model` does.

Imported only by the section, so that torch stays an optional extra (`pip install .[torch]`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llada_jax import model as model_lib

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RMSNorm(nn.Module):

  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    # In float32 whatever the compute dtype, cast back before the weight: `model._rms_norm`.
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
    return normed.to(x.dtype) * self.weight.to(x.dtype)


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
  """float32 (sin, cos) [length, head_dim]: each frequency twice, first half then second half."""
  inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
  angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq
  angles = torch.cat([angles, angles], dim=-1)
  return angles.sin(), angles.cos()


def apply_rope(x_bhtd: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
  """Rotates the two halves of each head (not interleaved pairs), in float32: `model.apply_rope`."""
  x = x_bhtd.float()
  half = x.shape[-1] // 2
  rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
  return (x * cos + rotated * sin).to(x_bhtd.dtype)


class Attention(nn.Module):

  def __init__(self, cfg: model_lib.ModelConfig):
    super().__init__()
    d, hd = cfg.d_model, cfg.resolved_head_dim
    self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, hd
    self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
    self.k_proj = nn.Linear(d, cfg.kv_heads * hd, bias=False)
    self.v_proj = nn.Linear(d, cfg.kv_heads * hd, bias=False)
    self.attn_out = nn.Linear(cfg.n_heads * hd, d, bias=False)

  def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    b, t, _ = x.shape

    def heads(proj, n):
      return proj(x).view(b, t, n, self.head_dim).transpose(1, 2)  # [b, heads, t, hd]

    q = apply_rope(heads(self.q_proj, self.n_heads), sin, cos)
    k = apply_rope(heads(self.k_proj, self.kv_heads), sin, cos)
    v = heads(self.v_proj, self.kv_heads)
    if self.kv_heads != self.n_heads:  # query head h reads kv head h // group, as the JAX grouping does
      group = self.n_heads // self.kv_heads
      k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=False)  # bidirectional: no mask
    return self.attn_out(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):

  def __init__(self, cfg: model_lib.ModelConfig):
    super().__init__()
    self.ff_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)
    self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)
    self.ff_out = nn.Linear(cfg.mlp_hidden_size, cfg.d_model, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.ff_out(F.silu(self.ff_proj(x)) * self.up_proj(x))


class Block(nn.Module):

  def __init__(self, cfg: model_lib.ModelConfig):
    super().__init__()
    self.attn_norm, self.ff_norm = RMSNorm(cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps)
    self.attn, self.mlp = Attention(cfg), MLP(cfg)

  def forward(self, x, sin, cos):
    x = x + self.attn(self.attn_norm(x), sin, cos)
    return x + self.mlp(self.ff_norm(x))


class LLaDA(nn.Module):
  """`forward(tokens [b, t] int64) -> float32 logits [b, t, vocab]`; call it inside `autocast(cfg)`."""

  def __init__(self, cfg: model_lib.ModelConfig):
    super().__init__()
    self.cfg = cfg
    self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
    self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
    self.ln_f = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # untied from wte

  def forward(self, tokens: torch.Tensor) -> torch.Tensor:
    cfg = self.cfg
    x = self.wte(tokens).to(DTYPES[cfg.dtype])  # the residual stream in the compute dtype, as in JAX
    sin, cos = rope_tables(tokens.shape[1], cfg.resolved_head_dim, cfg.rope_theta)
    for block in self.blocks:
      x = block(x, sin, cos)
    # Under autocast the head's output is rounded to bfloat16 before the cast (JAX keeps its float32
    # accumulator): PyTorch has no bfloat16 x bfloat16 -> float32 matmul on CPU.
    return self.head(self.ln_f(x)).float()


def autocast(cfg: model_lib.ModelConfig):
  """bfloat16/float16 compute over float32 parameters: the JAX model's dtype policy."""
  if cfg.dtype == "float32":
    return contextlib.nullcontext()
  return torch.autocast("cpu", dtype=DTYPES[cfg.dtype])


def state_dict_from_flax(cfg: model_lib.ModelConfig, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
  """The torch module's state from `llada_jax.model.init_params`' tree (unscanned layers, no adapters).

  Flax kernels are `[in, out]` with heads split out; `nn.Linear` keeps `[out, in]`.
  """
  def linear(kernel, fan_in):
    return torch.from_numpy(np.array(kernel, np.float32).reshape(fan_in, -1).T.copy())

  def vector(weight):
    return torch.from_numpy(np.array(weight, np.float32))

  d, hd = cfg.d_model, cfg.resolved_head_dim
  state = {"wte.weight": vector(params["wte"]), "ln_f.weight": vector(params["ln_f"]["weight"]),
           "head.weight": linear(params["ff_out"], d)}
  for i in range(cfg.n_layers):
    p, pre = params[f"blocks_{i}"], f"blocks.{i}."
    for name in ("q_proj", "k_proj", "v_proj"):
      state[f"{pre}attn.{name}.weight"] = linear(p["attn"][name], d)
    state[f"{pre}attn.attn_out.weight"] = linear(p["attn"]["attn_out"], cfg.n_heads * hd)
    for name in ("ff_proj", "up_proj"):
      state[f"{pre}mlp.{name}.weight"] = linear(p["mlp"][name], d)
    state[f"{pre}mlp.ff_out.weight"] = linear(p["mlp"]["ff_out"], cfg.mlp_hidden_size)
    for norm in ("attn_norm", "ff_norm"):
      state[f"{pre}{norm}.weight"] = vector(p[norm]["weight"])
  return state


def pretrain_loss(model: LLaDA, tokens: torch.Tensor, *, mask_id: int, eps: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
  """`llada_jax.diffusion.PretrainLoss` without the random length cut: p = (1 - eps) t + eps per row,
  each token masked with probability p, the sum over masked tokens of CE / p over all b * l tokens."""
  b, l = tokens.shape
  p = (1.0 - eps) * torch.rand(b, generator=generator) + eps
  masked = torch.rand(b, l, generator=generator) < p[:, None]
  with autocast(model.cfg):
    logits = model(torch.where(masked, torch.full_like(tokens, mask_id), tokens))
  ce = F.cross_entropy(logits.reshape(b * l, -1), tokens.reshape(-1), reduction="none").view(b, l)
  return torch.where(masked, ce / p[:, None], 0.0).sum() / (b * l)


def adamw(model: nn.Module, opt_cfg: Mapping[str, Any]) -> tuple[torch.optim.Optimizer, str]:
  """(torch's AdamW with `llada_jax.optim`'s hyperparameters, which implementation it runs).

  Decay on every parameter (weight_decay_mask "all") and a constant learning rate: the schedule
  does not change the work of a step. The fused CPU kernel where this torch has it, the default
  (per-tensor) loop otherwise.
  """
  kwargs = dict(lr=opt_cfg["lr"], betas=(opt_cfg["b1"], opt_cfg["b2"]), eps=opt_cfg["eps"],
                weight_decay=opt_cfg["weight_decay"])
  try:
    return torch.optim.AdamW(model.parameters(), fused=True, **kwargs), "fused"
  except (RuntimeError, TypeError, ValueError):  # a torch whose fused AdamW is CUDA-only
    return torch.optim.AdamW(model.parameters(), **kwargs), "default"


def train_step(model: LLaDA, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, *, mask_id: int, eps: float,
               grad_clip: float, micro_batches: int = 1, generator: torch.Generator | None = None) -> float:
  """One pretraining step: the loss averaged over `micro_batches` (rows a, a + n, ... as the JAX step
  splits them), global-norm clipping, AdamW. Returns the loss (a Python float: the step is done)."""
  optimizer.zero_grad(set_to_none=True)
  total = 0.0
  for a in range(micro_batches):
    loss = pretrain_loss(model, tokens[a::micro_batches], mask_id=mask_id, eps=eps, generator=generator)
    (loss / micro_batches).backward()
    total += loss.item() / micro_batches
  if grad_clip:
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
  optimizer.step()
  return total
