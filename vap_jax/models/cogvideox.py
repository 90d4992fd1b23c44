"""CogVideoX-5B-I2V transformer with the VAP reference-video expert (Mixture-of-Transformers).

The target stream is the base CogVideoX-I2V model. Blocks listed in ``block_idx_with_mot_ref``
carry a second, expert copy of the block weights for the reference stream; the two streams meet
in `mot.joint_attention` over ``[text_tgt, video_tgt, text_ref..., video_ref...]``. Blocks without
an expert pass the reference stream through. The expert has its own patch/text embedding and time
MLP, sees the same timestep as the target, and its final hidden state is discarded: only the
target is decoded. Without a reference the model *is* the base CogVideoX-I2V transformer.

Latents are (B, F, C, H, W) as in diffusers. n references arrive concatenated along frames,
(B, n*F, C, H, W), with their captions concatenated along the sequence, (B, n*L, text_dim).

The tree: the base model's embedders, ``blocks`` (the L base layers stacked, see
`vap_jax.models.stack`) and head; ``expert`` holds everything VAP trains -- its own patch/text
embedding, time MLP and ``blocks`` (the E expert layers stacked).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from vap_jax.models.common import check_expert_blocks, from_diffusers_config, to_diffusers_config
from vap_jax.models.mot import MoTTransformer, StreamAttention
from vap_jax.models.stack import REMAT_POLICIES, stacked
from vap_jax.nn.dtypes import DTypePolicy
from vap_jax.nn.embeddings import sincos_3d_table, timestep_features
from vap_jax.nn.layers import (AdaLayerNorm, FeedForward, LayerNorm, LayerNormZero, Linear,
                               TimestepEmbedding, buffer)
from vap_jax.nn.rope import RopeTable, cogvideox_rope
from vap_jax.parallel import TOKEN_AXES, constrain
from vap_jax.parallel.context import CONTEXT_PARALLEL

log = logging.getLogger(__name__)

# diffusers config fields that we run at one value only (`from_source` refuses others), for the
# base class and for VAP's; `to_source` writes them. dropout: we train without it.
CLASS_NAMES = ('CogVideoXTransformer3DModel', 'CogVideoXTransformer3DMOTModel')
FIXED = {'patch_size_t': None, 'ofs_embed_dim': None, 'activation_fn': 'gelu-approximate',
         'timestep_activation_fn': 'silu'}
VAP_FIXED = {'attention_head_dim_mot_ref': None, 'supported_effect_types': None,
             'num_ref_embeddings': None, 'reference_train_mode': None,
             'ablation_single_encoder': False, 'ablation_residual_addition': False}


@dataclasses.dataclass(frozen=True)
class CogVideoXConfig:
  """Architecture (diffusers ``CogVideoXTransformer3DMOTModel`` fields) plus runtime choices."""
  num_layers: int = 42
  num_attention_heads: int = 48
  attention_head_dim: int = 64
  in_channels: int = 32
  out_channels: int = 16
  time_embed_dim: int = 512
  text_embed_dim: int = 4096
  patch_size: int = 2
  max_text_seq_length: int = 226
  sample_height: int = 60
  sample_width: int = 90
  sample_frames: int = 49
  temporal_compression_ratio: int = 4
  spatial_interpolation_scale: float = 1.875
  temporal_interpolation_scale: float = 1.0
  use_rotary_positional_embeddings: bool = True
  use_learned_positional_embeddings: bool = True
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  norm_eps: float = 1e-5
  norm_elementwise_affine: bool = True
  attention_bias: bool = True
  patch_bias: bool = True
  block_idx_with_mot_ref: tuple[int, ...] = ()
  # Runtime: dtypes, attention implementation (vap_jax.nn.attention), scanned or looped layers,
  # remat policy (vap_jax.models.stack.REMAT_POLICIES).
  dtypes: DTypePolicy = DTypePolicy()
  attention: str = 'xla'
  scan_layers: bool = True
  remat: str = 'none'
  context_parallel: str = 'gspmd'  # vap_jax.parallel.context.CONTEXT_PARALLEL

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  def __post_init__(self):
    object.__setattr__(self, 'dtypes', DTypePolicy.of(self.dtypes))
    object.__setattr__(self, 'block_idx_with_mot_ref', tuple(self.block_idx_with_mot_ref))
    check_expert_blocks(self.block_idx_with_mot_ref, self.num_layers)
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat {self.remat!r} is not one of {REMAT_POLICIES}')
    if self.context_parallel not in CONTEXT_PARALLEL:
      raise ValueError(f'context_parallel {self.context_parallel!r} is not one of '
                       f'{CONTEXT_PARALLEL}')
    if self.use_rotary_positional_embeddings and self.attention_head_dim % 16:
      raise ValueError(f'3D RoPE splits attention_head_dim into [d/4, 3d/8, 3d/8] channel pairs: '
                       f'it must be a multiple of 16, got {self.attention_head_dim}')

  @classmethod
  def from_source(cls, config: dict[str, Any], **runtime) -> 'CogVideoXConfig':
    """Build from a diffusers ``transformer/config.json`` dict; rejects features we do not run.
    ``runtime``: dtype / param_dtype / trainable_dtype (or dtypes), attention, scan_layers,
    remat."""
    return from_diffusers_config(cls, config, {**FIXED, **VAP_FIXED}, (
        'num_layers', 'num_attention_heads', 'attention_head_dim', 'in_channels', 'out_channels',
        'time_embed_dim', 'text_embed_dim', 'patch_size'), **runtime)

  def to_source(self) -> dict[str, Any]:
    """The diffusers ``config.json`` dict of this architecture (the inverse of `from_source`):
    ``CogVideoXTransformer3DMOTModel`` with the VAP fields, or the base class without experts."""
    return to_diffusers_config(self, CLASS_NAMES, {**FIXED, 'dropout': 0.0}, VAP_FIXED)


class Stream(NamedTuple):
  """One token stream flowing through the blocks: video and text tokens (``carried`` from block
  to block), its temb and RoPE (the same for every block)."""
  video: jax.Array
  text: jax.Array
  temb: jax.Array
  rope: RopeTable | None
  mask: jax.Array | None = None  # (B, R) references kept (see `vap_jax.models.mot`)
  carried = ('video', 'text')


class Conditioning(NamedTuple):
  """What stays fixed over the denoising steps: the embedded target text and the reference stream
  (all but its timestep embedding, which follows the target's t)."""
  text: jax.Array
  ref: Stream | None


class PatchEmbed(nnx.Module):
  """Text projection + 2x2 patchify-and-project of every frame, plus the absolute position table."""

  def __init__(self, cfg: CogVideoXConfig, dtypes: DTypePolicy, *, rngs: nnx.Rngs):
    self.config, p, d = cfg, cfg.patch_size, cfg.inner_dim
    self.proj = Linear(cfg.in_channels * p * p, d, axes=('patch', 'embed'), use_bias=cfg.patch_bias,
                       rngs=rngs, **dtypes.kw())
    self.text_proj = Linear(cfg.text_embed_dim, d, axes=('text_embed', 'embed'), rngs=rngs,
                            **dtypes.kw())
    # Learned tables are checkpoint buffers, initialised (as in diffusers) to the sin-cos table.
    frames = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
    length = cfg.max_text_seq_length + frames * (cfg.sample_height // p) * (cfg.sample_width // p)
    self.pos_embedding = buffer(
        lambda: self._sincos(cfg.sample_height, cfg.sample_width, cfg.sample_frames),
        (1, length, d), dtypes.params, (None, 'length', 'embed'),
    ) if cfg.use_learned_positional_embeddings else None

  def _sincos(self, height: int, width: int, frames: int) -> np.ndarray:
    cfg, p = self.config, self.config.patch_size
    latent_frames = (frames - 1) // cfg.temporal_compression_ratio + 1
    table = sincos_3d_table(cfg.inner_dim, height // p, width // p, latent_frames,
                            spatial_scale=cfg.spatial_interpolation_scale,
                            temporal_scale=cfg.temporal_interpolation_scale)
    return np.concatenate([np.zeros((cfg.max_text_seq_length, cfg.inner_dim)), table])

  def positions(self, frames: int, height: int, width: int, n_text: int):
    """Absolute positions added to [text ; video] tokens for latents (frames, height, width), split
    into (text rows, video rows); None for a RoPE-only model (CogVideoX-5B)."""
    cfg = self.config
    if cfg.use_rotary_positional_embeddings and not cfg.use_learned_positional_embeddings:
      return None
    if cfg.use_learned_positional_embeddings and (height, width) != (cfg.sample_height,
                                                                   cfg.sample_width):
      raise ValueError(f'learned positional embeddings fix the latent size to '
                       f'{cfg.sample_height}x{cfg.sample_width}, got {height}x{width}')
    if n_text != cfg.max_text_seq_length:
      raise ValueError(f'positional embeddings expect {cfg.max_text_seq_length} text tokens, got '
                       f'{n_text}')
    pixel_frames = (frames - 1) * cfg.temporal_compression_ratio + 1
    if cfg.use_learned_positional_embeddings and pixel_frames == cfg.sample_frames:
      pos = self.pos_embedding[...]
    else:
      if cfg.use_learned_positional_embeddings:
        log.warning('%d latent frames differ from sample_frames=%d: the learned position table is '
                    'replaced by sin-cos positions, as diffusers does', frames, cfg.sample_frames)
      pos = jnp.asarray(self._sincos(height, width, pixel_frames))[None]
    return pos[:, :n_text], pos[:, n_text:]

  def embed_text(self, text: jax.Array, positions) -> jax.Array:
    x = self.text_proj(text)
    return x if positions is None else x + positions[0].astype(x.dtype)

  def embed_video(self, latents: jax.Array, positions) -> jax.Array:
    p = self.config.patch_size
    b, f, c, h, w = latents.shape
    patches = latents.reshape(b, f, c, h // p, p, w // p, p).transpose(0, 1, 3, 5, 2, 4, 6)
    x = self.proj(patches.reshape(b, f * (h // p) * (w // p), c * p * p))
    return x if positions is None else x + positions[1].astype(x.dtype)


class CogVideoXLayer(nnx.Module):
  """One stream's block weights: norm1, attn1, norm2, ff (the base or the expert copy)."""
  after_attention = ('attn1/to_out', 'norm2', 'ff')  # what follows the joint attention
  attention_tokens = ('text', 'video')               # its joint-attention tokens, in order
  rotated = ('video',)                               # RoPE rotates the video tokens only

  def __init__(self, cfg: CogVideoXConfig, dtypes: DTypePolicy, *, rngs: nnx.Rngs):
    d, kw = cfg.inner_dim, dict(rngs=rngs, **dtypes.kw())
    norm_kw = dict(eps=cfg.norm_eps, affine=cfg.norm_elementwise_affine, **kw)
    self.norm1 = LayerNormZero(cfg.time_embed_dim, d, **norm_kw)
    self.attn1 = StreamAttention(d, cfg.num_attention_heads, cfg.attention_head_dim,
                                 qk_norm='layer_norm', eps=1e-6, bias=cfg.attention_bias, **kw)
    self.norm2 = LayerNormZero(cfg.time_embed_dim, d, **norm_kw)
    self.ff = FeedForward(d, 4 * d, **kw)

  def attention_input(self, s: Stream):
    video, text, gate, text_gate = self.norm1(s.video, s.text, s.temb)
    return (text, video), (gate, text_gate)

  def finish(self, s: Stream, attn, gates) -> Stream:
    """Gated attention residual, then the gated feed-forward (per token: the official applies
    it to [text ; video] concatenated; kept apart, neither is ever resharded at their boundary)."""
    (attn_text, attn_video), (gate, text_gate) = attn, gates
    video = s.video + gate * attn_video
    text = s.text + text_gate * attn_text
    norm_video, norm_text, gate, text_gate = self.norm2(video, text, s.temb)
    ff_text, ff_video = (checkpoint_name(self.ff(x), 'ffn') for x in (norm_text, norm_video))
    video = constrain(video + gate * ff_video, TOKEN_AXES)
    return s._replace(video=video, text=text + text_gate * ff_text)


def rope_table(cfg: CogVideoXConfig, frames: int, height: int, width: int,
               num_refs: int = 0) -> RopeTable | None:
  """RoPE table for latents of (frames, height, width): target, or ``num_refs`` references."""
  p = cfg.patch_size
  if not cfg.use_rotary_positional_embeddings:
    return None
  cos, sin = cogvideox_rope(cfg.attention_head_dim, frames, height // p, width // p,
                            base_h=cfg.sample_height // p, base_w=cfg.sample_width // p,
                            num_refs=num_refs)
  return jnp.asarray(cos), jnp.asarray(sin)


class CogVideoXExpert(nnx.Module):
  """Everything the VAP expert adds (and trains): own patch/text embedding, time MLP, and the
  expert layers of the blocks in ``block_idx_with_mot_ref``, stacked (E, ...)."""

  def __init__(self, cfg: CogVideoXConfig, *, rngs: nnx.Rngs):
    dtypes = cfg.dtypes.trainable_policy()
    self.patch_embed = PatchEmbed(cfg, dtypes, rngs=rngs)
    self.time_embedding = TimestepEmbedding(cfg.inner_dim, cfg.time_embed_dim, rngs=rngs,
                                            **dtypes.kw())
    self.blocks = stacked(lambda: CogVideoXLayer(cfg, dtypes, rngs=rngs),
                          len(cfg.block_idx_with_mot_ref))


class CogVideoXTransformer(MoTTransformer):
  """CogVideoX-I2V DiT + VAP expert. ``__call__`` returns the target's prediction (B,F,C_out,H,W)."""

  def __init__(self, cfg: CogVideoXConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    d, dtypes = cfg.inner_dim, cfg.dtypes
    kw = dict(rngs=rngs, **dtypes.kw())
    self.patch_embed = PatchEmbed(cfg, dtypes, rngs=rngs)
    self.time_embedding = TimestepEmbedding(d, cfg.time_embed_dim, **kw)
    self.blocks = stacked(lambda: CogVideoXLayer(cfg, dtypes, rngs=rngs), cfg.num_layers)
    self.norm_final = LayerNorm(d, eps=cfg.norm_eps, affine=cfg.norm_elementwise_affine, **kw)
    self.norm_out = AdaLayerNorm(cfg.time_embed_dim, d, eps=cfg.norm_eps,
                                 affine=cfg.norm_elementwise_affine, **kw)
    self.proj_out = Linear(d, cfg.patch_size ** 2 * cfg.out_channels, axes=('embed', None), **kw)
    self.expert = CogVideoXExpert(cfg, rngs=rngs) if cfg.block_idx_with_mot_ref else None

  def rope(self, frames: int, height: int, width: int, num_refs: int = 0) -> RopeTable | None:
    return rope_table(self.config, frames, height, width, num_refs)

  # ------------------------------------------------------------------------------ the one API

  def __call__(self, latents: jax.Array, timestep: jax.Array, text: jax.Array, *,
               image: None = None, ref_latents: jax.Array | None = None,
               ref_text: jax.Array | None = None, ref_image: None = None,
               ref_mask: jax.Array | None = None) -> jax.Array:
    """latents (B,F,C,H,W) (noisy latents ; image latents along C), timestep (B,) or scalar,
    text (B,L,text_dim).

    ref_latents (B, n*F, C, H, W) and ref_text (B, n*L, text_dim) feed the expert; leave both
    None to run the base model. (``image``/``ref_image`` are Wan's CLIP tokens: CogVideoX takes
    none.) ``ref_mask`` (B, n) drops the False references (training's reference dropout; kept
    ones last, so they sit next to the target in time).
    """
    cond = self.condition(latents, text, image=image, ref_latents=ref_latents,
                          ref_text=ref_text, ref_image=ref_image, ref_mask=ref_mask)
    return self.predict(latents, timestep, cond)

  def condition(self, latents, text, *, image=None, ref_latents=None, ref_text=None,
                ref_image=None, ref_mask=None) -> Conditioning:
    """The step-independent part of the inputs, embedded once per sampling run (``latents`` is
    read for its shape only)."""
    if image is not None or ref_image is not None:
      raise ValueError('CogVideoX takes no CLIP image tokens (image / ref_image): its image '
                       'condition is the image latents concatenated to the noisy latents')
    cfg, dtype = self.config, self.config.dtypes.compute_dtype
    b, f, c, h, w = self._check_inputs(latents, text, ref_latents, ref_text)
    n_text = text.shape[1]
    text_tokens = self.patch_embed.embed_text(text.astype(dtype),
                                              self.patch_embed.positions(f, h, w, n_text))
    if ref_latents is None:
      return Conditioning(text_tokens, None)
    # Each reference is embedded on its own (own text chunk, own frames, same position table).
    n, embed = ref_latents.shape[1] // f, self.expert.patch_embed
    pos = embed.positions(f, h, w, n_text)
    ref_text = embed.embed_text(ref_text.astype(dtype).reshape(b * n, n_text, -1), pos)
    ref_video = embed.embed_video(ref_latents.astype(dtype).reshape(b * n, f, c, h, w), pos)
    ref = Stream(constrain(ref_video.reshape(b, -1, cfg.inner_dim), TOKEN_AXES),
                 ref_text.reshape(b, -1, cfg.inner_dim), None, self.rope(f, h, w, num_refs=n),
                 None if ref_mask is None else jnp.asarray(ref_mask, bool))
    return Conditioning(text_tokens, ref)

  def predict(self, latents: jax.Array, timestep: jax.Array, cond: Conditioning) -> jax.Array:
    """The prediction for noisy ``latents`` at ``timestep`` given a precomputed `condition`."""
    target, ref = self.streams(latents, timestep, cond)
    target, _ = self.run_blocks(target, ref)
    return self.head(target, latents.shape)

  def embed(self, latents, timestep, text, **refs):
    """Inputs -> (target stream, reference stream or None) ready for the blocks."""
    return self.streams(latents, timestep, self.condition(latents, text, **refs))

  def streams(self, latents, timestep, cond: Conditioning):
    cfg, dtype = self.config, self.config.dtypes.compute_dtype
    b, f, _, h, w = latents.shape
    t_feat = timestep_features(jnp.broadcast_to(timestep, (b,)), cfg.inner_dim,
                               flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
    t_feat = t_feat.astype(dtype)
    pos = self.patch_embed.positions(f, h, w, cond.text.shape[1])
    video = constrain(self.patch_embed.embed_video(latents.astype(dtype), pos), TOKEN_AXES)
    target = Stream(video, cond.text, self.time_embedding(t_feat), self.rope(f, h, w))
    if cond.ref is None:
      return target, None
    return target, cond.ref._replace(temb=self.expert.time_embedding(t_feat))

  def head(self, target: Stream, latent_shape) -> jax.Array:
    """Final norms and projection of the target stream, unpatchified to (B, F, C_out, H, W)."""
    b, f, _, h, w = latent_shape
    p = self.config.patch_size
    video = self.proj_out(self.norm_out(self.norm_final(target.video), target.temb))
    out = video.reshape(b, f, h // p, w // p, -1, p, p).transpose(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(b, f, -1, h, w)

  def _check_inputs(self, latents, text, ref_latents, ref_text):
    cfg = self.config
    if latents.ndim != 5 or latents.shape[2] != cfg.in_channels:
      raise ValueError(f'latents must be (B, F, {cfg.in_channels}, H, W), got {latents.shape}')
    b, f, c, h, w = latents.shape
    if h % cfg.patch_size or w % cfg.patch_size:
      raise ValueError(f'latent height/width {h}x{w} must be multiples of patch_size {cfg.patch_size}')
    if text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_embed_dim:
      raise ValueError(f'text must be ({b}, L, {cfg.text_embed_dim}), got {text.shape}')
    if (ref_latents is None) != (ref_text is None):
      raise ValueError('ref_latents and ref_text must be given together')
    if ref_latents is None:
      return latents.shape
    if self.expert is None:
      raise ValueError('references were given but this model has no expert '
                       '(block_idx_with_mot_ref is empty)')
    if (ref_latents.ndim != 5 or ref_latents.shape[0] != b or ref_latents.shape[2:] != (c, h, w)
        or ref_latents.shape[1] % f or ref_latents.shape[1] == 0):
      raise ValueError(f'ref_latents must be ({b}, n*{f}, {c}, {h}, {w}) for n >= 1 references, '
                       f'got {ref_latents.shape}')
    n = ref_latents.shape[1] // f
    if ref_text.shape != (b, n * text.shape[1], cfg.text_embed_dim):
      raise ValueError(f'ref_text must be ({b}, {n}*{text.shape[1]}, {cfg.text_embed_dim}) for '
                       f'{n} references, got {ref_text.shape}')
    return latents.shape

