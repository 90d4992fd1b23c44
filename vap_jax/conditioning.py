"""What turns latents, first frames and references into the transformers' inputs, per family:
one place that the pipelines, `vap-precompute` and the trainer all use, so training and
inference cannot drift.

CogVideoX (latents frames-first, (B, T, C, h, w)): the target input is [noisy ; image latents]
along channels, the image latents being the first frame's latents followed by zero frames; each
reference likewise [ref video ; ref first frame] along channels, references along frames.

Wan (latents channels-first, (B, C, T, h, w)): the condition is [mask (4) ; latents of
(first frame, then zero frames)] along channels, the mask one on latent frame 0; the target input
is [noisy ; condition], each reference [ref video ; its condition], references along frames.
The references' first frames also give their CLIP tokens (`clip_tokens`).

The VAE-side helpers are traced functions of the VAE module: call them inside a jit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


# ------------------------------------------------------------------------------------ CogVideoX


def pad_first_frame(latents: jax.Array, frames: int, axis: int = 1) -> jax.Array:
  """First-frame latents (one latent frame on ``axis``) followed by zeros up to ``frames``."""
  pad = [(0, 0)] * latents.ndim
  pad[axis] = (0, frames - latents.shape[axis])
  return jnp.pad(latents, pad)


def cogvideox_inputs(noisy: jax.Array, image_latents: jax.Array) -> jax.Array:
  """(B, T, C, h, w) noisy latents and padded image latents -> (B, T, 2C, h, w)."""
  return jnp.concatenate([noisy, image_latents.astype(noisy.dtype)], axis=2)


def cogvideox_reference_inputs(ref_latents: jax.Array, ref_image_latents: jax.Array) -> jax.Array:
  """References (B, R, T, C, h, w) and their padded first frames -> (B, R*T, 2C, h, w)."""
  both = jnp.concatenate([ref_latents, ref_image_latents.astype(ref_latents.dtype)], axis=3)
  return both.reshape(both.shape[0], -1, *both.shape[3:])


# ------------------------------------------------------------------------------------------ Wan


def first_frame_video(frame: np.ndarray | jax.Array, num_frames: int) -> jax.Array:
  """A first frame (B, 3, H, W) in [-1, 1] then ``num_frames - 1`` zero frames: (B, 3, F, H, W),
  what Wan encodes for its image condition."""
  frame = jnp.asarray(frame)[:, :, None]
  return jnp.concatenate(
      [frame, jnp.zeros(frame.shape[:2] + (num_frames - 1,) + frame.shape[3:], frame.dtype)], 2)


def wan_mask(batch: int, frames: int, height: int, width: int, temporal_ratio: int = 4):
  """The first-frame mask (B, temporal_ratio, T, h, w): ones on latent frame 0."""
  return jnp.zeros((batch, temporal_ratio, frames, height, width), jnp.float32).at[:, :, 0].set(1)


def wan_condition(first_frame_latents: jax.Array, temporal_ratio: int = 4) -> jax.Array:
  """Normalised latents of (first frame, zeros) (B[, R], C, T, h, w) -> [mask ; latents]."""
  lead, (t, h, w) = first_frame_latents.shape[:-4], first_frame_latents.shape[-3:]
  mask = wan_mask(int(np.prod(lead)), t, h, w, temporal_ratio).reshape(*lead, temporal_ratio,
                                                                        t, h, w)
  return jnp.concatenate([mask.astype(first_frame_latents.dtype), first_frame_latents], axis=-4)


def wan_inputs(noisy: jax.Array, condition: jax.Array) -> jax.Array:
  """(B, C, T, h, w) noisy latents and the condition -> (B, C + 4 + C, T, h, w)."""
  return jnp.concatenate([noisy, condition.astype(noisy.dtype)], axis=1)


def wan_reference_inputs(ref_latents: jax.Array, ref_condition: jax.Array) -> jax.Array:
  """References (B, R, C, T, h, w) and their conditions -> (B, C + 4 + C, R*T, h, w)."""
  both = jnp.concatenate([ref_latents, ref_condition.astype(ref_latents.dtype)], axis=2)
  b, r, c, t = both.shape[:4]
  return jnp.moveaxis(both, 1, 2).reshape(b, c, r * t, *both.shape[4:])


def wan_first_frame_latents(vae, video: jax.Array) -> jax.Array:
  """Videos (B, 3, F, H, W) in [-1, 1] -> normalised latents (B, C, T, h, w) of their first
  frame followed by zero frames (the VAE mode, normalised as the Wan pipeline does)."""
  return vae.encode_normalized(first_frame_video(video[:, :, 0], video.shape[2]))


def clip_tokens(image_encoder, pixels: jax.Array) -> jax.Array:
  """Preprocessed images (B, 3, 224, 224) -> CLIP penultimate hidden states, as Wan reads them."""
  return image_encoder.hidden_state(pixels, -2)


# ------------------------------------------------------- training: from the stored posteriors
# `vap-precompute` stores raw VAE moments, channels-first: latents (B, C, T, h, w), references
# (B, R, C, T, h, w); the trainer draws the posterior samples at every step, where the official
# trainer does (VAP_SPEC §5.1).

COGVIDEOX_DRAWN = ('latents', 'ref_latents', 'image_latents', 'ref_image_latents')
WAN_DRAWN = ('latents', 'ref_latents')


def posterior_draws(key: jax.Array, batch: dict, names) -> dict:
  """Standard-normal draws for the posterior of each stored ``<name>_mean``, from one key."""
  shapes = [tuple(np.shape(batch[f'{n}_mean'])) for n in names]
  sizes = [int(np.prod(s)) for s in shapes]
  flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
  parts = jnp.split(flat, np.cumsum(sizes)[:-1])
  return {n: x.reshape(s) for n, x, s in zip(names, parts, shapes)}


def sample_posterior(mean, logvar, eps):
  """diffusers ``DiagonalGaussianDistribution.sample()``: logvar clamped to [-30, 20]."""
  logvar = jnp.clip(jnp.asarray(logvar, jnp.float32), -30.0, 20.0)
  return jnp.asarray(mean, jnp.float32) + jnp.exp(0.5 * logvar) * eps


def cogvideox_latents(batch: dict, eps: dict, scaling_factor: float) -> dict:
  """The CogVideoX trainer's latents: posterior samples x scaling_factor, frames first.
  latents / image_latents (B, T, C, h, w) (the first frame zero-padded to T frames);
  ref_latents / ref_image_latents (B, R, T, C, h, w). ``eps``: `posterior_draws`."""
  out = {n: sample_posterior(batch[f'{n}_mean'], batch[f'{n}_logvar'], eps[n]) * scaling_factor
         for n in COGVIDEOX_DRAWN}
  frames = out['latents'].shape[-3]
  for name in ('image_latents', 'ref_image_latents'):
    out[name] = pad_first_frame(out[name], frames, axis=-3)
  return {n: jnp.moveaxis(z, -4, -3) for n, z in out.items()}  # (.., C, T, ..) -> (.., T, C, ..)


def wan_latents(batch: dict, eps: dict, latents_mean, latents_std, *,
                official_logvar: bool = True) -> dict:
  """The Wan trainer's inputs: latents / ref_latents sampled from the normalised posterior,
  (B[, R], C, T, h, w); condition / ref_condition = `wan_condition` of the stored normalised
  first-frame latents (the mode, as the official trainer uses it).

  ``official_logvar`` normalises logvar like the mean, ``(logvar - mean) / std``, as the official
  trainer does; False uses the correct variance transform ``logvar - 2 log std``.
  """
  shape = (-1, 1, 1, 1)
  m = jnp.asarray(latents_mean, jnp.float32).reshape(shape)
  s = jnp.asarray(latents_std, jnp.float32).reshape(shape)
  out = {}
  for name in WAN_DRAWN:
    mean = (jnp.asarray(batch[f'{name}_mean'], jnp.float32) - m) / s
    logvar = jnp.asarray(batch[f'{name}_logvar'], jnp.float32)
    logvar = (logvar - m) / s if official_logvar else logvar - 2 * jnp.log(s)
    out[name] = sample_posterior(mean, logvar, eps[name])
  for name in ('condition', 'ref_condition'):
    out[name] = wan_condition(jnp.asarray(batch[name], jnp.float32))
  return out
