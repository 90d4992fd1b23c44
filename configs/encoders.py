"""Text and image encoder configs, real and tiny: ``get_config('<name>')``.

  t5_xxl     T5 v1.1 XXL encoder (CogVideoX text encoder)    4.76B params
  umt5_xxl   umT5-XXL encoder (Wan text encoder)              5.68B params
  clip_h14   CLIP ViT-H/14 vision tower, 224 px (Wan image encoder) 0.63B params
  t5_tiny, umt5_tiny, clip_tiny: the same code paths at test sizes.

``config.kind`` is 't5' or 'clip'; ``config.model`` holds `T5Config` / `CLIPVisionConfig` fields.
Real runs shard these over fsdp/tensor: see ``config.mesh`` and ``config.rules``.
"""
import ml_collections

from vap_jax.parallel import DEFAULT_RULES

_T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               layer_norm_epsilon=1e-6, feed_forward_proj='gated-gelu',
               per_layer_position_bias=False)
_T5_TINY = dict(_T5_XXL, vocab_size=256, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=16)
_CLIP_H14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=16, num_channels=3, image_size=224, patch_size=14,
                 hidden_act='gelu', layer_norm_eps=1e-5)
_CLIP_TINY = dict(_CLIP_H14, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, image_size=28, patch_size=7)

MODELS = {
    't5_xxl': ('t5', _T5_XXL),
    'umt5_xxl': ('t5', dict(_T5_XXL, vocab_size=256384, per_layer_position_bias=True)),
    'clip_h14': ('clip', _CLIP_H14),
    't5_tiny': ('t5', _T5_TINY),
    'umt5_tiny': ('t5', dict(_T5_TINY, per_layer_position_bias=True)),
    'clip_tiny': ('clip', _CLIP_TINY),
}


def get_config(arg: str = 't5_xxl') -> ml_collections.ConfigDict:
  if arg not in MODELS:
    raise ValueError(f'unknown encoder config {arg!r}: one of {sorted(MODELS)}')
  kind, model = MODELS[arg]
  config = ml_collections.ConfigDict()
  config.kind = kind
  tiny = arg.endswith('_tiny')
  runtime = dict(dtype='float32', param_dtype='float32') if tiny else dict(
      dtype='bfloat16', param_dtype='bfloat16')
  config.model = dict(model, attention='xla', **runtime)
  config.mesh = dict(data=1, fsdp=1, context=1, tensor=1)
  config.rules = DEFAULT_RULES
  return config
