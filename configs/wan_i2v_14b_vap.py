"""Wan2.1-I2V-14B + VAP expert (ByteDance/Video-As-Prompt-Wan2.1-14B), real size.

Experts on blocks 0, 4, ..., 36 (10 of 40; the released multi-node recipe, config_ori_d_10); a
converted checkpoint's own config.json takes precedence when loading. Shapes: 49 frames at
480x832 -> latents (B, 36, 13, 60, 104) = 16 noisy + 4 mask + 16 image-condition channels; text
(B, 512, 4096); CLIP image tokens (B, 257, 1280); one reference adds the same again.

Convert the released transformer:
  python -m convert.wan --src Video-As-Prompt-Wan2.1-14B --dst ckpt/wan_vap
"""
import ml_collections

from vap_jax.parallel import DEFAULT_RULES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = dict(
      patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36,
      out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
      cross_attn_norm=True, qk_norm='rms_norm_across_heads', eps=1e-6, image_dim=1280,
      added_kv_proj_dim=5120, rope_max_seq_len=1024, block_idx_with_mot_ref=tuple(range(0, 40, 4)),
      dtypes=dict(compute='bfloat16', params='bfloat16'), attention='xla')
  config.mesh = dict(data=1, fsdp=-1, context=1, tensor=1)
  config.rules = DEFAULT_RULES
  if arg == 'base':  # expert off: the plain Wan2.1-I2V-14B transformer
    config.model.block_idx_with_mot_ref = ()
  elif arg == 'd20':  # the single-node recipe: experts on every second block
    config.model.block_idx_with_mot_ref = tuple(range(0, 40, 2))
  return config
