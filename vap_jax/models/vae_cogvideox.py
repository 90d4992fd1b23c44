"""CogVideoX video VAE (diffusers ``AutoencoderKLCogVideoX``): causal 3D convs, frame batches.

diffusers encodes 8 video frames and decodes 2 latent frames at a time (the first batch also
takes the remainder: 49 frames = 9 + 5 x 8, 13 latents = 3 + 5 x 2), carrying each causal conv's
last two input frames to the next batch. Unlike Wan, the GroupNorms see only their batch, so the
batching is part of the model's numbers: we run exactly those batches (first alone, the rest
under one `lax.scan`, so memory is one batch's). ``chunked=False`` runs the whole video as one
batch: a different (unbatched) model, kept for comparison only.

Causal convs pad the first batch with copies of its first frame (``pad_mode='first'``). The
decoder's norms are spatial norms conditioned on the batch's latents. Activations are
channels-last inside; the public API takes and returns (B, C, F, H, W).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vap_jax.models.common import source_fields
from vap_jax.models.vae_common import DiagonalGaussian, blend_tiles
from vap_jax.nn.conv import (Caches, CausalConv3d, Conv2d, GroupNorm, run_chunked,
                             to_channels_first, to_channels_last)
from vap_jax.nn.layers import Linear
from vap_jax.parallel import constrain

ACT = ('activation_batch', None, None, 'activation_width', None)


@dataclasses.dataclass(frozen=True)
class CogVideoXVAEConfig:
  """diffusers ``AutoencoderKLCogVideoX`` fields (CogVideoX-5b defaults) plus runtime choices."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
  latent_channels: int = 16
  layers_per_block: int = 3
  norm_eps: float = 1e-6
  norm_num_groups: int = 32
  temporal_compression_ratio: int = 4
  sample_height: int = 480
  sample_width: int = 720
  scaling_factor: float = 0.7
  # Runtime: diffusers' frame batches and tile geometry (its defaults), dtypes.
  sample_frames_batch: int = 8
  latent_frames_batch: int = 2
  tile_sample_min_height: int | None = None   # default sample_height // 2
  tile_sample_min_width: int | None = None    # default sample_width // 2
  tile_overlap_factor_height: float = 1 / 6
  tile_overlap_factor_width: float = 1 / 5
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @classmethod
  def from_source(cls, config: dict[str, Any], **runtime) -> 'CogVideoXVAEConfig':
    """From a diffusers ``vae/config.json``; rejects options we do not implement."""
    unsupported = {'use_quant_conv': False, 'use_post_quant_conv': False, 'act_fn': 'silu',
                   'shift_factor': None, 'invert_scale_latents': False}
    for key, expected in unsupported.items():
      if config.get(key, expected) != expected:
        raise ValueError(f'AutoencoderKLCogVideoX config field {key}={config[key]!r} is not '
                         f'supported (expected {expected!r})')
    for key, kind in (('down_block_types', 'CogVideoXDownBlock3D'),
                      ('up_block_types', 'CogVideoXUpBlock3D')):
      if any(t != kind for t in config.get(key, [kind])):
        raise ValueError(f'AutoencoderKLCogVideoX {key} must all be {kind}: {config[key]}')
    return cls(**source_fields(cls, config, ('block_out_channels', 'latent_channels', 'layers_per_block')), **runtime)


def _kw(cfg, rngs):
  return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


def _nearest_index(out: int, size: int) -> np.ndarray:
  """torch ``interpolate(mode='nearest')`` source indices (float32 scale, floor)."""
  scale = np.float32(size) / np.float32(out)
  return np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale).astype(np.int64), size - 1)


def _resize_nearest(z, shape):
  """(B, T, H, W, C) -> (B, *shape, C) by nearest neighbour on each axis."""
  for axis, out in zip((1, 2, 3), shape):
    if z.shape[axis] != out:
      z = jnp.take(z, _nearest_index(out, z.shape[axis]), axis=axis)
  return z


class SpatialNorm3D(nnx.Module):
  """GroupNorm(f) * conv_y(zq) + conv_b(zq), zq resized to f (frame 0 on its own if odd)."""

  def __init__(self, channels: int, zq_channels: int, cfg, *, rngs: nnx.Rngs):
    kw = _kw(cfg, rngs)
    self.norm_layer = GroupNorm(channels, cfg.norm_num_groups, eps=1e-6,
                                param_dtype=kw['param_dtype'], rngs=rngs)
    self.conv_y = Linear(zq_channels, channels, axes=('conv_in', 'conv_out'), **kw)
    self.conv_b = Linear(zq_channels, channels, axes=('conv_in', 'conv_out'), **kw)

  def __call__(self, f, zq):
    t = f.shape[1]
    if t > 1 and t % 2 == 1:
      zq = jnp.concatenate([_resize_nearest(zq[:, :1], (1,) + f.shape[2:4]),
                            _resize_nearest(zq[:, 1:], (t - 1,) + f.shape[2:4])], axis=1)
    else:
      zq = _resize_nearest(zq, f.shape[1:4])
    zq = constrain(zq, ACT)  # the resize gathers: keep it (and so the product) in width strips
    return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


class ResnetBlock(nnx.Module):

  def __init__(self, in_ch: int, out_ch: int, cfg, *, zq_channels: int | None = None,
               rngs: nnx.Rngs):
    kw = _kw(cfg, rngs)
    if zq_channels is None:
      norm = lambda c: GroupNorm(c, cfg.norm_num_groups, eps=cfg.norm_eps,
                                 param_dtype=kw['param_dtype'], rngs=rngs)
    else:
      norm = lambda c: SpatialNorm3D(c, zq_channels, cfg, rngs=rngs)
    self.norm1 = norm(in_ch)
    self.conv1 = CausalConv3d(in_ch, out_ch, 3, replicate_first=True, **kw)
    self.norm2 = norm(out_ch)
    self.conv2 = CausalConv3d(out_ch, out_ch, 3, replicate_first=True, **kw)
    self.conv_shortcut = (Linear(in_ch, out_ch, axes=('conv_in', 'conv_out'), **kw)
                          if in_ch != out_ch else None)

  def __call__(self, x, caches: Caches, zq=None):
    norm = (lambda n, h: n(h)) if zq is None else (lambda n, h: n(h, zq))
    h = self.conv1(jax.nn.silu(norm(self.norm1, x)), caches)
    h = self.conv2(jax.nn.silu(norm(self.norm2, h)), caches)
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return constrain(h + x, ACT)


class Downsample(nnx.Module):
  """Optional temporal 2x average (frame 0 alone if odd), then pad (0,1) + 3x3 stride-2 conv."""

  def __init__(self, ch: int, compress_time: bool, cfg, *, rngs: nnx.Rngs):
    self.compress_time = compress_time
    self.conv = Conv2d(ch, ch, 3, stride=2, padding=((0, 1), (0, 1)), **_kw(cfg, rngs))

  def __call__(self, x):
    if self.compress_time:
      head, rest = (x[:, :1], x[:, 1:]) if x.shape[1] % 2 else (None, x)
      b, t = rest.shape[:2]
      rest = rest.reshape((b, t // 2, 2) + rest.shape[2:]).mean(2)
      x = rest if head is None else jnp.concatenate([head, rest], axis=1)
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest 2x in space (and in time, frame 0 alone if odd, when compressing), 3x3 conv."""

  def __init__(self, ch: int, compress_time: bool, cfg, *, rngs: nnx.Rngs):
    self.compress_time = compress_time
    self.conv = Conv2d(ch, ch, 3, padding=1, **_kw(cfg, rngs))

  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
    t = x.shape[1]
    if self.compress_time and t > 1:
      head, rest = (x[:, :1], x[:, 1:]) if t % 2 else (None, x)
      rest = jnp.repeat(rest, 2, axis=1)
      x = rest if head is None else jnp.concatenate([head, rest], axis=1)
    return self.conv(x)


class Block(nnx.Module):
  """CogVideoX Down/Mid/UpBlock3D: resnets, then an optional resampler."""

  def __init__(self, in_ch, out_ch, layers, cfg, *, resample=None, compress_time=False,
               zq_channels=None, rngs):
    self.resnets = nnx.List([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, cfg,
                                         zq_channels=zq_channels, rngs=rngs)
                             for i in range(layers)])
    # diffusers names the resampler list after its direction (checkpoint keys follow).
    self.samplers_name = {'down': 'downsamplers', 'up': 'upsamplers'}.get(resample)
    if resample is not None:
      sampler = Downsample if resample == 'down' else Upsample
      setattr(self, self.samplers_name, nnx.List([sampler(out_ch, compress_time, cfg, rngs=rngs)]))

  def __call__(self, x, caches, zq=None):
    for resnet in self.resnets:
      x = resnet(x, caches, zq)
    for sampler in getattr(self, self.samplers_name) if self.samplers_name else ():
      x = constrain(sampler(x), ACT)
    return x


class Encoder(nnx.Module):

  def __init__(self, cfg: CogVideoXVAEConfig, *, rngs: nnx.Rngs):
    kw = _kw(cfg, rngs)
    ch = cfg.block_out_channels
    levels = int(math.log2(cfg.temporal_compression_ratio))
    self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3, replicate_first=True, **kw)
    self.down_blocks = nnx.List([
        Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, cfg,
              resample=None if i == len(ch) - 1 else 'down', compress_time=i < levels, rngs=rngs)
        for i in range(len(ch))])
    self.mid_block = Block(ch[-1], ch[-1], 2, cfg, rngs=rngs)
    self.norm_out = GroupNorm(ch[-1], cfg.norm_num_groups, eps=1e-6,
                              param_dtype=kw['param_dtype'], rngs=rngs)
    self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3, replicate_first=True, **kw)

  def __call__(self, x, caches: Caches):
    x = self.conv_in(x, caches)
    for block in self.down_blocks:
      x = block(x, caches)
    x = self.mid_block(x, caches)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), caches)


class Decoder(nnx.Module):

  def __init__(self, cfg: CogVideoXVAEConfig, *, rngs: nnx.Rngs):
    kw = _kw(cfg, rngs)
    ch = cfg.block_out_channels[::-1]
    z = cfg.latent_channels
    levels = int(math.log2(cfg.temporal_compression_ratio))
    self.conv_in = CausalConv3d(z, ch[0], 3, replicate_first=True, **kw)
    self.mid_block = Block(ch[0], ch[0], 2, cfg, zq_channels=z, rngs=rngs)
    self.up_blocks = nnx.List([
        Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, cfg, zq_channels=z,
              resample=None if i == len(ch) - 1 else 'up', compress_time=i < levels, rngs=rngs)
        for i in range(len(ch))])
    self.norm_out = SpatialNorm3D(ch[-1], z, cfg, rngs=rngs)
    self.conv_out = CausalConv3d(ch[-1], cfg.out_channels, 3, replicate_first=True, **kw)

  def __call__(self, z, caches: Caches):
    x = self.conv_in(z, caches)
    x = self.mid_block(x, caches, z)
    for block in self.up_blocks:
      x = block(x, caches, z)
    return self.conv_out(jax.nn.silu(self.norm_out(x, z)), caches)


def _first_batch(frames: int, batch: int) -> int:
  """diffusers' batching: max(F // batch, 1) batches, the first also takes F % batch."""
  return frames - batch * (max(frames // batch, 1) - 1)


class AutoencoderKLCogVideoX(nnx.Module):
  """encode: (B, 3, F, H, W) in [-1, 1] -> posterior over (B, 16, (F - 1)/4 + 1, H/8, W/8);
  decode: latents -> (B, 3, F, H, W). Latents for the DiT are ``mode() * scaling_factor``."""

  def __init__(self, cfg: CogVideoXVAEConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)

  @property
  def spatial_ratio(self) -> int:
    return 2 ** (len(self.config.block_out_channels) - 1)

  @property
  def temporal_ratio(self) -> int:
    """Frames per latent frame after the first."""
    return self.config.temporal_compression_ratio

  def _run(self, module, x, batch, chunked):
    x = constrain(x, ACT)
    if not chunked:
      return module(x, Caches())
    return run_chunked(module, x, first=_first_batch(x.shape[1], batch), size=batch)

  def _tiles(self):
    cfg = self.config
    h = cfg.tile_sample_min_height or cfg.sample_height // 2
    w = cfg.tile_sample_min_width or cfg.sample_width // 2
    r = self.spatial_ratio
    return (h, w, int(h / r), int(w / r), cfg.tile_overlap_factor_height,
            cfg.tile_overlap_factor_width)

  def encode(self, video: jax.Array, *, chunked: bool = True, tiled: bool = False
             ) -> DiagonalGaussian:
    x = to_channels_last(video)
    batch = self.config.sample_frames_batch
    sh, sw, lh, lw, oh, ow = self._tiles()
    if tiled and (x.shape[3] > sw or x.shape[2] > sh):
      step_h, step_w = int(sh * (1 - oh)), int(sw * (1 - ow))
      rows = [[self._run(self.encoder, x[:, :, i:i + sh, j:j + sw], batch, chunked)
               for j in range(0, x.shape[3], step_w)] for i in range(0, x.shape[2], step_h)]
      bh, bw = int(lh * oh), int(lw * ow)
      moments = blend_tiles(rows, bh, bw, lh - bh, lw - bw)
    else:
      moments = self._run(self.encoder, x, batch, chunked)
    return DiagonalGaussian.from_moments(to_channels_first(moments))

  def decode(self, latents: jax.Array, *, chunked: bool = True, tiled: bool = False) -> jax.Array:
    z = to_channels_last(latents)
    batch = self.config.latent_frames_batch
    sh, sw, lh, lw, oh, ow = self._tiles()
    if tiled and (z.shape[3] > lw or z.shape[2] > lh):
      step_h, step_w = int(lh * (1 - oh)), int(lw * (1 - ow))
      rows = [[self._run(self.decoder, z[:, :, i:i + lh, j:j + lw], batch, chunked)
               for j in range(0, z.shape[3], step_w)] for i in range(0, z.shape[2], step_h)]
      bh, bw = int(sh * oh), int(sw * ow)
      x = blend_tiles(rows, bh, bw, sh - bh, sw - bw)
    else:
      x = self._run(self.decoder, z, batch, chunked)
    return to_channels_first(constrain(x, ACT))
