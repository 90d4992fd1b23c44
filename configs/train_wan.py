"""Train the VAP expert on a frozen Wan2.1-I2V-14B (VAP_SPEC §5), from vap-precompute shards.

  vap-train --config configs/train_wan.py:d10 --workdir runs/wan \\
      --set model.checkpoint=Wan2.1-I2V-14B-480P-Diffusers --set data.latents=latents/wan
  vap-train --config configs/train_wan.py:tiny --workdir /tmp/tiny \\
      --set model.checkpoint=tests/data/wan_pipeline/components --set data.latents=...

Variants: 'd10' (default; the released layout, experts on every fourth block; the official
48-GPU recipe: batch 24, lr 5e-5, 500 warmup steps), 'd20' (experts on every second block; the
8-GPU recipe: batch 2 on HSDP 2x4, i.e. two data replicas each sharded over four devices, lr
1e-5, 2000 warmup steps), 'tiny' (CPU). Reference stream at t = 1, rectified flow with
logit-normal sigmas; base bf16 and frozen (norms, modulation and time embedding float32 as the
official model keeps them), expert master weights and Adam moments float32.
"""
import ml_collections

from vap_jax.parallel import DEFAULT_RULES, with_rules


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'd10'
  c = ml_collections.ConfigDict()
  c.family = 'wan'
  c.task = 'vap'  # the VAP expert (configs/train_vae.py: 'vae')
  c.model = dict(
      checkpoint='Wan2.1-I2V-14B-480P-Diffusers', config='',
      block_idx_with_mot_ref=tuple(range(0, 40, 4)),
      dtypes=dict(compute='bfloat16', params='bfloat16', trainable='float32'),
      attention='cudnn', remat='full', scan_layers=True,
      context_parallel='gspmd')  # on a context axis: 'allgather' or 'ulysses' joint attention
  c.data = dict(latents='latents/wan', batch_size=24, caption_dropout=0.02,
                reference_dropout=0.0, workers=2, max_failure_fraction=0.05,
                min_samples_before_cap=100)
  c.optimizer = dict(learning_rate=5e-5, b1=0.9, b2=0.99, eps=1e-8, weight_decay=1e-4,
                     max_grad_norm=1.0)
  c.schedule = dict(kind='constant', warmup_steps=500, end_value=0.0)
  c.noise_window = (0.0, 1.0)  # timesteps drawn from this part of the table: all (official)
  c.steps = 60_000
  c.accumulation = 1
  # HSDP as the official recipes: data replicas, each sharded over fsdp, one video per replica.
  c.mesh = dict(data=-1, fsdp=2, context=1, tensor=1)
  c.rules = with_rules(DEFAULT_RULES, activation_batch='data')
  c.log = dict(every=1, tensorboard=True, peak_tflops=0.0)
  c.checkpoint = dict(every=1000, keep=2, async_save=True)   # steps; checkpoints kept
  c.seed = 42
  if variant == 'd20':
    c.model.block_idx_with_mot_ref = tuple(range(0, 40, 2))
    c.data.batch_size = 2
    c.optimizer.learning_rate = 1e-5
    c.schedule.warmup_steps = 2000
    c.mesh = dict(data=2, fsdp=-1, context=1, tensor=1)
  elif variant == 'tiny':
    c.model.update(checkpoint='tests/data/wan_pipeline/components', block_idx_with_mot_ref=(0, 2),
                   dtypes=dict(compute='float32', params='float32', trainable='float32'),
                   attention='xla', remat='none')
    c.data.update(batch_size=8, workers=0)  # one sample per device on an 8-device test mesh
    c.optimizer.learning_rate = 1e-3
    c.schedule.warmup_steps = 10
    c.steps = 200
    c.checkpoint.every = 50
    c.mesh = dict(data=-1, fsdp=1, context=1, tensor=1)
    c.rules = DEFAULT_RULES
  elif variant != 'd10':
    raise ValueError(f'variant {variant!r}: expected d10, d20 or tiny')
  return c
