"""Every component a pipeline needs, from a diffusers VAP folder or a ``vap-convert`` folder."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from vap_jax.diffusion import from_config
from vap_jax.text import Tokenizer
from vap_jax.weights.safetensors_io import CheckpointError

log = logging.getLogger(__name__)

COMPONENTS = {
    'cogvideox': ('transformer', 'vae', 'text_encoder', 'tokenizer', 'scheduler'),
    'wan': ('transformer', 'vae', 'text_encoder', 'tokenizer', 'scheduler', 'image_encoder',
            'image_processor'),
}


def check_components(path: Path, family: str) -> None:
  if not path.is_dir():
    raise CheckpointError(f'checkpoint folder {path} does not exist')
  missing = [c for c in COMPONENTS[family] if not (path / c).is_dir()]
  if missing:
    raise CheckpointError(f'{path} is not a complete {family} VAP checkpoint: missing '
                          f'component folder(s) {", ".join(missing)}')


def read_json(path: Path, what: str) -> dict:
  if not path.is_file():
    raise CheckpointError(f'{path} not found ({what})')
  return json.loads(path.read_text())


def load_components(path: str | Path, family: str, *, dtype: str, vae_dtype: str, mesh=None,
                    attention: str = 'xla', image_encoder_dtype: str = 'float32') -> dict:
  """Keyword arguments for the family's pipeline constructor."""
  from vap_jax.weights.encoders import load_image_encoder, load_text_encoder
  path = Path(path)
  check_components(path, family)
  scheduler = from_config(read_json(path / 'scheduler' / 'scheduler_config.json', 'scheduler'))
  log.info('loading the %s VAP pipeline from %s', family, path)
  parts = dict(
      tokenizer=Tokenizer(path / 'tokenizer'), scheduler=scheduler,
      text_encoder=load_text_encoder(path, mesh=mesh, dtype=dtype, attention=attention))
  if family == 'cogvideox':
    from vap_jax.weights.cogvideox import load_cogvideox
    from vap_jax.weights.vae import load_cogvideox_vae
    parts['transformer'] = load_cogvideox(path, mesh=mesh, dtype=dtype, attention=attention)
    parts['vae'] = load_cogvideox_vae(path, mesh=mesh, dtype=vae_dtype)
  else:
    from vap_jax.weights.vae import load_wan_vae
    from vap_jax.weights.wan import load_wan
    parts['transformer'] = load_wan(path, mesh=mesh, dtype=dtype, attention=attention)
    parts['vae'] = load_wan_vae(path, mesh=mesh, dtype=vae_dtype)
    parts['image_encoder'] = load_image_encoder(path, mesh=mesh, dtype=image_encoder_dtype,
                                                attention=attention)
    parts['image_processor'] = read_json(
        path / 'image_processor' / 'preprocessor_config.json', 'image_processor')
  return parts
