"""Config plumbing both VAP backbones share: reading diffusers configs, expert placement, and the
naming convention that marks expert parameters (the only ones VAP trains)."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence


def from_diffusers_config(cls, config: dict[str, Any], unsupported: dict[str, Any], **fixed):
  """``cls`` from a diffusers ``config.json`` dict: unknown keys are ignored, keys in
  ``unsupported`` must hold their expected value, ``fixed`` overrides (runtime choices, tuples)."""
  for key, expected in unsupported.items():
    if config.get(key, expected) != expected:
      raise ValueError(f'transformer config field {key}={config[key]!r} is not supported '
                       f'(expected {expected!r})')
  names = {f.name for f in dataclasses.fields(cls)}
  kwargs = {k: v for k, v in config.items() if k in names}
  kwargs['block_idx_with_mot_ref'] = tuple(config.get('block_idx_with_mot_ref') or ())
  return cls(**{**kwargs, **fixed})


def check_expert_blocks(block_idx: Sequence[int], num_layers: int) -> None:
  bad = [i for i in block_idx if not 0 <= i < num_layers]
  if bad:
    raise ValueError(f'block_idx_with_mot_ref {bad} outside the {num_layers} layers')


def trainable_filter(path: Sequence[Any], _value=None) -> bool:
  """True for expert parameters: modules named ``expert`` / ``expert_*`` in either backbone."""
  return any(str(part).startswith('expert') for part in path)
