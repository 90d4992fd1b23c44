"""Train a CogVideoX-family video VAE (task 'vae'): reconstruction + KL on VAP-Data target clips.

  vap-train --config configs/train_vae.py --workdir runs/vae \
      --set model.checkpoint='"/ckpt/CogVideoX-5b-I2V"' --set data.root='"data/VAP-Data"'
  vap-train --config configs/train_vae.py:toy_frames --workdir runs/toy_vae_frames  # VAP-Toy, CPU
  vap-export --run runs/toy_vae_frames --dst toy/vae_frames
  vap-train --config configs/train_vae.py:toy_clips --workdir runs/toy_vae \
      --set model.checkpoint='"toy/vae_frames"'
  vap-export --run runs/toy_vae --dst toy/vae     # a converted vae folder the loaders read

Variants: 'finetune' (default: the CogVideoX-5b-I2V VAE, 17x256x256 clips, batch 8, lr 1e-5);
the VAP-Toy VAE (`TOY_VAE`: 8-16 channels, 4x space, 4x time, 8 latent channels) from scratch in
two stages, as image-and-video VAEs are trained: 'toy_frames' (single random frames, batch 8, lr
2e-3, 800 steps, the posterior's log-variance starting at -8), then 'toy_clips' (9-frame windows,
batch 2, lr 1e-3, 500 steps) from the first stage's export. Every VAE parameter trains, in
float32, with AdamW (no weight decay: the norms' scales must not shrink). The objective
(`vap_jax.train.vae_objective`): L1 per pixel value + vae.kl_weight x KL per pixel value (1e-6,
the latent-diffusion recipe's ratio). ``data`` is `vap_jax.data.default_data_config`
(documented in configs/vap_data.py) with the target clips only (no references), every row of
the table (no truncation to 48), ``batch_size`` global and the run's seed. Clips need 1 + 4k
frames and sides divisible by the VAE's ratio. ``model.checkpoint``, when set, wins over
``model.config``.
"""
import ml_collections

from vap_jax.data import default_data_config
from vap_jax.parallel import DEFAULT_RULES

# The VAP-Toy VAE: the CogVideoX VAE's structure at 8-16 channels, 3 levels (4x space; the first
# two also 4x time), one resnet per level, 8 latent channels: 17x64x64 clips -> 8x5x16x16.
TOY_VAE = dict(
    _class_name='AutoencoderKLCogVideoX', in_channels=3, out_channels=3,
    block_out_channels=[8, 16, 16], latent_channels=8, layers_per_block=1, norm_eps=1e-6,
    norm_num_groups=4, temporal_compression_ratio=4, sample_height=64, sample_width=64,
    scaling_factor=1.0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'finetune'
  if variant not in ('finetune', 'toy_frames', 'toy_clips'):
    raise ValueError(f'variant {variant!r}: expected finetune, toy_frames or toy_clips')
  c = ml_collections.ConfigDict()
  c.family = 'cogvideox'
  c.task = 'vae'
  c.model = dict(checkpoint='CogVideoX-5b-I2V',   # a pipeline or vae/ folder (any layout)
                 config='',                       # or: a vae config.json path, or its fields
                 dtype='float32')                 # compute; the weights are float32 always
  if variant == 'toy_frames':  # its fields, so --set model.config.latent_channels=4 works
    c.model = dict(checkpoint='', config=TOY_VAE, dtype='float32')
  elif variant == 'toy_clips':
    c.model.checkpoint = 'toy/vae_frames'
  # init_logvar: a random init's posterior log-variance (None: the model's init, 0).
  c.vae = dict(kl_weight=1e-6, init_logvar=-8.0 if variant == 'toy_frames' else None)
  data = default_data_config('cog')
  del data['seed']  # the run's seed
  data.update(buckets=[[17, 256, 256]], sample_ref_videos_num=0, mask_caption_ratio=0.0,
              truncate_multiple=1, batch_size=8, workers=2)
  c.data = data
  c.optimizer = dict(learning_rate=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                     max_grad_norm=1.0)
  c.schedule = dict(kind='constant', warmup_steps=100, end_value=0.0)
  c.steps = 10_000
  c.accumulation = 1
  c.mesh = dict(data=-1, fsdp=1, context=1, tensor=1)
  c.rules = DEFAULT_RULES
  c.log = dict(every=10, tensorboard=True, peak_tflops=0.0)  # 0: the device's known peak
  c.checkpoint = dict(every=500, keep=2, async_save=True)
  c.seed = 42
  if variant != 'finetune':
    c.data.update(root='toy/data', workers=0, frames_selection='random')
    c.optimizer.max_grad_norm = 10.0
    c.log.update(every=25, tensorboard=False)
    c.checkpoint.update(every=250, keep=1, async_save=False)
  if variant == 'toy_frames':
    c.data.update(buckets=[[1, 64, 64]], batch_size=8)
    c.optimizer.learning_rate = 2e-3
    c.schedule.warmup_steps = 50
    c.steps = 800
  elif variant == 'toy_clips':
    c.data.update(buckets=[[9, 64, 64]], batch_size=2)
    c.optimizer.learning_rate = 1e-3
    c.schedule.warmup_steps = 20
    c.steps = 500
  return c
