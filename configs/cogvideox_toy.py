"""The VAP-Toy transformer: CogVideoX-VAP's architecture in miniature (vap_jax.toy).

4 blocks of 8 heads x 32 (inner 256), the expert on blocks 0-2 (the official layout also
leaves the last blocks without one). It reads the toy VAE's latents: 17x64x64 clips -> (5, 8,
16, 16) latents (8 channels, 4x space, 4x time), the image latents concatenated along channels
(16 in), patches of 4x4 -> 80 tokens a video; captions of the toy T5 (64 wide, 32 tokens).
  vap-train --config configs/train_toy.py:base ...   (reads this file's model block)
"""
import ml_collections

from vap_jax.parallel import DEFAULT_RULES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = dict(
      num_layers=4, num_attention_heads=8, attention_head_dim=32, in_channels=16, out_channels=8,
      time_embed_dim=128, text_embed_dim=64, patch_size=4, max_text_seq_length=32,
      sample_height=16, sample_width=16, sample_frames=17, temporal_compression_ratio=4,
      spatial_interpolation_scale=1.0, use_rotary_positional_embeddings=True,
      use_learned_positional_embeddings=True, block_idx_with_mot_ref=(0, 1, 2),
      dtypes=dict(compute='float32', params='float32'), attention='xla')
  config.mesh = dict(data=1, fsdp=1, context=1, tensor=1)
  config.rules = DEFAULT_RULES
  if arg == 'base':
    config.model.block_idx_with_mot_ref = ()
  return config
