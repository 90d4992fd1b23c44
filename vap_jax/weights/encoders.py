"""Key maps and loaders for the text and image encoders shipped beside the DiTs.

``text_encoder/``: transformers ``T5EncoderModel`` (CogVideoX, T5 v1.1 XXL) or
``UMT5EncoderModel`` (Wan, umT5-XXL): same tensor names, the config's ``model_type`` tells which.
``image_encoder/``: transformers ``CLIPVisionModel`` (Wan, ViT-H/14).

Each ``load_*`` accepts the whole diffusers pipeline folder, the component folder, or a folder the
converter wrote (Orbax, see `vap_jax.weights.orbax_io`).
"""
from __future__ import annotations

import json
from pathlib import Path

from flax import nnx
from jax.sharding import Mesh

from vap_jax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
from vap_jax.models.t5 import T5Config, T5Encoder
from vap_jax.parallel import DEFAULT_RULES
from vap_jax.parallel.sharding import Rules
from vap_jax.weights import orbax_io
from vap_jax.weights.keymap import CONV_TO_DENSE, TRANSPOSE, KeyMap, Rule
from vap_jax.weights.loading import component_dir, load_model
from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint

_T5_BLOCK = r'encoder\.block\.(\d+)\.layer\.'

T5 = KeyMap('t5-encoder', [
    Rule(r'shared\.weight', 'embed'),
    Rule(_T5_BLOCK + r'0\.SelfAttention\.([qkvo])\.weight', r'layers.\1.attn.\2.kernel', TRANSPOSE),
    Rule(_T5_BLOCK + r'0\.SelfAttention\.relative_attention_bias\.weight',
         r'layers.\1.attn.relative_attention_bias'),
    Rule(_T5_BLOCK + r'0\.layer_norm\.weight', r'layers.\1.attn_norm.scale'),
    Rule(_T5_BLOCK + r'1\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight', r'layers.\1.ff.\2.kernel',
         TRANSPOSE),
    Rule(_T5_BLOCK + r'1\.layer_norm\.weight', r'layers.\1.ff_norm.scale'),
    Rule(r'encoder\.final_layer_norm\.weight', 'final_norm.scale'),
], ignore=[r'encoder\.embed_tokens\.weight'])  # tied to shared.weight (saved by older versions)

# transformers 4 saved names under vision_model.; transformers 5 saves them without the prefix.
_VM = r'(?:vision_model\.)?'
_CLIP_LAYER = _VM + r'encoder\.layers\.(\d+)\.'

CLIP_VISION = KeyMap('clip-vision', [
    Rule(_VM + r'embeddings\.class_embedding', 'class_embedding'),
    Rule(_VM + r'embeddings\.patch_embedding\.weight', 'patch_embedding.kernel',
         CONV_TO_DENSE),
    Rule(_VM + r'embeddings\.position_embedding\.weight', 'position_embedding'),
    Rule(_VM + r'(pre_layrnorm|post_layernorm)\.weight', r'\1.scale'),
    Rule(_VM + r'(pre_layrnorm|post_layernorm)\.bias', r'\1.bias'),
    Rule(_CLIP_LAYER + r'self_attn\.([qkv]_proj|out_proj)\.weight', r'layers.\1.self_attn.\2.kernel',
         TRANSPOSE),
    Rule(_CLIP_LAYER + r'self_attn\.([qkv]_proj|out_proj)\.bias', r'layers.\1.self_attn.\2.bias'),
    Rule(_CLIP_LAYER + r'(layer_norm[12])\.weight', r'layers.\1.\2.scale'),
    Rule(_CLIP_LAYER + r'(layer_norm[12])\.bias', r'layers.\1.\2.bias'),
    Rule(_CLIP_LAYER + r'mlp\.(fc[12])\.weight', r'layers.\1.\2.kernel', TRANSPOSE),
    Rule(_CLIP_LAYER + r'mlp\.(fc[12])\.bias', r'layers.\1.\2.bias'),
], ignore=[_VM + r'embeddings\.position_ids',  # a non-persistent buffer older saves kept
           r'visual_projection\.weight'])  # CLIPVisionModelWithProjection's head, unused by Wan

# component -> (default subfolder, accepted model_types, key map)
_KINDS = {
    't5': ('text_encoder', ('t5', 'umt5'), T5),
    'clip': ('image_encoder', ('clip_vision_model', 'clip'), CLIP_VISION),
}


def read_hf_config(path: str | Path, kind: str) -> dict:
  """The transformers config.json of a ``kind`` ('t5' or 'clip') folder, checked."""
  folder = component_dir(Path(path), _KINDS[kind][0])
  config_file = folder / 'config.json'
  if not config_file.is_file():
    raise CheckpointError(f'{folder} has no config.json (expected a transformers '
                          f'{_KINDS[kind][0]}/ folder)')
  config = json.loads(config_file.read_text())
  if config.get('model_type') not in _KINDS[kind][1]:
    raise CheckpointError(f'{config_file}: model_type {config.get("model_type")!r} is not one of '
                          f'{_KINDS[kind][1]}')
  return config


def make_config(kind: str, raw: dict, **runtime):
  return T5Config.from_hf(raw, **runtime) if kind == 't5' else CLIPVisionConfig.from_hf(raw, **runtime)


def model_factory(config, seed: int = 0):
  cls = T5Encoder if isinstance(config, T5Config) else CLIPVisionTransformer
  return lambda: cls(config, rngs=nnx.Rngs(seed))


def _load(kind: str, path, *, mesh, rules, dtype, param_dtype, attention, progress):
  path = Path(path)
  runtime = dict(dtype=dtype, param_dtype=param_dtype or dtype, attention=attention)
  if (path / orbax_io.STATE_DIR).is_dir():
    meta = orbax_io.read_config(path)
    if meta.get('model') != kind:
      raise CheckpointError(f'{path} holds a converted {meta.get("model")!r} model, not {kind!r}')
    config = make_config(kind, meta['hf_config'], **runtime)
    return orbax_io.restore_model(model_factory(config), path, mesh=mesh, rules=rules)
  config = make_config(kind, read_hf_config(path, kind), **runtime)
  checkpoint = SafetensorsCheckpoint(component_dir(path, _KINDS[kind][0]))
  return load_model(model_factory(config), checkpoint, _KINDS[kind][2], mesh=mesh, rules=rules,
                    progress=progress)


def load_text_encoder(path: str | Path, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                      dtype: str = 'bfloat16', param_dtype: str | None = None,
                      attention: str = 'xla', progress: bool = False) -> T5Encoder:
  """T5 / umT5 encoder from a diffusers folder, its ``text_encoder/``, or a converted folder."""
  return _load('t5', path, mesh=mesh, rules=rules, dtype=dtype, param_dtype=param_dtype,
               attention=attention, progress=progress)


def load_image_encoder(path: str | Path, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                       dtype: str = 'bfloat16', param_dtype: str | None = None,
                       attention: str = 'xla', progress: bool = False) -> CLIPVisionTransformer:
  """CLIP vision tower from a diffusers folder, its ``image_encoder/``, or a converted folder."""
  return _load('clip', path, mesh=mesh, rules=rules, dtype=dtype, param_dtype=param_dtype,
               attention=attention, progress=progress)


def convert(kind: str, src: str | Path, dst: str | Path, *, param_dtype: str = 'bfloat16',
            group_bytes: int | None = None, overwrite: bool = False, progress: bool = True) -> int:
  """HF ``text_encoder/`` (kind 't5') or ``image_encoder/`` (kind 'clip') -> Orbax folder."""
  if kind not in _KINDS:
    raise ValueError(f'kind {kind!r} is not one of {sorted(_KINDS)}')
  raw = read_hf_config(src, kind)
  config = make_config(kind, raw, dtype=param_dtype, param_dtype=param_dtype)
  checkpoint = SafetensorsCheckpoint(component_dir(Path(src), _KINDS[kind][0]))
  count = orbax_io.convert_safetensors(checkpoint, _KINDS[kind][2], model_factory(config), dst,
                                       group_bytes=group_bytes, overwrite=overwrite,
                                       progress=progress)
  orbax_io.write_config(dst, {'model': kind, 'param_dtype': param_dtype,
                              'source': str(Path(src).resolve()), 'hf_config': raw})
  return count
