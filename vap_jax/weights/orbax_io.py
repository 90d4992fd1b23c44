"""Orbax checkpoints of model state, written tensor-group by tensor-group and restored sharded.

Layout of a converted folder::

    dst/config.json   the model config (diffusers field names + what produced it)
    dst/state/        an Orbax PyTree checkpoint: nested dict of the NNX state, string keys

Conversion never holds the model in host memory: tensors stream from safetensors into Orbax
partial saves of at most ``group_bytes`` each. Restoring reads every array straight onto its
sharding on the mesh.
"""
from __future__ import annotations

import ctypes
import gc
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from vap_jax.parallel import DEFAULT_RULES
from vap_jax.parallel.sharding import Rules
from vap_jax.weights import keymap as km
from vap_jax.weights.loading import abstract_model, fill, placement
from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint

log = logging.getLogger(__name__)

STATE_DIR = 'state'
CONFIG_FILE = 'config.json'


def _ocp():
  from orbax.checkpoint.experimental import v1 as ocp  # imported lazily: slow, and noisy
  return ocp


def _release_freed_memory() -> None:
  """Return freed heap to the OS (glibc). Orbax's writer threads free their buffers into per-thread
  malloc arenas that glibc keeps: without this, converter RSS grows with every write (measured:
  +400 MB over a 490 MB checkpoint; with it, flat at one write group)."""
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _nest(flat: dict[km.Path, object]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(str(part), {})
    node[str(path[-1])] = value
  return tree


def _unnest(tree: dict, paths) -> dict[km.Path, object]:
  out = {}
  for path in paths:
    node = tree
    for part in path:
      node = node[str(part)]
    out[path] = node
  return out


def write_config(dst: str | Path, config: dict) -> None:
  Path(dst).mkdir(parents=True, exist_ok=True)
  (Path(dst) / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True))


def read_config(src: str | Path) -> dict:
  path = Path(src) / CONFIG_FILE
  if not path.is_file():
    raise CheckpointError(f'{src} is not a vap_jax checkpoint folder: {CONFIG_FILE} is missing')
  return json.loads(path.read_text())


def convert_safetensors(checkpoint: SafetensorsCheckpoint, keymap: km.KeyMap,
                        factory: Callable[[], nnx.Module], dst: str | Path, *,
                        group_bytes: int | None = None, overwrite: bool = False,
                        progress: bool = True) -> int:
  """Stream a safetensors checkpoint into ``dst/state`` (Orbax), group by group.

  Every tensor is checked against the model first (`keymap.plan`), so a bad checkpoint fails
  before anything is written. ``group_bytes`` bounds the host memory of one write; default 2x the
  largest tensor. Returns the number of tensors written.
  """
  dst = Path(dst).absolute()  # Orbax refuses relative paths
  target = dst / STATE_DIR
  if target.exists():
    if not overwrite:
      raise FileExistsError(f'{target} exists; pass overwrite=True (--overwrite) to replace it')
    shutil.rmtree(target)
  _, state = nnx.split(abstract_model(factory))
  the_plan = km.plan(checkpoint, keymap, state)
  variables = km.flat_variables(state)
  sizes = {p: int(np.prod(variables[p].shape)) * np.dtype(variables[p].dtype).itemsize
           for p in the_plan.entries}
  if group_bytes is None:
    group_bytes = 2 * max(sizes.values())
  ocp = _ocp()
  group, group_size, written = {}, 0, 0
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=sum(sizes.values()), unit='B', unit_scale=True, desc=f'converting to {dst}')

  def flush():
    nonlocal group, group_size
    if group:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ocp.partial.save(target, _nest(group))
      group, group_size = {}, 0
      gc.collect()
      _release_freed_memory()

  for path, array in km.stream(checkpoint, the_plan, state):
    if group and group_size + sizes[path] > group_bytes:
      flush()
    group[path] = array
    group_size += sizes[path]
    written += 1
    if bar is not None:
      bar.update(sizes[path])
  flush()
  ocp.partial.finalize(target)
  if bar is not None:
    bar.close()
  log.info('wrote %d tensors to %s', written, target)
  return written


def save_model(model: nnx.Module, dst: str | Path, *, overwrite: bool = False) -> None:
  """Save a live model's state in the same layout `restore_model` reads."""
  target = Path(dst).absolute() / STATE_DIR
  if target.exists() and overwrite:
    shutil.rmtree(target)
  flat = km.flat_variables(nnx.state(model))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    _ocp().save_pytree(target, _nest({p: v[...] for p, v in flat.items()}))


def restore_model(factory: Callable[[], nnx.Module], src: str | Path, *, mesh: Mesh | None = None,
                  rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Restore ``src/state`` into the model ``factory`` builds, each array on its mesh sharding."""
  target = Path(src).absolute() / STATE_DIR
  if not target.is_dir():
    raise CheckpointError(f'{src} has no Orbax state folder {STATE_DIR}/')
  graphdef, state = nnx.split(abstract_model(factory))
  where = placement(state, mesh, rules)
  variables = km.flat_variables(state)

  def spec(path):
    sharding = where[path]
    if not isinstance(sharding, jax.sharding.Sharding):
      sharding = jax.sharding.SingleDeviceSharding(sharding)
    return jax.ShapeDtypeStruct(variables[path].shape, variables[path].dtype, sharding=sharding)

  ocp = _ocp()
  stored = ocp.metadata(target).metadata
  stored_paths = set()

  def walk(node, prefix=()):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, prefix + (k,))
    else:
      stored_paths.add(prefix)
  walk(stored)
  wanted = {tuple(str(p) for p in path) for path in variables}
  if stored_paths != wanted:
    missing = sorted('.'.join(p) for p in wanted - stored_paths)
    extra = sorted('.'.join(p) for p in stored_paths - wanted)
    raise CheckpointError(f'Orbax checkpoint {target} does not match the model: '
                          f'missing {missing[:20]}, unexpected {extra[:20]}')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    tree = ocp.load_pytree(target, _nest({p: spec(p) for p in variables}))
  return fill(graphdef, state, _unnest(tree, variables))
