"""Key maps and loaders for the text and image encoders shipped beside the DiTs.

``text_encoder/``: transformers ``T5EncoderModel`` (CogVideoX, T5 v1.1 XXL) or
``UMT5EncoderModel`` (Wan, umT5-XXL): same tensor names, the config's ``model_type`` tells which.
``image_encoder/``: transformers ``CLIPVisionModel`` (Wan, ViT-H/14).

Each ``load_*`` accepts a diffusers or converted pipeline folder or the component folder itself
(see `vap_jax.weights.component`).
"""
from __future__ import annotations

from pathlib import Path

from jax.sharding import Mesh

from vap_jax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
from vap_jax.models.t5 import T5Config, T5Encoder
from vap_jax.parallel import DEFAULT_RULES
from vap_jax.parallel.sharding import Rules
from vap_jax.weights import component
from vap_jax.weights.component import ModelSpec, read_json_config
from vap_jax.weights.keymap import CONV_TO_DENSE, TRANSPOSE, KeyMap, Rule
from vap_jax.weights.safetensors_io import CheckpointError

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


def _source_reader(folder_kind: str, model_types: tuple[str, ...], keymap: KeyMap):
  def read_source(folder: Path) -> tuple[dict, KeyMap]:
    config = read_json_config(folder, f'a transformers {folder_kind}/ folder')
    if config.get('model_type') not in model_types:
      raise CheckpointError(f'{folder / "config.json"}: model_type {config.get("model_type")!r} '
                            f'is not one of {model_types}')
    return config, keymap
  return read_source


T5_SPEC = ModelSpec('t5', 'text_encoder', _source_reader('text_encoder', ('t5', 'umt5'), T5),
                    T5Config.from_source, T5Encoder)
CLIP_SPEC = ModelSpec('clip', 'image_encoder',
                      _source_reader('image_encoder', ('clip_vision_model', 'clip'), CLIP_VISION),
                      CLIPVisionConfig.from_source, CLIPVisionTransformer)
SPECS = {'t5': T5_SPEC, 'clip': CLIP_SPEC}


def _spec(kind: str) -> ModelSpec:
  if kind not in SPECS:
    raise ValueError(f'kind {kind!r} is not one of {sorted(SPECS)}')
  return SPECS[kind]


def make_config(kind: str, raw: dict, **runtime):
  return _spec(kind).make_config(raw, **runtime)


def model_factory(config, seed: int = 0):
  return (T5_SPEC if isinstance(config, T5Config) else CLIP_SPEC).factory(config, seed)


def load_text_encoder(path: str | Path, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                      dtype: str = 'bfloat16', param_dtype: str | None = None,
                      attention: str = 'xla', progress: bool = False) -> T5Encoder:
  """T5 / umT5 encoder from a diffusers or converted pipeline folder, or its ``text_encoder/``."""
  return component.load(T5_SPEC, path, mesh=mesh, rules=rules, progress=progress, dtype=dtype,
                        param_dtype=param_dtype or dtype, attention=attention)


def load_image_encoder(path: str | Path, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                       dtype: str = 'bfloat16', param_dtype: str | None = None,
                       attention: str = 'xla', progress: bool = False) -> CLIPVisionTransformer:
  """CLIP vision tower from a diffusers or converted pipeline folder, or its ``image_encoder/``."""
  return component.load(CLIP_SPEC, path, mesh=mesh, rules=rules, progress=progress, dtype=dtype,
                        param_dtype=param_dtype or dtype, attention=attention)


def convert(kind: str, src: str | Path, dst: str | Path, *, param_dtype: str = 'bfloat16',
            group_bytes: int | None = None, overwrite: bool = False, progress: bool = True) -> int:
  """HF ``text_encoder/`` (kind 't5') or ``image_encoder/`` (kind 'clip') -> Orbax folder."""
  return component.convert(_spec(kind), src, dst, param_dtype=param_dtype,
                           group_bytes=group_bytes, overwrite=overwrite, progress=progress)
