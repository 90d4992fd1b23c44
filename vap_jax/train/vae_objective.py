"""The VAE objective (task 'vae'): reconstruction + KL of a CogVideoX-family video VAE, trained on
target clips of VAP-Data (what `vap_jax.data.make_loader` yields: ``video`` (B, F, H, W, 3) in
[-1, 1] and ``index``).

Per sample, with ``x`` the clip as (3, F, H, W) and ``P = 3 F H W`` its pixel values::

    mean, logvar = encode(x)                      the model's posterior (logvar clipped as it clips)
    z = mean + exp(logvar / 2) * eps              eps ~ N(0, 1), one draw per sample (`VAEDraws`)
    recon = sum |x - decode(z)| / P               mean absolute error per pixel value
    kl = sum 0.5 (mean^2 + exp(logvar) - 1 - logvar) / P     KL(q || N(0, 1)), summed over the
                                                  latent elements, divided by the same P
    loss = recon + kl_weight * kl

and the batch's loss is the mean of the samples'. L1, not L2: it is what video VAEs train their
pixels with (sharper reconstructions, less pull from outliers). Both terms are sums over the sample
divided by the same ``P``: the ratio is then the latent-diffusion KL-autoencoder recipe's (both
terms summed per sample), so ``kl_weight`` means what it means there (1e-6), while the loss reads
per pixel value. encode/decode are the model's own code paths (frame batches as at inference,
no tiling), so the trained weights run unchanged in precompute and the pipelines.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VAEDraws:
  """The random numbers of one step: ``noise`` (B, C, T, h, w), each sample's posterior eps."""
  noise: jax.Array


@dataclasses.dataclass(frozen=True)
class VAEObjective:
  """``loss(vae, batch, draws) -> (mean loss, per-sample losses, aux)``; ``aux['metrics']``
  holds the batch means of ``recon`` and ``kl`` (see the module docstring), ``aux`` also the
  ``posterior`` and the ``reconstruction``."""
  latent_channels: int
  spatial_ratio: int
  temporal_ratio: int
  kl_weight: float = 1e-6

  @classmethod
  def of(cls, vae, kl_weight: float) -> 'VAEObjective':
    return cls(vae.config.latent_channels, vae.spatial_ratio, vae.temporal_ratio,
               float(kl_weight))

  def latent_shape(self, video_shape) -> tuple[int, ...]:
    """(C, T, h, w) of a (F, H, W, 3) clip; a clear error for a size the VAE cannot take."""
    f, h, w = video_shape[:3]
    s, t = self.spatial_ratio, self.temporal_ratio
    if (f - 1) % t or h % s or w % s:
      raise ValueError(f'clips of {f}x{h}x{w} (frames x height x width): the VAE needs '
                       f'1 + {t}k frames and sides divisible by {s} (data.buckets)')
    return self.latent_channels, (f - 1) // t + 1, h // s, w // s

  def draws(self, key: jax.Array, batch: dict) -> VAEDraws:
    """eps for each sample from ``key`` folded with its global index, so the draws do not depend
    on where the sample sits in the batch (another mesh or process count draws the same)."""
    shape = self.latent_shape(np.shape(batch['video'])[1:])
    one = lambda index: jax.random.normal(jax.random.fold_in(key, index), shape, jnp.float32)
    return VAEDraws(jax.vmap(one)(jnp.asarray(batch['index']).astype(jnp.uint32)))

  def __call__(self, vae, batch: dict, d: VAEDraws):
    x = jnp.moveaxis(jnp.asarray(batch['video'], jnp.float32), -1, 1)  # (B, 3, F, H, W)
    posterior = vae.encode(x.astype(vae.config.dtype))
    mean = posterior.mean.astype(jnp.float32)
    logvar = posterior.logvar.astype(jnp.float32)
    z = mean + jnp.exp(0.5 * logvar) * d.noise
    out = vae.decode(z.astype(vae.config.dtype)).astype(jnp.float32)
    pixels = np.prod(x.shape[1:])
    recon = jnp.sum(jnp.abs(out - x).reshape(x.shape[0], -1), axis=1) / pixels
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    kl = jnp.sum(kl.reshape(kl.shape[0], -1), axis=1) / pixels
    per_sample = recon + self.kl_weight * kl
    metrics = dict(recon=jnp.mean(recon), kl=jnp.mean(kl))
    return jnp.mean(per_sample), per_sample, dict(metrics=metrics, posterior=posterior,
                                                  reconstruction=out)
