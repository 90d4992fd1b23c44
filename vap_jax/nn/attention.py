"""The attention op every model calls: one function, the implementation chosen by name.

``xla`` is portable (it materialises the score matrix: fine on GPU/TPU, slow for long CPU runs);
``cudnn`` is the fused flash kernel on NVIDIA GPUs (bf16/fp16 only). A TPU splash kernel plugs in
as one more entry of `IMPLEMENTATIONS`.
"""
from __future__ import annotations

import jax

IMPLEMENTATIONS = ('xla', 'cudnn')


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = 'xla') -> jax.Array:
  """Full bidirectional softmax attention, scale 1/sqrt(head_dim). q, k, v: (B, S, H, D)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}')
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
