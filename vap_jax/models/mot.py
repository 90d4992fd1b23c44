"""Mixture-of-Transformers joint attention: the heart of VAP, shared by both backbones.

Every stream (the target video, and the reference-video expert) owns its attention weights. Each
projects its own tokens to Q/K/V and normalises them, applies its own RoPE table, then *one*
full, unmasked, bidirectional attention runs over the concatenation of all streams' tokens, in
stream order (target first). The result is split back at the stream boundaries and each stream
applies its own output projection. With a single stream this is ordinary self-attention, which is
how the base model (expert off) runs through the same code. A stream's tokens come in parts
(CogVideoX: text, video), each projected on its own, so that on a context-parallel mesh no part
is concatenated to another outside the attention (`vap_jax.parallel.context`).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from vap_jax.models import stack
from vap_jax.nn.attention import attention
from vap_jax.nn.layers import LayerNorm, Linear, RMSNorm
from vap_jax.nn.rope import RopeTable, apply_rope
from vap_jax.parallel import constrain, context

QK_NORMS = (None, 'layer_norm', 'rms_norm_across_heads')
HEADS_AXES = ('activation_batch', 'activation_length', 'activation_heads', None)


class StreamAttention(nnx.Module):
  """One stream's attention weights: to_q/to_k/to_v/to_out and the Q/K normalisation.

  ``qk_norm='layer_norm'`` normalises each head separately (CogVideoX);
  ``'rms_norm_across_heads'`` normalises the full width before the head split (Wan).
  """

  def __init__(self, dim: int, heads: int, head_dim: int, *, qk_norm: str | None, eps: float,
               bias: bool = True, out_bias: bool = True, dtype, param_dtype, rngs: nnx.Rngs):
    if qk_norm not in QK_NORMS:
      raise ValueError(f'qk_norm {qk_norm!r} is not one of {QK_NORMS}')
    self.heads, self.head_dim, self.qk_norm = heads, head_dim, qk_norm
    inner = heads * head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.to_q = Linear(dim, inner, axes=('embed', 'heads'), use_bias=bias, **kw)
    self.to_k = Linear(dim, inner, axes=('embed', 'heads'), use_bias=bias, **kw)
    self.to_v = Linear(dim, inner, axes=('embed', 'heads'), use_bias=bias, **kw)
    self.to_out = Linear(inner, dim, axes=('heads', 'embed'), use_bias=out_bias, **kw)
    norm_kw = dict(eps=eps, param_dtype=param_dtype, rngs=rngs)
    if qk_norm == 'layer_norm':
      self.norm_q, self.norm_k = LayerNorm(head_dim, **norm_kw), LayerNorm(head_dim, **norm_kw)
    elif qk_norm == 'rms_norm_across_heads':
      self.norm_q, self.norm_k = RMSNorm(inner, **norm_kw), RMSNorm(inner, **norm_kw)
    else:
      self.norm_q = self.norm_k = None

  def qkv(self, x: jax.Array, rope: RopeTable | None = None):
    """x: (B, S, dim) -> q, k, v: (B, S, heads, head_dim), RoPE on q and k when given."""
    q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
    if self.qk_norm == 'rms_norm_across_heads':
      q, k = self.norm_q(q), self.norm_k(k)
    q, k, v = (self.split_heads(t) for t in (q, k, v))
    if self.qk_norm == 'layer_norm':
      q, k = self.norm_q(q), self.norm_k(k)
    if rope is not None:
      q, k = apply_rope(q, rope), apply_rope(k, rope)
    return tuple(constrain(t, HEADS_AXES) for t in (q, k, v))

  def split_heads(self, t: jax.Array) -> jax.Array:
    return t.reshape(*t.shape[:-1], self.heads, self.head_dim)

  def out(self, o: jax.Array) -> jax.Array:
    """(B, S, heads, head_dim) -> (B, S, dim)."""
    return self.to_out(o.reshape(*o.shape[:-2], self.heads * self.head_dim))


def joint_attention(streams: Sequence[StreamAttention], parts: Sequence[Sequence[jax.Array]],
                    ropes: Sequence[Sequence[RopeTable | None]], *, implementation: str = 'xla',
                    key_masks: Sequence[Sequence[jax.Array | None]] | None = None,
                    context_parallel: str = 'gspmd') -> list[list[jax.Array]]:
  """One attention over all streams' tokens; returns each stream's projected output per part.

  Stream i's tokens come in parts (CogVideoX: its text, then its video; Wan: its video):
  ``parts[i][j]`` (B, S_ij, dim) with RoPE table ``ropes[i][j]`` (or None) and key mask
  ``key_masks[i][j]`` (B, S_ij) (or None: all kept; False removes a token as a key, e.g. a dropped
  reference's). The parts are projected on their own (every projection is per token), so no
  part is ever concatenated to another outside the attention: on a mesh with a context axis,
  ``context_parallel`` 'allgather' or 'ulysses' keeps each part sequence-sharded through the
  attention (`vap_jax.parallel.context`); 'gspmd' concatenates them and leaves the layout to the
  compiler.
  """
  owners = [s for s, ps in zip(streams, parts) for _ in ps]
  flat_masks = ([m for ms in key_masks for m in ms] if key_masks is not None
                else [None] * len(owners))
  qkvs = [s.qkv(x, rope) for s, ps, rs in zip(streams, parts, ropes) for x, rope in zip(ps, rs)]
  if context.active(context_parallel):
    outs = context.joint_attention(qkvs, flat_masks, kind=context_parallel,
                                   implementation=implementation)
  else:
    q, k, v = (jnp.concatenate(t, axis=1) if len(t) > 1 else t[0] for t in zip(*qkvs))
    key_mask = None
    if any(m is not None for m in flat_masks):
      key_mask = jnp.concatenate([jnp.ones(t[0].shape[:2], bool) if m is None else m
                                  for t, m in zip(qkvs, flat_masks)], axis=1)
    o = attention(checkpoint_name(q, 'query'), checkpoint_name(k, 'key'),
                  checkpoint_name(v, 'value'), key_mask=key_mask, implementation=implementation)
    bounds = np.cumsum([t[0].shape[1] for t in qkvs])[:-1]
    outs = jnp.split(o, bounds, axis=1)
  projected = iter([s.out(checkpoint_name(o, 'attention')) for s, o in zip(owners, outs)])
  return [[next(projected) for _ in ps] for ps in parts]


def reference_key_masks(layer: nnx.Module, stream) -> list[jax.Array | None]:
  """(B, S_j) keys of each of a stream's parts (the layer's ``attention_tokens`` fields, each
  made of R equal chunks) whose ``mask`` (B, R) marks its kept references; Nones when every
  reference is kept."""
  mask = getattr(stream, 'mask', None)
  if mask is None:
    return [None] * len(layer.attention_tokens)
  r = mask.shape[1]
  return [jnp.repeat(mask, getattr(stream, f).shape[1] // r, axis=1)
          for f in layer.attention_tokens]


def mot_block(base: nnx.Module, expert: nnx.Module | None, target, ref, *,
              implementation: str = 'xla', context_parallel: str = 'gspmd'):
  """One transformer block of either backbone: the base layer on the target stream and, on
  expert blocks, the expert layer on the reference stream, meeting in `joint_attention`. Without
  an expert layer (or without references) the reference stream passes through unchanged.

  Layers provide ``attn1`` (a `StreamAttention`), ``attention_tokens`` (the stream fields its
  tokens come from, in order) and ``rotated`` (those RoPE applies to),
  ``attention_input(stream) -> (parts, carry)`` (one token array per field) and
  ``finish(stream, outputs, carry) -> stream`` (one attention output per part); streams carry
  their RoPE table as ``.rope`` and may carry ``.mask`` (B, R): the references to keep.
  """
  pairs = [(base, target)]
  if expert is not None and ref is not None:
    pairs.append((expert, ref))
  inputs = [layer.attention_input(s) for layer, s in pairs]
  ropes = [[s.rope if f in layer.rotated else None for f in layer.attention_tokens]
           for layer, s in pairs]
  attn = joint_attention([layer.attn1 for layer, _ in pairs], [p for p, _ in inputs], ropes,
                         implementation=implementation, context_parallel=context_parallel,
                         key_masks=[reference_key_masks(layer, s) for layer, s in pairs])
  out = [layer.finish(s, a, carry) for (layer, s), a, (_, carry) in zip(pairs, attn, inputs)]
  return out[0], (out[1] if len(out) > 1 else ref)


class MoTTransformer(nnx.Module):
  """What both VAP transformers share: the base layers stacked in ``blocks`` (L, ...), the expert
  layers in ``expert.blocks`` (E, ...), and how they run (`vap_jax.models.stack`). Subclasses set
  ``config`` (num_layers, block_idx_with_mot_ref, attention, scan_layers, remat), ``blocks`` and
  ``expert`` (None without expert blocks); the config's ``context_parallel`` picks the joint
  attention's layout on a context-parallel mesh."""

  @property
  def runs(self) -> tuple[stack.Run, ...]:
    return stack.plan_runs(self.config.num_layers, self.config.block_idx_with_mot_ref)

  def run_blocks(self, target, ref):
    """Every block on (target, ref), scanned (``scan_layers``) or looped, under the remat policy."""
    experts = self.expert.blocks if self.expert is not None else None
    return stack.run_blocks(self.runs, self.blocks, experts, self.block, target, ref,
                            scan=self.config.scan_layers, remat=self.config.remat)

  def block(self, base: nnx.Module, expert: nnx.Module | None, target, ref):
    """One block: `mot_block` with this model's attention implementation."""
    return mot_block(base, expert, target, ref, implementation=self.config.attention,
                     context_parallel=self.config.context_parallel)

  def unreachable(self) -> list[tuple[tuple, int]]:
    """(path, slot) of the expert parameters no loss can reach: the last expert block's reference
    path after its attention (its layer class lists it as ``after_attention``), since the target
    reads the reference stream only through the joint attention's keys and values."""
    if self.expert is None:
      return []
    last = len(self.config.block_idx_with_mot_ref) - 1
    prefixes = [tuple(p.split('/')) for p in type(stack.unstack(self.blocks, 0)).after_attention]
    out = []
    for path, _ in nnx.to_flat_state(nnx.state(self.expert.blocks, nnx.Param)):
      if any(tuple(path[:len(p)]) == p for p in prefixes):
        out.append((('expert', 'blocks') + tuple(path), last))
    return out

  def layers(self, index: int) -> tuple[nnx.Module, nnx.Module | None]:
    """Block ``index``'s base layer and expert layer (None off the expert blocks), unstacked."""
    experts = self.config.block_idx_with_mot_ref
    expert = (stack.unstack(self.expert.blocks, experts.index(index)) if index in experts
              else None)
    return stack.unstack(self.blocks, index), expert
