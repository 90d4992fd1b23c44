"""Every component a pipeline needs, from a diffusers VAP folder or a ``vap-convert`` folder
(`vap_jax.weights.checkpoint` reads both layouts)."""
from __future__ import annotations

import logging
from pathlib import Path

from vap_jax.diffusion import from_config
from vap_jax.models import stack
from vap_jax.text import Tokenizer
from vap_jax.weights import checkpoint
from vap_jax.weights.safetensors_io import CheckpointError

log = logging.getLogger(__name__)


def load_components(path: str | Path, family: str, *, dtype: str = 'bfloat16',
                    vae_dtype: str = 'float32', image_encoder_dtype: str = 'float32', mesh=None,
                    attention: str = 'xla', vae_tiling: bool = False,
                    context_parallel: str = 'gspmd', lora: str | Path | None = None,
                    lora_scale: float = 1.0, lora_merge: bool = True,
                    offload: bool = False) -> dict:
  """Keyword arguments for the family's pipeline constructor: every component, loaded.

  ``dtype`` is the transformer's and text encoder's; the VAE and (Wan) CLIP image encoder run in
  float32 unless ``vae_dtype`` / ``image_encoder_dtype`` say otherwise, for both families.
  ``mesh`` shards every component; ``attention`` picks the attention op and
  ``context_parallel`` the joint attention's layout on a context axis (`vap_jax.parallel.
  context`). ``lora``: a diffusers
  or PEFT LoRA file (or folder) for the transformer, at ``lora_scale``, merged into its weights
  (the base model's speed) unless ``lora_merge`` is False. ``offload``: every weight lives in
  pinned host memory (`vap_jax.models.stack.offload`); each compiled call copies in what it
  uses -- the transformer one layer (group) at a time inside its scan, the encoders and the VAE
  whole for their call -- so the device holds activations and about one layer group. Each
  component is moved to the host as soon as it is loaded, so loading needs the device memory of
  the largest one alone.
  """
  from vap_jax.weights.encoders import load_image_encoder, load_text_encoder
  path = Path(path)
  found = checkpoint.check_components(path)
  if found != family:
    raise CheckpointError(f'{path} is a {found} checkpoint, not {family}')
  log.info('loading the %s VAP pipeline from %s%s', family, path,
           ', weights offloaded to host memory' if offload else '')
  place = stack.offload if offload else (lambda module: module)
  parts = dict(mesh=mesh, vae_tiling=vae_tiling,
               tokenizer=Tokenizer(checkpoint.tokenizer_dir(path)),
               scheduler=from_config(checkpoint.scheduler_config(path)))
  if family == 'cogvideox':
    from vap_jax.weights.cogvideox import load_cogvideox
    from vap_jax.weights.vae import load_cogvideox_vae
    transformer = load_cogvideox(path, mesh=mesh, dtype=dtype, attention=attention,
                                 context_parallel=context_parallel)
    load_vae = load_cogvideox_vae
  else:
    from vap_jax.weights.vae import load_wan_vae
    from vap_jax.weights.wan import load_wan
    transformer = load_wan(path, mesh=mesh, dtype=dtype, attention=attention,
                           context_parallel=context_parallel)
    load_vae = load_wan_vae
  if lora is not None:
    from vap_jax.nn.lora import merge
    from vap_jax.weights import lora as lora_files
    names = lora_files.load(transformer, lora, scale=lora_scale)
    log.info('LoRA %s on %d layers at scale %g%s', lora, len(names), lora_scale,
             ', merged' if lora_merge else '')
    if lora_merge:
      merge(transformer)
  parts['transformer'] = place(transformer)
  del transformer
  parts['text_encoder'] = place(load_text_encoder(path, mesh=mesh, dtype=dtype,
                                                  attention=attention))
  parts['vae'] = place(load_vae(path, mesh=mesh, dtype=vae_dtype))
  if family == 'wan':
    parts['image_encoder'] = place(load_image_encoder(path, mesh=mesh, dtype=image_encoder_dtype,
                                                      attention=attention))
    parts['image_processor'] = checkpoint.image_processor_config(path)
  return parts
