"""Config plumbing both VAP backbones share: reading source configs, expert placement, and which
parameters VAP trains."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Sequence

from flax import nnx

from vap_jax.nn.dtypes import DTypePolicy


def source_fields(cls, config: dict[str, Any], required: Sequence[str] = (),
                  skip: Sequence[str] = ()) -> dict[str, Any]:
  """The fields of dataclass ``cls`` that a source ``config.json`` dict holds (but ``skip``),
  checked against their annotations (lists become tuples). ``required`` fields must be there:
  they set parameter shapes, and the defaults are the full-size model's, so a missing one would
  surface as hundreds of mismatched tensors. A ValueError names the first bad field."""
  hints = typing.get_type_hints(cls)
  for name in required:
    if name not in config:
      raise ValueError(f'field {name} is missing (expected {_describe(hints[name])}; it sets '
                       'the size of the model)')
  out = {}
  for field in dataclasses.fields(cls):
    if field.name in config and field.name not in skip:
      ok, value = _conform(config[field.name], hints[field.name])
      if not ok:
        raise ValueError(f'field {field.name} is {config[field.name]!r}, expected '
                         f'{_describe(hints[field.name])}')
      out[field.name] = value
  return out


def _conform(value, hint) -> tuple[bool, Any]:
  """(whether JSON ``value`` fits type ``hint``, the value with lists made tuples)."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (types.UnionType, typing.Union):
    for arg in args:
      ok, out = _conform(value, arg)
      if ok:
        return True, out
    return False, value
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      return False, value
    each = args[:1] * len(value) if args[1:] == (Ellipsis,) else args
    items = [_conform(v, a) for v, a in zip(value, each)]
    return len(each) == len(value) and all(ok for ok, _ in items), tuple(v for _, v in items)
  if hint is type(None):
    return value is None, value
  if isinstance(value, bool) and hint is not bool:
    return False, value
  if hint is float:  # JSON has one number type: an int is a fine float
    return isinstance(value, (int, float)), value
  if hint is int:  # and a whole float (4.0, as some writers save ints) a fine int
    if isinstance(value, float) and value.is_integer():
      return True, int(value)
    return isinstance(value, int), value
  if hint in (bool, str):
    return isinstance(value, hint), value
  return True, value  # a runtime type (dtype policy), never in a source config


def _describe(hint) -> str:
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (types.UnionType, typing.Union):
    return ' or '.join(_describe(a) for a in args)
  if origin is tuple:
    if args[1:] == (Ellipsis,):
      return f'a list of {_describe(args[0])}'
    return f'a list of {len(args)} {_describe(args[0])}'
  return 'null' if hint is type(None) else getattr(hint, '__name__', str(hint))


def from_diffusers_config(cls, config: dict[str, Any], unsupported: dict[str, Any],
                          required: Sequence[str] = (), *, dtype: str | None = None,
                          param_dtype: str | None = None, trainable_dtype: str | None = None,
                          **fixed):
  """``cls`` from a diffusers ``config.json`` dict: unknown keys are ignored, keys in
  ``unsupported`` must hold their expected value, known ones are type-checked and ``required``
  ones must be present (`source_fields`), ``fixed`` overrides (runtime choices).

  ``dtype`` (compute), ``param_dtype`` (stored; default ``dtype``) and ``trainable_dtype`` (the
  expert's; default ``param_dtype``) fill the class's default `DTypePolicy` when given.
  """
  for key, expected in unsupported.items():
    if config.get(key, expected) != expected:
      raise ValueError(f'transformer config field {key}={config[key]!r} is not supported '
                       f'(expected {expected!r})')
  # The base I2V models have no expert: the field is absent or null.
  config = {**config, 'block_idx_with_mot_ref': config.get('block_idx_with_mot_ref') or []}
  kwargs = source_fields(cls, config, required)
  if dtype is not None or param_dtype is not None or trainable_dtype is not None:
    default = DTypePolicy.of(fixed.get('dtypes', cls.__dataclass_fields__['dtypes'].default))
    compute = dtype or default.compute
    fixed['dtypes'] = dataclasses.replace(default, compute=compute,
                                          params=param_dtype or dtype or default.params,
                                          trainable=trainable_dtype)
  return cls(**{**kwargs, **fixed})


# Config fields that are runtime choices of ours, not architecture: never written to config.json.
RUNTIME_FIELDS = ('dtypes', 'attention', 'scan_layers', 'remat', 'context_parallel')


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
