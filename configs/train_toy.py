"""VAP-Toy's two transformer stages (launch/train_toy.sh runs the whole recipe, VAE first):

  vap-train --config configs/train_toy.py:base --workdir runs/toy_base   # the I2V base model
  vap-export --run runs/toy_base --converted --dst toy/base/transformer
  vap-train --config configs/train_toy.py:vap --workdir runs/toy_vap \\
      --set model.checkpoint=toy/base/transformer                       # the VAP expert

'base' trains every parameter of a random-init `configs/cogvideox_toy.py:base` transformer on the
precomputed VAP-Toy latents (task 'base': the references are not read); 'vap' adds the expert on
blocks 0-2 as copies of the trained base blocks and trains only it on the frozen base (the
official recipe: v-prediction on the zero-SNR schedule, AdamW b2 0.99, wd 1e-4, clip 1; two
changes for a small model trained briefly: values zeroed at the start, timesteps t >= 500). Both
on one CPU process, float32, batch 8.
"""
import ml_collections

from vap_jax.parallel import DEFAULT_RULES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'vap'
  if variant not in ('base', 'vap'):
    raise ValueError(f'variant {variant!r}: expected base or vap')
  c = ml_collections.ConfigDict()
  c.family = 'cogvideox'
  c.task = variant
  c.model = dict(
      checkpoint='' if variant == 'base' else 'toy/base/transformer',
      config='configs/cogvideox_toy.py:base' if variant == 'base' else '',
      block_idx_with_mot_ref=() if variant == 'base' else (0, 1, 2),
      dtypes=dict(compute='float32', params='float32', trainable='float32'),
      # Measured on this CPU (20 steps after warm-up): the expert's step is 8% faster looped than
      # scanned (0.310 vs 0.338 s; the scan's stacking of saved activations and gradients), the
      # base's 10% slower (0.259 vs 0.234 s).
      attention='xla', remat='none', scan_layers=variant == 'base',
      # The expert starts as the base's copy with its attention values zeroed: a plain copy makes
      # the target read the reference's subject as its own (loss x7 at high noise), and a small
      # expert's first lesson is then to shut the reference out (benchmarks/RESULTS.md, VAP-Toy).
      expert_init='copy_zero_values')
  # The expert's captions are dropped half the time (target and references together): then the
  # reference video is the only carrier of the condition, and the expert learns to read it
  # rather than the half of the captions that name the condition.
  c.data = dict(latents='toy/latents', batch_size=8,
                caption_dropout=0.1 if variant == 'base' else 0.5, reference_dropout=0.0,
                workers=0, max_failure_fraction=0.0, min_samples_before_cap=0)
  c.optimizer = dict(learning_rate=1e-3, b1=0.9, b2=0.99, eps=1e-8, weight_decay=1e-4,
                     max_grad_norm=1.0)
  c.schedule = dict(kind='cosine', warmup_steps=100, end_value=1e-5 if variant == 'base' else 1e-4)
  # The expert trains on the noisier half of the timesteps (t >= 500): where the condition is
  # still undecided and the reference lowers the loss (below t = 500 the noisy target shows it).
  c.noise_window = (0.0, 1.0) if variant == 'base' else (0.0, 0.5)
  c.steps = 3000 if variant == 'base' else 3500
  c.accumulation = 1
  c.mesh = dict(data=-1, fsdp=1, context=1, tensor=1)
  c.rules = DEFAULT_RULES
  c.log = dict(every=25, tensorboard=False, peak_tflops=0.0)
  c.checkpoint = dict(every=1000, keep=1, async_save=False)
  c.seed = 0
  return c
