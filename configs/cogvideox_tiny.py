"""Tiny CogVideoX-VAP for tests: 3 layers (experts on 0 and 1), 4 heads x 16, 4+4 channels.

Latents (B, 3, 8, 8, 12) (sample_frames 9 -> 3 latent frames, learned positions at 8x12).
  pytest tests/test_cogvideox.py
"""
import ml_collections

from vap_jax.parallel import DEFAULT_RULES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = dict(
      num_layers=3, num_attention_heads=4, attention_head_dim=16, in_channels=8, out_channels=4,
      time_embed_dim=8, text_embed_dim=16, patch_size=2, max_text_seq_length=8, sample_height=8,
      sample_width=12, sample_frames=9, temporal_compression_ratio=4,
      use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True,
      block_idx_with_mot_ref=(0, 1), dtypes=dict(compute='float32', params='float32'),
      attention='xla')
  config.mesh = dict(data=1, fsdp=1, context=1, tensor=1)
  config.rules = DEFAULT_RULES
  if arg == 'base':
    config.model.block_idx_with_mot_ref = ()
  return config
