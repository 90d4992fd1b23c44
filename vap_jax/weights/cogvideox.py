"""Key map for diffusers ``CogVideoXTransformer3DModel`` / VAP ``CogVideoXTransformer3DMOTModel``.

Expert tensors carry ``_mot_ref``; removing it gives the base key with the same shape. Here the
base lives under top-level names and in slot i of the stacked ``blocks``; the expert under
``expert`` (its j-th block in slot j of ``expert.blocks``).
"""
from __future__ import annotations

from pathlib import Path

from jax.sharding import Mesh

from vap_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer
from vap_jax.parallel import DEFAULT_RULES
from vap_jax.parallel.sharding import Rules
from vap_jax.weights import component
from vap_jax.weights.component import ModelSpec, read_json_config
from vap_jax.weights.keymap import CONV_TO_DENSE, TRANSPOSE, KeyMap, Rule
from vap_jax.weights.safetensors_io import CheckpointError

_BLOCK = r'transformer_blocks\.(\d+)\.'
_LAYER = r'blocks.#\1.'


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
    Rule(_BLOCK + r'attn1\.(to_[qkv])\.weight', _LAYER + r'attn1.\2.kernel', TRANSPOSE),
    Rule(_BLOCK + r'attn1\.(to_[qkv])\.bias', _LAYER + r'attn1.\2.bias'),
    Rule(_BLOCK + r'attn1\.to_out\.0\.weight', _LAYER + r'attn1.to_out.kernel', TRANSPOSE),
    Rule(_BLOCK + r'attn1\.to_out\.0\.bias', _LAYER + r'attn1.to_out.bias'),
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
], marker='_mot_ref')


def _read_source(folder: Path) -> tuple[dict, KeyMap]:
  config = read_json_config(folder, 'a diffusers transformer folder')
  name = config.get('_class_name', '')
  if not name.startswith('CogVideoXTransformer3D'):
    raise CheckpointError(f'{folder / "config.json"}: _class_name {name!r} is not a CogVideoX '
                          'transformer')
  return config, COGVIDEOX


SPEC = ModelSpec('cogvideox', 'transformer', _read_source, CogVideoXConfig.from_source,
                 CogVideoXTransformer)


def model_factory(config: CogVideoXConfig, seed: int = 0):
  return SPEC.factory(config, seed)


def load_cogvideox(path: str | Path, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                   dtype: str = 'bfloat16', param_dtype: str | None = None,
                   progress: bool = False, **runtime) -> CogVideoXTransformer:
  """Load a CogVideoX(-VAP) transformer from a diffusers or converted folder (pipeline root or
  component, see `vap_jax.weights.component`).

  ``dtype`` is the compute dtype; parameters are stored as ``param_dtype`` (default: ``dtype``).
  ``runtime``: trainable_dtype, attention, scan_layers, remat (`CogVideoXConfig`).
  """
  return component.load(SPEC, path, mesh=mesh, rules=rules, progress=progress, dtype=dtype,
                        param_dtype=param_dtype or dtype, **runtime)


def convert(src: str | Path, dst: str | Path, *, param_dtype: str = 'bfloat16',
            group_bytes: int | None = None, overwrite: bool = False, progress: bool = True) -> int:
  """diffusers CogVideoX(-VAP) transformer folder -> vap_jax Orbax folder. Returns tensor count."""
  return component.convert(SPEC, src, dst, param_dtype=param_dtype, group_bytes=group_bytes,
                           overwrite=overwrite, progress=progress)
