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


def _axis_angles(dim: int, positions: np.ndarray, theta: float, dtype) -> np.ndarray:
  """(len(positions), dim // 2) angles pos * theta^(-2i/dim), computed in ``dtype``."""
  inv_freq = 1.0 / (dtype(theta) ** (np.arange(0, dim, 2, dtype=dtype)[: dim // 2] / dtype(dim)))
  return np.outer(positions.astype(dtype), inv_freq.astype(dtype)).astype(dtype)


def _angles(pos_t, pos_h, pos_w, dims: tuple[int, int, int], theta: float, dtype) -> np.ndarray:
  """Per-token angles (tokens, sum(dims)), tokens t-major then h then w; pairs [t | h | w], each
  angle repeated for its channel pair."""
  t, h, w = len(pos_t), len(pos_h), len(pos_w)
  parts = [_axis_angles(d, p, theta, dtype) for d, p in zip(dims, (pos_t, pos_h, pos_w))]
  angles = np.concatenate([
      np.broadcast_to(parts[0][:, None, None], (t, h, w, parts[0].shape[-1])),
      np.broadcast_to(parts[1][None, :, None], (t, h, w, parts[1].shape[-1])),
      np.broadcast_to(parts[2][None, None, :], (t, h, w, parts[2].shape[-1])),
  ], axis=-1).reshape(t * h * w, -1)
  return np.repeat(angles, 2, axis=-1)


def _table(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _time_positions(frames: int, num_refs: int) -> np.ndarray:
  """Target: 0..T-1. ``num_refs`` references: -n*T..-1 (reference 0 first, the last adjacent)."""
  if num_refs:
    return np.linspace(-num_refs * frames, -1, num_refs * frames)
  return np.arange(frames)


def crop_region(grid_h: int, grid_w: int, base_h: int, base_w: int):
  """Where a (grid_h, grid_w) grid lands after resizing into the (base_h, base_w) training grid."""
  if grid_h / grid_w > base_h / base_w:
    resize_h, resize_w = base_h, int(round(base_h / grid_h * grid_w))
  else:
    resize_w, resize_h = base_w, int(round(base_w / grid_w * grid_h))
  top, left = int(round((base_h - resize_h) / 2.0)), int(round((base_w - resize_w) / 2.0))
  return (top, left), (top + resize_h, left + resize_w)


def cogvideox_rope_angles(head_dim: int, frames: int, grid_h: int, grid_w: int, *, base_h: int,
                          base_w: int, num_refs: int = 0, theta: float = 10000.0) -> np.ndarray:
  """The float32 angles (tokens, head_dim) of `cogvideox_rope`'s table."""
  (top, left), (bottom, right) = crop_region(grid_h, grid_w, base_h, base_w)
  pos_h = np.linspace(top, bottom * (grid_h - 1) / grid_h, grid_h, dtype=np.float32)
  pos_w = np.linspace(left, right * (grid_w - 1) / grid_w, grid_w, dtype=np.float32)
  if num_refs:
    pos_t = _time_positions(frames, num_refs).astype(np.float32)
  else:
    pos_t = np.linspace(0, frames * (frames - 1) / frames, frames, dtype=np.float32)
  dims = (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)
  return _angles(pos_t, pos_h, pos_w, dims, theta, np.float32)


def cogvideox_rope(head_dim: int, frames: int, grid_h: int, grid_w: int, *, base_h: int,
                   base_w: int, num_refs: int = 0, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  """CogVideoX 3D RoPE table ("linspace" grid), for the target or for ``num_refs`` references.

  The head dim splits [t | h | w] = [d/4 | 3d/8 | 3d/8]; angles in float32 as diffusers.
  Spatial positions span the crop region of the training grid.
  """
  return _table(cogvideox_rope_angles(head_dim, frames, grid_h, grid_w, base_h=base_h,
                                      base_w=base_w, num_refs=num_refs, theta=theta))


def wan_rope(head_dim: int, frames: int, grid_h: int, grid_w: int, *, num_refs: int = 0,
             theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  """Wan 3D RoPE table: integer positions, angles in float64 (as the official complex128).

  Channel split [t | h | w] = [d - 4(d//6) | 2(d//6) | 2(d//6)], each axis with its own
  frequencies; references take t = -n*T..-1.
  """
  hw = 2 * (head_dim // 6)
  dims = (head_dim - 2 * hw, hw, hw)
  return _table(_angles(_time_positions(frames, num_refs).astype(np.float64),
                        np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                        dims, theta, np.float64))
