"""What every sampler module builds on: plans as pytrees, config option checks, host coefficients."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def pytree_dataclass(cls):
  """Frozen dataclass whose fields are all pytree children (arrays): a plan a jitted step takes."""
  cls = dataclasses.dataclass(frozen=True)(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])


def check_options(name: str, cfg: Mapping[str, Any], allowed: Mapping[str, Any]) -> None:
  """Reject config options whose value we do not implement (``allowed`` maps key -> accepted values)."""
  for key, ok in allowed.items():
    if key in cfg and cfg[key] not in ok:
      raise ValueError(f'{name}: {key}={cfg[key]!r} is not supported (supported: {list(ok)})')


def host_f32(x) -> jax.Array:
  """Host float64 -> float32 device array (torch's cast of a 0-d float64 coefficient onto a float32 sample)."""
  return jnp.asarray(np.asarray(x, np.float64).astype(np.float32))
