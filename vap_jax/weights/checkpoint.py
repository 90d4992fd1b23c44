"""A whole VAP checkpoint folder, downloaded (diffusers layout) or converted (`convert_pipeline`).

diffusers layout (``ByteDance/Video-As-Prompt-CogVideoX-5B`` / ``-Wan2.1-14B``, or the base I2V
pipelines)::

    model_index.json                       _class_name tells the family
    transformer/ vae/ text_encoder/ [image_encoder/]   config.json + *.safetensors
    tokenizer/ scheduler/ [image_processor/]           tokenizer, scheduler and CLIP files

converted layout (``vap-convert``)::

    manifest.json                          format_version, family, components, source, files
                                           (size + sha256 of each copied file), ...
    transformer/ vae/ text_encoder/ [image_encoder/]   config.json + state/ (Orbax, one per model)
    tokenizer/ scheduler/ [image_processor/]           copied as they are

Every model loader (``load_cogvideox``, ``load_wan_vae``, ``load_text_encoder``, ...) takes either
root, or one component folder of either layout. This module names the family, checks that every
component is there, reads the file-only components, and converts a whole folder.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from vap_jax.weights import cogvideox, component, encoders, integrity, orbax_io, vae, wan
from vap_jax.weights.component import ModelSpec
from vap_jax.weights.loading import MANIFEST, MODEL_INDEX
from vap_jax.weights.safetensors_io import CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: stacked layers (see weights/orbax_io.py); 1 read per-block paths
FAMILIES = ('cogvideox', 'wan')
COMPONENTS = {
    'cogvideox': ('transformer', 'vae', 'text_encoder', 'tokenizer', 'scheduler'),
    'wan': ('transformer', 'vae', 'text_encoder', 'image_encoder', 'tokenizer', 'scheduler',
            'image_processor'),
}
# Components that are plain files, and the files they need (any one of each tuple).
FILE_COMPONENTS = {'tokenizer': ('spiece.model', 'tokenizer.json'),
                   'scheduler': ('scheduler_config.json',),
                   'image_processor': ('preprocessor_config.json',)}
# model_index.json _class_name -> family: the VAP pipelines and the base I2V pipelines.
PIPELINE_CLASSES = {
    'CogVideoXImageToVideoMOTPipeline': 'cogvideox', 'CogVideoXImageToVideoPipeline': 'cogvideox',
    'WanImageToVideoMOTPipeline': 'wan', 'WanImageToVideoPipeline': 'wan',
}
# Default parameter dtype of each network when converting; None: the ``dtype`` argument. The
# official pipelines keep the Wan VAE and CLIP in float32 (VAP_SPEC §3.3).
DEFAULT_DTYPES = {'transformer': None, 'text_encoder': None, 'vae': 'float32',
                  'image_encoder': 'float32'}


def model_specs(family: str) -> dict[str, ModelSpec]:
  """component name -> the spec that loads / converts it, for ``family``."""
  if family == 'cogvideox':
    return {'transformer': cogvideox.SPEC, 'vae': vae.COGVIDEOX_SPEC,
            'text_encoder': encoders.T5_SPEC}
  if family == 'wan':
    return {'transformer': wan.SPEC, 'vae': vae.WAN_SPEC, 'text_encoder': encoders.T5_SPEC,
            'image_encoder': encoders.CLIP_SPEC}
  raise ValueError(f'family {family!r} is not one of {FAMILIES}')


def is_converted_pipeline(path: str | Path) -> bool:
  """True for a converted (vap-convert) folder, False for a diffusers one."""
  return (Path(path) / MANIFEST).is_file()


def _read_json(file: Path) -> dict:
  try:
    return json.loads(file.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f'cannot read {file}: {e}') from e


def read_manifest(path: str | Path) -> dict:
  manifest = _read_json(Path(path) / MANIFEST)
  if manifest.get('format_version') != FORMAT_VERSION:
    raise CheckpointError(f'{Path(path) / MANIFEST}: format_version '
                          f'{manifest.get("format_version")!r}, this vap_jax reads {FORMAT_VERSION}: '
                          f'convert the checkpoint again with vap-convert ... --overwrite')
  return manifest


def detect_family(path: str | Path) -> str:
  """'cogvideox' or 'wan', from ``manifest.json`` (converted) or ``model_index.json`` (diffusers)."""
  path = Path(path)
  if is_converted_pipeline(path):
    family = read_manifest(path).get('family')
    if family not in FAMILIES:
      raise CheckpointError(f'{path / MANIFEST}: family {family!r} is not one of {FAMILIES}')
    return family
  if (path / MODEL_INDEX).is_file():
    name = _read_json(path / MODEL_INDEX).get('_class_name')
    if name not in PIPELINE_CLASSES:
      raise CheckpointError(f'{path / MODEL_INDEX}: _class_name {name!r} is not a VAP pipeline '
                            f'(expected one of {sorted(PIPELINE_CLASSES)})')
    return PIPELINE_CLASSES[name]
  if not path.is_dir():
    raise CheckpointError(f'checkpoint folder {path} does not exist')
  hint = (': it looks like one component folder; pass the pipeline folder above it'
          if (path / 'config.json').is_file() else '')
  raise CheckpointError(f'{path} is not a VAP checkpoint folder: it has neither {MODEL_INDEX} '
                        f'(downloaded diffusers layout) nor {MANIFEST} (vap-convert output){hint}')


def _problem(path: Path, name: str, converted: bool) -> str | None:
  """Why component ``name`` of ``path`` is unusable, or None."""
  folder = path / name
  if not folder.is_dir():
    return 'folder missing'
  if name in FILE_COMPONENTS:
    files = FILE_COMPONENTS[name]
    return None if any((folder / f).is_file() for f in files) else f'no {" or ".join(files)}'
  if not (folder / 'config.json').is_file():
    return 'no config.json' + (' (incomplete conversion: re-run vap-convert)' if converted else '')
  if converted and not component.has_orbax_state(folder):
    return f'no {orbax_io.STATE_DIR}/'
  if not converted and not any(folder.glob('*.safetensors')):
    return 'no *.safetensors'
  return None


def check_components(path: str | Path) -> str:
  """Check that every component of the family is present; returns the family.

  Raises `CheckpointError` naming each missing or incomplete component folder and ``path``, a
  model config.json that does not describe a model we build, or (converted folders) a file whose
  size differs from the one recorded at conversion.
  """
  path = Path(path)
  family = detect_family(path)
  converted = is_converted_pipeline(path)
  problems = {name: why for name in COMPONENTS[family]
              if (why := _problem(path, name, converted)) is not None}
  if problems:
    layout = 'converted' if converted else 'diffusers'
    listed = '; '.join(f'{name}/ ({why})' for name, why in problems.items())
    raise CheckpointError(f'{layout} {family} checkpoint {path} is missing components: {listed}')
  for spec in model_specs(family).values():
    component.check_config(spec, path)
  if converted:
    if not read_manifest(path).get('complete', False):
      raise CheckpointError(f'{path}: the conversion did not finish; re-run vap-convert')
    verify(path, full=False)
  return family


def verify(path: str | Path, *, full: bool = True) -> tuple[int, int]:
  """Check a converted folder (pipeline root or one component folder) against the checksums
  recorded at conversion: every file's size, and with ``full`` its sha256 (which a folder
  without checksums, converted by an older vap_jax, cannot pass). Returns (files, bytes) checked;
  raises `CheckpointError` naming the first missing, cut or changed file."""
  path = Path(path)
  if is_converted_pipeline(path):
    manifest = read_manifest(path)
    folders = [path / name for name, entry in manifest['components'].items()
               if entry['kind'] == 'model']
    counts = [integrity.check(path, manifest.get('files'), full=full)]
  elif component.has_orbax_state(path):
    folders, counts = [path], []
  else:
    raise CheckpointError(f'{path} is not a converted folder (it has neither {MANIFEST} nor '
                          f'{orbax_io.STATE_DIR}/): only vap-convert output records checksums')
  for folder in folders:
    counts.append(integrity.check(folder, orbax_io.read_config(folder).get('files'), full=full))
  files = sum(n for n, _ in counts)
  if full and not files:
    raise CheckpointError(f'{path} has no recorded checksums (converted by an older vap_jax): '
                          f'{integrity.AGAIN} to record them')
  return files, sum(b for _, b in counts)


def _file_component(path: str | Path, name: str) -> Path:
  path = Path(path)
  why = _problem(path, name, is_converted_pipeline(path))
  if why is not None:
    raise CheckpointError(f'checkpoint {path} has no usable {name}/ component ({why})')
  return path / name


def tokenizer_dir(path: str | Path) -> Path:
  """The ``tokenizer/`` folder (for `vap_jax.text.Tokenizer`)."""
  return _file_component(path, 'tokenizer')


def scheduler_config(path: str | Path) -> dict:
  """``scheduler/scheduler_config.json`` (for `vap_jax.diffusion` ``from_config``)."""
  return _read_json(_file_component(path, 'scheduler') / 'scheduler_config.json')


def image_processor_config(path: str | Path) -> dict:
  """Wan's ``image_processor/preprocessor_config.json`` (``CLIPImageProcessor`` fields)."""
  return _read_json(_file_component(path, 'image_processor') / 'preprocessor_config.json')


def clip_preprocess_kwargs(config: dict) -> dict:
  """``CLIPImageProcessor`` fields -> keyword arguments of `vap_jax.models.clip.preprocess`."""
  for field in ('do_resize', 'do_center_crop', 'do_rescale', 'do_normalize'):
    if not config.get(field, True):
      raise ValueError(f'image_processor {field}=false is not supported')
  size = config.get('size', 224)
  size = size.get('shortest_edge', 224) if isinstance(size, dict) else size
  crop = config.get('crop_size', size)
  crop = crop.get('height', size) if isinstance(crop, dict) else crop
  kwargs = dict(size=int(size), crop_size=int(crop), resample=config.get('resample', 3))
  for key, field in (('mean', 'image_mean'), ('std', 'image_std')):
    if field in config:
      kwargs[key] = tuple(config[field])
  return kwargs


def _component_done(folder: Path, spec: ModelSpec, param_dtype: str) -> bool:
  """True if ``folder`` is a finished conversion of a ``spec`` model in ``param_dtype``; raises
  if it is a finished conversion of something else."""
  if not ((folder / orbax_io.CONFIG_FILE).is_file() and component.has_orbax_state(folder)):
    return False
  meta = orbax_io.read_config(folder)
  if meta.get('format_version', 1) != orbax_io.FORMAT_VERSION:
    return False  # an older layout: convert it again
  if meta.get('model') == spec.name and meta.get('param_dtype') == param_dtype:
    return True
  raise FileExistsError(f'{folder} holds a converted {meta.get("model")!r} model in '
                        f'{meta.get("param_dtype")}, not {spec.name} in {param_dtype}; pass '
                        'overwrite=True (--overwrite) to replace it')


def _version() -> str:
  from importlib import metadata
  try:
    return metadata.version('vap_jax')
  except metadata.PackageNotFoundError:
    return 'unknown'


def _write_manifest(dst: Path, manifest: dict) -> None:
  tmp = dst / (MANIFEST + '.tmp')
  tmp.write_text(json.dumps(manifest, indent=1))
  tmp.replace(dst / MANIFEST)


def _add_entry(dst: Path, name: str, manifest: dict) -> None:
  """Record component ``name`` of the converted folder ``dst`` in ``manifest``: a model's
  spec name, dtype and source config; a file component's files (and their checksums)."""
  out = dst / name
  if name in FILE_COMPONENTS:
    entry = dict(kind='files', files=sorted(p.name for p in out.iterdir()))
    manifest.setdefault('files', {}).update(integrity.record(dst, out))
  else:
    config = orbax_io.read_config(out)
    entry = dict(kind='model', model=config['model'], param_dtype=config['param_dtype'],
                 config=config['source_config'])
  manifest['components'][name] = entry


def seal_pipeline(dst: str | Path, family: str, *, source: str, model_index: dict) -> dict:
  """Make ``dst``, a folder of converted component folders (e.g. written by
  `vap_jax.weights.component.save` from trained models) and the file components, a converted
  pipeline folder: checks every component of ``family`` is there, then writes the manifest.
  Returns it."""
  dst = Path(dst)
  problems = [f'{name}: {why}' for name in COMPONENTS.get(family, ())
              if (why := _problem(dst, name, converted=True))]
  if family not in FAMILIES or problems:
    raise CheckpointError(f'{dst} is not a complete {family} pipeline: ' +
                          ('; '.join(problems) or f'family must be one of {FAMILIES}'))
  manifest = dict(format='vap_jax pipeline checkpoint', format_version=FORMAT_VERSION,
                  complete=True, family=family, source=source, vap_jax_version=_version(),
                  model_index=model_index, components={})
  for name in COMPONENTS[family]:
    _add_entry(dst, name, manifest)
  _write_manifest(dst, manifest)
  return manifest


def convert_pipeline(src: str | Path, dst: str | Path, *, dtype: str = 'bfloat16',
                     dtypes: dict[str, str] | None = None, overwrite: bool = False,
                     group_bytes: int | None = None, progress: bool = True) -> dict:
  """Convert a downloaded diffusers VAP folder into one converted folder; returns the manifest.

  Networks are written as Orbax component folders, tensor by tensor (bounded host memory): the
  transformer and text encoder in ``dtype``, the VAE and CLIP image encoder in float32
  (`DEFAULT_DTYPES`; ``dtypes`` overrides per component). Tokenizer, scheduler and image
  processor files are copied as they are. Re-running into the same ``dst`` resumes: finished
  components are kept. ``overwrite`` rewrites everything.
  """
  src, dst = Path(src).resolve(), Path(dst)
  if is_converted_pipeline(src):
    raise CheckpointError(f'{src} is already a converted folder ({MANIFEST})')
  family = check_components(src)
  dtypes = {name: (dtypes or {}).get(name) or DEFAULT_DTYPES[name] or dtype
            for name in model_specs(family)}
  # A run killed while writing its first manifest leaves only manifest.json.tmp: still empty.
  if dst.exists() and any(p.name != MANIFEST + '.tmp' for p in dst.iterdir()) and not overwrite:
    if not is_converted_pipeline(dst):
      raise FileExistsError(f'{dst} exists and is not a vap-convert output: pick an empty folder '
                            'or pass overwrite=True (--overwrite)')
    previous = _read_json(dst / MANIFEST)
    if previous.get('source') != str(src) or previous.get('family') != family:
      raise FileExistsError(f'{dst} holds a conversion of {previous.get("source")}, not {src}; '
                            'pass overwrite=True (--overwrite) to replace it')
  specs = model_specs(family)
  # Decide what to keep before writing anything: a refused run leaves dst as it was.
  keep = {name: not overwrite and _component_done(dst / name, spec, dtypes[name])
          for name, spec in specs.items()}
  dst.mkdir(parents=True, exist_ok=True)
  manifest = dict(format='vap_jax pipeline checkpoint', format_version=FORMAT_VERSION,
                  complete=False, family=family, source=str(src), vap_jax_version=_version(),
                  model_index=_read_json(src / MODEL_INDEX), components={})
  _write_manifest(dst, manifest)
  from tqdm import tqdm
  names = COMPONENTS[family]
  for name in tqdm(names, desc=f'vap-convert {family}', unit='component', disable=not progress):
    out = dst / name
    if name in FILE_COMPONENTS:
      if out.exists():
        shutil.rmtree(out)
      shutil.copytree(src / name, out)
    elif keep[name]:
      log.info('%s: already converted in %s, kept', name, out)
    else:
      log.info('%s: converting %s to %s (%s)', name, src / name, out, dtypes[name])
      component.convert(specs[name], src / name, out, param_dtype=dtypes[name],
                        group_bytes=group_bytes, overwrite=True, progress=progress)
    _add_entry(dst, name, manifest)
    _write_manifest(dst, manifest)
  manifest['complete'] = True
  _write_manifest(dst, manifest)
  log.info('converted %s (%s) to %s', src, family, dst)
  return manifest
