"""Tiny Wan-VAP for tests: 4 layers (experts on 0 and 2), 4 heads x 12, I2V channels 4+4+4.

Latents (B, 12, 3, 8, 8); text (B, L, 16); CLIP tokens (B, N, 20).
  pytest tests/test_wan_sharding.py
"""
import ml_collections

from vap_jax.parallel import DEFAULT_RULES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = dict(
      patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=12,
      out_channels=4, text_dim=16, freq_dim=256, ffn_dim=64, num_layers=4, image_dim=20,
      added_kv_proj_dim=48, rope_max_seq_len=32, block_idx_with_mot_ref=(0, 2),
      dtypes=dict(compute='float32', params='float32'), attention='xla')
  config.mesh = dict(data=1, fsdp=1, context=1, tensor=1)
  config.rules = DEFAULT_RULES
  if arg == 'base':
    config.model.block_idx_with_mot_ref = ()
  return config
