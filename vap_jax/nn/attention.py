"""The attention op every model calls: one function, the implementation chosen by name.

``xla``: portable, materialises the (S x S) score matrix; ``cudnn``: fused flash kernel on NVIDIA
GPUs (bf16/fp16); ``blockwise``: pure-JAX flash-style attention (online softmax over key blocks,
one query block at a time) whose memory is bounded by the block sizes on any backend -- the
choice for long sequences without a fused kernel and for ahead-of-time memory estimates. A TPU
splash kernel plugs in as one more entry of `IMPLEMENTATIONS`.

Text encoders need three extras, all optional: an additive ``bias`` (T5 relative positions), a
boolean key ``mask`` (padding), and ``scale`` (T5 does not scale scores, i.e. scale=1).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('xla', 'cudnn', 'blockwise')
BLOCK_Q = 512
BLOCK_K = 1024


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None,
              mask: jax.Array | None = None, scale: float | None = None,
              implementation: str = 'xla') -> jax.Array:
  """Full bidirectional softmax attention. q, k, v: (B, S, H, D).

  ``bias`` is added to the scores, broadcastable to (B, H, Sq, Sk); ``mask`` (same broadcast,
  boolean) keeps True positions; ``scale`` defaults to 1/sqrt(D).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}')
  if implementation == 'blockwise':
    if bias is not None or mask is not None:
      raise ValueError('blockwise attention takes no bias or mask (the video transformers need '
                       'none); use xla or cudnn for the text encoders')
    return blockwise_attention(q, k, v, scale=scale)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                      implementation=implementation)


def _pad_to(x: jax.Array, block: int) -> jax.Array:
  pad = -x.shape[1] % block
  return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                        block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> jax.Array:
  """Exact softmax attention in O(block_q * block_k) score memory (statistics in float32)."""
  b, s_q, h, d = q.shape
  s_k = k.shape[1]
  block_q, block_k = min(block_q, s_q), min(block_k, s_k)
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  qs = _pad_to(q, block_q).reshape(b, -1, block_q, h, d).swapaxes(0, 1)
  ks = _pad_to(k, block_k).reshape(b, -1, block_k, h, d).swapaxes(0, 1)
  vs = _pad_to(v, block_k).reshape(b, -1, block_k, h, d).swapaxes(0, 1)
  valid = (jnp.arange(ks.shape[0] * block_k) < s_k).reshape(-1, block_k)

  def one_query_block(qb):
    def step(carry, kv):
      m, l, acc = carry
      kb, vb, ok = kv
      s = jnp.einsum('bqhd,bkhd->bhqk', qb, kb, preferred_element_type=jnp.float32) * scale
      s = jnp.where(ok[None, None, None], s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      correction = jnp.exp(m - m_new)
      l = l * correction + p.sum(-1)
      pv = jnp.einsum('bhqk,bkhd->bqhd', p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
      acc = acc * correction.transpose(0, 2, 1)[..., None] + pv
      return (m_new, l, acc), None

    init = (jnp.full((b, h, block_q), -jnp.inf, jnp.float32), jnp.zeros((b, h, block_q), jnp.float32),
            jnp.zeros((b, block_q, h, d), jnp.float32))
    (_, l, acc), _ = jax.lax.scan(step, init, (ks, vs, valid))
    return (acc / l.transpose(0, 2, 1)[..., None]).astype(q.dtype)

  out = jax.lax.map(one_query_block, qs)
  return out.swapaxes(0, 1).reshape(b, -1, h, d)[:, :s_q]
