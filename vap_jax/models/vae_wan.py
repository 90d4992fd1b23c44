"""Wan2.1 video VAE (diffusers ``AutoencoderKLWan``): causal 3D convs run chunk by chunk.

diffusers encodes the first frame, then groups of 4 frames, and decodes one latent frame at a
time, each chunk reading its temporal context from a feature cache. Here the same cache is the
`Caches` list of `vap_jax.nn.conv`; the first chunk runs alone and the rest under one `lax.scan`,
so memory is that of one chunk whatever the video length. ``chunked=False`` runs the whole video
as one chunk (the same numbers; used to test the chunking).

The resample layers have a first-frame rule: temporal up/downsampling leaves frame 0 alone
(1 latent frame <-> 1 video frame), which is what makes F = 1 + 4k frames map to 1 + k latents.
Activations are channels-last inside; the public API takes and returns (B, C, F, H, W).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vap_jax.models.common import source_fields
from vap_jax.models.vae_common import DiagonalGaussian, blend_tiles, tile_starts
from vap_jax.nn.attention import attention
from vap_jax.nn.conv import (Caches, CausalConv3d, Conv2d, Conv3d, run_chunked, to_channels_first,
                             to_channels_last)
from vap_jax.nn.layers import Linear, param
from vap_jax.parallel import constrain

# (batch, frames, height, width, channels) activations: batch and width may be sharded.
ACT = ('activation_batch', None, None, 'activation_width', None)

WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
  """diffusers ``AutoencoderKLWan`` fields (Wan2.1 defaults) plus runtime choices."""
  base_dim: int = 96
  decoder_base_dim: int | None = None
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temperal_downsample: tuple[bool, ...] = (False, True, True)
  latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
  latents_std: tuple[float, ...] = WAN21_LATENTS_STD
  in_channels: int = 3
  out_channels: int = 3
  # Runtime. Tiles as diffusers' defaults (pixels); used when ``tiled=True``.
  tile_sample_min_size: int = 256
  tile_sample_stride: int = 192
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention: str = 'xla'

  @classmethod
  def from_source(cls, config: dict[str, Any], **runtime) -> 'WanVAEConfig':
    """From a diffusers ``vae/config.json``; rejects Wan2.2 features we do not implement."""
    unsupported = {'is_residual': False, 'patch_size': None, 'attn_scales': (), 'dropout': 0.0}
    for key, expected in unsupported.items():
      value = config.get(key, expected)
      if (tuple(value) if isinstance(value, list) else value) != expected:
        raise ValueError(f'AutoencoderKLWan config field {key}={value!r} is not supported '
                         f'(expected {expected!r})')
    return cls(**source_fields(cls, config, ('base_dim', 'z_dim', 'dim_mult', 'num_res_blocks')), **runtime)


class RMSNorm(nnx.Module):
  """Wan ``RMS_norm``: x / max(||x||, 1e-12) * sqrt(C) * gamma over channels, in float32."""

  def __init__(self, dim: int, *, param_dtype, rngs: nnx.Rngs):
    self.factor = dim ** 0.5
    self.gamma = param(rngs, nnx.initializers.ones, (dim,), param_dtype, ('norm',))

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(xf), -1, keepdims=True))
    y = xf / jnp.maximum(norm, 1e-12) * self.factor * self.gamma[...].astype(jnp.float32)
    return y.astype(x.dtype)


def _kw(cfg: WanVAEConfig, rngs):
  return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


class ResidualBlock(nnx.Module):

  def __init__(self, in_dim: int, out_dim: int, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
    kw = _kw(cfg, rngs)
    self.norm1 = RMSNorm(in_dim, param_dtype=kw['param_dtype'], rngs=rngs)
    self.conv1 = CausalConv3d(in_dim, out_dim, 3, **kw)
    self.norm2 = RMSNorm(out_dim, param_dtype=kw['param_dtype'], rngs=rngs)
    self.conv2 = CausalConv3d(out_dim, out_dim, 3, **kw)
    self.conv_shortcut = (Linear(in_dim, out_dim, axes=('conv_in', 'conv_out'), **kw)
                          if in_dim != out_dim else None)

  def __call__(self, x, caches: Caches):
    h = x if self.conv_shortcut is None else self.conv_shortcut(x)
    x = self.conv1(jax.nn.silu(self.norm1(x)), caches)
    x = self.conv2(jax.nn.silu(self.norm2(x)), caches)
    return constrain(x + h, ACT)


class AttentionBlock(nnx.Module):
  """Single-head spatial self-attention, each frame on its own."""

  def __init__(self, dim: int, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
    kw = _kw(cfg, rngs)
    self.implementation = cfg.attention
    self.norm = RMSNorm(dim, param_dtype=kw['param_dtype'], rngs=rngs)
    self.to_qkv = Linear(dim, 3 * dim, axes=('conv_in', 'conv_out'), **kw)
    self.proj = Linear(dim, dim, axes=('conv_in', 'conv_out'), **kw)

  def __call__(self, x):
    b, t, h, w, c = x.shape
    qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 1, 3 * c)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    y = attention(q, k, v, implementation=self.implementation).reshape(b, t, h, w, c)
    return x + self.proj(y)


class Resample(nnx.Module):
  """Spatial x2 up/down (nearest + conv / pad + strided conv), optionally temporal x2 too."""

  def __init__(self, dim: int, mode: str, cfg: WanVAEConfig, *, out_dim: int | None = None,
               rngs: nnx.Rngs):
    kw = _kw(cfg, rngs)
    self.mode = mode
    if mode.startswith('upsample'):
      self.resample = Conv2d(dim, out_dim or dim // 2, 3, padding=1, **kw)
    else:
      self.resample = Conv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
    time_conv = None
    if mode == 'upsample3d':
      time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), **kw)
    elif mode == 'downsample3d':
      time_conv = Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), **kw)
    self.time_conv = time_conv

  def _time_up(self, x, caches: Caches):
    """Frame 0 of the video passes; every other frame becomes two (causal conv to 2C)."""
    head, x = (x[:, :1], x[:, 1:]) if caches.first else (None, x)
    if x.shape[1] == 0:
      caches.put(jnp.zeros(x.shape[:1] + (2,) + x.shape[2:], x.dtype))
      return head
    b, t, h, w, c = x.shape
    y = self.time_conv(x, caches).reshape(b, t, h, w, 2, c)
    y = jnp.moveaxis(y, 4, 2).reshape(b, 2 * t, h, w, c)
    return y if head is None else jnp.concatenate([head, y], axis=1)

  def _time_down(self, x, caches: Caches):
    """Frame 0 of the video passes; then frames (2j-2, 2j-1, 2j) -> latent frame j."""
    previous = caches.take()
    caches.put(x[:, -1:])
    if previous is not None:
      return self.time_conv(jnp.concatenate([previous.astype(x.dtype), x], axis=1))
    if x.shape[1] < 3:
      return x[:, :1]
    return jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1)

  def __call__(self, x, caches: Caches):
    if self.mode == 'upsample3d':
      x = self._time_up(x, caches)
    if self.mode.startswith('upsample'):
      x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact x2 == repeat
    x = self.resample(x)
    if self.mode == 'downsample3d':
      x = self._time_down(x, caches)
    return constrain(x, ACT)


class MidBlock(nnx.Module):

  def __init__(self, dim: int, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResidualBlock(dim, dim, cfg, rngs=rngs) for _ in range(2)])
    self.attentions = nnx.List([AttentionBlock(dim, cfg, rngs=rngs)])

  def __call__(self, x, caches: Caches):
    x = self.resnets[0](x, caches)
    return self.resnets[1](self.attentions[0](x), caches)


class Encoder(nnx.Module):

  def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
    kw = _kw(cfg, rngs)
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, **kw)
    blocks = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(cfg.num_res_blocks):
        blocks.append(ResidualBlock(in_dim, out_dim, cfg, rngs=rngs))
        in_dim = out_dim
      if i != len(cfg.dim_mult) - 1:
        mode = 'downsample3d' if cfg.temperal_downsample[i] else 'downsample2d'
        blocks.append(Resample(out_dim, mode, cfg, rngs=rngs))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(dims[-1], cfg, rngs=rngs)
    self.norm_out = RMSNorm(dims[-1], param_dtype=kw['param_dtype'], rngs=rngs)
    self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, **kw)

  def __call__(self, x, caches: Caches):
    x = self.conv_in(x, caches)
    for block in self.down_blocks:
      x = block(x, caches)
    x = self.mid_block(x, caches)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), caches)


class UpBlock(nnx.Module):

  def __init__(self, in_dim: int, out_dim: int, mode: str | None, cfg: WanVAEConfig, *,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([ResidualBlock(in_dim if j == 0 else out_dim, out_dim, cfg, rngs=rngs)
                             for j in range(cfg.num_res_blocks + 1)])
    self.upsamplers = nnx.List([Resample(out_dim, mode, cfg, rngs=rngs)] if mode else [])

  def __call__(self, x, caches: Caches):
    for resnet in self.resnets:
      x = resnet(x, caches)
    for upsampler in self.upsamplers:
      x = upsampler(x, caches)
    return x


class Decoder(nnx.Module):

  def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
    kw = _kw(cfg, rngs)
    base = cfg.decoder_base_dim or cfg.base_dim
    mult = cfg.dim_mult
    dims = [base * m for m in (mult[-1], *mult[::-1])]
    temperal_upsample = cfg.temperal_downsample[::-1]
    self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, **kw)
    self.mid_block = MidBlock(dims[0], cfg, rngs=rngs)
    blocks = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      if i > 0:
        in_dim //= 2
      mode = None
      if i != len(mult) - 1:
        mode = 'upsample3d' if temperal_upsample[i] else 'upsample2d'
      blocks.append(UpBlock(in_dim, out_dim, mode, cfg, rngs=rngs))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm(dims[-1], param_dtype=kw['param_dtype'], rngs=rngs)
    self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, **kw)

  def __call__(self, x, caches: Caches):
    x = self.conv_in(x, caches)
    x = self.mid_block(x, caches)
    for block in self.up_blocks:
      x = block(x, caches)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), caches)


class AutoencoderKLWan(nnx.Module):
  """encode: (B, 3, F, H, W) video in [-1, 1] -> posterior over (B, 16, 1 + (F-1)//4, H/8, W/8);
  decode: latents -> video clamped to [-1, 1]. ``tiled`` splits H/W into overlapping tiles."""

  def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
    kw = _kw(cfg, rngs)
    self.config = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    self.quant_conv = Linear(2 * cfg.z_dim, 2 * cfg.z_dim, axes=('conv_in', 'conv_out'), **kw)
    self.post_quant_conv = Linear(cfg.z_dim, cfg.z_dim, axes=('conv_in', 'conv_out'), **kw)
    self.decoder = Decoder(cfg, rngs=rngs)

  @property
  def spatial_ratio(self) -> int:
    return 2 ** (len(self.config.dim_mult) - 1)

  @property
  def temporal_ratio(self) -> int:
    """Frames per latent frame after the first."""
    return 2 ** sum(self.config.temperal_downsample)

  def _encode_video(self, x, chunked: bool):
    """(B, T, H, W, C) -> moments (B, T', h, w, 2z)."""
    frames = 1 + 4 * ((x.shape[1] - 1) // 4)  # diffusers drops trailing frames the same way
    x = constrain(x[:, :frames], ACT)
    if chunked:
      y = run_chunked(self.encoder, x, first=1, size=4)
    else:
      y = self.encoder(x, Caches())
    return self.quant_conv(y)

  def _decode_latents(self, z, chunked: bool):
    z = constrain(self.post_quant_conv(z), ACT)
    if chunked:
      return run_chunked(self.decoder, z, first=1, size=1)
    return self.decoder(z, Caches())

  def encode(self, video: jax.Array, *, chunked: bool = True, tiled: bool = False
             ) -> DiagonalGaussian:
    x = to_channels_last(video)
    size, stride = self.config.tile_sample_min_size, self.config.tile_sample_stride
    if tiled and (x.shape[2] > size or x.shape[3] > size):
      r = self.spatial_ratio
      rows = [[self._encode_video(x[:, :, i:i + size, j:j + size], chunked)
               for j in tile_starts(x.shape[3], stride)] for i in tile_starts(x.shape[2], stride)]
      blend = size // r - stride // r
      moments = blend_tiles(rows, blend, blend, stride // r, stride // r,
                            x.shape[2] // r, x.shape[3] // r)
    else:
      moments = self._encode_video(x, chunked)
    return DiagonalGaussian.from_moments(to_channels_first(moments))

  def decode(self, latents: jax.Array, *, chunked: bool = True, tiled: bool = False) -> jax.Array:
    z = to_channels_last(latents)
    r = self.spatial_ratio
    size, stride = self.config.tile_sample_min_size, self.config.tile_sample_stride
    if tiled and (z.shape[2] > size // r or z.shape[3] > size // r):
      tile, step = size // r, stride // r
      rows = [[self._decode_latents(z[:, :, i:i + tile, j:j + tile], chunked)
               for j in tile_starts(z.shape[3], step)] for i in tile_starts(z.shape[2], step)]
      x = blend_tiles(rows, size - stride, size - stride, stride, stride,
                      z.shape[2] * r, z.shape[3] * r)
    else:
      x = self._decode_latents(z, chunked)
    return to_channels_first(jnp.clip(x, -1.0, 1.0))

  # Pipeline-side latent normalisation, with the Wan pipelines' exact arithmetic: they keep
  # ``inv_std = 1 / std`` (float32) and compute (z - mean) * inv_std, and z / inv_std + mean back.
  def normalize_latents(self, z: jax.Array) -> jax.Array:
    mean, inv_std = self._stats(z)
    return (z - mean) * inv_std

  def denormalize_latents(self, z: jax.Array) -> jax.Array:
    mean, inv_std = self._stats(z)
    return z / inv_std + mean

  def encode_normalized(self, video: jax.Array, *, tiled: bool = False) -> jax.Array:
    """The pipelines' latents of a video: the posterior mode, normalised."""
    return self.normalize_latents(self.encode(video, tiled=tiled).mode())

  def decode_normalized(self, z: jax.Array, *, tiled: bool = False) -> jax.Array:
    return self.decode(self.denormalize_latents(z), tiled=tiled)

  def _stats(self, z):
    shape = (1, self.config.z_dim, 1, 1, 1)
    inv_std = 1 / np.asarray(self.config.latents_std, np.float32)
    return (jnp.asarray(self.config.latents_mean, z.dtype).reshape(shape),
            jnp.asarray(inv_std, z.dtype).reshape(shape))
