"""The attention op every model calls: one function, the implementation chosen by name.

``xla`` is portable (it materialises the score matrix: fine on GPU/TPU, slow for long CPU runs);
``cudnn`` is the fused flash kernel on NVIDIA GPUs (bf16/fp16 only). A TPU splash kernel plugs in
as one more entry of `IMPLEMENTATIONS`.

Text encoders need three extras, all optional: an additive ``bias`` (T5 relative positions), a
boolean key ``mask`` (padding), and ``scale`` (T5 does not scale scores, i.e. scale=1).
"""
from __future__ import annotations

import jax

IMPLEMENTATIONS = ('xla', 'cudnn')


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None,
              mask: jax.Array | None = None, scale: float | None = None,
              implementation: str = 'xla') -> jax.Array:
  """Full bidirectional softmax attention. q, k, v: (B, S, H, D).

  ``bias`` is added to the scores, broadcastable to (B, H, Sq, Sk); ``mask`` (same broadcast,
  boolean) keeps True positions; ``scale`` defaults to 1/sqrt(D).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}')
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                      implementation=implementation)
