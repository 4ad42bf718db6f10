"""What attention may look at, and the Pallas splash-attention kernel that runs it on TPU.

The model hands each layer an `AttentionMasks` (key mask and segment ids) instead of a dense
[batch, 1, q, k] mask. The einsum and `jax.nn.dot_product_attention` paths build the dense mask from
it where they run; splash attention takes segment ids directly and never materialises a [q, k]
mask or score array (docs/method.md, "Attention implementations").
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

Array = jax.Array

# Kernel block sizes tried in order: larger blocks amortise the per-block bookkeeping; each must
# divide the sequence length, and the kernel needs multiples of the TPU's 128 lanes.
_SPLASH_BLOCKS = (512, 256, 128)
_LANES = 128


def attention_mask(key_mask: Array | None, segment_ids: Array | None) -> Array | None:
  """Boolean [batch, 1, q, k] mask: keys that are real and in the query's segment.

  There is no causal part: the mask predictor is bidirectional.
  """
  mask = None
  if key_mask is not None:
    mask = key_mask.astype(bool)[:, None, None, :]
  if segment_ids is not None:
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    mask = same if mask is None else mask & same
  return mask


class AttentionMasks(NamedTuple):
  """What each query may attend to, in the compact form the inputs give it.

  `key_mask` [batch, k] is True for real keys; `segment_ids` [batch, length] restricts a packed
  row's queries to keys of their own segment (self-attention only, so q and k share the length).
  """

  key_mask: Array | None = None
  segment_ids: Array | None = None

  def dense(self) -> Array | None:
    """The [batch, 1, q, k] boolean mask, built where a path needs it (not carried between layers)."""
    return attention_mask(self.key_mask, self.segment_ids)


def splash_block_size(q_len: int, kv_len: int, head_dim: int) -> int | None:
  """The kernel's block size for these shapes, or None where splash does not apply.

  The caller then runs the einsum path, which computes the same attention:
  - q_len != kv_len is a span of queries against a KV cache (the samplers). The kernel's segment ids
    describe self-attention over one sequence, and those spans are short, so a dense mask is cheap.
  - the kernel tiles both lengths in blocks that are multiples of 128 lanes.
  - head dims that are not a multiple of 128: the TPU kernels of this family have long required whole
    128-lane tiles there, and the einsum path is sure to compile.
  """
  if q_len != kv_len or head_dim % _LANES:
    return None
  return next((b for b in _SPLASH_BLOCKS if q_len % b == 0), None)


def _segment_ids(masks: AttentionMasks) -> splash.SegmentIds | None:
  """Segment ids that encode the key mask as well: padding positions get an id no real one has.

  A real query (one whose own key is real) then sees exactly the keys `masks.dense()` allows.
  Padding queries see only padding keys (at least themselves) instead of what the dense mask gives
  them; their outputs are ignored either way. This keeps every row of the kernel non-empty: on a row
  with no visible key the kernel's backward pass is not the gradient of its output, and a cotangent
  there would reach the real keys. As it is, padding never touches real positions, forward or backward.
  """
  key_mask, segment_ids = masks
  if key_mask is None and segment_ids is None:
    return None
  ids = jnp.zeros(key_mask.shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  if key_mask is not None:
    ids = jnp.where(key_mask.astype(bool), ids, jnp.min(ids) - 1)
  return splash.SegmentIds(q=ids, kv=ids)


def _kernel(n_heads: int, length: int, block: int, interpret: bool):
  # The static mask is full (bidirectional); all masking comes from the segment ids. Its block
  # bookkeeping is numpy work that the library caches per shape.
  mask = splash.MultiHeadMask([splash.FullMask((length, length))] * n_heads)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q: Array, k: Array, v: Array, masks: AttentionMasks, scale: float, *,
                     interpret: bool = False) -> Array:
  """Grouped-query attention [batch, length, heads, head_dim] by the Pallas splash kernel.

  Only for shapes `splash_block_size` accepts. `interpret=True` runs the kernel through the Pallas
  interpreter, which works on any backend (slowly); compiled, it needs a TPU.
  """
  b, t, h, d = q.shape
  block = splash_block_size(t, k.shape[1], d)
  if block is None:
    raise ValueError(f"splash attention: q {q.shape}, k {k.shape}: expected equal lengths that are a multiple of "
                     f"{_LANES} and a head_dim that is a multiple of {_LANES}")
  # The kernel does not scale the scores, so the queries carry the scale (applied in float32).
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)
  segments = _segment_ids(masks)

  args = (q, k, v) if segments is None else (q, k, v, segments)

  def local(q, k, v, *segments):
    kernel = _kernel(q.shape[2], t, block, interpret)
    heads_major = [jnp.swapaxes(x, 1, 2) for x in (q, k, v)]  # the kernel wants [heads, length, head_dim]
    return jnp.swapaxes(jax.vmap(kernel)(*heads_major, *segments), 1, 2)

  return _over_mesh(local, b, k.shape[2], len(args))(*args)


def _over_mesh(fn, batch: int, kv_heads: int, n_args: int):
  """`fn` per device under the abstract mesh in context (as training traces the step), else as is.

  XLA cannot partition a Pallas kernel itself, so under a multi-device mesh it runs in a
  shard_map: rows split as the `batch` rule says and heads as the `heads` rule says (where the
  key/value heads divide evenly). Lengths and head_dim stay whole, as the kernel needs them.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn

  def axes(name, size):
    spec = nn.logical_to_mesh_axes((name,))[0]
    names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    if any(n not in mesh.axis_names for n in names) or size % math.prod(mesh.shape[n] for n in names):
      return None
    return spec

  batch_axes, head_axes = axes("batch", batch), axes("heads", kv_heads)
  qkv = jax.sharding.PartitionSpec(batch_axes, None, head_axes, None)
  segments = splash.SegmentIds(*[jax.sharding.PartitionSpec(batch_axes, None)] * 2)
  in_specs = (qkv, qkv, qkv, segments)[:n_args]
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=qkv, check_vma=False)
