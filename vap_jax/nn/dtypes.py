"""One dtype policy per model: what every layer computes in and stores its parameters as.

    compute     activations and matmuls (bfloat16 on accelerators)
    params      frozen parameters as stored (the base model; bfloat16 to halve memory)
    trainable   trainable parameters (the VAP expert, LoRA): float32 master weights for training;
                None stores them like ``params`` (inference)
    keep_fp32   module roles that keep float32 parameters *and* compute whatever the rest uses
                (Wan: its official ``_keep_in_fp32_modules``)

Layers take ``**policy.kw(role)``; the expert's layers take ``**policy.trainable_policy().kw(...)``.
Layer constructors have no dtype defaults, so a forgotten policy is an error, not float32.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class DTypePolicy:
  compute: str = 'float32'
  params: str = 'float32'
  trainable: str | None = None
  keep_fp32: tuple[str, ...] = ()

  def __post_init__(self):
    for field in ('compute', 'params', 'trainable'):
      value = getattr(self, field)
      if value is not None:
        jnp.dtype(value)  # a TypeError naming the bad dtype
    object.__setattr__(self, 'keep_fp32', tuple(self.keep_fp32))

  @classmethod
  def of(cls, value: 'DTypePolicy | Mapping[str, Any] | None', **defaults) -> 'DTypePolicy':
    """A policy from a policy, a dict of its fields (config files), or None (``defaults``)."""
    if isinstance(value, DTypePolicy):
      return value
    return cls(**{**defaults, **dict(value or {})})

  def kw(self, role: str | None = None) -> dict:
    """``dtype`` and ``param_dtype`` for a layer playing ``role``."""
    if role is not None and role in self.keep_fp32:
      return dict(dtype=jnp.float32, param_dtype=jnp.float32)
    return dict(dtype=jnp.dtype(self.compute), param_dtype=jnp.dtype(self.params))

  @property
  def compute_dtype(self):
    return jnp.dtype(self.compute)

  def trainable_policy(self) -> 'DTypePolicy':
    """The policy of the trainable modules: parameters as ``trainable`` (if set)."""
    return dataclasses.replace(self, params=self.trainable or self.params)
