"""LoRA SFT of a base image-to-video transformer (no expert): adapters on a frozen model,
trained on vap-precompute latents with the family's SFT objective (references unread).

  vap-train --config configs/lora_sft.py:wan --workdir runs/wan_lora \\
      --set model.checkpoint=Wan2.1-I2V-14B-480P-Diffusers --set data.latents=latents/wan
  vap-export --run runs/wan_lora --dst out/wan_lora      # pytorch_lora_weights.safetensors

Variants: 'wan' (DiffSynth-Studio's Wan LoRA targets: q, k, v, o of both attentions and the
feed-forward, rank 32), 'cogvideox' (the attention projections, rank 32), 'wan_tiny' and
'cogvideox_tiny' (CPU tests).
"""
from pathlib import Path

from vap_jax.config import load_config

TARGETS = {
    'wan': r'blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|attn2\.(to_q|to_k|to_v|to_out\.0)'
           r'|ffn\.net\.(0\.proj|2))',
    'cogvideox': r'transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)',
}


def get_config(arg: str | None = None):
  variant = arg or 'wan'
  family, _, size = variant.partition('_')
  if family not in TARGETS or size not in ('', 'tiny'):
    raise ValueError(f'variant {variant!r}: expected wan, cogvideox, wan_tiny or cogvideox_tiny')
  base = {'wan': 'd10', 'cogvideox': '1node'}[family] if not size else 'tiny'
  c = load_config(f'{Path(__file__).with_name(f"train_{family}.py")}:{base}')
  c.task = 'lora'
  c.model.block_idx_with_mot_ref = ()
  c.lora = dict(target=TARGETS[family], rank=32, alpha=32.0, init='')
  c.optimizer.learning_rate = 1e-4
  if size:
    c.lora.update(rank=4, alpha=4.0)
    c.optimizer.learning_rate = 1e-3
    c.steps = 20
  return c
