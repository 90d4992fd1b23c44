"""Train the VAP expert on a frozen CogVideoX-5B-I2V (VAP_SPEC §5), from vap-precompute shards.

  vap-train --config configs/train_cogvideox.py --workdir runs/cog \\
      --set model.checkpoint=CogVideoX-5b-I2V --set data.latents=latents/cog
  vap-train --config configs/train_cogvideox.py:multinode ...   # the 48-GPU recipe
  vap-train --config configs/train_cogvideox.py:tiny --workdir /tmp/tiny \\
      --set model.checkpoint=tests/data/cogvideox_pipeline/components --set data.latents=...

Variants: '1node' (default; the official 8-GPU SFT recipe: batch 8, lr 1e-5, 1000 warmup steps,
caption dropout 0.02), 'multinode' (48 GPUs: batch 48, lr 5e-5, warmup 200), 'tiny' (CPU).
The expert sits on blocks 0..40 and starts as a copy of those base blocks when the checkpoint
has none; base weights bf16 and frozen, expert master weights and Adam moments float32.
"""
import ml_collections

from vap_jax.parallel import DEFAULT_RULES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or '1node'
  c = ml_collections.ConfigDict()
  c.family = 'cogvideox'
  c.task = 'vap'  # the VAP expert (configs/train_vae.py: 'vae')
  c.model = dict(
      checkpoint='CogVideoX-5b-I2V',        # base (expert copied in) or a VAP checkpoint
      config='',                            # or: a model config file for a random init
      block_idx_with_mot_ref=tuple(range(41)),
      dtypes=dict(compute='bfloat16', params='bfloat16', trainable='float32'),
      attention='cudnn', remat='full', scan_layers=True,
      context_parallel='gspmd')  # on a context axis: 'allgather' or 'ulysses' joint attention
  c.data = dict(latents='latents/cog', batch_size=8, caption_dropout=0.02,
                reference_dropout=0.0, workers=2, max_failure_fraction=0.05,
                min_samples_before_cap=100)
  c.optimizer = dict(learning_rate=1e-5, b1=0.9, b2=0.99, eps=1e-8, weight_decay=1e-4,
                     max_grad_norm=1.0)
  c.schedule = dict(kind='constant', warmup_steps=1000, end_value=0.0)
  c.noise_window = (0.0, 1.0)  # timesteps drawn from this part of the table: all (official)
  c.steps = 60_000
  c.accumulation = 1
  c.mesh = dict(data=1, fsdp=-1, context=1, tensor=1)
  c.rules = DEFAULT_RULES
  c.log = dict(every=1, tensorboard=True, peak_tflops=0.0)  # 0: the device's known peak
  c.checkpoint = dict(every=1000, keep=2, async_save=True)   # steps; checkpoints kept
  c.seed = 42
  if variant == 'multinode':
    c.data.batch_size = 48
    c.optimizer.learning_rate = 5e-5
    c.schedule.warmup_steps = 200
  elif variant == 'tiny':
    c.model.update(checkpoint='tests/data/cogvideox_pipeline/components',
                   block_idx_with_mot_ref=(0, 1),
                   dtypes=dict(compute='float32', params='float32', trainable='float32'),
                   attention='xla', remat='none')
    c.data.update(batch_size=8, workers=0)  # one sample per device on an 8-device test mesh
    c.optimizer.learning_rate = 1e-3
    c.schedule.warmup_steps = 10
    c.steps = 200
    c.checkpoint.every = 50
    c.mesh = dict(data=-1, fsdp=1, context=1, tensor=1)
  elif variant != '1node':
    raise ValueError(f'variant {variant!r}: expected 1node, multinode or tiny')
  return c
