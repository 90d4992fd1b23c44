"""Mesh over ('data', 'fsdp', 'context', 'tensor') and an ordered logical->mesh rule list.

Parameters and activations are annotated with logical axis names (``embed``, ``heads``, ``mlp``,
``activation_batch``, ...). A rule list maps each name to candidate mesh axes, first match wins,
and a mesh axis is used at most once per tensor (so a (embed, embed) kernel shards only one dim).
Model code only names logical axes; the mesh and the rules come from the config.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'context', 'tensor')

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Logical names of a (batch, tokens, width) activation, the layout every transformer stream has.
TOKEN_AXES = ('activation_batch', 'activation_length', 'activation_embed')

# Weights: FSDP over the model width, tensor parallel over heads/MLP. Activations: batch over
# data+fsdp, sequence over context, heads over tensor.
DEFAULT_RULES: Rules = (
    ('activation_batch', ('data', 'fsdp')),
    ('activation_length', 'context'),
    ('activation_heads', 'tensor'),
    ('activation_mlp', 'tensor'),
    ('activation_embed', None),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('embed', 'fsdp'),
    ('text_embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('time_embed', None),
    ('patch', None),
    ('length', None),
    ('norm', None),
    ('relpos', None),
    ('layers', None),  # the layer axis of stacked blocks: every device holds its part of each
    # Video VAEs: conv channels replicated (small), activations sharded over batch or width.
    ('activation_width', 'context'),
    ('conv_in', None),
    ('conv_out', None),
)


def with_rules(rules: Rules, **overrides) -> Rules:
  """``rules`` with the mesh axes of some logical names replaced (first match wins, so the
  override takes the place of the original rule)."""
  out = [(name, overrides.pop(name)) if name in overrides else (name, axes) for name, axes in rules]
  return tuple(out) + tuple(overrides.items())


# FSDP over the context axis too: on a context-parallel mesh the weights are not replicated
# across the sequence shards.
FSDP_CONTEXT_RULES = with_rules(DEFAULT_RULES, embed=('fsdp', 'context'),
                                text_embed=('fsdp', 'context'))


# A pipeline's VAE calls take one video: every device of the mesh takes a strip of its width
# instead (the convolutions exchange their edges), the VAE weights replicated.
VAE_RULES = with_rules(DEFAULT_RULES, activation_batch=None,
                       activation_width=('data', 'fsdp', 'context', 'tensor'))


def make_mesh(shape: dict[str, int] | Sequence[int], devices=None) -> Mesh:
  """Mesh over MESH_AXES. ``shape`` maps axis -> size (missing axes are 1); -1 takes the rest."""
  if not isinstance(shape, dict):
    shape = dict(zip(MESH_AXES, shape))
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'mesh axes {sorted(unknown)} are not among {MESH_AXES}')
  devices = jax.devices() if devices is None else devices
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  if -1 in sizes:
    rest = math.prod(s for s in sizes if s != -1)
    sizes[sizes.index(-1)] = len(devices) // rest
  if math.prod(sizes) != len(devices):
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, '
                     f'{len(devices)} are available')
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def parse_mesh_shape(text: str) -> dict[str, int]:
  """``'fsdp=4,tensor=2'`` (a command-line flag) -> ``{'fsdp': 4, 'tensor': 2}`` for `make_mesh`."""
  try:
    return {k.strip(): int(v) for k, v in (item.split('=') for item in text.split(',')
                                           if item.strip())}
  except ValueError:
    raise ValueError(f'mesh {text!r}: expected AXIS=N[,AXIS=N...] over {MESH_AXES}, e.g. '
                     f'fsdp=8 or data=2,fsdp=4 (N=-1 takes the remaining devices)') from None


def logical_to_spec(names: Iterable[str | None], rules: Rules, mesh: Mesh | None = None) -> PartitionSpec:
  """Logical axis names -> PartitionSpec under ordered ``rules`` (first unused mesh axis wins).

  Mesh axes of size 1 are skipped when a mesh is given, so specs stay minimal.
  """
  used: set[str] = set()
  spec = []
  for name in names:
    chosen = None
    if name is not None:
      for logical, mesh_axes in rules:
        if logical != name or mesh_axes is None:
          continue
        axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        if mesh is not None:
          axes = tuple(a for a in axes if mesh.shape[a] > 1)
        if axes and not used.intersection(axes):
          chosen = axes[0] if len(axes) == 1 else axes
          used.update(axes)
          break
    spec.append(chosen)
  return PartitionSpec(*spec)


def _logical_axes(name: str, variable: nnx.Variable, ndim: int) -> tuple[str | None, ...]:
  axes = variable.get_metadata().get('logical_axes')
  if axes is None:
    return (None,) * ndim
  if len(axes) != ndim:
    raise ValueError(f'parameter {name}: logical axes {tuple(axes)} name {len(axes)} dimensions '
                     f'but its shape has {ndim}')
  return tuple(axes)


def param_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
  """NamedSharding for every variable of ``state`` (abstract or concrete), validated for the mesh.

  Raises a ValueError naming the parameter when its logical axes do not name each dimension, or
  when a sharded dimension does not divide evenly.
  """
  def one(path, variable):
    shape, name = variable.shape, '.'.join(map(str, path))
    spec = logical_to_spec(_logical_axes(name, variable, len(shape)), rules, mesh)
    for dim, axes in zip(shape, spec):
      if axes is None:
        continue
      size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
      if dim % size:
        raise ValueError(f'parameter {name} of shape {tuple(shape)} cannot be sharded as {spec} '
                         f'on mesh {dict(mesh.shape)}: {dim} is not divisible by {size}')
    return NamedSharding(mesh, spec)
  return nnx.map_state(one, state)


# ---- activation constraints -------------------------------------------------------------------

class _Context(threading.local):
  mesh: Mesh | None = None
  rules: Rules = ()


_context = _Context()


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Within this context `constrain` pins activations to the mesh; outside it is a no-op."""
  previous = (_context.mesh, _context.rules)
  _context.mesh, _context.rules = mesh, rules
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _context.mesh, _context.rules = previous


def current() -> tuple[Mesh | None, Rules]:
  """The (mesh, rules) of the active `sharding_context` ((None, ()) outside one)."""
  return _context.mesh, _context.rules


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """with_sharding_constraint by logical names, when a sharding context is active."""
  if _context.mesh is None:
    return x
  spec = logical_to_spec(names, _context.rules, _context.mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(_context.mesh, spec))
