"""Rotary position embedding over adjacent channel pairs, and VAP's temporally biased 3D tables.

A table is (cos, sin) of shape (tokens, head_dim) with every frequency repeated for its channel pair.
Applying it rotates each pair (x0, x1) by its angle: (x0 cos - x1 sin, x1 cos + x0 sin). That is the
CogVideoX "real, interleaved" form and, written with complex numbers, Wan's form too, so both
backbones share `apply_rope`.

Reference streams (VAP) keep the target's spatial positions but sit *before* it in time: with n
references of T latent frames each, their temporal positions are -n*T ... -1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

RopeTable = tuple[jax.Array, jax.Array]


def apply_rope(x: jax.Array, table: RopeTable) -> jax.Array:
  """x: (B, S, H, D); table: (S, D) cos and sin. Rotation in float32, result in x.dtype."""
  cos, sin = (t[None, :, None, :].astype(jnp.float32) for t in table)
  xf = x.astype(jnp.float32)
  pairs = xf.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return (xf * cos + rotated * sin).astype(x.dtype)


def _angles(dim: int, positions: np.ndarray, theta: float) -> np.ndarray:
  """(len(positions), dim // 2) float32 angles, as diffusers ``get_1d_rotary_pos_embed``."""
  inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32)[: dim // 2]
                                          / np.float32(dim)))
  return np.outer(positions.astype(np.float32), inv_freq.astype(np.float32)).astype(np.float32)


def crop_region(grid_h: int, grid_w: int, base_h: int, base_w: int):
  """Where a (grid_h, grid_w) grid lands after resizing into the (base_h, base_w) training grid."""
  if grid_h / grid_w > base_h / base_w:
    resize_h, resize_w = base_h, int(round(base_h / grid_h * grid_w))
  else:
    resize_w, resize_h = base_w, int(round(base_w / grid_w * grid_h))
  top, left = int(round((base_h - resize_h) / 2.0)), int(round((base_w - resize_w) / 2.0))
  return (top, left), (top + resize_h, left + resize_w)


def cogvideox_rope(head_dim: int, frames: int, grid_h: int, grid_w: int, *, base_h: int,
                   base_w: int, num_refs: int = 0, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  """CogVideoX 3D RoPE table ("linspace" grid), for the target or for ``num_refs`` references.

  The head dim splits [t | h | w] = [d/4 | 3d/8 | 3d/8]; tokens are t-major, then h, then w.
  Spatial positions span the crop region of the training grid. The target's temporal positions
  are 0..T-1; ``num_refs=n`` gives the reference stream, positions -n*T..-1 (ref 0 first).
  """
  (top, left), (bottom, right) = crop_region(grid_h, grid_w, base_h, base_w)
  pos_h = np.linspace(top, bottom * (grid_h - 1) / grid_h, grid_h, dtype=np.float32)
  pos_w = np.linspace(left, right * (grid_w - 1) / grid_w, grid_w, dtype=np.float32)
  if num_refs:
    pos_t = np.linspace(-num_refs * frames, -1, num_refs * frames, dtype=np.float32)
  else:
    pos_t = np.linspace(0, frames * (frames - 1) / frames, frames, dtype=np.float32)
  dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3
  t, h, w = len(pos_t), grid_h, grid_w
  angles = np.concatenate([
      np.broadcast_to(_angles(dim_t, pos_t, theta)[:, None, None], (t, h, w, dim_t // 2)),
      np.broadcast_to(_angles(dim_hw, pos_h, theta)[None, :, None], (t, h, w, dim_hw // 2)),
      np.broadcast_to(_angles(dim_hw, pos_w, theta)[None, None, :], (t, h, w, dim_hw // 2)),
  ], axis=-1).reshape(t * h * w, -1)
  angles = np.repeat(angles, 2, axis=-1)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
