"""Build NNX models from checkpoints with bounded host memory.

The model is never materialised on the host: an abstract model (`nnx.eval_shape`) gives shapes,
dtypes and logical axes; each checkpoint tensor is read, transformed, cast and placed directly on
its sharding, then dropped from host memory.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import jax
from flax import nnx
from jax.sharding import Mesh

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


def load_model(factory: Callable[[], nnx.Module], checkpoint: str | SafetensorsCheckpoint,
               keymap: km.KeyMap, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
               progress: bool = False) -> nnx.Module:
  """Stream a safetensors checkpoint into the model that ``factory`` builds, sharded on ``mesh``."""
  if not isinstance(checkpoint, SafetensorsCheckpoint):
    checkpoint = SafetensorsCheckpoint(checkpoint)
  graphdef, state = nnx.split(abstract_model(factory))
  the_plan = km.plan(checkpoint, keymap, state)
  where = placement(state, mesh, rules)
  values = {}
  items = km.stream(checkpoint, the_plan, state)
  if progress:
    from tqdm import tqdm
    items = tqdm(items, total=len(the_plan.entries), desc=f'loading {checkpoint.path}', unit='tensor')
  for path, array in items:
    values[path] = jax.device_put(array, where[path])
    del array
  log.info('loaded %d tensors from %s', len(values), checkpoint.path)
  return fill(graphdef, state, values)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Place an existing model's variables on the mesh according to their logical axes."""
  graphdef, state = nnx.split(model)
  shardings = param_shardings(state, mesh, rules)
  return nnx.merge(graphdef, jax.device_put(state, shardings))


def count_params(model_or_state, *, trainable: Callable | None = None) -> int:
  """Number of nnx.Param scalars (buffers excluded), optionally only where ``trainable(path)``."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
  total = 0
  for path, var in nnx.to_flat_state(state):
    if isinstance(var, nnx.Param) and (trainable is None or trainable(path)):
      total += math.prod(var.shape)
  return total
