"""Key maps: PyTorch state-dict names -> NNX variable paths, with a per-tensor transform.

A `KeyMap` is an ordered table of regex rules (first full match wins). `plan` checks a checkpoint
against a model *before reading any data*: every checkpoint tensor must map to a model variable,
every model variable must be covered, shapes must agree after the transform; all problems are
reported together, by name. `stream` then yields one converted tensor at a time.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from typing import Callable, Iterator, Sequence

import numpy as np
from flax import nnx

from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
  """A tensor transform and the shape it produces (so shapes are checked without reading data)."""
  name: str
  array: Callable[[np.ndarray], np.ndarray]
  shape: Callable[[tuple[int, ...]], tuple[int, ...]]


IDENTITY = Transform('identity', lambda a: a, lambda s: s)
# nn.Linear (out, in) -> kernel (in, out).
TRANSPOSE = Transform('transpose', lambda a: a.T, lambda s: s[::-1])
# Conv with kernel == stride (patchify): (out, in, *k) -> (in * prod(k), out), rows ordered (in, *k).
CONV_TO_DENSE = Transform('conv_to_dense', lambda a: a.reshape(a.shape[0], -1).T,
                          lambda s: (int(np.prod(s[1:])), s[0]))


@dataclasses.dataclass(frozen=True)
class Rule:
  pattern: str          # regex, full match on the checkpoint key
  target: str           # dotted NNX path; may use \1-style groups
  transform: Transform = IDENTITY


def expert_path(path: Path) -> Path:
  """A base variable's expert twin in both VAP backbones: blocks.i.base.* -> blocks.i.expert.*,
  any other top-level module x -> expert_x."""
  if path[0] == 'blocks':
    return path[:2] + ('expert',) + path[3:]
  return (f'expert_{path[0]}',) + path[1:]


class KeyMap:
  """Ordered rules; optionally a ``marker`` for tensors that mirror a base tensor.

  VAP names every expert tensor like its base twin plus ``_mot_ref``: a marked key is mapped as
  its unmarked twin, then ``marked_path`` moves the result to the expert's variable.

  ``ignore`` lists checkpoint keys (regex, full match) that carry nothing the model needs: tied
  copies of another tensor, buffers that older library versions saved. `plan` skips them.
  """

  def __init__(self, name: str, rules: Sequence[Rule], *, marker: str | None = None,
               marked_path: Callable[[Path], Path] | None = None, ignore: Sequence[str] = (),
               rename: Callable[[str], str | None] | None = None):
    self.name = name
    self.rules = [(re.compile(r.pattern), r) for r in rules]
    self.marker, self.marked_path = marker, marked_path
    self.ignore = [re.compile(p) for p in ignore]
    self.rename = rename

  def renamed(self, name: str, rename: Callable[[str], str | None]) -> 'KeyMap':
    """The same rules behind a key renaming (another checkpoint naming of the same tensors;
    ``rename`` returns None for keys it does not know)."""
    other = copy.copy(self)
    other.name, other.rename = name, rename
    return other

  def ignored(self, key: str) -> bool:
    return any(regex.fullmatch(key) for regex in self.ignore)

  def __call__(self, key: str) -> tuple[Path, Transform] | None:
    if self.rename is not None:
      key = self.rename(key)
      if key is None:
        return None
    return self._lookup(key)

  def _lookup(self, key: str) -> tuple[Path, Transform] | None:
    if self.marker and self.marker in key:
      hit = self._lookup(key.replace(self.marker, ''))
      return None if hit is None else (self.marked_path(hit[0]), hit[1])
    for regex, rule in self.rules:
      m = regex.fullmatch(key)
      if m:
        path = tuple(int(p) if p.isdigit() else p for p in m.expand(rule.target).split('.'))
        return path, rule.transform
    return None


def flat_variables(state: nnx.State) -> dict[Path, nnx.Variable]:
  return {tuple(path): var for path, var in nnx.to_flat_state(state)}


@dataclasses.dataclass
class Plan:
  """Which checkpoint tensor fills which model variable, and how."""
  entries: dict[Path, tuple[str, Transform]]


def plan(checkpoint: SafetensorsCheckpoint, keymap: KeyMap, state: nnx.State) -> Plan:
  """Match checkpoint tensors to model variables in both directions; raise on any mismatch."""
  variables = flat_variables(state)
  entries: dict[Path, tuple[str, Transform]] = {}
  unmapped, unknown, duplicated, misshaped = [], [], [], []
  for key in checkpoint.keys():
    if keymap.ignored(key):
      continue
    hit = keymap(key)
    if hit is None:
      unmapped.append(key)
      continue
    path, transform = hit
    if path not in variables:
      unknown.append(f'{key} -> {".".join(map(str, path))}')
      continue
    if path in entries:
      duplicated.append(f'{key} and {entries[path][0]} -> {".".join(map(str, path))}')
      continue
    want, got = tuple(variables[path].shape), transform.shape(checkpoint.shape(key))
    if want != got:
      misshaped.append(f'{key}: checkpoint {checkpoint.shape(key)} -> {got} after {transform.name}, '
                       f'model {".".join(map(str, path))} expects {want}')
      continue
    entries[path] = (key, transform)
  missing = [".".join(map(str, p)) for p in variables if p not in entries]
  problems = [(f'{len(unmapped)} checkpoint tensors match no {keymap.name} key-map rule', unmapped),
              (f'{len(unknown)} checkpoint tensors map to variables the model does not have '
               '(does the config match the checkpoint?)', unknown),
              (f'{len(duplicated)} model variables are filled twice', duplicated),
              (f'{len(misshaped)} tensors have the wrong shape', misshaped),
              (f'{len(missing)} model variables are missing from the checkpoint', missing)]
  message = '\n'.join(f'{title}:\n  ' + '\n  '.join(items[:20]) +
                      (f'\n  ... and {len(items) - 20} more' if len(items) > 20 else '')
                      for title, items in problems if items)
  if message:
    raise CheckpointError(f'checkpoint {checkpoint.path} does not match the model:\n{message}')
  return Plan(entries)


def stream(checkpoint: SafetensorsCheckpoint, the_plan: Plan, state: nnx.State,
           order: Sequence[Path] | None = None) -> Iterator[tuple[Path, np.ndarray]]:
  """Yield (path, array) one tensor at a time, transformed and cast to the variable's dtype."""
  variables = flat_variables(state)
  for path in (order or the_plan.entries):
    key, transform = the_plan.entries[path]
    yield path, np.ascontiguousarray(transform.array(checkpoint.read(key)).astype(variables[path].dtype))
