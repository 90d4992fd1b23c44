"""T5 text encoders: T5 v1.1 (CogVideoX's ``google/t5-v1_1-xxl``) and umT5 (Wan's ``umt5-xxl``).

Encoder only, pre-norm blocks with RMS LayerNorm (no mean, no bias) and no bias anywhere. The two
flavours differ in one place: T5 computes the relative position bias once, in layer 0, and every
layer reuses it; umT5 gives every layer its own bias table. Scores are *not* scaled by 1/sqrt(d)
(T5 folds that into its initialisation), so the attention op runs with ``scale=1``.

Positions are bucketed on the host (shapes are static): relative distance -> one of
``num_buckets`` buckets, exact for short distances and log-spaced up to ``max_distance``.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vap_jax.models.common import source_fields
from vap_jax.nn.attention import attention
from vap_jax.nn.layers import Linear, RMSNorm, param
from vap_jax.parallel import TOKEN_AXES, constrain


_ACTIVATIONS = {
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),  # T5 v1.1 "gated-gelu"
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
}


_RUNTIME = {'dtype', 'param_dtype', 'attention'}  # ours, not the checkpoint's


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Architecture (transformers ``T5Config`` / ``UMT5Config`` field names) plus runtime choices."""
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = 'gated-gelu'
  per_layer_position_bias: bool = False   # True for umT5
  # Runtime: compute dtype, parameter dtype, attention implementation (vap_jax.nn.attention).
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention: str = 'xla'

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith('gated-')

  @property
  def activation(self) -> str:
    # transformers maps exactly "gated-gelu" to the tanh GELU; plain "gelu" is the exact one.
    if self.feed_forward_proj == 'gated-gelu':
      return 'gelu_new'
    return self.feed_forward_proj.split('-')[-1]

  def __post_init__(self):
    parts = self.feed_forward_proj.split('-')
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != 'gated') or self.activation not in _ACTIVATIONS:
      raise ValueError(f'feed_forward_proj {self.feed_forward_proj!r} is not supported: use one '
                       f'of {sorted(_ACTIVATIONS)} optionally prefixed with "gated-"')

  @classmethod
  def from_source(cls, config: dict, **runtime) -> 'T5Config':
    """From a transformers ``config.json`` dict (model_type "t5" or "umt5")."""
    model_type = config.get('model_type', 't5')
    if model_type not in ('t5', 'umt5'):
      raise ValueError(f'model_type {model_type!r} is not a T5 encoder (t5 or umt5)')
    kwargs = source_fields(cls, config, ('vocab_size', 'd_model', 'd_kv', 'd_ff', 'num_layers',
                                         'num_heads'), skip=_RUNTIME)
    return cls(**kwargs, per_layer_position_bias=model_type == 'umt5', **runtime)

  @classmethod
  def t5_v1_1_xxl(cls, **runtime) -> 'T5Config':
    return cls(**runtime)

  @classmethod
  def umt5_xxl(cls, **runtime) -> 'T5Config':
    return cls(vocab_size=256384, per_layer_position_bias=True, **runtime)


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """(q_len, k_len) int32 buckets of ``key - query`` for bidirectional attention.

  Half the buckets hold positive distances. Within a half, distances below ``num_buckets // 4``
  are exact, larger ones log-spaced up to ``max_distance`` (float32 arithmetic, like PyTorch).
  """
  relative = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
  half = num_buckets // 2
  buckets = np.where(relative > 0, half, 0)
  distance = np.abs(relative)
  max_exact = half // 2
  with np.errstate(divide='ignore'):
    ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
    scaled = ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
  large = max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class T5Attention(nnx.Module):
  def __init__(self, config: T5Config, *, has_position_bias: bool, rngs: nnx.Rngs):
    c = config
    self.config = c
    inner = c.num_heads * c.d_kv
    kw = dict(use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
    self.q = Linear(c.d_model, inner, axes=('embed', 'heads'), **kw)
    self.k = Linear(c.d_model, inner, axes=('embed', 'heads'), **kw)
    self.v = Linear(c.d_model, inner, axes=('embed', 'heads'), **kw)
    self.o = Linear(inner, c.d_model, axes=('heads', 'embed'), **kw)
    self.relative_attention_bias = (
        param(rngs, nnx.initializers.normal(1.0), (c.relative_attention_num_buckets, c.num_heads),
              c.param_dtype, ('relpos', 'heads')) if has_position_bias else None)

  def position_bias(self, q_len: int, k_len: int) -> jax.Array:
    """(1, H, q_len, k_len) float32 additive bias from this layer's table."""
    c = self.config
    buckets = relative_position_buckets(q_len, k_len, c.relative_attention_num_buckets,
                                        c.relative_attention_max_distance)
    bias = jnp.take(self.relative_attention_bias[...].astype(jnp.float32), buckets, axis=0)
    return bias.transpose(2, 0, 1)[None]

  def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array | None) -> jax.Array:
    c = self.config
    b, s, _ = x.shape
    heads = lambda t: constrain(t.reshape(b, s, c.num_heads, c.d_kv),
                                ('activation_batch', 'activation_length', 'activation_heads', None))
    q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
    out = attention(q, k, v, bias=bias.astype(q.dtype), mask=mask, scale=1.0,
                    implementation=c.attention)
    return self.o(out.reshape(b, s, c.num_heads * c.d_kv))


class T5FeedForward(nnx.Module):
  """wo(act(wi_0 x) * wi_1 x) when gated, else wo(act(wi x))."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    c = config
    kw = dict(use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
    self.act = _ACTIVATIONS[c.activation]
    if c.is_gated:
      self.wi_0 = Linear(c.d_model, c.d_ff, axes=('embed', 'mlp'), **kw)
      self.wi_1 = Linear(c.d_model, c.d_ff, axes=('embed', 'mlp'), **kw)
      self.wi = None
    else:
      self.wi = Linear(c.d_model, c.d_ff, axes=('embed', 'mlp'), **kw)
      self.wi_0 = self.wi_1 = None
    self.wo = Linear(c.d_ff, c.d_model, axes=('mlp', 'embed'), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.act(self.wi(x)) if self.wi is not None else self.act(self.wi_0(x)) * self.wi_1(x)
    h = constrain(h, ('activation_batch', 'activation_length', 'activation_mlp'))
    return self.wo(h)


class T5Block(nnx.Module):
  def __init__(self, config: T5Config, *, has_position_bias: bool, rngs: nnx.Rngs):
    c = config
    norm = dict(eps=c.layer_norm_epsilon, param_dtype=c.param_dtype, rngs=rngs)
    self.attn_norm = RMSNorm(c.d_model, **norm)
    self.attn = T5Attention(c, has_position_bias=has_position_bias, rngs=rngs)
    self.ff_norm = RMSNorm(c.d_model, **norm)
    self.ff = T5FeedForward(c, rngs=rngs)

  def __call__(self, x, bias, mask):
    x = x + self.attn(self.attn_norm(x), bias, mask)
    x = x + self.ff(self.ff_norm(x))
    return constrain(x, TOKEN_AXES)


class T5Encoder(nnx.Module):
  """Token ids (B, L) [+ mask (B, L), 1 = real token] -> last hidden state (B, L, d_model)."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.embed = param(rngs, nnx.initializers.normal(1.0), (c.vocab_size, c.d_model),
                       c.param_dtype, ('vocab', 'embed'))
    self.layers = nnx.List([T5Block(c, has_position_bias=c.per_layer_position_bias or i == 0,
                                    rngs=rngs) for i in range(c.num_layers)])
    self.final_norm = RMSNorm(c.d_model, eps=c.layer_norm_epsilon, param_dtype=c.param_dtype,
                              rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    c = self.config
    input_ids = jnp.asarray(input_ids)
    s = input_ids.shape[1]
    x = jnp.take(self.embed[...], input_ids, axis=0).astype(c.dtype)
    x = constrain(x, TOKEN_AXES)
    mask = None
    if attention_mask is not None:
      mask = (jnp.asarray(attention_mask) > 0)[:, None, None, :]  # (B, 1, 1, L) over keys
    bias = None
    for layer in self.layers:
      if bias is None or c.per_layer_position_bias:
        bias = layer.attn.position_bias(s, s)
      x = layer(x, bias, mask)
    return self.final_norm(x)
