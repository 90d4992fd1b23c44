"""CogVideoX-5B-I2V + VAP expert (ByteDance/Video-As-Prompt-CogVideoX-5B), real size.

Experts on blocks 0..40 of 42 (the released recipe, SCog/config_ori.json); a converted checkpoint's
own config.json takes precedence when loading. Shapes: 49 frames at 480x720 -> latents
(B, 13, 32, 60, 90); one reference adds (B, 13, 32, 60, 90) and 226 caption tokens.

Convert the released transformer:
  python -m convert.cogvideox --src Video-As-Prompt-CogVideoX-5B --dst ckpt/cogvideox_vap
Mesh: ``config.mesh`` sizes over ('data', 'fsdp', 'context', 'tensor'); -1 takes the rest.
"""
import ml_collections

from vap_jax.parallel import DEFAULT_RULES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = dict(
      num_layers=42, num_attention_heads=48, attention_head_dim=64, in_channels=32,
      out_channels=16, time_embed_dim=512, text_embed_dim=4096, patch_size=2,
      max_text_seq_length=226, sample_height=60, sample_width=90, sample_frames=49,
      temporal_compression_ratio=4, spatial_interpolation_scale=1.875,
      temporal_interpolation_scale=1.0, use_rotary_positional_embeddings=True,
      use_learned_positional_embeddings=True, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5,
      norm_elementwise_affine=True, attention_bias=True, patch_bias=True,
      block_idx_with_mot_ref=tuple(range(41)),
      dtypes=dict(compute='bfloat16', params='bfloat16'), attention='xla')
  config.mesh = dict(data=1, fsdp=-1, context=1, tensor=1)
  config.rules = DEFAULT_RULES
  if arg == 'base':  # expert off: the plain CogVideoX-5B-I2V transformer
    config.model.block_idx_with_mot_ref = ()
  return config
