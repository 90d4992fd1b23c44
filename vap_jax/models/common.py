"""Config plumbing both VAP backbones share: reading source configs, expert placement, and which
parameters VAP trains."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from flax import nnx

from vap_jax.nn.dtypes import DTypePolicy


def from_diffusers_config(cls, config: dict[str, Any], unsupported: dict[str, Any], *,
                          dtype: str | None = None, param_dtype: str | None = None,
                          trainable_dtype: str | None = None, **fixed):
  """``cls`` from a diffusers ``config.json`` dict: unknown keys are ignored, keys in
  ``unsupported`` must hold their expected value, ``fixed`` overrides (runtime choices, tuples).

  ``dtype`` (compute), ``param_dtype`` (stored; default ``dtype``) and ``trainable_dtype`` (the
  expert's; default ``param_dtype``) fill the class's default `DTypePolicy` when given.
  """
  for key, expected in unsupported.items():
    if config.get(key, expected) != expected:
      raise ValueError(f'transformer config field {key}={config[key]!r} is not supported '
                       f'(expected {expected!r})')
  names = {f.name for f in dataclasses.fields(cls)}
  kwargs = {k: v for k, v in config.items() if k in names}
  kwargs['block_idx_with_mot_ref'] = tuple(config.get('block_idx_with_mot_ref') or ())
  if dtype is not None or param_dtype is not None or trainable_dtype is not None:
    default = DTypePolicy.of(fixed.get('dtypes', cls.__dataclass_fields__['dtypes'].default))
    compute = dtype or default.compute
    fixed['dtypes'] = dataclasses.replace(default, compute=compute,
                                          params=param_dtype or dtype or default.params,
                                          trainable=trainable_dtype)
  return cls(**{**kwargs, **fixed})


# Config fields that are runtime choices of ours, not architecture: never written to config.json.
RUNTIME_FIELDS = ('dtypes', 'attention', 'scan_layers', 'remat')


def to_diffusers_config(config, class_names: tuple[str, str], fixed: dict[str, Any],
                        vap_fixed: dict[str, Any]) -> dict[str, Any]:
  """The diffusers ``config.json`` dict of a model config: the inverse of `from_diffusers_config`.

  Every architecture field (tuples as lists), the ``fixed`` fields at the one value we run, and
  for a model with an expert the VAP class name (``class_names``: base, VAP), its
  ``block_idx_with_mot_ref`` and the ``vap_fixed`` fields; a model without one is written as the
  base class, which PyPI diffusers reads.
  """
  out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
         if f.name not in RUNTIME_FIELDS}
  out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
  experts = out.pop('block_idx_with_mot_ref')
  out.update(fixed)
  if experts:
    out.update(vap_fixed, block_idx_with_mot_ref=experts)
  return {'_class_name': class_names[bool(experts)], **dict(sorted(out.items()))}


def check_expert_blocks(block_idx: Sequence[int], num_layers: int) -> None:
  bad = [i for i in block_idx if not 0 <= i < num_layers]
  if bad:
    raise ValueError(f'block_idx_with_mot_ref {bad} outside the {num_layers} layers')
  if list(block_idx) != sorted(set(block_idx)):
    raise ValueError(f'block_idx_with_mot_ref {list(block_idx)} must be increasing, without '
                     'repeats')


# What VAP trains: the parameters (not buffers such as the learned position table) of the
# ``expert`` subtree of either backbone. An nnx filter: use it with nnx.state / nnx.split.
TRAINABLE = nnx.All(nnx.Param, nnx.PathContains('expert'))
