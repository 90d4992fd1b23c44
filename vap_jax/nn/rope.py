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
  angle repeated for its channel pair (the full table, for tests)."""
  parts = [np.repeat(_axis_angles(d, p, theta, dtype), 2, axis=-1)
           for d, p in zip(dims, (pos_t, pos_h, pos_w))]
  return np.asarray(_assemble([(a, a) for a in parts])[0])


def _table(pos_t, pos_h, pos_w, dims: tuple[int, int, int], theta: float, dtype) -> RopeTable:
  """The (tokens, head_dim) cos/sin table, built on device from per-axis tables.

  Every angle depends on one axis only, so cos/sin are taken of the few per-axis angles on the
  host (in ``dtype``, as the reference computes them) and broadcast into the token table on
  device: the same numbers as a host-built table, without a (tokens, head_dim) constant.
  """
  tables = []
  for d, p in zip(dims, (pos_t, pos_h, pos_w)):
    angles = np.repeat(_axis_angles(d, p, theta, dtype), 2, axis=-1)
    tables.append((np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)))
  return _assemble(tables)


def _assemble(tables) -> RopeTable:
  """Per-axis (cos, sin) tables [(T, d_t), (H, d_h), (W, d_w)] -> (T*H*W, d) each."""
  (t, _), (h, _), (w, _) = (c.shape for c, _ in tables)
  def full(parts):
    parts = [jnp.asarray(p) for p in parts]
    return jnp.concatenate([
        jnp.broadcast_to(parts[0][:, None, None], (t, h, w, parts[0].shape[-1])),
        jnp.broadcast_to(parts[1][None, :, None], (t, h, w, parts[1].shape[-1])),
        jnp.broadcast_to(parts[2][None, None, :], (t, h, w, parts[2].shape[-1])),
    ], axis=-1).reshape(t * h * w, -1)
  return full([c for c, _ in tables]), full([s for _, s in tables])


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


def _cogvideox_positions(frames, grid_h, grid_w, base_h, base_w, num_refs):
  (top, left), (bottom, right) = crop_region(grid_h, grid_w, base_h, base_w)
  pos_h = np.linspace(top, bottom * (grid_h - 1) / grid_h, grid_h, dtype=np.float32)
  pos_w = np.linspace(left, right * (grid_w - 1) / grid_w, grid_w, dtype=np.float32)
  if num_refs:
    pos_t = _time_positions(frames, num_refs).astype(np.float32)
  else:
    pos_t = np.linspace(0, frames * (frames - 1) / frames, frames, dtype=np.float32)
  return pos_t, pos_h, pos_w


def _cogvideox_dims(head_dim: int) -> tuple[int, int, int]:
  return head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3


def cogvideox_rope_angles(head_dim: int, frames: int, grid_h: int, grid_w: int, *, base_h: int,
                          base_w: int, num_refs: int = 0, theta: float = 10000.0) -> np.ndarray:
  """The float32 angles (tokens, head_dim) behind `cogvideox_rope`'s table."""
  positions = _cogvideox_positions(frames, grid_h, grid_w, base_h, base_w, num_refs)
  return _angles(*positions, _cogvideox_dims(head_dim), theta, np.float32)


def cogvideox_rope(head_dim: int, frames: int, grid_h: int, grid_w: int, *, base_h: int,
                   base_w: int, num_refs: int = 0, theta: float = 10000.0) -> RopeTable:
  """CogVideoX 3D RoPE table ("linspace" grid), for the target or for ``num_refs`` references.

  The head dim splits [t | h | w] = [d/4 | 3d/8 | 3d/8]; angles in float32 as diffusers.
  Spatial positions span the crop region of the training grid.
  """
  positions = _cogvideox_positions(frames, grid_h, grid_w, base_h, base_w, num_refs)
  return _table(*positions, _cogvideox_dims(head_dim), theta, np.float32)


def wan_rope(head_dim: int, frames: int, grid_h: int, grid_w: int, *, num_refs: int = 0,
             theta: float = 10000.0) -> RopeTable:
  """Wan 3D RoPE table: integer positions, angles in float64 (as the official complex128).

  Channel split [t | h | w] = [d - 4(d//6) | 2(d//6) | 2(d//6)], each axis with its own
  frequencies; references take t = -n*T..-1.
  """
  hw = 2 * (head_dim // 6)
  dims = (head_dim - 2 * hw, hw, hw)
  return _table(_time_positions(frames, num_refs).astype(np.float64),
                np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                dims, theta, np.float64)
