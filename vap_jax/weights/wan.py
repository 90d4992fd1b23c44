"""Key maps for Wan2.1 transformers: diffusers names (``WanTransformer3DModel`` and VAP's
``WanTransformer3DMOTModel``) and the original Wan release names (``self_attn``, ``cross_attn``,
``modulation``, ...). Expert tensors carry ``_mot_ref`` and mirror their base twin.
"""
from __future__ import annotations

from pathlib import Path

from jax.sharding import Mesh

from vap_jax.models.wan import WanConfig, WanTransformer
from vap_jax.parallel import DEFAULT_RULES
from vap_jax.parallel.sharding import Rules
from vap_jax.weights import component
from vap_jax.weights.component import ModelSpec, read_json_config
from vap_jax.weights.keymap import CONV_TO_DENSE, TRANSPOSE, KeyMap, Rule
from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint


def _linear(torch_name: str, path: str) -> list[Rule]:
  """weight (out, in) -> kernel (in, out); bias as is. Names are regexes (groups allowed)."""
  return [Rule(torch_name + r'\.weight', path + '.kernel', TRANSPOSE),
          Rule(torch_name + r'\.bias', path + '.bias')]


def _norm(torch_name: str, path: str) -> list[Rule]:
  return [Rule(torch_name + r'\.weight', path + '.scale'), Rule(torch_name + r'\.bias', path + '.bias')]


_B, _L = r'blocks\.(\d+)\.', r'blocks.#\1.'
_CE = r'condition_embedder\.'

WAN = KeyMap('wan (diffusers)', [
    Rule(r'patch_embedding\.weight', 'patch_embedding.kernel', CONV_TO_DENSE),
    Rule(r'patch_embedding\.bias', 'patch_embedding.bias'),
    *_linear(_CE + r'time_embedder\.(linear_[12])', r'condition_embedder.time_embedder.\1'),
    *_linear(_CE + r'time_proj', 'condition_embedder.time_proj'),
    *_linear(_CE + r'text_embedder\.linear_1', 'condition_embedder.text_embedder.proj_in'),
    *_linear(_CE + r'text_embedder\.linear_2', 'condition_embedder.text_embedder.proj_out'),
    *_norm(_CE + r'image_embedder\.(norm[12])', r'condition_embedder.image_\1'),
    *_linear(_CE + r'image_embedder\.ff\.net\.0\.proj', 'condition_embedder.image_ff.proj_in'),
    *_linear(_CE + r'image_embedder\.ff\.net\.2', 'condition_embedder.image_ff.proj_out'),
    Rule(_B + r'scale_shift_table', _L + 'scale_shift_table'),
    *_linear(_B + r'(attn[12])\.(to_[qkv]|add_[kv]_proj)', _L + r'\2.\3'),
    *_linear(_B + r'(attn[12])\.to_out\.0', _L + r'\2.to_out'),
    Rule(_B + r'(attn[12])\.(norm_[qk]|norm_added_k)\.weight', _L + r'\2.\3.scale'),
    *_norm(_B + r'norm2', _L + 'norm2'),
    *_linear(_B + r'ffn\.net\.0\.proj', _L + 'ffn.proj_in'),
    *_linear(_B + r'ffn\.net\.2', _L + 'ffn.proj_out'),
    *_linear(r'proj_out', 'proj_out'),
    Rule(r'scale_shift_table', 'scale_shift_table'),
], marker='_mot_ref')

# The original Wan2.1 checkpoint layout (``diffusion_pytorch_model*.safetensors`` of
# Wan-AI/Wan2.1-I2V-14B-480P); VAP_SPEC §4.3 gives the correspondence. Original norm3 is the
# cross-attention norm (diffusers norm2).
WAN_ORIGINAL = KeyMap('wan (original)', [
    Rule(r'patch_embedding\.weight', 'patch_embedding.kernel', CONV_TO_DENSE),
    Rule(r'patch_embedding\.bias', 'patch_embedding.bias'),
    *_linear(r'time_embedding\.0', 'condition_embedder.time_embedder.linear_1'),
    *_linear(r'time_embedding\.2', 'condition_embedder.time_embedder.linear_2'),
    *_linear(r'time_projection\.1', 'condition_embedder.time_proj'),
    *_linear(r'text_embedding\.0', 'condition_embedder.text_embedder.proj_in'),
    *_linear(r'text_embedding\.2', 'condition_embedder.text_embedder.proj_out'),
    *_norm(r'img_emb\.proj\.0', 'condition_embedder.image_norm1'),
    *_linear(r'img_emb\.proj\.1', 'condition_embedder.image_ff.proj_in'),
    *_linear(r'img_emb\.proj\.3', 'condition_embedder.image_ff.proj_out'),
    *_norm(r'img_emb\.proj\.4', 'condition_embedder.image_norm2'),
    Rule(_B + r'modulation', _L + 'scale_shift_table'),
    *_linear(_B + r'self_attn\.([qkv])', _L + r'attn1.to_\2'),
    *_linear(_B + r'self_attn\.o', _L + 'attn1.to_out'),
    Rule(_B + r'self_attn\.norm_([qk])\.weight', _L + r'attn1.norm_\2.scale'),
    *_linear(_B + r'cross_attn\.([qkv])', _L + r'attn2.to_\2'),
    *_linear(_B + r'cross_attn\.o', _L + 'attn2.to_out'),
    *_linear(_B + r'cross_attn\.([kv])_img', _L + r'attn2.add_\2_proj'),
    Rule(_B + r'cross_attn\.norm_([qk])\.weight', _L + r'attn2.norm_\2.scale'),
    Rule(_B + r'cross_attn\.norm_k_img\.weight', _L + 'attn2.norm_added_k.scale'),
    *_norm(_B + r'norm3', _L + 'norm2'),
    *_linear(_B + r'ffn\.0', _L + 'ffn.proj_in'),
    *_linear(_B + r'ffn\.2', _L + 'ffn.proj_out'),
    *_linear(r'head\.head', 'proj_out'),
    Rule(r'head\.modulation', 'scale_shift_table'),
])


def _read_source(folder: Path) -> tuple[dict, KeyMap]:
  """The diffusers config of a transformer folder and the key map its tensors need.

  An original-format folder (Wan's ``config.json`` with ``dim``/``num_heads``) is translated.
  """
  config = read_json_config(folder, 'a Wan transformer folder')
  if config.get('_class_name', '').startswith('WanTransformer3D'):
    return config, WAN
  if 'dim' in config and 'num_heads' in config:  # original Wan release
    # Its config does not record the text / CLIP widths: read them off the tensors.
    checkpoint = SafetensorsCheckpoint(folder)
    i2v = 'img_emb.proj.0.weight' in checkpoint
    heads = config['num_heads']
    return dict(patch_size=list(config.get('patch_size', (1, 2, 2))), num_attention_heads=heads,
                attention_head_dim=config['dim'] // heads, in_channels=config['in_dim'],
                out_channels=config['out_dim'], text_dim=checkpoint.shape('text_embedding.0.weight')[1],
                freq_dim=config['freq_dim'], ffn_dim=config['ffn_dim'],
                num_layers=config['num_layers'], cross_attn_norm=config.get('cross_attn_norm', True),
                eps=config.get('eps', 1e-6),
                image_dim=checkpoint.shape('img_emb.proj.0.weight')[0] if i2v else None,
                added_kv_proj_dim=config['dim'] if i2v else None), WAN_ORIGINAL
  raise CheckpointError(f'{folder / "config.json"}: neither a diffusers Wan transformer config '
                        '(_class_name WanTransformer3D*) nor an original Wan config (dim, num_heads)')


SPEC = ModelSpec('wan', 'transformer', _read_source, WanConfig.from_source, WanTransformer)


def model_factory(config: WanConfig, seed: int = 0):
  return SPEC.factory(config, seed)


def load_wan(path: str | Path, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
             dtype: str = 'bfloat16', param_dtype: str | None = None, progress: bool = False,
             **runtime) -> WanTransformer:
  """Load a Wan(-VAP) transformer from a diffusers/original or converted folder (pipeline root or
  component, see `vap_jax.weights.component`). ``runtime``: trainable_dtype, attention,
  scan_layers, remat (`WanConfig`)."""
  return component.load(SPEC, path, mesh=mesh, rules=rules, progress=progress, dtype=dtype,
                        param_dtype=param_dtype or dtype, **runtime)


def convert(src: str | Path, dst: str | Path, *, param_dtype: str = 'bfloat16',
            group_bytes: int | None = None, overwrite: bool = False, progress: bool = True) -> int:
  """Wan(-VAP) transformer folder (diffusers or original names) -> vap_jax Orbax folder."""
  return component.convert(SPEC, src, dst, param_dtype=param_dtype, group_bytes=group_bytes,
                           overwrite=overwrite, progress=progress)
