"""Key map for diffusers ``CogVideoXTransformer3DModel`` / VAP ``CogVideoXTransformer3DMOTModel``.

Expert tensors carry ``_mot_ref``; removing it gives the base key with the same shape. Here the
base lives under top-level names and ``blocks.i.base``; the expert under ``expert_*`` and
``blocks.i.expert``.
"""
from __future__ import annotations

import json
from pathlib import Path

from flax import nnx
from jax.sharding import Mesh

from vap_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer
from vap_jax.parallel import DEFAULT_RULES
from vap_jax.parallel.sharding import Rules
from vap_jax.weights import orbax_io
from vap_jax.weights.keymap import CONV_TO_DENSE, TRANSPOSE, KeyMap, Rule, expert_path
from vap_jax.weights.loading import component_dir, load_model
from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint

_BLOCK = r'transformer_blocks\.(\d+)\.'
_LAYER = r'blocks.\1.base.'


COGVIDEOX = KeyMap('cogvideox', [
    Rule(r'patch_embed\.proj\.weight', 'patch_embed.proj.kernel', CONV_TO_DENSE),
    Rule(r'patch_embed\.(proj|text_proj)\.bias', r'patch_embed.\1.bias'),
    Rule(r'patch_embed\.text_proj\.weight', 'patch_embed.text_proj.kernel', TRANSPOSE),
    Rule(r'patch_embed\.pos_embedding', 'patch_embed.pos_embedding'),
    Rule(r'time_embedding\.(linear_[12])\.weight', r'time_embedding.\1.kernel', TRANSPOSE),
    Rule(r'time_embedding\.(linear_[12])\.bias', r'time_embedding.\1.bias'),
    Rule(_BLOCK + r'(norm[12])\.linear\.weight', _LAYER + r'\2.linear.kernel', TRANSPOSE),
    Rule(_BLOCK + r'(norm[12])\.linear\.bias', _LAYER + r'\2.linear.bias'),
    Rule(_BLOCK + r'(norm[12])\.norm\.weight', _LAYER + r'\2.norm.scale'),
    Rule(_BLOCK + r'(norm[12])\.norm\.bias', _LAYER + r'\2.norm.bias'),
    Rule(_BLOCK + r'attn1\.(to_[qkv]|to_out)(?:\.0)?\.weight', _LAYER + r'attn1.\2.kernel', TRANSPOSE),
    Rule(_BLOCK + r'attn1\.(to_[qkv]|to_out)(?:\.0)?\.bias', _LAYER + r'attn1.\2.bias'),
    Rule(_BLOCK + r'attn1\.(norm_[qk])\.weight', _LAYER + r'attn1.\2.scale'),
    Rule(_BLOCK + r'attn1\.(norm_[qk])\.bias', _LAYER + r'attn1.\2.bias'),
    Rule(_BLOCK + r'ff\.net\.0\.proj\.weight', _LAYER + r'ff.proj_in.kernel', TRANSPOSE),
    Rule(_BLOCK + r'ff\.net\.0\.proj\.bias', _LAYER + r'ff.proj_in.bias'),
    Rule(_BLOCK + r'ff\.net\.2\.weight', _LAYER + r'ff.proj_out.kernel', TRANSPOSE),
    Rule(_BLOCK + r'ff\.net\.2\.bias', _LAYER + r'ff.proj_out.bias'),
    # Output head (target stream only).
    Rule(r'norm_final\.weight', 'norm_final.scale'),
    Rule(r'norm_final\.bias', 'norm_final.bias'),
    Rule(r'norm_out\.linear\.weight', 'norm_out.linear.kernel', TRANSPOSE),
    Rule(r'norm_out\.linear\.bias', 'norm_out.linear.bias'),
    Rule(r'norm_out\.norm\.weight', 'norm_out.norm.scale'),
    Rule(r'norm_out\.norm\.bias', 'norm_out.norm.bias'),
    Rule(r'proj_out\.weight', 'proj_out.kernel', TRANSPOSE),
    Rule(r'proj_out\.bias', 'proj_out.bias'),
], marker='_mot_ref', marked_path=expert_path)


def read_diffusers_config(path: str | Path) -> dict:
  folder = component_dir(Path(path))
  config_file = folder / 'config.json'
  if not config_file.is_file():
    raise CheckpointError(f'{folder} has no config.json (expected a diffusers transformer folder)')
  config = json.loads(config_file.read_text())
  name = config.get('_class_name', '')
  if not name.startswith('CogVideoXTransformer3D'):
    raise CheckpointError(f'{config_file}: _class_name {name!r} is not a CogVideoX transformer')
  return config


def model_factory(config: CogVideoXConfig, seed: int = 0):
  return lambda: CogVideoXTransformer(config, rngs=nnx.Rngs(seed))


def load_cogvideox(path: str | Path, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                   dtype: str = 'bfloat16', param_dtype: str | None = None,
                   attention: str = 'xla', progress: bool = False) -> CogVideoXTransformer:
  """Load a CogVideoX(-VAP) transformer from a diffusers folder or a converted Orbax folder.

  ``dtype`` is the compute dtype; parameters are stored as ``param_dtype`` (default: ``dtype``).
  """
  path = Path(path)
  runtime = dict(dtype=dtype, param_dtype=param_dtype or dtype, attention=attention)
  if (path / orbax_io.STATE_DIR).is_dir():
    meta = orbax_io.read_config(path)
    config = CogVideoXConfig.from_diffusers(meta['diffusers_config'], **runtime)
    return orbax_io.restore_model(model_factory(config), path, mesh=mesh, rules=rules)
  config = CogVideoXConfig.from_diffusers(read_diffusers_config(path), **runtime)
  checkpoint = SafetensorsCheckpoint(component_dir(path))
  return load_model(model_factory(config), checkpoint, COGVIDEOX, mesh=mesh, rules=rules,
                    progress=progress)


def convert(src: str | Path, dst: str | Path, *, param_dtype: str = 'bfloat16',
            group_bytes: int | None = None, overwrite: bool = False, progress: bool = True) -> int:
  """diffusers CogVideoX(-VAP) transformer folder -> vap_jax Orbax folder. Returns tensor count."""
  raw = read_diffusers_config(src)
  config = CogVideoXConfig.from_diffusers(raw, dtype=param_dtype, param_dtype=param_dtype)
  checkpoint = SafetensorsCheckpoint(component_dir(Path(src)))
  count = orbax_io.convert_safetensors(checkpoint, COGVIDEOX, model_factory(config), dst,
                                       group_bytes=group_bytes, overwrite=overwrite,
                                       progress=progress)
  orbax_io.write_config(dst, {'model': 'cogvideox', 'param_dtype': param_dtype,
                              'source': str(Path(src).resolve()), 'diffusers_config': raw})
  return count
