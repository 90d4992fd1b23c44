"""The official optimizer, exactly: torch's global-norm clipping and AdamW, with the learning-rate
schedules of the recipes (VAP_SPEC §5.3).

* Clipping is torch's ``clip_grad_norm_``: every gradient times ``min(1, max_norm / (norm +
  1e-6))`` (optax's `clip_by_global_norm` has no 1e-6; at the clip the difference shows).
* AdamW: decoupled decay, ``p <- p - lr (adam(g) + wd p)``, moments in float32 on float32
  master weights (the official code keeps both in bf16).
* torch skips parameters that never get a gradient (the last expert block's reference path after
  its attention, which cannot reach the loss): no moment update and no decay. Their gradients
  are zero here, so Adam leaves them alone; `decay_scales` takes them out of the decay too, per
  layer slot of the stacked tensors.
* Schedules: ``constant`` after a linear warmup from 0 (the official ``constant_with_warmup``:
  the first step's lr is 0), or ``cosine`` decay after the warmup.
"""
from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def global_norm(tree) -> jax.Array:
  """The L2 norm of every leaf together, in float32."""
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """torch's ``clip_grad_norm_``: gradients times ``min(1, max_norm / (norm + 1e-6))``."""
  def update(updates, state, params=None):
    coef = jnp.minimum(1.0, max_norm / (global_norm(updates) + 1e-6))
    return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decayed_weights(weight_decay: float, scales) -> optax.GradientTransformation:
  """``update + weight_decay * scale * param``; ``scales`` is a pytree like the params of 1.0 or
  per-slot arrays (0 for the slots that must not decay)."""
  def update(updates, state, params):
    return jax.tree.map(lambda u, p, s: u + weight_decay * s * p, updates, params, scales), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def schedule(learning_rate: float, *, warmup_steps: int = 0, kind: str = 'constant',
             total_steps: int | None = None, end_value: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0, then ``constant`` or ``cosine`` (to ``end_value`` at total_steps)."""
  if kind == 'constant':
    if warmup_steps <= 0:
      return optax.constant_schedule(learning_rate)
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps),
                                 optax.constant_schedule(learning_rate)], [warmup_steps])
  if kind == 'cosine':
    if not total_steps:
      raise ValueError('a cosine schedule needs total_steps')
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 0),
                                              total_steps, end_value)
  raise ValueError(f"schedule {kind!r}: expected 'constant' or 'cosine'")


def adamw(lr_schedule: optax.Schedule, *, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8,
          weight_decay: float = 1e-4, max_grad_norm: float | None = 1.0,
          decay: object = None) -> optax.GradientTransformation:
  """Clip (torch's), then AdamW; ``decay``: `decay_scales` (default: every parameter decays)."""
  parts = [clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
  parts.append(optax.scale_by_adam(b1, b2, eps))
  if weight_decay:
    parts.append(decayed_weights(weight_decay, decay) if decay is not None
                 else optax.add_decayed_weights(weight_decay))
  parts.append(optax.scale_by_learning_rate(lr_schedule))
  return optax.chain(*parts)


def decay_scales(trainable: nnx.State, unreachable: Iterable[tuple[tuple, int]]) -> nnx.State:
  """1.0 for every trainable leaf, except the stack slots in ``unreachable`` ((path, slot)
  pairs), which get 0: a (layers, 1, ...) array that masks those slots of the stacked leaf."""
  zero_slots: dict[tuple, list[int]] = {}
  for path, slot in unreachable:
    zero_slots.setdefault(tuple(path), []).append(slot)
  flat = []
  for path, var in nnx.to_flat_state(trainable):
    path = tuple(path)
    if path in zero_slots:
      scale = np.ones((var.shape[0],) + (1,) * (len(var.shape) - 1), np.float32)
      scale[zero_slots[path]] = 0.0
      flat.append((path, var.replace(value=jnp.asarray(scale))))
    else:
      flat.append((path, var.replace(value=jnp.float32(1.0))))
  return nnx.from_flat_state(flat)
