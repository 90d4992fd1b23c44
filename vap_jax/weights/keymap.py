"""Key maps: PyTorch state-dict names -> NNX variable paths, with a per-tensor transform.

A `KeyMap` is an ordered table of regex rules (first full match wins). A rule's target may name
a layer with a ``#N`` segment: the tensor fills slot N of a stacked variable (leading 'layers'
axis, `vap_jax.models.stack`). A checkpoint tensor thus fills a *slot* ``(path, layer)``, with
layer None for a variable that is not stacked. `plan` checks a checkpoint against a model *before
reading any data*: every checkpoint tensor must map to a model slot, every slot must be covered,
shapes must agree after the transform; all problems are reported together, by name. `stream`
then yields one converted tensor at a time; `read` reads one, or only part of one.

Export runs the same rules backwards (`KeyMap.key_of`): a slot's path is matched against each
rule's target, the captured values are written into the rule's pattern, and the result must map
forward to the same slot. So one table serves both directions; a rule that cannot be run
backwards (a wildcard outside a captured group, an optional part) is reported as such.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Callable, Iterator, Sequence

import numpy as np
from flax import nnx

from vap_jax.models.stack import LAYER_AXIS
from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint


Path = tuple[str | int, ...]
Slot = tuple[Path, int | None]  # a variable, and its layer if it is stacked


@dataclasses.dataclass(frozen=True)
class Transform:
  """A tensor transform and the shape it produces (so shapes are checked without reading data).

  ``source_index`` maps an index into the result to the index of the source it comes from, for
  transforms that commute with slicing: then a device's shard is read without the rest.
  ``inverse`` / ``inverse_shape`` undo it for export; they also take the conv kernel size, which
  the model's layout no longer shows (None where no conv is involved).
  """
  name: str
  array: Callable[[np.ndarray], np.ndarray]
  shape: Callable[[tuple[int, ...]], tuple[int, ...]]
  source_index: Callable[[tuple], tuple] | None = None
  inverse: Callable[[np.ndarray, tuple[int, ...] | None], np.ndarray] = lambda a, kernel: a
  inverse_shape: Callable[[tuple[int, ...], tuple[int, ...] | None], tuple[int, ...]] = (
      lambda s, kernel: s)


def _kernel(kernel: tuple[int, ...] | None) -> tuple[int, ...]:
  if not kernel:
    raise ValueError('conv_to_dense needs the conv kernel size to be undone')
  return tuple(kernel)


IDENTITY = Transform('identity', lambda a: a, lambda s: s, lambda index: index)
# nn.Linear (out, in) -> kernel (in, out).
TRANSPOSE = Transform('transpose', lambda a: a.T, lambda s: s[::-1], lambda index: index[::-1],
                      inverse=lambda a, kernel: a.T, inverse_shape=lambda s, kernel: s[::-1])
# Conv with kernel == stride (patchify): (out, in, *k) -> (in * prod(k), out), rows ordered (in, *k).
CONV_TO_DENSE = Transform(
    'conv_to_dense', lambda a: a.reshape(a.shape[0], -1).T, lambda s: (int(np.prod(s[1:])), s[0]),
    inverse=lambda a, kernel: a.T.reshape(a.shape[1], -1, *_kernel(kernel)),
    inverse_shape=lambda s, kernel: (s[1], s[0] // math.prod(_kernel(kernel)), *_kernel(kernel)))


@dataclasses.dataclass(frozen=True)
class Rule:
  pattern: str          # regex, full match on the checkpoint key
  target: str           # dotted NNX path; may use \1-style groups
  transform: Transform = IDENTITY


# Both VAP backbones keep a base variable's expert twin at the same path under ``expert``.
EXPERT = ('expert',)
# VAP names an expert module after its base twin plus the marker, at the model's top level or a
# block's ('patch_embed_mot_ref.proj.weight', 'blocks.4.attn1_mot_ref.to_q.weight',
# 'blocks.4.scale_shift_table_mot_ref'): the marker goes after what this matches in the base key.
MARKED_NAME = re.compile(r'(?:[^.]+\.\d+\.)?[^.]+')


class KeyMap:
  """Ordered rules; optionally a ``marker`` for tensors that mirror a base tensor.

  VAP names every expert tensor like its base twin plus ``_mot_ref``: a marked key is mapped as
  its unmarked twin, then moved under ``marked_prefix`` (the expert's variables).

  ``ignore`` lists checkpoint keys (regex, full match) that carry nothing the model needs: tied
  copies of another tensor, buffers that older library versions saved. `plan` skips them.
  """

  def __init__(self, name: str, rules: Sequence[Rule], *, marker: str | None = None,
               marked_prefix: Path = EXPERT, ignore: Sequence[str] = (),
               rename: Callable[[str], str | None] | None = None):
    self.name = name
    self.rules = [(re.compile(r.pattern), r) for r in rules]
    self.marker, self.marked_prefix = marker, tuple(marked_prefix)
    self.ignore = [re.compile(p) for p in ignore]
    self.rename = rename
    self._inverse = None  # built on first use by `key_of`

  def renamed(self, name: str, rename: Callable[[str], str | None]) -> 'KeyMap':
    """The same rules behind a key renaming (another checkpoint naming of the same tensors;
    ``rename`` returns None for keys it does not know)."""
    other = copy.copy(self)
    other.name, other.rename = name, rename
    return other

  def ignored(self, key: str) -> bool:
    return any(regex.fullmatch(key) for regex in self.ignore)

  def __call__(self, key: str) -> tuple[Path, int | None, Transform] | None:
    """(variable path, checkpoint layer or None, transform) of a checkpoint key, or None."""
    if self.rename is not None:
      key = self.rename(key)
      if key is None:
        return None
    return self._lookup(key)

  def _lookup(self, key: str) -> tuple[Path, int | None, Transform] | None:
    if self.marker and self.marker in key:
      hit = self._lookup(key.replace(self.marker, ''))
      return None if hit is None else (self.marked_prefix + hit[0],) + hit[1:]
    for regex, rule in self.rules:
      m = regex.fullmatch(key)
      if m:
        path, layer = [], None
        for part in m.expand(rule.target).split('.'):
          if part.startswith('#'):
            layer = int(part[1:])
          else:
            path.append(int(part) if part.isdigit() else part)
        return tuple(path), layer, rule.transform
    return None

  # ------------------------------------------------------------------------------ backwards

  def key_of(self, path: Path, layer: int | None) -> tuple[str, Transform]:
    """The checkpoint key of variable ``path`` (checkpoint layer ``layer`` of a stacked one) and
    the transform that key gets on loading: `__call__` run backwards, from the same rules.

    Raises `CheckpointError` when no rule gives a key that maps back to the same place.
    """
    if self.rename is not None:
      raise ValueError(f'{self.name}: a renamed key map cannot be run backwards')
    marked = bool(self.marker) and len(path) > len(self.marked_prefix) and (
        tuple(path[:len(self.marked_prefix)]) == self.marked_prefix)
    base = tuple(path[len(self.marked_prefix):]) if marked else tuple(path)
    name = '.'.join(map(str, base))
    for template, rule in self._templates():
      key = template.key(name, layer)
      if key is None:
        continue
      if marked:
        key = MARKED_NAME.sub(lambda m: m.group(0) + self.marker, key, count=1)
      if self(key) == (tuple(path), layer, rule.transform):  # first match wins going forward too
        return key, rule.transform
    where = '' if layer is None else f' layer {layer}'
    raise CheckpointError(f'{self.name} key map: no rule names variable '
                          f'{".".join(map(str, path))}{where}')

  def _templates(self) -> list[tuple['_Template', Rule]]:
    if self._inverse is None:
      self._inverse = [(_Template(rule), rule) for _, rule in self.rules]
    return self._inverse


class _Template:
  """One rule run backwards: its target as a regex over variable names (capturing the values of
  the pattern's groups), and its pattern as a template those values fill."""

  def __init__(self, rule: Rule):
    self.parts, groups = _split_pattern(rule.pattern)  # literal strings and group numbers
    used = [int(g) for g in re.findall(r'\\(\d+)', rule.target)]
    unused = [n for n in groups if n not in used]
    if unused:
      raise ValueError(f'key-map rule {rule.pattern!r} -> {rule.target!r} cannot run backwards: '
                       f'groups {unused} do not appear in the target')
    segments = rule.target.split('.')
    layer = [s for s in segments if s.startswith('#')]  # '#\1': the layer is group 1
    self.layer_group = int(layer[0][2:]) if layer else None
    pieces = re.split(r'\\(\d+)', '.'.join(s for s in segments if not s.startswith('#')))
    seen: set[int] = set()

    def group(n: int) -> str:  # a group's first use captures it, a repeat must be equal
      if n in seen:
        return f'(?P=g{n})'
      seen.add(n)
      return f'(?P<g{n}>{groups[n]})'
    self.target = re.compile(''.join(re.escape(p) if i % 2 == 0 else group(int(p))
                                     for i, p in enumerate(pieces)))

  def key(self, name: str, layer: int | None) -> str | None:
    """The checkpoint key for variable ``name`` (dotted) and checkpoint layer, or None."""
    if (layer is None) != (self.layer_group is None):
      return None
    m = self.target.fullmatch(name)
    if m is None:
      return None
    values = {int(k[1:]): v for k, v in m.groupdict().items()}
    if layer is not None:
      values[self.layer_group] = str(layer)
    return ''.join(p if isinstance(p, str) else values[p] for p in self.parts)


def _split_pattern(pattern: str) -> tuple[list[str | int], dict[int, str]]:
  """A rule's regex as [literal text | group number, ...] and {group number: its sub-pattern}.

  Only escaped characters, plain characters and capturing groups may appear outside a group:
  anything else (wildcards, optional parts) leaves more than one key possible.
  """
  parts: list[str | int] = []
  groups: dict[int, str] = {}
  i = 0
  while i < len(pattern):
    c = pattern[i]
    if c == '\\' and i + 1 < len(pattern) and not pattern[i + 1].isalnum():
      parts.append(pattern[i + 1])
      i += 2
    elif c == '(' and not pattern.startswith('(?', i):
      depth, j = 0, i
      while True:  # the matching parenthesis (escapes and classes skipped)
        if pattern[j] == '\\':
          j += 1
        elif pattern[j] == '[':
          j = pattern.index(']', j + 1)
        elif pattern[j] == '(':
          depth += 1
        elif pattern[j] == ')':
          depth -= 1
          if depth == 0:
            break
        j += 1
      number = len(groups) + 1
      groups[number] = pattern[i + 1:j]
      if '(' in groups[number].replace('\\(', ''):
        raise ValueError(f'key-map pattern {pattern!r}: nested groups cannot run backwards')
      parts.append(number)
      i = j + 1
    elif c in '\\.[](){}*+?|^$':
      raise ValueError(f'key-map pattern {pattern!r} cannot run backwards: {pattern[i:]!r} is '
                       'not a literal or a captured group')
    else:
      parts.append(c)
      i += 1
  return parts, groups


def flat_variables(state: nnx.State) -> dict[Path, nnx.Variable]:
  return {tuple(path): var for path, var in nnx.to_flat_state(state)}


def is_stacked(variable) -> bool:
  """A variable with a leading layer axis (`vap_jax.models.stack`)."""
  axes = variable.get_metadata().get('logical_axes') or ()
  return bool(axes) and axes[0] == LAYER_AXIS


def slots(state: nnx.State) -> dict[Slot, tuple[tuple[int, ...], np.dtype]]:
  """Every slot of the model: (path, layer) of stacked variables, (path, None) of the rest, with
  the shape and dtype one checkpoint tensor must give it."""
  out = {}
  for path, var in flat_variables(state).items():
    if is_stacked(var):
      for layer in range(var.shape[0]):
        out[path, layer] = (tuple(var.shape[1:]), np.dtype(var.dtype))
    else:
      out[path, None] = (tuple(var.shape), np.dtype(var.dtype))
  return out


def slot_name(slot: Slot) -> str:
  path, layer = slot
  return '.'.join(map(str, path)) + ('' if layer is None else f'[{layer}]')


@dataclasses.dataclass
class Plan:
  """Which checkpoint tensor fills which model slot, and how."""
  entries: dict[Slot, tuple[str, Transform]]


def plan(checkpoint: SafetensorsCheckpoint, keymap: KeyMap, state: nnx.State,
         slot_of: Callable[[Path, int], int | None] | None = None) -> Plan:
  """Match checkpoint tensors to model slots in both directions; raise on any mismatch.

  ``slot_of(path, layer)`` turns a checkpoint layer number into the stack slot of ``path``
  (e.g. expert blocks 0, 4, 8 are expert slots 0, 1, 2), None if the model has no such layer.
  """
  wanted = slots(state)
  entries: dict[Slot, tuple[str, Transform]] = {}
  unmapped, unknown, duplicated, misshaped = [], [], [], []
  for key in checkpoint.keys():
    if keymap.ignored(key):
      continue
    hit = keymap(key)
    if hit is None:
      unmapped.append(key)
      continue
    path, layer, transform = hit
    if layer is not None and slot_of is not None:
      layer = slot_of(path, layer)
    slot = (path, layer)
    if slot not in wanted or (layer is None and hit[1] is not None):
      unknown.append(f'{key} -> {slot_name((path, hit[1]))}')
      continue
    if slot in entries:
      duplicated.append(f'{key} and {entries[slot][0]} -> {slot_name(slot)}')
      continue
    want, got = wanted[slot][0], transform.shape(checkpoint.shape(key))
    if want != got:
      misshaped.append(f'{key}: checkpoint {checkpoint.shape(key)} -> {got} after {transform.name}, '
                       f'model {slot_name(slot)} expects {want}')
      continue
    entries[slot] = (key, transform)
  missing = [slot_name(s) for s in wanted if s not in entries]
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


def read(checkpoint: SafetensorsCheckpoint, entry: tuple[str, Transform], dtype,
         index: tuple | None = None) -> np.ndarray:
  """One planned tensor, transformed and cast to ``dtype``; with ``index``, only that part of
  the result (read as such when the transform allows, else cut from the whole)."""
  key, transform = entry
  if index is not None and transform.source_index is not None:
    part = checkpoint.read_slice(key, transform.source_index(tuple(index)))
    return np.ascontiguousarray(transform.array(part).astype(dtype))
  whole = transform.array(checkpoint.read(key))
  return np.ascontiguousarray((whole if index is None else whole[tuple(index)]).astype(dtype))


def stream(checkpoint: SafetensorsCheckpoint, the_plan: Plan, state: nnx.State
           ) -> Iterator[tuple[Slot, np.ndarray]]:
  """Yield (slot, array) one tensor at a time, transformed and cast to the variable's dtype."""
  dtypes = {slot: dtype for slot, (_, dtype) in slots(state).items()}
  for slot, entry in the_plan.entries.items():
    yield slot, read(checkpoint, entry, dtypes[slot])
