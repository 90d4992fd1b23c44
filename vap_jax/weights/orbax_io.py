"""Orbax checkpoints of model state, written tensor-group by tensor-group and restored sharded.

Layout of a converted folder (format 2)::

    dst/config.json   the model config (diffusers field names + what produced it), format_version
    dst/state/        an Orbax PyTree checkpoint: nested dict of the NNX state, string keys; a
                      stacked variable (leading layer axis) is stored one layer per leaf, under
                      its path plus the layer number ('blocks/attn1/to_q/kernel/7')

Conversion never holds the model in host memory: tensors stream from safetensors into Orbax
partial saves of at most ``group_bytes`` each. Restoring reads every array straight onto its
sharding on the mesh, a stacked variable one layer at a time into its preallocated stack, so
neither host nor device ever holds a second copy of the model. Format 1 (before stacked layers)
stored per-block paths ('blocks/7/base/...'); such folders must be converted again.
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
from vap_jax.weights import integrity, keymap as km
from vap_jax.weights.loading import SlotWriter, abstract_model, fill
from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint

log = logging.getLogger(__name__)

STATE_DIR = 'state'
CONFIG_FILE = 'config.json'
FORMAT_VERSION = 2


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


def _key(slot: km.Slot) -> tuple[str, ...]:
  path, layer = slot
  return tuple(str(p) for p in path) + (() if layer is None else (str(layer),))


def _nest(flat: dict[km.Slot, object]) -> dict:
  tree: dict = {}
  for slot, value in flat.items():
    key = _key(slot)
    node = tree
    for part in key[:-1]:
      node = node.setdefault(part, {})
    node[key[-1]] = value
  return tree


def _unnest(tree: dict, slots) -> dict[km.Slot, object]:
  out = {}
  for slot in slots:
    node = tree
    for part in _key(slot):
      node = node[part]
    out[slot] = node
  return out


def write_config(dst: str | Path, config: dict) -> None:
  """Write ``dst/config.json`` atomically: its presence marks a finished conversion, so a kill
  while writing must leave none rather than a cut one."""
  Path(dst).mkdir(parents=True, exist_ok=True)
  config = {**config, 'format_version': FORMAT_VERSION}
  tmp = Path(dst) / (CONFIG_FILE + '.tmp')
  tmp.write_text(json.dumps(config, indent=1, sort_keys=True))
  tmp.replace(Path(dst) / CONFIG_FILE)


def read_config(src: str | Path) -> dict:
  path = Path(src) / CONFIG_FILE
  if not path.is_file():
    raise CheckpointError(f'{src} is not a vap_jax checkpoint folder: {CONFIG_FILE} is missing')
  return json.loads(path.read_text())


def convert_safetensors(checkpoint: SafetensorsCheckpoint, keymap: km.KeyMap,
                        factory: Callable[[], nnx.Module], dst: str | Path, *,
                        group_bytes: int | None = None, overwrite: bool = False,
                        progress: bool = True, slot_of: Callable | None = None) -> int:
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
  # A killed conversion leaves Orbax partial saves ('state.partial_save', its '.orbax-checkpoint-
  # tmp' twin): Orbax refuses to add the same keys to them, and they are never a finished state.
  for leftover in target.parent.glob(target.name + '.partial_save*'):
    shutil.rmtree(leftover)
  _, state = nnx.split(abstract_model(factory))
  the_plan = km.plan(checkpoint, keymap, state, slot_of)
  sizes = {slot: int(np.prod(shape)) * dtype.itemsize
           for slot, (shape, dtype) in km.slots(state).items()}
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

  for slot, array in km.stream(checkpoint, the_plan, state):
    if group and group_size + sizes[slot] > group_bytes:
      flush()
    group[slot] = array
    group_size += sizes[slot]
    written += 1
    if bar is not None:
      bar.update(sizes[slot])
  flush()
  ocp.partial.finalize(target)
  if bar is not None:
    bar.close()
  log.info('wrote %d tensors to %s', written, target)
  return written


def save_model(model: nnx.Module, dst: str | Path, *, overwrite: bool = False) -> None:
  """Save a live model's state in the layout `restore_model` reads (its config.json is the
  caller's: `write_config`)."""
  target = Path(dst).absolute() / STATE_DIR
  if target.exists() and overwrite:
    shutil.rmtree(target)
  flat = {}
  for path, var in km.flat_variables(nnx.state(model)).items():
    if km.is_stacked(var):
      flat.update({(path, layer): var[layer] for layer in range(var.shape[0])})
    else:
      flat[path, None] = var[...]
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    _ocp().save_pytree(target, _nest(flat))


def check_format(src: str | Path) -> None:
  """A converted folder must be of this version's layout (format 2: stacked layers)."""
  config_file = Path(src) / CONFIG_FILE
  found = json.loads(config_file.read_text()).get('format_version', 1) if config_file.is_file() else None
  if found is not None and found != FORMAT_VERSION:
    raise CheckpointError(
        f'{src} was converted by an older vap_jax (folder format {found}; this version reads '
        f'format {FORMAT_VERSION}, which stores each block\'s layers stacked): convert it again '
        f'with vap-convert ... --overwrite')


def _recorded_files(src: str | Path) -> dict | None:
  """The size and sha256 records `vap-convert` wrote in ``src``'s config, if any."""
  return read_config(src).get('files') if (Path(src) / CONFIG_FILE).is_file() else None


def _check_stored(src: str | Path, target: Path, slots, files) -> None:
  """The Orbax checkpoint at ``target`` holds exactly the model's slots (``files``: the size
  and sha256 records of ``src``, to tell a damaged file from a different model)."""
  stored = set()

  def walk(node, prefix=()):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, prefix + (k,))
    else:
      stored.add(prefix)
  try:
    walk(_ocp().metadata(target).metadata)
  except Exception as e:  # noqa: BLE001 - any Orbax/tensorstore read failure
    raise _read_failure(src, files, e) from None
  wanted = {_key(slot) for slot in slots}
  if stored != wanted:
    integrity.check(src, files, full=True)  # a damaged metadata file reads as other keys
    missing = sorted('/'.join(p) for p in wanted - stored)
    extra = sorted('/'.join(p) for p in stored - wanted)
    raise CheckpointError(f'Orbax checkpoint {target} does not match the model: '
                          f'missing {missing[:20]}, unexpected {extra[:20]}')


def slot_reader(src: str | Path, state: nnx.State
                ) -> Callable[[list[km.Slot]], dict[km.Slot, np.ndarray]]:
  """``read(slots)``: those slots of ``src/state`` as host arrays in their stored dtype, loaded
  together and nothing else (export streams a converted folder this way, a group of tensors at a
  time: the host never holds the model). Each load has a fixed cost (~40 ms on a tiny model,
  growing with the tree), so callers read groups rather than single tensors."""
  check_format(src)
  target = Path(src).absolute() / STATE_DIR
  if not target.is_dir():
    raise CheckpointError(f'{src} has no Orbax state folder {STATE_DIR}/')
  files = _recorded_files(src)
  integrity.check(src, files)
  slots = km.slots(state)
  _check_stored(src, target, slots, files)
  ocp = _ocp()
  placeholders = jax.tree.map(lambda _: ocp.PLACEHOLDER, _nest({s: 0 for s in slots}))
  host = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])

  def read(wanted: list[km.Slot]) -> dict[km.Slot, np.ndarray]:
    specs = {s: jax.ShapeDtypeStruct(slots[s][0], slots[s][1], sharding=host) for s in wanted}
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      tree = ocp.load_pytree(target, _merge(placeholders, _nest(specs)))
    out = {s: np.asarray(v) for s, v in _unnest(tree, wanted).items()}
    del tree
    _release_freed_memory()  # Orbax's reader threads keep freed buffers otherwise
    return out
  return read


def restore_model(factory: Callable[[], nnx.Module], src: str | Path, *, mesh: Mesh | None = None,
                  rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Restore ``src/state`` into the model ``factory`` builds, each array on its mesh sharding;
  stacked variables layer by layer into their preallocated stacks."""
  check_format(src)
  target = Path(src).absolute() / STATE_DIR
  if not target.is_dir():
    raise CheckpointError(f'{src} has no Orbax state folder {STATE_DIR}/')
  files = _recorded_files(src)
  integrity.check(src, files)  # a missing or cut file, before anything is read
  graphdef, state = nnx.split(abstract_model(factory))
  writer = SlotWriter(state, mesh, rules)
  slots = km.slots(state)
  ocp = _ocp()
  _check_stored(src, target, slots, files)

  def spec(slot):
    sharding = writer.sharding(slot)
    if not isinstance(sharding, jax.sharding.Sharding):
      sharding = jax.sharding.SingleDeviceSharding(sharding)
    shape, dtype = slots[slot]
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  # One load for the unstacked variables, then one per layer number: at most one layer of every
  # stack is in flight beside the stacks themselves.
  groups: dict = {}
  for slot in slots:
    groups.setdefault(slot[1], []).append(slot)
  for layer, group in sorted(groups.items(), key=lambda item: -1 if item[0] is None else item[0]):
    abstract = jax.tree.map(lambda _: ocp.PLACEHOLDER, _nest({s: 0 for s in slots}))
    wanted_here = _nest({s: spec(s) for s in group})
    try:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        tree = ocp.load_pytree(target, _merge(abstract, wanted_here))
    except Exception as e:  # noqa: BLE001 - any Orbax/tensorstore read failure
      raise _read_failure(src, files, e) from None
    for slot, value in _unnest(tree, group).items():
      writer.put(slot, value)
  return fill(graphdef, state, writer.values)


def _read_failure(src, files: dict | None, error: Exception) -> CheckpointError:
  """A failed read as one line. Orbax's own message is a long tensorstore spec; the checksums
  recorded at conversion name the damaged file (`integrity.check` raises with it)."""
  integrity.check(src, files, full=True)
  first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
  return CheckpointError(f'cannot read the Orbax state {Path(src) / STATE_DIR}: {first}')


def _merge(base: dict, update: dict) -> dict:
  """``base`` with the leaves of ``update`` written over it (nested dicts)."""
  out = dict(base)
  for key, value in update.items():
    out[key] = _merge(base[key], value) if isinstance(value, dict) else value
  return out
