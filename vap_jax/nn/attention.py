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

import functools
import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('xla', 'cudnn', 'blockwise')
BLOCK_Q = 512
BLOCK_K = 1024


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None,
              mask: jax.Array | None = None, key_mask: jax.Array | None = None,
              scale: float | None = None, implementation: str = 'xla') -> jax.Array:
  """Full bidirectional softmax attention. q, k, v: (B, S, H, D).

  ``bias`` is added to the scores, broadcastable to (B, H, Sq, Sk); ``mask`` (same broadcast,
  boolean) keeps True positions; ``key_mask`` (B, Sk) keeps True keys for every query (the
  video transformers' dropped references; every implementation takes it); ``scale`` defaults to
  1/sqrt(D).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}')
  if implementation == 'blockwise':
    if bias is not None or mask is not None:
      raise ValueError('blockwise attention takes no bias or mask (the video transformers need '
                       'none); use xla or cudnn for the text encoders')
    return blockwise_attention(q, k, v, scale=scale, key_mask=key_mask)
  if key_mask is not None:
    keys = key_mask[:, None, None, :]
    mask = keys if mask is None else mask & keys
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                      implementation=implementation)


def _pad_to(x: jax.Array, block: int) -> jax.Array:
  pad = -x.shape[1] % block
  return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                        key_mask: jax.Array | None = None, block_q: int = BLOCK_Q,
                        block_k: int = BLOCK_K) -> jax.Array:
  """Exact softmax attention in O(block_q * block_k) score memory (statistics in float32);
  ``key_mask`` (B, Sk) keeps the True keys.

  Its gradient is the flash-attention backward (`_blockwise_vjp`): the probabilities are
  recomputed block by block from the saved log-sum-exp, so training memory stays bounded too
  (autodiff of the loops would store every block's probabilities: O(S^2)).
  """
  d = q.shape[-1]
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  if key_mask is None:
    key_mask = jnp.ones(k.shape[:2], bool)
  return _blockwise(q, k, v, key_mask, scale, min(block_q, q.shape[1]), min(block_k, k.shape[1]))


def _blocks(x: jax.Array, block: int) -> jax.Array:
  """(B, S, H, D) -> (S / block, B, block, H, D), zero-padded."""
  b, _, h, d = x.shape
  return _pad_to(x, block).reshape(b, -1, block, h, d).swapaxes(0, 1)


def _scores(qb, kb, ok, scale):
  """Scores of a query and a key block; ``ok`` (B, block_k) marks the real, kept keys."""
  s = jnp.einsum('bqhd,bkhd->bhqk', qb, kb, preferred_element_type=jnp.float32) * scale
  return jnp.where(ok[:, None, None], s, -jnp.inf)


def _valid(key_mask, block_k):
  """(S_k / block_k, B, block_k): the kept keys, padding excluded."""
  b, s_k = key_mask.shape
  padded = jnp.pad(key_mask, ((0, 0), (0, -s_k % block_k)))
  return padded.reshape(b, -1, block_k).swapaxes(0, 1)


def _forward(q, k, v, key_mask, scale, block_q, block_k):
  """Output (B, S_q, H, D) and the log-sum-exp of every score row (B, H, S_q), float32."""
  b, s_q, h, d = q.shape
  ks, vs = _blocks(k, block_k), _blocks(v, block_k)
  valid = _valid(key_mask, block_k)

  def one_query_block(qb):
    def step(carry, kv):
      m, l, acc = carry
      kb, vb, ok = kv
      s = _scores(qb, kb, ok, scale)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      correction = jnp.exp(m - m_new)
      l = l * correction + p.sum(-1)
      pv = jnp.einsum('bhqk,bkhd->bqhd', p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
      acc = acc * correction.transpose(0, 2, 1)[..., None] + pv
      return (m_new, l, acc), None

    init = (jnp.full((b, h, block_q), -jnp.inf, jnp.float32), jnp.zeros((b, h, block_q), jnp.float32),
            jnp.zeros((b, block_q, h, d), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, (ks, vs, valid))
    return (acc / l.transpose(0, 2, 1)[..., None]).astype(q.dtype), m + jnp.log(l)

  out, lse = jax.lax.map(one_query_block, _blocks(q, block_q))
  out = out.swapaxes(0, 1).reshape(b, -1, h, d)[:, :s_q]
  return out, lse.transpose(1, 2, 0, 3).reshape(b, h, -1)[:, :, :s_q]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blockwise(q, k, v, key_mask, scale, block_q, block_k):
  return _forward(q, k, v, key_mask, scale, block_q, block_k)[0]


def _blockwise_fwd(q, k, v, key_mask, scale, block_q, block_k):
  out, lse = _forward(q, k, v, key_mask, scale, block_q, block_k)
  return out, (q, k, v, key_mask, out, lse)


def _blockwise_vjp(scale, block_q, block_k, residuals, dout):
  """Flash-attention backward: per key block, over the query blocks, P = exp(S - lse) again;
  dV += P^T dO, dS = P (dO V^T - rowsum(dO O)), dK += dS^T Q, dQ += dS K."""
  q, k, v, key_mask, out, lse = residuals
  b, s_q, h, d = q.shape
  qs, dos = _blocks(q, block_q), _blocks(dout, block_q)
  ks, vs = _blocks(k, block_k), _blocks(v, block_k)
  valid = _valid(key_mask, block_k)
  delta = jnp.einsum('bqhd,bqhd->bhq', dout.astype(jnp.float32), out.astype(jnp.float32))
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, qs.shape[0] * block_q - s_q)))
  row = lambda x: pad(x).reshape(b, h, -1, block_q).transpose(2, 0, 1, 3)  # (nq, B, H, bq)
  lses, deltas = row(lse), row(delta)

  def key_block(dq, kv):
    kb, vb, ok = kv

    def query_block(carry, xs):
      dk, dv = carry
      qb, dob, lse_b, delta_b = xs
      p = jnp.exp(_scores(qb, kb, ok, scale) - lse_b[..., None])  # (B, H, bq, bk)
      dv = dv + jnp.einsum('bhqk,bqhd->bkhd', p.astype(dob.dtype), dob,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum('bqhd,bkhd->bhqk', dob, vb, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_b[..., None]) * scale).astype(q.dtype)
      dk = dk + jnp.einsum('bhqk,bqhd->bkhd', ds, qb, preferred_element_type=jnp.float32)
      dq_b = jnp.einsum('bhqk,bkhd->bqhd', ds, kb, preferred_element_type=jnp.float32)
      return (dk, dv), dq_b

    zeros = jnp.zeros(kb.shape, jnp.float32)
    (dk, dv), dq_blocks = jax.lax.scan(query_block, (zeros, zeros), (qs, dos, lses, deltas))
    return dq + dq_blocks, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qs.shape, jnp.float32), (ks, vs, valid))
  unblock = lambda x, n, like: x.swapaxes(0, 1).reshape(b, -1, h, d)[:, :n].astype(like.dtype)
  return unblock(dq, s_q, q), unblock(dk, k.shape[1], k), unblock(dv, v.shape[1], v), None


_blockwise.defvjp(_blockwise_fwd, _blockwise_vjp)
