"""What both video VAEs share: the diagonal-Gaussian posterior and tile blending."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DiagonalGaussian:
  """diffusers ``DiagonalGaussianDistribution``: the encoder output split into (mean, logvar)."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array, axis: int = 1) -> 'DiagonalGaussian':
    mean, logvar = jnp.split(moments, 2, axis=axis)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    noise = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
    return self.mean + self.std * noise

  def mode(self) -> jax.Array:
    return self.mean


def tile_starts(size: int, stride: int) -> list[int]:
  """Tile origins along one axis, as ``range(0, size, stride)`` in diffusers."""
  return list(range(0, size, stride))


def blend_tiles(rows: list[list[jax.Array]], blend_h: int, blend_w: int, stride_h: int,
                stride_w: int, height: int | None = None, width: int | None = None) -> jax.Array:
  """diffusers' tile merge on (B, T, H, W, C) tiles: linear ramps over the overlap with the tile
  above and to the left, keep the top-left ``stride`` part of each, crop to (height, width) if
  given.

  As in diffusers (which blends in place), a tile is blended with its neighbours' *blended*
  versions.
  """
  def ramp(a, b, n, axis):
    n = min(a.shape[axis], b.shape[axis], n)
    if n == 0:
      return b
    shape = [1] * b.ndim
    shape[axis] = n
    w = jnp.asarray(np.arange(n, dtype=np.float32) / n, b.dtype).reshape(shape)
    tail = jax.lax.slice_in_dim(a, a.shape[axis] - n, a.shape[axis], axis=axis)
    head = jax.lax.slice_in_dim(b, 0, n, axis=axis)
    mixed = tail * (1 - w) + head * w
    return jnp.concatenate([mixed, jax.lax.slice_in_dim(b, n, b.shape[axis], axis=axis)], axis)

  rows = [list(row) for row in rows]
  out_rows = []
  for i, row in enumerate(rows):
    parts = []
    for j, tile in enumerate(row):
      if i > 0:
        tile = ramp(rows[i - 1][j], tile, blend_h, 2)
      if j > 0:
        tile = ramp(row[j - 1], tile, blend_w, 3)
      row[j] = tile
      parts.append(tile[:, :, :stride_h, :stride_w])
    out_rows.append(jnp.concatenate(parts, axis=3))
  return jnp.concatenate(out_rows, axis=2)[:, :, :height, :width]
