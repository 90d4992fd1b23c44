"""Wan2.1-I2V-14B transformer with the VAP reference-video expert (Mixture-of-Transformers).

The target stream is the base Wan2.1 I2V model. Blocks listed in ``block_idx_with_mot_ref`` carry
an expert copy of the block for the reference stream; the streams meet in `mot.joint_attention`
over ``[video_tgt ; video_ref...]`` (text is not in the joint attention). Cross-attention is per
stream: the target reads [CLIP(image) ; umT5(prompt)], each reference reads its own CLIP tokens
and caption. Blocks without an expert pass the reference through; only the target is decoded.
The expert has its own patch embedding and condition embedder and sees a fixed "clean" timestep
(t = 1 in the official pipeline).

Dtypes follow the official ``_keep_in_fp32_modules``: time embedder, modulation tables and the
norm1/norm2/norm3 LayerNorms (including the image embedder's) keep float32 parameters and
compute (the policy's ``keep_fp32`` roles); everything else follows the `DTypePolicy`.

The tree: the base model's embedders, ``blocks`` (the L base layers stacked, see
`vap_jax.models.stack`) and head; ``expert`` holds everything VAP trains -- its own patch
embedding, condition embedder and ``blocks`` (the E expert layers stacked).

Latents are (B, C, F, H, W) as in diffusers, C = 16 noisy + 4 mask + 16 image-condition.
n references: ref_latents (B, C, n*F, H, W), ref_text (B, n*L, text_dim), ref_image
(B, n*257, image_dim); the official code supports n = 1, for which this is exact.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from vap_jax.models.common import check_expert_blocks, from_diffusers_config, to_diffusers_config
from vap_jax.models.mot import MoTTransformer, StreamAttention
from vap_jax.models.stack import REMAT_POLICIES, stacked
from vap_jax.nn.attention import attention
from vap_jax.nn.dtypes import DTypePolicy
from vap_jax.nn.embeddings import timestep_features
from vap_jax.nn.layers import FeedForward, LayerNorm, Linear, RMSNorm, TimestepEmbedding, param
from vap_jax.nn.rope import RopeTable, wan_rope
from vap_jax.parallel import TOKEN_AXES, constrain
from vap_jax.parallel.context import CONTEXT_PARALLEL

F32 = jnp.float32
# The official ``_keep_in_fp32_modules``, as policy roles.
KEEP_FP32 = ('time_embedder', 'modulation', 'norm')
# diffusers config fields that we run at one value only (`from_source` refuses others), for the
# base class and for VAP's; `to_source` writes them.
CLASS_NAMES = ('WanTransformer3DModel', 'WanTransformer3DMOTModel')
FIXED = {'pos_embed_seq_len': None}
VAP_FIXED = {'attention_head_dim_mot_ref': None, 'supported_effect_types': None,
             'num_ref_embeddings': None, 'reference_train_mode': None}


@dataclasses.dataclass(frozen=True)
class WanConfig:
  """Architecture (diffusers ``WanTransformer3DMOTModel`` fields) plus runtime choices."""
  patch_size: tuple[int, int, int] = (1, 2, 2)
  num_attention_heads: int = 40
  attention_head_dim: int = 128
  in_channels: int = 36
  out_channels: int = 16
  text_dim: int = 4096
  freq_dim: int = 256
  ffn_dim: int = 13824
  num_layers: int = 40
  cross_attn_norm: bool = True
  qk_norm: str | None = 'rms_norm_across_heads'
  eps: float = 1e-6
  image_dim: int | None = 1280
  added_kv_proj_dim: int | None = 5120
  rope_max_seq_len: int = 1024
  block_idx_with_mot_ref: tuple[int, ...] = ()
  # Runtime: dtypes, attention implementation, scanned or looped layers, remat policy.
  dtypes: DTypePolicy = DTypePolicy(keep_fp32=KEEP_FP32)
  attention: str = 'xla'
  scan_layers: bool = True
  remat: str = 'none'
  context_parallel: str = 'gspmd'  # vap_jax.parallel.context.CONTEXT_PARALLEL

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  def __post_init__(self):
    object.__setattr__(self, 'dtypes', DTypePolicy.of(self.dtypes, keep_fp32=KEEP_FP32))
    object.__setattr__(self, 'block_idx_with_mot_ref', tuple(self.block_idx_with_mot_ref))
    object.__setattr__(self, 'patch_size', tuple(self.patch_size))
    check_expert_blocks(self.block_idx_with_mot_ref, self.num_layers)
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat {self.remat!r} is not one of {REMAT_POLICIES}')
    if self.context_parallel not in CONTEXT_PARALLEL:
      raise ValueError(f'context_parallel {self.context_parallel!r} is not one of '
                       f'{CONTEXT_PARALLEL}')
    if (self.image_dim is None) != (self.added_kv_proj_dim is None):
      raise ValueError('image_dim and added_kv_proj_dim must both be set (I2V) or both be None')

  @classmethod
  def from_source(cls, config: dict[str, Any], **runtime) -> 'WanConfig':
    """Build from a diffusers ``transformer/config.json`` dict; rejects features we do not run.
    ``runtime``: dtype / param_dtype / trainable_dtype (or dtypes), attention, scan_layers,
    remat."""
    return from_diffusers_config(cls, config, {**FIXED, **VAP_FIXED}, (
        'num_layers', 'num_attention_heads', 'attention_head_dim', 'in_channels', 'out_channels',
        'text_dim', 'ffn_dim', 'patch_size'), **runtime)

  def to_source(self) -> dict[str, Any]:
    """The diffusers ``config.json`` dict of this architecture (the inverse of `from_source`):
    ``WanTransformer3DMOTModel`` with the VAP fields, or the base class without experts."""
    return to_diffusers_config(self, CLASS_NAMES, FIXED, VAP_FIXED)


class Stream(NamedTuple):
  """One token stream: video tokens (``carried`` from block to block); its cross-attention
  context, modulation, RoPE and (target) time embedding are the same for every block.

  ``chunks`` is the number of references packed in the stream (1 for the target); modulation is
  (B, chunks, 6, dim) float32 and each chunk cross-attends to its own text/image tokens.
  """
  video: jax.Array
  text: jax.Array
  image: jax.Array | None
  modulation: jax.Array
  rope: RopeTable
  temb: jax.Array | None = None
  mask: jax.Array | None = None  # (B, R) references kept (see `vap_jax.models.mot`)
  carried = ('video',)

  @property
  def chunks(self) -> int:  # static: read off a shape, so a stream can cross a jit boundary
    return self.modulation.shape[1]


class Conditioning(NamedTuple):
  """What stays fixed over the denoising steps: the target's embedded text/CLIP context and the
  whole reference stream."""
  text: jax.Array
  image: jax.Array | None
  ref: Stream | None


class ConditionEmbedder(nnx.Module):
  """Timestep -> (temb, 6-way modulation); umT5 text and CLIP image tokens -> model width."""

  def __init__(self, cfg: WanConfig, dtypes: DTypePolicy, *, rngs: nnx.Rngs):
    d, self.config, self.dtype = cfg.inner_dim, cfg, dtypes.compute_dtype
    self.time_embedder = TimestepEmbedding(cfg.freq_dim, d, rngs=rngs,
                                           **dtypes.kw('time_embedder'))
    self.time_proj = Linear(d, 6 * d, axes=(None, 'embed'), rngs=rngs, **dtypes.kw())
    self.text_embedder = FeedForward(cfg.text_dim, d, d, axes=('text_embed', 'embed', None),
                                     rngs=rngs, **dtypes.kw())
    if cfg.image_dim is not None:
      norm = dict(eps=1e-5, rngs=rngs, **dtypes.kw('norm'))
      self.image_norm1 = LayerNorm(cfg.image_dim, **norm)
      self.image_ff = FeedForward(cfg.image_dim, cfg.image_dim, d, approximate=False,
                                  axes=(None, None, 'embed'), rngs=rngs, **dtypes.kw())
      self.image_norm2 = LayerNorm(d, **norm)
    else:
      self.image_norm1 = self.image_ff = self.image_norm2 = None

  def time(self, t: jax.Array):
    """(...,) timesteps -> temb (..., dim) in dtype and modulation (..., 6, dim) float32."""
    dtype = self.dtype
    shape = t.shape
    feats = timestep_features(t.reshape(-1), self.config.freq_dim)
    temb = self.time_embedder(feats).astype(dtype)
    modulation = self.time_proj(jax.nn.silu(temb)).reshape(*shape, 6, -1).astype(F32)
    return temb.reshape(*shape, -1), modulation

  def context(self, text: jax.Array, image: jax.Array | None):
    dtype = self.dtype
    text = self.text_embedder(text.astype(dtype))
    if image is None:
      return text, None
    # FP32LayerNorm: float32 in and out, then the image MLP in dtype.
    image = self.image_norm1(image.astype(F32)).astype(dtype)
    image = self.image_norm2(self.image_ff(image).astype(F32)).astype(dtype)
    return text, image


class CrossAttention(StreamAttention):
  """Wan I2V cross-attention: text attention plus an image branch with its own K/V (to_out shared)."""

  def __init__(self, cfg: WanConfig, dtypes: DTypePolicy, *, rngs: nnx.Rngs):
    d, kw = cfg.inner_dim, dict(rngs=rngs, **dtypes.kw())
    super().__init__(d, cfg.num_attention_heads, cfg.attention_head_dim, qk_norm=cfg.qk_norm,
                     eps=cfg.eps, **kw)
    self.attention = cfg.attention
    if cfg.added_kv_proj_dim is not None:
      self.add_k_proj = Linear(cfg.added_kv_proj_dim, d, axes=('embed', 'heads'), **kw)
      self.add_v_proj = Linear(cfg.added_kv_proj_dim, d, axes=('embed', 'heads'), **kw)
      self.norm_added_k = RMSNorm(d, eps=cfg.eps, **kw)
    else:
      self.add_k_proj = self.add_v_proj = self.norm_added_k = None

  def __call__(self, x: jax.Array, text: jax.Array, image: jax.Array | None) -> jax.Array:
    q = self.to_q(x)
    k = self.to_k(text)
    if self.norm_q is not None:
      q, k = self.norm_q(q), self.norm_k(k)
    q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(self.to_v(text))
    o = attention(q, k, v, implementation=self.attention)
    if image is not None:
      k_img = self.split_heads(self.norm_added_k(self.add_k_proj(image)))
      v_img = self.split_heads(self.add_v_proj(image))
      o = o + attention(q, k_img, v_img, implementation=self.attention)
    return self.out(o)


class WanLayer(nnx.Module):
  """One stream's block weights (the base or the expert copy)."""
  after_attention = ('attn1/to_out', 'attn2', 'norm2', 'ffn')  # what follows the joint attention
  attention_tokens = ('video',)                                  # its joint-attention tokens
  rotated = ('video',)                                           # all rotated by RoPE

  def __init__(self, cfg: WanConfig, dtypes: DTypePolicy, *, rngs: nnx.Rngs):
    d = cfg.inner_dim
    norm = dict(eps=cfg.eps, rngs=rngs, **dtypes.kw('norm'))
    self.norm1 = LayerNorm(d, affine=False, **norm)
    self.attn1 = StreamAttention(d, cfg.num_attention_heads, cfg.attention_head_dim,
                                 qk_norm=cfg.qk_norm, eps=cfg.eps, rngs=rngs, **dtypes.kw())
    self.attn2 = CrossAttention(cfg, dtypes, rngs=rngs)
    self.norm2 = LayerNorm(d, **norm) if cfg.cross_attn_norm else None
    self.ffn = FeedForward(d, cfg.ffn_dim, rngs=rngs, **dtypes.kw())
    self.norm3 = LayerNorm(d, affine=False, **norm)
    self.scale_shift_table = param(rngs, lambda k, s, t: jax.random.normal(k, s, t) / d ** 0.5,
                                   (1, 6, d), dtypes.kw('modulation')['param_dtype'],
                                   (None, None, 'embed'))

  @staticmethod
  def _chunked(s: Stream, x: jax.Array) -> jax.Array:
    """(B, n*T, D) -> (B, n, T, D): one modulation per reference chunk."""
    return x.reshape(x.shape[0], s.chunks, -1, x.shape[-1])

  def _modulated(self, s: Stream, norm: LayerNorm, x, shift, scale):
    y = self._chunked(s, norm(x.astype(F32))) * (1 + scale) + shift
    return y.reshape(x.shape).astype(x.dtype)

  def attention_input(self, s: Stream):
    mods = [m[:, :, None] for m in jnp.unstack(self.scale_shift_table[...] + s.modulation, axis=2)]
    return (self._modulated(s, self.norm1, s.video, mods[0], mods[1]),), mods

  def finish(self, s: Stream, attn, mods) -> Stream:
    (attn,), (_, _, gate, c_shift, c_scale, c_gate) = attn, mods
    x = s.video
    x = (x.astype(F32) + (self._chunked(s, attn) * gate).reshape(x.shape)).astype(x.dtype)
    normed = x if self.norm2 is None else self.norm2(x.astype(F32)).astype(x.dtype)
    b, n = x.shape[0], s.chunks
    per_chunk = lambda t: None if t is None else t.reshape(b * n, -1, t.shape[-1])
    cross = self.attn2(per_chunk(normed), per_chunk(s.text), per_chunk(s.image))
    x = x + cross.reshape(x.shape)
    ff = checkpoint_name(self.ffn(self._modulated(s, self.norm3, x, c_shift, c_scale)), 'ffn')
    x = (x.astype(F32) + (self._chunked(s, ff.astype(F32)) * c_gate).reshape(x.shape)).astype(x.dtype)
    return s._replace(video=constrain(x, TOKEN_AXES))


class WanExpert(nnx.Module):
  """Everything the VAP expert adds (and trains): own patch embedding, condition embedder, and
  the expert layers of the blocks in ``block_idx_with_mot_ref``, stacked (E, ...)."""

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    dtypes = cfg.dtypes.trainable_policy()
    patch = cfg.in_channels * math.prod(cfg.patch_size)
    self.patch_embedding = Linear(patch, cfg.inner_dim, axes=('patch', 'embed'), rngs=rngs,
                                  **dtypes.kw())
    self.condition_embedder = ConditionEmbedder(cfg, dtypes, rngs=rngs)
    self.blocks = stacked(lambda: WanLayer(cfg, dtypes, rngs=rngs), len(cfg.block_idx_with_mot_ref))


class WanTransformer(MoTTransformer):
  """Wan2.1 I2V DiT + VAP expert. ``__call__`` returns the target's flow prediction (B,C,F,H,W)."""

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    d, dtypes = cfg.inner_dim, cfg.dtypes
    kw = dict(rngs=rngs, **dtypes.kw())
    patch = cfg.in_channels * math.prod(cfg.patch_size)
    self.patch_embedding = Linear(patch, d, axes=('patch', 'embed'), **kw)
    self.condition_embedder = ConditionEmbedder(cfg, dtypes, rngs=rngs)
    self.blocks = stacked(lambda: WanLayer(cfg, dtypes, rngs=rngs), cfg.num_layers)
    self.norm_out = LayerNorm(d, eps=cfg.eps, affine=False, rngs=rngs, **dtypes.kw('norm'))
    self.proj_out = Linear(d, cfg.out_channels * math.prod(cfg.patch_size), axes=('embed', None),
                           **kw)
    self.scale_shift_table = param(rngs, lambda k, s, t: jax.random.normal(k, s, t) / d ** 0.5,
                                   (1, 2, d), dtypes.kw('modulation')['param_dtype'],
                                   (None, None, 'embed'))
    self.expert = WanExpert(cfg, rngs=rngs) if cfg.block_idx_with_mot_ref else None

  def rope(self, frames: int, height: int, width: int, num_refs: int = 0) -> RopeTable:
    pt, ph, pw = self.config.patch_size
    cos, sin = wan_rope(self.config.attention_head_dim, frames // pt, height // ph, width // pw,
                        num_refs=num_refs)
    return jnp.asarray(cos), jnp.asarray(sin)

  def _patchify(self, proj: Linear, latents: jax.Array) -> jax.Array:
    b, c, f, h, w = latents.shape
    pt, ph, pw = self.config.patch_size
    x = latents.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
    x = x.transpose(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, -1, c * pt * ph * pw)
    return constrain(proj(x.astype(self.config.dtypes.compute_dtype)), TOKEN_AXES)

  # ------------------------------------------------------------------------------ the one API

  def __call__(self, latents: jax.Array, timestep: jax.Array, text: jax.Array, *,
               image: jax.Array | None = None, ref_latents: jax.Array | None = None,
               ref_text: jax.Array | None = None, ref_image: jax.Array | None = None,
               ref_timestep: jax.Array | int = 1, ref_mask: jax.Array | None = None) -> jax.Array:
    """latents (B,C,F,H,W), timestep (B,) or scalar, text (B,L,text_dim), image (B,257,image_dim).

    References (optional; all or none): ref_latents (B, C, n*F, H, W), ref_text (B, n*L, text_dim),
    ref_image (B, n*257, image_dim); ref_timestep broadcasts to (B, n), default 1 (clean).
    ``ref_mask`` (B, n) drops the False references (training's reference dropout; kept ones
    last, so they sit next to the target in time).
    """
    cond = self.condition(latents, text, image=image, ref_latents=ref_latents, ref_text=ref_text,
                          ref_image=ref_image, ref_timestep=ref_timestep, ref_mask=ref_mask)
    return self.predict(latents, timestep, cond)

  def condition(self, latents, text, *, image=None, ref_latents=None, ref_text=None,
                ref_image=None, ref_timestep=1, ref_mask=None) -> Conditioning:
    """The step-independent part of the inputs (the reference stream runs at a fixed t), embedded
    once per sampling run; ``latents`` is read for its shape only."""
    b, _, f, h, w = self._check_inputs(latents, text, image, ref_latents, ref_text, ref_image)
    text_ctx, image_ctx = self.condition_embedder.context(text, image)
    if ref_latents is None:
      return Conditioning(text_ctx, image_ctx, None)
    n, expert = ref_latents.shape[2] // f, self.expert
    _, ref_modulation = expert.condition_embedder.time(jnp.broadcast_to(ref_timestep, (b, n)))
    ref_text_ctx, ref_image_ctx = expert.condition_embedder.context(ref_text, ref_image)
    ref = Stream(self._patchify(expert.patch_embedding, ref_latents), ref_text_ctx,
                 ref_image_ctx, ref_modulation, self.rope(f, h, w, num_refs=n),
                 mask=None if ref_mask is None else jnp.asarray(ref_mask, bool))
    return Conditioning(text_ctx, image_ctx, ref)

  def predict(self, latents: jax.Array, timestep: jax.Array, cond: Conditioning) -> jax.Array:
    """The flow prediction for ``latents`` at ``timestep`` given a precomputed `condition`."""
    target, ref = self.streams(latents, timestep, cond)
    target, _ = self.run_blocks(target, ref)
    return self.head(target, latents.shape)

  def embed(self, latents, timestep, text, **refs):
    """Inputs -> (target stream, reference stream or None) ready for the blocks."""
    return self.streams(latents, timestep, self.condition(latents, text, **refs))

  def streams(self, latents, timestep, cond: Conditioning):
    b, _, f, h, w = latents.shape
    temb, modulation = self.condition_embedder.time(jnp.broadcast_to(timestep, (b,)))
    target = Stream(self._patchify(self.patch_embedding, latents), cond.text, cond.image,
                    modulation[:, None], self.rope(f, h, w), temb)
    return target, cond.ref

  def head(self, target: Stream, latent_shape) -> jax.Array:
    """Final modulated norm and projection of the target, unpatchified to (B, C_out, F, H, W)."""
    b, _, f, h, w = latent_shape
    pt, ph, pw = self.config.patch_size
    shift, scale = jnp.unstack(self.scale_shift_table[...] + target.temb.astype(F32)[:, None],
                               axis=1)
    x = self.norm_out(target.video.astype(F32)) * (1 + scale[:, None]) + shift[:, None]
    x = self.proj_out(x.astype(target.video.dtype))
    x = x.reshape(b, f // pt, h // ph, w // pw, pt, ph, pw, -1).transpose(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, -1, f, h, w)

  def _check_inputs(self, latents, text, image, ref_latents, ref_text, ref_image):
    cfg = self.config
    if latents.ndim != 5 or latents.shape[1] != cfg.in_channels:
      raise ValueError(f'latents must be (B, {cfg.in_channels}, F, H, W), got {latents.shape}')
    b, c, f, h, w = latents.shape
    if any(n % p for n, p in zip((f, h, w), cfg.patch_size)):
      raise ValueError(f'latent F,H,W {(f, h, w)} must be multiples of patch_size {cfg.patch_size}')
    if text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim:
      raise ValueError(f'text must be ({b}, L, {cfg.text_dim}), got {text.shape}')
    if (image is None) != (cfg.image_dim is None):
      raise ValueError('image tokens are required by an I2V model (image_dim set) and only then')
    if image is not None and (image.ndim != 3 or image.shape[0] != b or image.shape[2] != cfg.image_dim):
      raise ValueError(f'image must be ({b}, N, {cfg.image_dim}), got {image.shape}')
    refs = (ref_latents, ref_text) + ((ref_image,) if cfg.image_dim is not None else ())
    if all(r is None for r in refs):
      return latents.shape
    if any(r is None for r in refs):
      raise ValueError('ref_latents, ref_text' + (', ref_image' if cfg.image_dim else '') +
                       ' must be given together')
    if self.expert is None:
      raise ValueError('references were given but this model has no expert '
                       '(block_idx_with_mot_ref is empty)')
    if (ref_latents.ndim != 5 or ref_latents.shape[:2] != (b, c) or ref_latents.shape[3:] != (h, w)
        or ref_latents.shape[2] % f or ref_latents.shape[2] == 0):
      raise ValueError(f'ref_latents must be ({b}, {c}, n*{f}, {h}, {w}) for n >= 1 references, '
                       f'got {ref_latents.shape}')
    n = ref_latents.shape[2] // f
    if ref_text.ndim != 3 or ref_text.shape[0] != b or ref_text.shape[1] % n or \
        ref_text.shape[2] != cfg.text_dim:
      raise ValueError(f'ref_text must be ({b}, {n}*L, {cfg.text_dim}) for {n} references, '
                       f'got {ref_text.shape}')
    if ref_image is not None and (ref_image.shape[0] != b or ref_image.shape[1] % n or
                                  ref_image.shape[2] != cfg.image_dim):
      raise ValueError(f'ref_image must be ({b}, {n}*N, {cfg.image_dim}) for {n} references, '
                       f'got {ref_image.shape}')
    return latents.shape

