"""Load or convert one model component, whatever folder it comes in, driven by a `ModelSpec`.

Every network beside the pipelines (transformer, vae, text_encoder, image_encoder) is read the
same way; its spec says what differs: the folder it has in a pipeline, how its source config is
read and checked, how that config becomes our model config, and the key map of its tensors.
`load` and `convert` accept any of four layouts (``sub`` = ``spec.subfolder``)::

    diffusers pipeline root   root/model_index.json + root/sub/config.json + *.safetensors
    diffusers component       folder/config.json + *.safetensors (one file or shards + index)
    converted pipeline root   root/manifest.json + root/sub/{config.json, state/}  (vap-convert)
    converted component       folder/config.json + folder/state/                    (Orbax)

A converted ``config.json`` holds ``model`` (the spec name), ``param_dtype``, ``source`` and
``source_config`` (the source config.json, diffusers or transformers field names) and ``files``
(size and sha256 of every file of ``state/``, `vap_jax.weights.integrity`); folders written
before ``source_config`` existed stored it as ``diffusers_config`` / ``hf_config`` and still load.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from flax import nnx
from jax.sharding import Mesh

from vap_jax.models.stack import checkpoint_slots
from vap_jax.parallel import DEFAULT_RULES
from vap_jax.parallel.sharding import Rules
from vap_jax.weights import integrity, keymap as km, orbax_io
from vap_jax.weights.keymap import KeyMap
from vap_jax.weights.loading import component_dir, load_model
from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint

_LEGACY_CONFIG_KEYS = ('diffusers_config', 'hf_config')


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What one kind of component needs to be loaded and converted."""
  name: str             # recorded as "model" in a converted config.json
  subfolder: str        # its folder in a pipeline: transformer, vae, text_encoder, image_encoder
  read_source: Callable[[Path], tuple[dict, KeyMap]]  # component folder -> (checked config, key map)
  make_config: Callable[..., Any]       # (source config, **runtime) -> model config
  make_model: Callable[..., nnx.Module]  # (model config, *, rngs) -> model

  def factory(self, config, seed: int = 0) -> Callable[[], nnx.Module]:
    return lambda: self.make_model(config, rngs=nnx.Rngs(seed))

  def folder(self, path: str | Path) -> Path:
    """The component folder of ``path`` in any of the four layouts."""
    return component_dir(Path(path), self.subfolder)


def read_json_config(folder: Path, expected: str) -> dict:
  """``folder/config.json`` as a dict; ``expected`` names the folder kind for the error."""
  config_file = folder / orbax_io.CONFIG_FILE
  if not config_file.is_file():
    raise CheckpointError(f'{folder} has no config.json (expected {expected})')
  try:
    return json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{config_file} is not valid JSON: {e}') from e


def has_orbax_state(folder: str | Path) -> bool:
  """True for a converted component folder (one that holds an Orbax `state/`)."""
  return (Path(folder) / orbax_io.STATE_DIR).is_dir()


def converted_config(spec: ModelSpec, folder: Path) -> dict:
  """The source config stored in a converted folder, after checking it holds a ``spec`` model."""
  meta = orbax_io.read_config(folder)
  if meta.get('model') != spec.name:
    raise CheckpointError(f'{folder} holds a converted {meta.get("model")!r} model, not '
                          f'{spec.name!r}')
  for key in ('source_config', *_LEGACY_CONFIG_KEYS):
    if key in meta:
      return meta[key]
  raise CheckpointError(f'{folder / orbax_io.CONFIG_FILE} has no source_config')


def _read_source(spec: ModelSpec, folder: Path) -> tuple[dict, KeyMap]:
  try:
    return spec.read_source(folder)
  except CheckpointError:
    raise
  except (KeyError, TypeError, ValueError) as e:  # e.g. an original Wan config's missing field
    raise _config_error(folder, e) from None


def model_config(spec: ModelSpec, raw: dict, folder: Path, **runtime):
  """``spec.make_config(raw, **runtime)``; a field of the wrong type, a missing size field or an
  unsupported value is a `CheckpointError` naming ``folder/config.json``."""
  try:
    return spec.make_config(raw, **runtime)
  except (KeyError, TypeError, ValueError) as e:
    raise _config_error(folder, e) from None


def _config_error(folder: Path, error: Exception) -> CheckpointError:
  what = f'field {error} is missing' if isinstance(error, KeyError) else str(error)
  return CheckpointError(f'{Path(folder) / orbax_io.CONFIG_FILE}: {what}')


def source_config(spec: ModelSpec, path: str | Path) -> dict:
  """The component's source config (diffusers/transformers names) in either layout."""
  folder = spec.folder(path)
  return converted_config(spec, folder) if has_orbax_state(folder) else _read_source(spec, folder)[0]


def check_config(spec: ModelSpec, path: str | Path) -> None:
  """Build the component's model config (no weights): a bad config.json fails here, in one line,
  before anything is loaded."""
  model_config(spec, source_config(spec, path), spec.folder(path))


def load(spec: ModelSpec, path: str | Path, *, mesh: Mesh | None = None,
         rules: Rules = DEFAULT_RULES, progress: bool = False, **runtime) -> nnx.Module:
  """The ``spec`` model from ``path`` (any layout), each array placed on its ``mesh`` sharding.

  ``runtime`` goes to ``spec.make_config`` (dtype, param_dtype, attention, tiling, ...).
  """
  folder = spec.folder(path)
  if has_orbax_state(folder):
    orbax_io.check_format(folder)
    config = model_config(spec, converted_config(spec, folder), folder, **runtime)
    return orbax_io.restore_model(spec.factory(config), folder, mesh=mesh, rules=rules)
  raw, keymap = _read_source(spec, folder)
  config = model_config(spec, raw, folder, **runtime)
  return load_model(spec.factory(config), SafetensorsCheckpoint(folder), keymap, mesh=mesh,
                    rules=rules, progress=progress, slot_of=_slot_of(config))


def _slot_of(config):
  """How a checkpoint's block numbers map to the stack slots of a VAP transformer (None for
  models without stacked layers)."""
  experts = getattr(config, 'block_idx_with_mot_ref', None)
  return None if experts is None else checkpoint_slots(experts)


def convert_checkpoint(spec: ModelSpec, checkpoint: SafetensorsCheckpoint, raw: dict,
                       keymap: KeyMap, dst: str | Path, *, param_dtype: str = 'bfloat16',
                       group_bytes: int | None = None, overwrite: bool = False,
                       progress: bool = True) -> int:
  """Stream ``checkpoint`` (config ``raw``, names ``keymap``) into ``dst``; config.json last, so
  a folder with one is complete."""
  config = model_config(spec, raw, Path(checkpoint.path), dtype=param_dtype,
                        param_dtype=param_dtype)
  if overwrite:  # an interrupted rewrite must not look complete
    (Path(dst) / orbax_io.CONFIG_FILE).unlink(missing_ok=True)
  count = orbax_io.convert_safetensors(checkpoint, keymap, spec.factory(config), dst,
                                       group_bytes=group_bytes, overwrite=overwrite,
                                       progress=progress, slot_of=_slot_of(config))
  _write_config(spec, dst, param_dtype, str(Path(checkpoint.path).resolve()), raw)
  return count


def _write_config(spec: ModelSpec, dst: str | Path, param_dtype: str, source: str, raw: dict):
  """The converted ``config.json``, written last: its presence marks a finished folder."""
  dst = Path(dst)
  orbax_io.write_config(dst, {'model': spec.name, 'param_dtype': param_dtype, 'source': source,
                              'source_config': raw,
                              'files': integrity.record(dst, dst / orbax_io.STATE_DIR)})


def save(spec: ModelSpec, model: nnx.Module, raw: dict, dst: str | Path, *, param_dtype: str,
         source: str, overwrite: bool = False) -> int:
  """A live ``spec`` model (e.g. a trained one) -> a converted component folder ``dst``, the
  layout `load` reads; ``raw`` is its source config.json dict, ``source`` where it came from.
  Returns the number of arrays written."""
  dst = Path(dst).absolute()
  if (dst / orbax_io.STATE_DIR).exists() and not overwrite:
    raise FileExistsError(f'{dst / orbax_io.STATE_DIR} exists; pass overwrite=True '
                          '(--overwrite) to replace it')
  (dst / orbax_io.CONFIG_FILE).unlink(missing_ok=True)  # a cut rewrite must not look complete
  orbax_io.save_model(model, dst, overwrite=overwrite)
  _write_config(spec, dst, param_dtype, source, raw)
  return len(km.flat_variables(nnx.state(model)))


def convert(spec: ModelSpec, src: str | Path, dst: str | Path, *, param_dtype: str = 'bfloat16',
            group_bytes: int | None = None, overwrite: bool = False, progress: bool = True) -> int:
  """A source component (diffusers pipeline root or component folder) -> converted ``dst``.
  Returns the number of tensors written."""
  folder = spec.folder(src)
  if has_orbax_state(folder):
    raise CheckpointError(f'{folder} is already a converted vap_jax folder')
  raw, keymap = _read_source(spec, folder)
  return convert_checkpoint(spec, SafetensorsCheckpoint(folder), raw, keymap, dst,
                            param_dtype=param_dtype, group_bytes=group_bytes,
                            overwrite=overwrite, progress=progress)
