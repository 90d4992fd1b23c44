"""DPO of CogVideoX-VAP with LoRA adapters (VAP_SPEC §5.5), the official preference stage.

  vap-precompute cogvideox --data vap_data --out latents/cog_dpo \\
      --set alignment_score_threshold=0 --set mask_caption_ratio=0 ...
  vap-train --config configs/dpo_cogvideox.py --workdir runs/cog_dpo \\
      --set model.checkpoint=Video-As-Prompt-CogVideoX-5B --set data.latents=latents/cog_dpo \\
      --set dpo.table=vap_data/vap_data.csv
  vap-export --run runs/cog_dpo --dst out/cog_dpo_lora       # pytorch_lora_weights.safetensors
  vap-generate ... --lora out/cog_dpo_lora [--lora-scale 1.0]

The official recipe (``train_single_node_dpo.sh``): LoRA rank 32, alpha 32 on every attention
projection of the base and the expert (the official target regex over PyTorch module names),
the model itself frozen, AdamW lr 5e-5 constant (betas 0.9/0.99, eps 1e-8, weight decay 1e-4,
grad norm 1.0), one pair per GPU on 8 GPUs, captions dropped 2% of the time, beta 500, the
(>= 90, <= 10) then (>= 80, <= 30) stages. The reference model is the policy with its adapters
off. The precompute keeps every scored video (the official DPO loader's threshold 0) and leaves
caption dropout to the loader. (The official scripts pass no VAP checkpoint, so there the expert
starts as a copy of the base; point ``model.checkpoint`` at the SFT model you prefer.)

Variants: '1node' (default) and 'tiny' (CPU, the tiny golden model, wide stages that the small
fixture table can fill).
"""
from pathlib import Path

from vap_jax.config import load_config
from vap_jax.data.dpo import OFFICIAL_STAGES
from vap_jax.weights.lora import OFFICIAL_TARGET


def get_config(arg: str | None = None):
  variant = arg or '1node'
  if variant not in ('1node', 'tiny'):
    raise ValueError(f'variant {variant!r}: expected 1node or tiny')
  c = load_config(f'{Path(__file__).with_name("train_cogvideox.py")}:{variant}')
  c.task = 'dpo'
  c.model.checkpoint = 'Video-As-Prompt-CogVideoX-5B' if variant == '1node' else c.model.checkpoint
  c.lora = dict(target=OFFICIAL_TARGET, rank=32, alpha=32.0, init='')
  c.dpo = dict(table='vap_data/vap_data.csv', beta=500.0, stages=OFFICIAL_STAGES, reweight=True)
  c.data.update(batch_size=8, caption_dropout=0.02)   # pairs per step
  c.optimizer.learning_rate = 5e-5
  c.schedule = dict(kind='constant', warmup_steps=0, end_value=0.0)
  c.checkpoint.every = 500
  if variant == 'tiny':
    c.lora.update(rank=4, alpha=4.0)
    c.dpo.stages = ((None, 50, 50),)
    c.data.batch_size = 4                              # 8 rows: one per device of the test mesh
    c.optimizer.learning_rate = 1e-3
    c.steps = 20
    c.checkpoint.every = 10
  return c
