"""Build NNX models from checkpoints with bounded host memory.

The model is never materialised on the host: an abstract model (`abstract_model`) gives shapes,
dtypes and logical axes; each checkpoint tensor is read, transformed, cast and placed directly on
its sharding (a stacked layer straight into its slot of the preallocated stack), then dropped
from host memory.
"""
from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vap_jax.nn.layers import abstract_variables
from vap_jax.parallel import DEFAULT_RULES, param_shardings
from vap_jax.parallel.sharding import Rules
from vap_jax.weights import keymap as km
from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint

log = logging.getLogger(__name__)


# The top-level file of a pipeline folder: diffusers (downloaded) and vap-convert (converted).
MODEL_INDEX = 'model_index.json'
MANIFEST = 'manifest.json'


def component_dir(path: Path, component: str = 'transformer') -> Path:
  """A whole pipeline folder (diffusers or converted) resolves to its ``component/``; a component
  folder (or file) is returned as is. A pipeline folder without that component is an error."""
  path = Path(path)
  if (path / component / 'config.json').is_file():
    return path / component
  for marker, what in ((MANIFEST, 'converted (vap-convert)'), (MODEL_INDEX, 'diffusers')):
    if (path / marker).is_file():
      hint = ('; the conversion is incomplete: re-run vap-convert' if marker == MANIFEST and
              (path / component).is_dir() else '')
      raise CheckpointError(f'{what} pipeline folder {path} is missing its {component}/ component '
                            f'(no {component}/config.json){hint}')
  return path


def abstract_model(factory: Callable[[], nnx.Module]) -> nnx.Module:
  """The model with ShapeDtypeStruct leaves: no memory, no compute (see `abstract_variables`)."""
  with abstract_variables():
    return factory()


def placement(state: nnx.State, mesh: Mesh | None, rules: Rules):
  """path -> where to put it: a NamedSharding on the mesh, or the default device."""
  if mesh is None:
    device = jax.devices()[0]
    return {path: device for path in km.flat_variables(state)}
  return {path: var for path, var in nnx.to_flat_state(param_shardings(state, mesh, rules))}


def fill(graphdef, state: nnx.State, values: dict) -> nnx.Module:
  """Merge concrete arrays (by path) into the abstract state and build the module."""
  flat = [(path, var.replace(value=values[tuple(path)])) for path, var in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stack: jax.Array, value: jax.Array, layer: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(stack, value.astype(stack.dtype), layer, 0)


def _zeros(shape, dtype, where) -> jax.Array:
  """Zeros made where they live (no host copy of a whole stack)."""
  if not isinstance(where, jax.sharding.Sharding):
    where = jax.sharding.SingleDeviceSharding(where)
  return _zeros_fn(shape, dtype, where)()


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape, dtype, sharding):
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


class SlotWriter:
  """Builds a model's arrays slot by slot (see `keymap.slots`): each tensor goes straight onto its
  sharding; a stacked variable is preallocated on device and each layer written into it in place.
  Host memory holds one tensor (or one device's part of it) at a time."""

  def __init__(self, state: nnx.State, mesh: Mesh | None, rules: Rules):
    self.variables = km.flat_variables(state)
    self.where = placement(state, mesh, rules)
    self.values: dict[km.Path, jax.Array] = {}

  def sharding(self, slot: km.Slot):
    """Where slot's tensor lives: the variable's sharding, less the layer axis when stacked."""
    path, layer = slot
    where = self.where[path]
    if layer is None or not isinstance(where, NamedSharding):
      return where
    return NamedSharding(where.mesh, PartitionSpec(*where.spec[1:]))

  def shape(self, slot: km.Slot) -> tuple[int, ...]:
    path, layer = slot
    shape = tuple(self.variables[path].shape)
    return shape if layer is None else shape[1:]

  def place(self, slot: km.Slot, read: Callable) -> jax.Array:
    """``read(index=None)`` -> numpy, as a device array on the slot's sharding; on a mesh each
    device's part is read on its own (`jax.make_array_from_callback`), so a process reads only
    what its devices hold."""
    where, dtype = self.sharding(slot), self.variables[slot[0]].dtype
    if not isinstance(where, jax.sharding.Sharding):
      return jax.device_put(read(), where)
    parts = {}

    def part(index):
      key = tuple((i.start, i.stop, i.step) if isinstance(i, slice) else i for i in index)
      if key not in parts:
        parts[key] = read(index)
      return parts[key]
    return jax.make_array_from_callback(self.shape(slot), where, part, dtype=dtype)

  def put(self, slot: km.Slot, value: jax.Array) -> None:
    path, layer = slot
    if layer is None:
      self.values[path] = value
      return
    if path not in self.values:
      var = self.variables[path]
      self.values[path] = _zeros(tuple(var.shape), jnp.dtype(var.dtype), self.where[path])
    self.values[path] = _write_layer(self.values[path], value, jnp.int32(layer))


def tensor_reader(checkpoint: SafetensorsCheckpoint, entry, dtype) -> Callable:
  """``read(index=None)``: one planned tensor, or part of it (read on its own when the transform
  commutes with slicing; else cut from the whole tensor, read once)."""
  whole = None

  def read(index=None):
    nonlocal whole
    if index is not None and entry[1].source_index is not None:
      return km.read(checkpoint, entry, dtype, index)
    if whole is None:
      whole = km.read(checkpoint, entry, dtype)
    return whole if index is None else np.ascontiguousarray(whole[tuple(index)])
  return read


def load_model(factory: Callable[[], nnx.Module], checkpoint: str | SafetensorsCheckpoint,
               keymap: km.KeyMap, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
               progress: bool = False, slot_of: Callable | None = None) -> nnx.Module:
  """Stream a safetensors checkpoint into the model that ``factory`` builds, sharded on ``mesh``.
  ``slot_of`` maps checkpoint layers to stack slots (`keymap.plan`)."""
  if not isinstance(checkpoint, SafetensorsCheckpoint):
    checkpoint = SafetensorsCheckpoint(checkpoint)
  graphdef, state = nnx.split(abstract_model(factory))
  the_plan = km.plan(checkpoint, keymap, state, slot_of)
  writer = SlotWriter(state, mesh, rules)
  items = the_plan.entries.items()
  if progress:
    from tqdm import tqdm
    items = tqdm(items, total=len(the_plan.entries), desc=f'loading {checkpoint.path}', unit='tensor')
  for slot, entry in items:
    dtype = writer.variables[slot[0]].dtype
    writer.put(slot, writer.place(slot, tensor_reader(checkpoint, entry, dtype)))
  log.info('loaded %d tensors from %s', len(the_plan.entries), checkpoint.path)
  return fill(graphdef, state, writer.values)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Place an existing model's variables on the mesh according to their logical axes."""
  graphdef, state = nnx.split(model)
  shardings = param_shardings(state, mesh, rules)
  return nnx.merge(graphdef, jax.device_put(state, shardings))


def count_params(model: nnx.Module, what=nnx.Param) -> int:
  """Number of scalars in the variables the nnx filter ``what`` selects (default: every
  ``nnx.Param``, buffers excluded; `vap_jax.models.common.TRAINABLE` for what VAP trains)."""
  return sum(math.prod(var.shape) for _, var in nnx.to_flat_state(nnx.state(model, what)))
