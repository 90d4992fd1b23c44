"""Sinusoidal embeddings: timestep features and CogVideoX's 3D sin-cos position table.

Frequency tables are built in numpy at trace time (they depend only on static shapes), with the
same dtypes as diffusers so the float32 values agree to the last bit where it matters.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def timestep_features(t: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                      freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
  """(B,) timesteps -> (B, dim) float32 [sin | cos] features (diffusers ``get_timestep_embedding``)."""
  half = dim // 2
  exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
  exponent = exponent / np.float32(half - freq_shift)
  # PyTorch's float32 exp is correctly rounded, numpy's is not: round the float64 result.
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  sin, cos = _sin_cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


# 2*pi split in three float32 parts; the first has 8 significant bits so k * part is exact.
_TWO_PI = (np.float32(6.28125), np.float32(2 * math.pi - 6.28125),
           np.float32(2 * math.pi - 6.28125 - float(np.float32(2 * math.pi - 6.28125))))


def _sin_cos(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """float32 sin/cos accurate for |x| up to ~1e5 (timestep * frequency reaches 1000).

  XLA's float32 sin/cos reduce large arguments coarsely (errors ~|x| * 6e-8, i.e. 6e-5 at
  t=999); Cody-Waite reduction into [-pi, pi] first matches PyTorch to ~1e-7.
  """
  k = jnp.round(x * np.float32(1 / (2 * math.pi)))
  r = ((x - k * _TWO_PI[0]) - k * _TWO_PI[1]) - k * _TWO_PI[2]
  return jnp.sin(r), jnp.cos(r)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_3d_table(dim: int, grid_h: int, grid_w: int, frames: int, *, spatial_scale: float,
                    temporal_scale: float) -> np.ndarray:
  """(frames*grid_h*grid_w, dim) float64 table: [temporal dim/4 | h 3dim/8 | w 3dim/8] per token."""
  spatial_dim, temporal_dim = 3 * dim // 4, dim // 4
  h = np.arange(grid_h, dtype=np.float32) / np.float32(spatial_scale)
  w = np.arange(grid_w, dtype=np.float32) / np.float32(spatial_scale)
  ww, hh = np.meshgrid(w, h, indexing='xy')  # (grid_h, grid_w)
  spatial = np.concatenate([_sincos_1d(spatial_dim // 2, ww.reshape(-1)),
                            _sincos_1d(spatial_dim // 2, hh.reshape(-1))], axis=1)
  temporal = _sincos_1d(temporal_dim, np.arange(frames, dtype=np.float32) / np.float32(temporal_scale))
  spatial = np.broadcast_to(spatial[None], (frames, grid_h * grid_w, spatial_dim))
  temporal = np.broadcast_to(temporal[:, None], (frames, grid_h * grid_w, temporal_dim))
  return np.concatenate([temporal, spatial], axis=-1).reshape(frames * grid_h * grid_w, dim)
