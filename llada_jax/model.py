"""The LLaDA mask predictor: a Llama-style transformer without a causal mask.

Every position attends to every position (optionally restricted by a key-padding mask and by
segment ids for packed rows). Parameters and the main activations carry logical axis names
(`batch, length, embed, heads, head_dim, mlp, vocab`, plus `layers` when layers are scanned) that
`llada_jax.sharding` maps onto a device mesh.

Parameter names mirror the Hugging Face LLaDA checkpoint (`q_proj`, `attn_out`, `ff_proj`, ...) so
conversion is a rename plus a transpose. Kernels are stored `[in, out]` with heads split out:
`q_proj [embed, heads, head_dim]`, `attn_out [heads, head_dim, embed]`.

The numerics are pure functions over arrays and parameter subtrees. The Flax modules (used for
init and by `logits_fn`) declare the parameters and call them; the KV-cached forward passes for the
samplers call the same functions on the parameter tree directly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from llada_jax import attention as attention_lib, lora as lora_lib
from llada_jax.matmul import BATCHED_MATMUL, MATMUL, contract
from llada_jax.attention import AttentionMasks, attention_mask  # noqa: F401 - attention_mask: also model's API

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Names `contract` gives its outputs: the model's matmuls run inside a custom_vjp, where the
# dot_general-based policies of jax.checkpoint_policies cannot see them.
_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_only_these_names(MATMUL),  # projections, not attention
    "dots_saveable": jax.checkpoint_policies.save_only_these_names(MATMUL, BATCHED_MATMUL),
}
_ATTENTION_IMPLS = ("auto", "xla", "jax", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of the mask predictor (docs/method.md, "Architecture")."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  mlp_hidden_size: int
  n_kv_heads: int | None = None  # None: plain multi-head attention.
  head_dim: int | None = None  # None: d_model // n_heads.
  rope_theta: float = 500000.0
  norm_eps: float = 1e-5
  mask_token_id: int = 126336
  eos_token_id: int = 126081
  # Metadata: the model never reads BOS (the tokenizer adds it). None where a checkpoint gives none.
  bos_token_id: int | None = 126080
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype of activations and matmul inputs.
  remat: str = "none"  # one of _REMAT_POLICIES.
  scan_layers: bool = False
  # "xla": einsum + float32 softmax; "jax"/"cudnn": jax.nn.dot_product_attention; "splash": the Pallas
  # splash-attention kernel (TPU). "auto": splash on TPU, cuDNN's fused attention on GPU for 16-bit
  # compute where its kernels apply (none is float32), "xla" elsewhere (on CPU it measured as fast as
  # jax.nn.dot_product_attention's XLA path: docs/benchmarks.md).
  attention_impl: str = "auto"
  # Runs the splash kernel through the Pallas interpreter, which any backend can (slowly): for tests.
  attention_interpret: bool = False
  # LoRA adapters (llada_jax.lora): rank 0 = none; alpha / rank scales the adapters' term.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = lora_lib.TARGETS
  lora_base_dtype: str = ""  # the frozen base's storage dtype ("": param_dtype; "bfloat16" halves it)
  lora_dropout: float = 0.0  # adapter dropout in training (llada_jax.lora.dropout); never at inference

  def __post_init__(self):
    def fail(field, expected):
      raise ValueError(f"model.{field}={getattr(self, field)!r}: expected {expected}")

    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden_size"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
        fail(field, "a positive integer")
    if self.head_dim is None and self.d_model % self.n_heads:
      fail("n_heads", f"a divisor of d_model={self.d_model} (or set head_dim)")
    if self.n_heads % self.kv_heads:
      fail("n_kv_heads", f"a divisor of n_heads={self.n_heads}")
    if self.resolved_head_dim % 2:
      fail("head_dim", "an even number (RoPE rotates pairs)")
    for field in ("param_dtype", "dtype"):
      if getattr(self, field) not in _DTYPES:
        fail(field, f"one of {sorted(_DTYPES)}")
    if self.remat not in _REMAT_POLICIES:
      fail("remat", f"one of {sorted(_REMAT_POLICIES)}")
    if self.attention_impl not in _ATTENTION_IMPLS:
      fail("attention_impl", f"one of {_ATTENTION_IMPLS}")
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # saved configs give lists
    if self.lora_base_dtype not in ("", *_DTYPES):
      fail("lora_base_dtype", f"'' (param_dtype) or one of {tuple(_DTYPES)}")
    if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
      fail("lora_rank", "an integer >= 0 (0: no adapters)")
    if self.lora_rank and not (self.lora_alpha > 0 and self.lora_targets
                               and set(self.lora_targets) <= set(lora_lib.TARGETS)):
      fail("lora_targets" if self.lora_alpha > 0 else "lora_alpha",
           f"a positive alpha and a non-empty subset of {lora_lib.TARGETS}")
    if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):
      fail("lora_dropout", "a rate in [0, 1)")
    if self.lora_dropout and not self.lora_rank:
      fail("lora_dropout", "0 when there are no adapters (lora_rank 0)")
    if not isinstance(self.attention_interpret, bool):
      fail("attention_interpret", "True or False")
    for field in ("mask_token_id", "eos_token_id", "bos_token_id"):
      if field == "bos_token_id" and self.bos_token_id is None:
        continue
      if not 0 <= getattr(self, field) < self.vocab_size:
        fail(field, f"an id in [0, vocab_size={self.vocab_size})")

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def resolved_attention_impl(self) -> str:
    """The implementation `attention_impl` stands for on the default backend."""
    if self.attention_impl not in ("auto", "splash"):
      return self.attention_impl
    backend = jax.default_backend()
    if self.attention_impl == "splash":
      # Checked at use, not at construction: configs are also built and planned on hosts without a TPU.
      if backend != "tpu" and not self.attention_interpret:
        raise ValueError(f"model.attention_impl='splash' needs a TPU (the default backend is {backend!r}); expected "
                         "'auto', 'xla', 'jax' or 'cudnn' here, or model.attention_interpret=True (slow, for tests)")
      return "splash"
    if backend == "tpu":
      return "splash"
    # cuDNN's fused kernels take 16-bit inputs and head dimensions that are multiples of 8 up to 128.
    hd = self.resolved_head_dim
    if backend == "gpu" and self.dtype in ("bfloat16", "float16") and hd % 8 == 0 and hd <= 128:
      return "cudnn"
    return "xla"

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"model config: unknown field(s) {unknown}; expected some of {sorted(known)}")
    return cls(**dict(values))

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self, include_embedding: bool = True) -> int:
    """Exact parameter count, from the shapes alone."""
    d, hd, m, v = self.d_model, self.resolved_head_dim, self.mlp_hidden_size, self.vocab_size
    attn = d * hd * (2 * self.n_heads + 2 * self.kv_heads)
    per_layer = attn + 3 * d * m + 2 * d
    total = self.n_layers * per_layer + d
    if include_embedding:
      total += 2 * v * d
    return total


# --------------------------------------------------------------------------------------------
# Initialisation ("mitchell", docs/method.md, "Architecture"): truncated normal cut at +-3 sigma, where sigma
# is the std of the untruncated normal (as torch.nn.init.trunc_normal_).


def _trunc_normal(std: float) -> Callable:
  return nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)


def _depth_scaled_trunc_normal(std: float) -> Callable:
  """Output projections shrink with depth: std / sqrt(2 (l + 1)) for layer l.

  The layer index arrives as an init argument so the same code works when layers are scanned
  (the index is then a traced value of the scan).
  """

  def init(key, shape, dtype, layer_index):
    # Scaling a +-3 sigma truncated normal by c gives the +-3 (c sigma) truncated normal.
    scale = jax.lax.rsqrt(2.0 * (jnp.asarray(layer_index, jnp.float32) + 1.0))
    return (_trunc_normal(std)(key, shape, jnp.float32) * scale).astype(dtype)

  return init


def _param(module: nn.Module, name: str, init: Callable, shape, axes, dtype, *args) -> Array:
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype, *args)


def _constrain(x: Array, axes) -> Array:
  return nn.with_logical_constraint(x, axes)

# --------------------------------------------------------------------------------------------
# The numerics, as pure functions. The Flax modules below call them with the parameters they
# declare; the cached forward passes call them with subtrees of the same parameter tree. Each
# piece of math is written once so the two paths cannot drift apart.


def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """float32 (sin, cos) of shape [batch, length, head_dim] for half-split rotary embedding."""
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, hd/2]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x_bthd: Array, sin_btd: Array, cos_btd: Array) -> Array:
  """Rotates the two halves of each head ("rotate_half", not interleaved), in float32."""
  x = x_bthd.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_btd[:, :, None, :] + rotated * sin_btd[:, :, None, :]
  return out.astype(x_bthd.dtype)


def positions_from_segments(segment_ids: Array) -> Array:
  """Positions that restart at 0 at the start of each (contiguous) segment of a packed row."""
  length = segment_ids.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(length), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[..., :1], dtype=bool), segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
  segment_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)
  return idx - segment_start


def _rope(cfg: ModelConfig, tokens: Array, positions: Array | None, segment_ids: Array | None = None,
          start=0) -> tuple[Array, Array]:
  """RoPE tables at `positions`; by default positions restart per segment, or count from `start`."""
  if positions is None:
    positions = (positions_from_segments(segment_ids) if segment_ids is not None
                 else jnp.broadcast_to(start + jnp.arange(tokens.shape[1]), tokens.shape))
  return rope_tables(positions, cfg.resolved_head_dim, cfg.rope_theta)


def _rms_norm(x: Array, weight: Array, eps: float) -> Array:
  """RMSNorm in float32, cast back to the input dtype, then times the weight (no bias)."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return normed.astype(x.dtype) * weight.astype(x.dtype)


def _embed(cfg: ModelConfig, wte: Array, tokens: Array) -> Array:
  return _constrain(jnp.take(wte, tokens, axis=0).astype(cfg.compute_dtype), ("batch", "length", "embed"))


def _qkv(cfg: ModelConfig, p: Mapping[str, Array], x_btd: Array, rope, drop=None) -> tuple[Array, Array, Array]:
  """Queries, keys (both after RoPE) and values, from the `q_proj/k_proj/v_proj` kernels in `p`.

  `drop`: (token keys, layer index) for adapter dropout (`lora.project`), or None."""
  cdt = cfg.compute_dtype
  x = x_btd.astype(cdt)
  axes = ("batch", "length", "heads", "head_dim")
  q, k, v = (_constrain(lora_lib.project(cfg, p, name, "btd,dhk->bthk", x, cdt, drop), axes)
             for name in ("q_proj", "k_proj", "v_proj"))
  sin, cos = rope
  return apply_rope(q, sin, cos), apply_rope(k, sin, cos), v


def _xla_attention(q_bthd, k_bskd, v_bskd, mask, scale):
  """Grouped-query attention with the softmax in float32."""
  b, t, h, d = q_bthd.shape
  kv = k_bskd.shape[2]
  # Heads are moved ahead of the sequence once, so both products are plain batched matmuls over
  # (batch, kv head, group). Contracting the [b, t, h, d] layout directly made XLA:CPU copy
  # operands into that form inside each product and its two gradients (docs/benchmarks.md).
  q = q_bthd.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # [b, kv, g, t, d]
  k, v = k_bskd.transpose(0, 2, 1, 3), v_bskd.transpose(0, 2, 1, 3)  # [b, kv, s, d]
  scores = contract("bkgtd,bksd->bkgts", q, k, jnp.float32) * scale
  if mask is not None:
    # A large finite negative keeps fully masked (padding) query rows finite.
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = contract("bkgts,bksd->bkgtd", probs, v, v.dtype)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _attend(cfg: ModelConfig, p: Mapping[str, Array], q, k, v, masks: AttentionMasks, drop=None) -> Array:
  """Attention of q over k/v (which may be longer: a span against a cache), then `attn_out`."""
  scale = 1.0 / math.sqrt(cfg.resolved_head_dim)
  impl = cfg.resolved_attention_impl
  if impl == "splash" and attention_lib.splash_block_size(q.shape[1], k.shape[1], q.shape[3]):
    out = attention_lib.splash_attention(q, k, v, masks, scale, interpret=cfg.attention_interpret)
  elif impl in ("xla", "splash"):  # shapes splash does not take run here: see splash_block_size
    out = _xla_attention(q, k, v, masks.dense(), scale)
  else:
    mask = masks.dense()
    if mask is not None:  # cuDNN wants the mask's query and key lengths spelled out
      mask = jnp.broadcast_to(mask, (mask.shape[0], 1, q.shape[1], k.shape[1]))
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, implementation="cudnn" if impl == "cudnn" else None)
  out = _constrain(out, ("batch", "length", "heads", "head_dim"))
  cdt = cfg.compute_dtype
  return lora_lib.project(cfg, p, "attn_out", "bthk,hkd->btd", out.astype(cdt), cdt, drop)


def _swiglu(cfg: ModelConfig, p: Mapping[str, Array], x_btd: Array, drop=None) -> Array:
  """ff_out(silu(ff_proj(x)) * up_proj(x))."""
  cdt = cfg.compute_dtype
  x = x_btd.astype(cdt)
  gate = lora_lib.project(cfg, p, "ff_proj", "btd,dm->btm", x, cdt, drop)
  up = lora_lib.project(cfg, p, "up_proj", "btd,dm->btm", x, cdt, drop)
  hidden = _constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
  return lora_lib.project(cfg, p, "ff_out", "btm,md->btd", hidden, cdt, drop)


def _head(cfg: ModelConfig, x_btd: Array, w_head: Array) -> Array:
  # float32 logits: the losses and the sampler's confidences need the precision.
  cdt = cfg.compute_dtype
  logits = contract("btd,dv->btv", x_btd.astype(cdt), w_head.astype(cdt), jnp.float32)
  return _constrain(logits, ("batch", "length", "vocab"))


# --------------------------------------------------------------------------------------------
# Flax modules: they declare the parameters (names, shapes, init, axes) and call the functions above.


class RMSNorm(nn.Module):
  eps: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    weight = _param(self, "weight", nn.initializers.ones, (x.shape[-1],), ("embed",), self.param_dtype)
    return _rms_norm(x, weight, self.eps)


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_btd: Array, rope: tuple[Array, Array], masks: AttentionMasks, layer_index,
               drop_keys=None) -> Array:
    cfg = self.config
    d, hd, pdt = cfg.d_model, cfg.resolved_head_dim, cfg.weight_dtype
    std = 1.0 / math.sqrt(d)
    p = {name: _param(self, name, _trunc_normal(std), (d, heads, hd), ("embed", "heads", "head_dim"), pdt)
         for name, heads in (("q_proj", cfg.n_heads), ("k_proj", cfg.kv_heads), ("v_proj", cfg.kv_heads))}
    p["attn_out"] = _param(self, "attn_out", _depth_scaled_trunc_normal(std), (cfg.n_heads, hd, d),
                           ("heads", "head_dim", "embed"), pdt, layer_index)
    for name, heads in (("q_proj", cfg.n_heads), ("k_proj", cfg.kv_heads), ("v_proj", cfg.kv_heads)):
      lora_lib.declare(self, cfg, p, name, (d,), ("embed",), (heads, hd), ("heads", "head_dim"), pdt)
    lora_lib.declare(self, cfg, p, "attn_out", (cfg.n_heads, hd), ("heads", "head_dim"), (d,), ("embed",), pdt)
    drop = None if drop_keys is None else (drop_keys, layer_index)
    return _attend(cfg, p, *_qkv(cfg, p, x_btd, rope, drop), masks, drop)


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_btd: Array, layer_index, drop_keys=None) -> Array:
    cfg = self.config
    d, m, pdt = cfg.d_model, cfg.mlp_hidden_size, cfg.weight_dtype
    p = {
        "ff_proj": _param(self, "ff_proj", _trunc_normal(1 / math.sqrt(d)), (d, m), ("embed", "mlp"), pdt),
        "up_proj": _param(self, "up_proj", _trunc_normal(1 / math.sqrt(d)), (d, m), ("embed", "mlp"), pdt),
        "ff_out": _param(self, "ff_out", _depth_scaled_trunc_normal(1 / math.sqrt(m)), (m, d), ("mlp", "embed"),
                         pdt, layer_index),
    }
    for name, (n_in, in_axis, n_out, out_axis) in (("ff_proj", (d, "embed", m, "mlp")),
                                                   ("up_proj", (d, "embed", m, "mlp")),
                                                   ("ff_out", (m, "mlp", d, "embed"))):
      lora_lib.declare(self, cfg, p, name, (n_in,), (in_axis,), (n_out,), (out_axis,), pdt)
    return _swiglu(cfg, p, x_btd, None if drop_keys is None else (drop_keys, layer_index))


class Block(nn.Module):
  """Pre-norm residual block (`_block` is the same composition over a parameter subtree)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_btd: Array, rope, masks: AttentionMasks, layer_index, drop_keys=None):
    cfg = self.config
    h = RMSNorm(cfg.norm_eps, cfg.weight_dtype, name="attn_norm")(x_btd)
    x_btd = x_btd + Attention(cfg, name="attn")(h, rope, masks, layer_index, drop_keys)
    h = RMSNorm(cfg.norm_eps, cfg.weight_dtype, name="ff_norm")(x_btd)
    x_btd = x_btd + MLP(cfg, name="mlp")(h, layer_index, drop_keys)
    return _constrain(x_btd, ("batch", "length", "embed"))


class _ScannedBlock(nn.Module):
  """Adapts Block to nn.scan's (carry, xs) -> (carry, ys) convention."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_btd, layer_index, rope, masks, drop_keys):
    return _block_class(self.config)(self.config, name="block")(x_btd, rope, masks, layer_index, drop_keys), None


def _block_class(cfg: ModelConfig):
  policy = _REMAT_POLICIES[cfg.remat]
  if cfg.remat == "none":
    return Block
  # prevent_cse is unnecessary (and slower) inside scan, which already blocks CSE across steps.
  return nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)


class LLaDA(nn.Module):
  """The mask predictor. `__call__(tokens) -> float32 logits [batch, length, vocab]`.

  `dropout_keys`: per-example typed keys ([batch], or [batch, K] per slot with `segment_ids`) turn on
  adapter dropout when the config has a rate (training); without them the forward is deterministic."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: Array, *, key_mask: Array | None = None, segment_ids: Array | None = None,
               positions: Array | None = None, dropout_keys: Array | None = None) -> Array:
    cfg = self.config
    d, v, pdt = cfg.d_model, cfg.vocab_size, cfg.weight_dtype
    std = 1 / math.sqrt(d)
    x = _embed(cfg, _param(self, "wte", _trunc_normal(std), (v, d), ("vocab", "embed"), pdt), tokens)
    rope = _rope(cfg, tokens, positions, segment_ids)
    masks = AttentionMasks(key_mask, segment_ids)
    drop_keys = None
    if dropout_keys is not None and cfg.lora_dropout > 0:
      frame = (positions_from_segments(segment_ids) if segment_ids is not None
               else jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))
      drop_keys = lora_lib.token_keys(dropout_keys, segment_ids, frame)

    if cfg.scan_layers:
      blocks = nn.scan(
          _ScannedBlock,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.n_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, name="blocks")
      x, _ = blocks(x, jnp.arange(cfg.n_layers), rope, masks, drop_keys)
    else:
      block_cls = _block_class(cfg)
      for i in range(cfg.n_layers):
        x = block_cls(cfg, name=f"blocks_{i}")(x, rope, masks, i, drop_keys)

    x = RMSNorm(cfg.norm_eps, pdt, name="ln_f")(x)
    return _head(cfg, x, _param(self, "ff_out", _trunc_normal(std), (d, v), ("embed", "vocab"), pdt))


# --------------------------------------------------------------------------------------------
# Pure functional entry points.

LogitsFn = Callable[..., Array]  # (params, tokens, *, key_mask=None, segment_ids=None, positions=None) -> logits


def logits_fn(config: ModelConfig) -> LogitsFn:
  """`(params, tokens, **masks) -> logits`: the only view of the model the objectives need."""
  module = LLaDA(config)

  def apply(params, tokens, **kwargs):
    return module.apply({"params": params}, tokens, **kwargs)

  return apply


def _boxed_init(config: ModelConfig, key: Array, length: int):
  tokens = jnp.zeros((1, length), jnp.int32)
  return LLaDA(config).init(key, tokens)["params"]


def init_params(config: ModelConfig, key: Array, length: int = 8):
  """Freshly initialised parameters (plain arrays; see `logical_axes` for their axis names)."""
  return nn.meta.unbox(_boxed_init(config, key, length))


def abstract_params(config: ModelConfig):
  """Shapes and dtypes of the parameters, with no allocation."""
  return nn.meta.unbox(jax.eval_shape(lambda k: _boxed_init(config, k, 8), jax.random.key(0)))


def logical_axes(config: ModelConfig):
  """A pytree like the params whose leaves are `PartitionSpec`s of logical axis names."""
  boxed = jax.eval_shape(lambda k: _boxed_init(config, k, 8), jax.random.key(0))
  return nn.get_partition_spec(boxed)


def count_params(params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


# --------------------------------------------------------------------------------------------
# Forward passes with per-layer keys/values, for the KV-cached samplers (llada_jax.sampling).
#
# These walk the same parameter tree as `LLaDA` (scanned or not) with the same functions: the
# cache holds each layer's keys (after RoPE) and values for the whole sequence, and a span of
# query positions can then be run against it with its own keys/values recomputed.


class KVCache(NamedTuple):
  """Keys (after RoPE) and values of every layer: [layers, batch, length, kv_heads, head_dim]."""

  k: Array
  v: Array


def _block(cfg: ModelConfig, p, x, rope, masks: AttentionMasks, kv: Callable | None = None):
  """`Block` on its parameter subtree `p`; returns (x, this layer's own (k, v)).

  `kv(k, v)` chooses the keys/values attended to (a span splices its own into the cache's).
  """
  q, k, v = _qkv(cfg, p["attn"], _rms_norm(x, p["attn_norm"]["weight"], cfg.norm_eps), rope)
  x = x + _attend(cfg, p["attn"], q, *(kv(k, v) if kv else (k, v)), masks)
  x = x + _swiglu(cfg, p["mlp"], _rms_norm(x, p["ff_norm"]["weight"], cfg.norm_eps))
  return _constrain(x, ("batch", "length", "embed")), (k, v)


def _over_layers(cfg: ModelConfig, params, layer_fn, x, xs=None):
  """Runs `layer_fn(x, (layer_params, *xs_l)) -> (x, y_l)` over the layers; ys stacked on axis 0."""
  if cfg.scan_layers:
    return jax.lax.scan(layer_fn, x, (params["blocks"]["block"], *(xs or ())))
  ys = []
  for i in range(cfg.n_layers):
    x, y = layer_fn(x, (params[f"blocks_{i}"], *(a[i] for a in (xs or ()))))
    ys.append(y)
  return x, (None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys))


def _final_logits(cfg: ModelConfig, params, x, logits_range):
  if logits_range is not None:
    start, length = logits_range
    x = jax.lax.dynamic_slice_in_dim(x, start, length, axis=1)
  return _head(cfg, _rms_norm(x, params["ln_f"]["weight"], cfg.norm_eps), params["ff_out"])


def forward_with_cache(config: ModelConfig, params, tokens: Array, *, key_mask: Array | None = None,
                       positions: Array | None = None, logits_range=None) -> tuple[Array, KVCache]:
  """(float32 logits, KVCache) of a full forward pass; the logits equal `logits_fn`'s.

  `logits_range=(start, length)` (start may be traced, length static) computes logits only for
  those positions: samplers need one block's logits, and the LM head is large.
  """
  cfg = config
  rope, masks = _rope(cfg, tokens, positions), AttentionMasks(key_mask)
  x, (ks, vs) = _over_layers(cfg, params, lambda x, xs: _block(cfg, xs[0], x, rope, masks),
                             _embed(cfg, params["wte"], tokens))
  return _final_logits(cfg, params, x, logits_range), KVCache(ks, vs)


def forward_span(config: ModelConfig, params, span_tokens: Array, cache: KVCache, span_start, *,
                 key_mask: Array | None = None, span_positions: Array | None = None,
                 num_logits: int | None = None) -> Array:
  """float32 logits of the span `[span_start, span_start + S)` against cached keys/values.

  Queries are the span's tokens only. Keys/values are the cache's for every position outside the
  span and freshly computed for the span itself; `key_mask` [batch, length] covers the whole
  cached sequence. With a cache computed from the current tokens this equals the full forward
  on the span's positions. `num_logits` (static) keeps only the first positions of the span.
  """
  cfg = config
  rope = _rope(cfg, span_tokens, span_positions, start=span_start)
  masks = AttentionMasks(key_mask)

  def layer(x, xs):
    p, k_cache, v_cache = xs

    def splice(k, v):
      at = (0, span_start, 0, 0)
      return (jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), at),
              jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), at))

    return _block(cfg, p, x, rope, masks, splice)[0], None

  x, _ = _over_layers(cfg, params, layer, _embed(cfg, params["wte"], span_tokens), (cache.k, cache.v))
  return _final_logits(cfg, params, x, None if num_logits is None else (0, num_logits))
