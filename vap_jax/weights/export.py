"""Export VAP transformers to the diffusers (PyTorch) layout, alone or as a whole pipeline folder.

  export(model, 'out/transformer')                 # a live model, any dtype, sharded or not
  export_pipeline(model, 'out/vap', components_from='Video-As-Prompt-CogVideoX-5B')
  export_folder('ckpt/cogvideox_vap', 'out/vap')   # vap-export: streams from a checkpoint folder

A transformer folder is what diffusers' ``save_pretrained`` writes::

    config.json                                           _class_name, every architecture field
    diffusion_pytorch_model-0000k-of-0000n.safetensors    shards of at most max_shard_size
    diffusion_pytorch_model.safetensors.index.json        {"metadata": {"total_size"}, "weight_map"}

(one shard is ``diffusion_pytorch_model.safetensors`` without an index, as diffusers names it).
Key names come from the production key maps run backwards (`KeyMap.key_of`), transforms undone
(linear kernels transposed back, patch embeddings back to conv kernels), expert slots renumbered
to their checkpoint blocks (`checkpoint_blocks`). ``config.json`` is the config's `to_source`:
``CogVideoXTransformer3DMOTModel`` / ``WanTransformer3DMOTModel`` with ``block_idx_with_mot_ref``
for a VAP model, the PyPI base class for a model without an expert.

Host memory: the safetensors headers are written from the shapes first, then each tensor (one
layer of a stack) is gathered, cast, transformed and appended on its own, so the host holds one
tensor, never the model. Arrays sharded over several processes are gathered one slice at a time
by every process (a collective); only process 0 writes. The folder is built under a temporary
name and renamed when complete, so an interrupted export never looks finished.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from vap_jax.models.cogvideox import CogVideoXTransformer
from vap_jax.models.stack import checkpoint_blocks, checkpoint_slots
from vap_jax.models.wan import WanTransformer
from vap_jax.weights import checkpoint as ckpt, cogvideox, component, keymap as km, orbax_io, wan
from vap_jax.weights.component import ModelSpec
from vap_jax.weights.loading import MANIFEST, MODEL_INDEX, abstract_model
from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint

log = logging.getLogger(__name__)

WEIGHTS = 'diffusion_pytorch_model'
INDEX = f'{WEIGHTS}.safetensors.index.json'
DEFAULT_MAX_SHARD = '10GB'  # diffusers' save_pretrained default
# The diffusers version the official VAP code is built on; its configs record it.
DIFFUSERS_VERSION = '0.34.0.dev0'
DTYPES = {'bfloat16': (ml_dtypes.bfloat16, 'BF16'), 'float32': (np.float32, 'F32'),
          'float16': (np.float16, 'F16')}
_UNITS = {'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12}  # decimal, as huggingface_hub


@dataclasses.dataclass(frozen=True)
class Family:
  """What export needs of a transformer family."""
  name: str
  spec: ModelSpec                                 # reads its folders (export_folder)
  keymap: km.KeyMap                               # its diffusers names, run backwards
  kernel: Callable[[Any], tuple[int, ...]]        # config -> patch-embedding conv kernel


FAMILIES = {
    'cogvideox': Family('cogvideox', cogvideox.SPEC, cogvideox.COGVIDEOX,
                        lambda c: (c.patch_size, c.patch_size)),
    'wan': Family('wan', wan.SPEC, wan.WAN, lambda c: tuple(c.patch_size)),
}
_MODEL_FAMILY = {CogVideoXTransformer: 'cogvideox', WanTransformer: 'wan'}


def family_of(model: nnx.Module) -> Family:
  for cls, name in _MODEL_FAMILY.items():
    if isinstance(model, cls):
      return FAMILIES[name]
  raise ValueError(f'cannot export a {type(model).__name__}: only CogVideoX and Wan (VAP) '
                   'transformers are exported')


def parse_size(size: int | str) -> int:
  """Bytes from an int or a string like '10GB', '500MB' (decimal units, as diffusers reads them)."""
  if isinstance(size, int):
    value = size
  else:
    m = re.fullmatch(r'\s*([0-9.]+)\s*([KMGT]B)\s*', str(size).upper())
    if m is None:
      raise ValueError(f'max shard size {size!r}: expected bytes or a number with KB, MB, GB or '
                       'TB (e.g. 10GB)')
    value = int(float(m.group(1)) * _UNITS[m.group(2)])
  if value <= 0:
    raise ValueError(f'max shard size {size!r} must be positive')
  return value


def diffusers_config(config) -> dict[str, Any]:
  """The ``config.json`` an exported transformer gets (see the model config's ``to_source``)."""
  return {**config.to_source(), '_diffusers_version': DIFFUSERS_VERSION}


# ------------------------------------------------------------------------------------ the plan


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One checkpoint tensor: its key, the model slot it comes from and how to undo the transform."""
  key: str
  slot: km.Slot
  transform: km.Transform
  shape: tuple[int, ...]  # in the checkpoint


def _natural(key: str) -> list:
  """Sort key: block 2 before block 10, as the state dict lists them."""
  return [int(p) if p.isdigit() else p for p in re.split(r'(\d+)', key)]


def plan(family: Family, config, state: nnx.State) -> list[Tensor]:
  """Every slot of the model as a checkpoint tensor, in checkpoint order; checked both ways."""
  block_of = checkpoint_blocks(config.block_idx_with_mot_ref)
  kernel = family.kernel(config)
  tensors, seen = [], {}
  for slot, (shape, _) in km.slots(state).items():
    path, layer = slot
    key, transform = family.keymap.key_of(path, None if layer is None else block_of(path, layer))
    if key in seen:
      raise CheckpointError(f'{km.slot_name(seen[key])} and {km.slot_name(slot)} both export '
                            f'as {key}')
    seen[key] = slot
    source = tuple(transform.inverse_shape(shape, kernel))
    if tuple(transform.shape(source)) != tuple(shape):  # the inverse really inverts
      raise CheckpointError(f'{key}: {transform.name} of {source} gives {transform.shape(source)}, '
                            f'not the model shape {shape}')
    tensors.append(Tensor(key, slot, transform, source))
  return sorted(tensors, key=lambda t: _natural(t.key))


def split(tensors: list[Tensor], itemsize: int, max_bytes: int) -> list[list[Tensor]]:
  """Consecutive tensors in groups of at most ``max_bytes`` (a larger tensor gets its own)."""
  out, size = [[]], 0
  for t in tensors:
    nbytes = math.prod(t.shape) * itemsize
    if out[-1] and size + nbytes > max_bytes:
      out.append([])
      size = 0
    out[-1].append(t)
    size += nbytes
  return out


def shard_names(count: int) -> list[str]:
  if count == 1:
    return [f'{WEIGHTS}.safetensors']
  return [f'{WEIGHTS}-{k:05d}-of-{count:05d}.safetensors' for k in range(1, count + 1)]


# ------------------------------------------------------------------------------------- sources
# A source reads a group of slots: ``read(slots, dtype)`` yields each as a numpy array in the
# model's layout, cast to dtype. The writer asks for groups of at most a few tensors' bytes.
Source = Callable[[list[km.Slot], Any], Iterator[np.ndarray]]


def to_host(value: jax.Array) -> np.ndarray:
  """A device array as one host array: gathered over processes if it spans several."""
  if value.is_fully_addressable:
    return np.asarray(jax.device_get(value))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def model_source(model: nnx.Module) -> Source:
  """Slots of a live model, one at a time: a layer of a stack is sliced and cast on device, then
  gathered to the host."""
  variables = km.flat_variables(nnx.state(model))

  def read(slots: list[km.Slot], dtype) -> Iterator[np.ndarray]:
    for path, layer in slots:
      value = variables[path][...]
      if layer is not None:
        value = value[layer]
      yield to_host(value.astype(dtype))
  return read


def folder_source(family: Family, folder: Path, config, state: nnx.State) -> Source:
  """Slots of a checkpoint folder: converted (Orbax, one load per group) or diffusers/original
  safetensors (one tensor at a time)."""
  if component.has_orbax_state(folder):
    load = orbax_io.slot_reader(folder, state)

    def read_orbax(slots, dtype):
      loaded = load(slots)
      for slot in slots:
        yield loaded.pop(slot).astype(dtype, copy=False)
    return read_orbax
  _, keymap = family.spec.read_source(folder)
  checkpoint = SafetensorsCheckpoint(folder)
  entries = km.plan(checkpoint, keymap, state, checkpoint_slots(config.block_idx_with_mot_ref)
                    ).entries
  return lambda slots, dtype: (km.read(checkpoint, entries[slot], dtype) for slot in slots)


# ------------------------------------------------------------------------------------- writing


def _is_writer() -> bool:
  return jax.process_index() == 0


def _write_safetensors(file: Path, tensors: list[Tensor], dtype_name: str, itemsize: int,
                       arrays: Callable[[list[Tensor]], Iterator[np.ndarray]], read_bytes: int,
                       bar=None) -> None:
  """One safetensors file, streamed: the header from the planned shapes, then each tensor's
  bytes in order, read in groups of at most ``read_bytes``
  (https://github.com/huggingface/safetensors, format section)."""
  header, offset = {'__metadata__': {'format': 'pt'}}, 0
  for t in tensors:
    nbytes = math.prod(t.shape) * itemsize
    header[t.key] = {'dtype': dtype_name, 'shape': list(t.shape),
                     'data_offsets': [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # the data starts 8-byte aligned
  out = open(file, 'wb') if _is_writer() else None
  try:
    if out:
      out.write(struct.pack('<Q', len(blob)) + blob)
    for group in split(tensors, itemsize, read_bytes):
      for data in arrays(group):  # every process gathers; one writes
        if out:
          out.write(memoryview(data.reshape(-1).view(np.uint8)))  # little-endian hosts only
        if bar is not None:
          bar.update(data.nbytes)
  finally:
    if out:
      out.close()


def _write_transformer(family: Family, config, state: nnx.State, read: Source, dst: Path, *,
                       dtype: str, max_shard_size: int | str, progress: bool) -> dict:
  """Write the transformer folder ``dst`` (which must not exist) from ``read``."""
  if dtype not in DTYPES:
    raise ValueError(f'export dtype {dtype!r} is not one of {sorted(DTYPES)}')
  np_dtype, dtype_name = DTYPES[dtype]
  itemsize = np.dtype(np_dtype).itemsize
  tensors = plan(family, config, state)
  groups = split(tensors, itemsize, parse_size(max_shard_size))
  names = shard_names(len(groups))
  kernel = family.kernel(config)
  sizes = [math.prod(t.shape) * itemsize for t in tensors]
  total, read_bytes = sum(sizes), max(sizes)  # reads: a few tensors at a time

  def arrays(group: list[Tensor]) -> Iterator[np.ndarray]:
    for t, value in zip(group, read([t.slot for t in group], np_dtype)):
      data = np.ascontiguousarray(t.transform.inverse(value, kernel))
      if data.shape != t.shape or data.dtype != np_dtype:  # a source that does not fit the plan
        raise CheckpointError(f'{t.key}: got {data.dtype} {data.shape}, planned {dtype} {t.shape}')
      yield data

  bar = None
  if progress and _is_writer():
    from tqdm import tqdm
    bar = tqdm(total=total, unit='B', unit_scale=True,
               desc=f'exporting the {family.name} transformer')
  if _is_writer():
    dst.mkdir(parents=True)
  for name, group in zip(names, groups):
    _write_safetensors(dst / name, group, dtype_name, itemsize, arrays, read_bytes, bar)
  if bar is not None:
    bar.close()
  if _is_writer():
    if len(names) > 1:
      weight_map = {t.key: name for name, group in zip(names, groups) for t in group}
      (dst / INDEX).write_text(json.dumps({'metadata': {'total_size': total},
                                           'weight_map': weight_map}, indent=2, sort_keys=True))
    (dst / 'config.json').write_text(
        json.dumps(diffusers_config(config), indent=2, sort_keys=True) + '\n')
  log.info('exported %d tensors (%d shards, %.1f MB %s) to %s', len(tensors), len(names),
           total / 1e6, dtype, dst)
  return dict(family=family.name, tensors=len(tensors), shards=len(names), bytes=total,
              dtype=dtype, experts=list(config.block_idx_with_mot_ref))


class _Output:
  """``dst`` built under a temporary sibling and moved into place when complete. An existing
  ``dst`` is replaced only with ``overwrite``, and only if it is an earlier export."""

  def __init__(self, dst: str | Path, overwrite: bool, sources: list[Path]):
    self.dst = Path(dst).absolute()
    for src in sources:
      src = src.resolve()
      dst_real = self.dst.resolve()
      if src == dst_real or src.is_relative_to(dst_real) or dst_real.is_relative_to(src):
        raise ValueError(f'output {self.dst} overlaps the input {src}: pick another folder')
    if self.dst.exists() and not (self.dst.is_dir() and not any(self.dst.iterdir())):
      if not overwrite:
        raise FileExistsError(f'{self.dst} exists; pass overwrite=True (--overwrite) to replace it')
      if not _is_export(self.dst):
        raise FileExistsError(f'{self.dst} is not an earlier export (no transformer config.json '
                              f'or {MODEL_INDEX}): refusing to replace it')
    self.tmp = self.dst.with_name(f'.{self.dst.name}.exporting')

  def __enter__(self) -> Path:
    if _is_writer():
      if self.tmp.exists():
        shutil.rmtree(self.tmp)  # a previous export that was interrupted
      self.tmp.parent.mkdir(parents=True, exist_ok=True)
    return self.tmp

  def __exit__(self, kind, *_):
    if _is_writer():
      if kind is not None:
        shutil.rmtree(self.tmp, ignore_errors=True)
      else:
        if self.dst.exists():
          shutil.rmtree(self.dst)
        self.tmp.rename(self.dst)
    if kind is None and jax.process_count() > 1:  # no process returns before the folder is there
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'export {self.dst}')


def _is_export(folder: Path) -> bool:
  """A transformer folder or pipeline folder of the diffusers layout (what export writes)."""
  if (folder / MODEL_INDEX).is_file():
    return True
  try:
    name = json.loads((folder / 'config.json').read_text()).get('_class_name', '')
  except (OSError, json.JSONDecodeError):
    return False
  return name.startswith(('CogVideoXTransformer3D', 'WanTransformer3D'))


# ------------------------------------------------------------------------------- pipeline folders


def diffusers_components(path: str | Path) -> Path:
  """The diffusers pipeline folder that gives an exported pipeline its other components:
  ``path`` itself, or for a converted folder the download it was converted from (its VAE and
  encoders are Orbax there, which PyTorch cannot read)."""
  path = Path(path)
  if ckpt.is_converted_pipeline(path):
    source = Path(ckpt.read_manifest(path).get('source', ''))
    if not (source / MODEL_INDEX).is_file():
      raise CheckpointError(f'{path} is a converted folder: its VAE and encoders are Orbax, which '
                            f'PyTorch cannot read, and the download it was converted from '
                            f'({source}) is gone; pass the original diffusers folder')
    path = source
  ckpt.check_components(path)
  return path


def _model_index(components: Path, family: Family, config) -> dict:
  """``components``' model_index.json naming the VAP pipeline and transformer (or the base ones
  for a model without an expert)."""
  index = json.loads((components / MODEL_INDEX).read_text())
  experts = bool(config.block_idx_with_mot_ref)
  pipelines = [name for name, f in ckpt.PIPELINE_CLASSES.items() if f == family.name]
  index['_class_name'] = next(p for p in pipelines if ('MOT' in p) == experts)
  library = (index.get('transformer') or ['diffusers'])[0]
  index['transformer'] = [library, config.to_source()['_class_name']]
  return index


def _add_components(dst: Path, components: Path, family: Family, config,
                    link: bool) -> list[str]:
  """Copy (or symlink) every component but the transformer, and write model_index.json."""
  names = [n for n in ckpt.COMPONENTS[family.name] if n != 'transformer']
  for name in names:
    src = (components / name).resolve()
    if link:
      os.symlink(src, dst / name, target_is_directory=True)
    else:
      shutil.copytree(src, dst / name)
  index = _model_index(components, family, config)
  (dst / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + '\n')
  return names


# ------------------------------------------------------------------------------------ public API


def export(model: nnx.Module, dst: str | Path, *, dtype: str = 'bfloat16',
           max_shard_size: int | str = DEFAULT_MAX_SHARD, overwrite: bool = False,
           progress: bool = False) -> dict:
  """Write a live CogVideoX/Wan(-VAP) ``model`` as a diffusers transformer folder ``dst`` in
  ``dtype`` (bfloat16, float32 or float16). Returns a summary (family, tensors, shards, bytes).

  Under several processes every process must call it (slices are gathered collectively); only
  process 0 writes.
  """
  family = family_of(model)
  with _Output(dst, overwrite, []) as tmp:
    return _write_transformer(family, model.config, nnx.state(model), model_source(model), tmp,
                              dtype=dtype, max_shard_size=max_shard_size, progress=progress)


def export_pipeline(model: nnx.Module, dst: str | Path, components_from: str | Path, *,
                    link: bool = False, dtype: str = 'bfloat16',
                    max_shard_size: int | str = DEFAULT_MAX_SHARD, overwrite: bool = False,
                    progress: bool = False) -> dict:
  """Write ``model`` as the transformer of a whole diffusers pipeline folder ``dst``; the other
  components (VAE, encoders, tokenizer, scheduler, ...) are copied, or symlinked with ``link``,
  from ``components_from`` (a diffusers download, or a converted folder whose download still
  exists). The official PyTorch pipeline and vap-generate read the result."""
  family = family_of(model)
  components = diffusers_components(components_from)
  _check_family(components, family)
  with _Output(dst, overwrite, [components]) as tmp:
    summary = _write_transformer(family, model.config, nnx.state(model), model_source(model),
                                 tmp / 'transformer', dtype=dtype, max_shard_size=max_shard_size,
                                 progress=progress)
    if _is_writer():
      summary['components'] = _add_components(tmp, components, family, model.config, link)
  return summary


def _check_family(components: Path, family: Family) -> None:
  found = ckpt.detect_family(components)
  if found != family.name:
    raise CheckpointError(f'{components} is a {found} pipeline, the model is {family.name}')


def transformer_family(path: str | Path) -> tuple[Family, Path]:
  """The family of the transformer in ``path`` (any layout the loaders take) and its folder."""
  path = Path(path)
  if not path.exists():
    raise CheckpointError(f'{path} does not exist')
  if (path / MANIFEST).is_file() or (path / MODEL_INDEX).is_file():
    family = FAMILIES[ckpt.detect_family(path)]
    return family, family.spec.folder(path)
  if component.has_orbax_state(path):
    model = orbax_io.read_config(path).get('model')
    if model in FAMILIES:
      return FAMILIES[model], path
    raise CheckpointError(f'{path} holds a converted {model!r} model, not a CogVideoX or Wan '
                          'transformer')
  problems = []
  for family in FAMILIES.values():
    try:
      family.spec.read_source(path)
      return family, path
    except CheckpointError as e:
      problems.append(str(e))
  raise CheckpointError(f'{path} is not a CogVideoX or Wan transformer folder ({problems[-1]})')


def export_folder(src: str | Path, dst: str | Path, *, components_from: str | Path | None = None,
                  transformer_only: bool = False, link: bool = False, dtype: str = 'bfloat16',
                  max_shard_size: int | str = DEFAULT_MAX_SHARD, overwrite: bool = False,
                  progress: bool = False) -> dict:
  """Export the transformer of checkpoint ``src`` (converted or diffusers, pipeline root or
  transformer folder) without building the model: tensors stream one at a time from ``src``.

  A pipeline ``src`` gives a whole pipeline folder, its other components from ``src`` (for a
  converted one, from the download it was converted from) or ``components_from``; a transformer
  ``src`` gives a transformer folder, unless ``components_from`` is given. ``transformer_only``
  writes only the transformer folder.
  """
  src = Path(src)
  family, folder = transformer_family(src)
  if components_from is None and not transformer_only and (
      (src / MANIFEST).is_file() or (src / MODEL_INDEX).is_file()):
    components_from = src
  components = None
  if components_from is not None and not transformer_only:
    components = diffusers_components(components_from)
    _check_family(components, family)
  raw = component.source_config(family.spec, folder)
  param_dtype = (orbax_io.read_config(folder).get('param_dtype', 'float32')
                 if component.has_orbax_state(folder) else 'float32')
  config = family.spec.make_config(raw, dtype=param_dtype, param_dtype=param_dtype)
  _, state = nnx.split(abstract_model(family.spec.factory(config)))
  read = folder_source(family, folder, config, state)
  out = _Output(dst, overwrite, [folder] + ([components] if components else []))
  with out as tmp:
    target = tmp if components is None else tmp / 'transformer'
    summary = _write_transformer(family, config, state, read, target, dtype=dtype,
                                 max_shard_size=max_shard_size, progress=progress)
    if components is not None:
      summary['components'] = _add_components(tmp, components, family, config, link)
  return summary
