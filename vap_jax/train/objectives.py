"""The VAP training objectives (VAP_SPEC §5.1), computed as the official trainer computes them.

CogVideoX: v-prediction on the zero-terminal-SNR DDPM schedule. ``u`` uniform picks an index into
the trainer's sigma table ``[0.999, ..., 0.0]`` (``scheduler.timesteps / 1000``), ``t =
int(sigma * 1000)`` in float32 (so t = 511, 506, 502, 253, 251 never occur, as in the official
code), ``x_t = sqrt(a) x0 + sqrt(1-a) eps``; the model's v gives ``x0 = sqrt(a) x_t - sqrt(1-a)
v`` and the loss is ``mean(w (x0_hat - x0)^2)`` with ``w = 1/(1 - a)`` (algebraically v-MSE). The
reference stream sees the target's t.

Wan: rectified flow. ``u = sigmoid(N(0, 1))`` picks ``sigma`` from the 1000-entry table
``[1.0, ..., 0.001]``, ``t = int(sigma * 1000)``, ``x_t = (1 - sigma) x0 + sigma eps``, target
``eps - x0``, weight 1; the reference stream runs at t = 1.

Every random number is an explicit input (`Draws`), made by `draws` from a key or injected (the
parity tests inject the official ones). A batch is what `vap_jax.data.make_latent_loader` yields:
the stored VAE moments, caption embeddings (B, L, D) and (B, R, L, D), Wan's conditions and CLIP
tokens, and ``ref_mask`` (B, R) with the kept references last (see `keep_references_last`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vap_jax import conditioning
from vap_jax.diffusion.schedulers import CogVideoXSchedule, FlowMatchEulerDiscreteScheduler

# The official draw's window: the whole timestep table (`Objective.noise_window`).
WHOLE_TABLE = (0.0, 1.0)

NUM_TRAIN_TIMESTEPS = 1000


def cogvideox_sigma_table() -> np.ndarray:
  """(1000,) float32 ``scheduler.timesteps.float() / 1000`` = [0.999, 0.998, ..., 0.0]."""
  return (np.arange(NUM_TRAIN_TIMESTEPS - 1, -1, -1, dtype=np.float32) /
          np.float32(NUM_TRAIN_TIMESTEPS)).astype(np.float32)


def wan_sigma_table() -> np.ndarray:
  """(1000,) float32 ``FlowMatchEulerDiscreteScheduler().sigmas`` = [1.0, 0.999, ..., 0.001]."""
  return FlowMatchEulerDiscreteScheduler().train_sigmas


def timesteps_of(sigmas: jax.Array) -> jax.Array:
  """``(sigma * 1000.0).long()``: a float32 product, truncated."""
  return (sigmas.astype(jnp.float32) * jnp.float32(NUM_TRAIN_TIMESTEPS)).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Draws:
  """The random numbers of one training step: ``u`` (B,) picks the timestep, ``noise`` is the
  target's eps, ``posterior`` the standard-normal draws of each sampled VAE posterior."""
  u: jax.Array
  noise: jax.Array
  posterior: dict


def draws(key: jax.Array, batch: dict, family: str) -> Draws:
  """Fresh draws for ``batch``: uniform u (CogVideoX) or sigmoid(N(0,1)) (Wan), noise and
  posterior draws. Each sample's come from ``key`` folded with its global sample index
  (``batch['index']``), so they do not depend on where the sample sits in the batch: the same
  run on another mesh or process count draws the same numbers."""
  names = conditioning.COGVIDEOX_DRAWN if family == 'cogvideox' else conditioning.WAN_DRAWN
  shape = tuple(np.shape(batch['latents_mean'])[1:])
  if family == 'cogvideox':
    c, t, h, w = shape
    shape = (t, c, h, w)  # the noise is frames-first like the CogVideoX latents
  one = {n: {f'{n}_mean': np.zeros(np.shape(batch[f'{n}_mean'])[1:])} for n in names}

  def sample(index):
    k_u, k_noise, k_post = jax.random.split(jax.random.fold_in(key, index), 3)
    if family == 'cogvideox':
      u = jax.random.uniform(k_u, (), jnp.float32)
    else:
      u = jax.nn.sigmoid(jax.random.normal(k_u, (), jnp.float32))
    posterior = conditioning.posterior_draws(
        k_post, {f'{n}_mean': one[n][f'{n}_mean'] for n in names}, names)
    return Draws(u, jax.random.normal(k_noise, shape, jnp.float32), posterior)
  return jax.vmap(sample)(jnp.asarray(batch['index']).astype(jnp.uint32))


def _frames_first(shape):  # (B, C, T, h, w) -> (B, T, C, h, w)
  b, c, t, h, w = shape
  return b, t, c, h, w


def _index(u: jax.Array) -> jax.Array:
  """``(u * 1000).long()``: the table index of each draw."""
  return jnp.clip((u * jnp.float32(NUM_TRAIN_TIMESTEPS)).astype(jnp.int32), 0,
                  NUM_TRAIN_TIMESTEPS - 1)


def per_sample_mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


@dataclasses.dataclass(frozen=True)
class Objective:
  """One family's objective: ``loss(model, batch, draws) -> (mean loss, per-sample losses,
  aux)``; the model is called with the keyword inputs of the one model API. ``aux`` holds the
  timesteps, the prediction, and ``error`` and ``weights``: the per-sample loss is the mean of
  ``weights * error**2``."""
  family: str
  vae: dict                                    # scaling_factor (CogVideoX) or latents_mean/std
  schedule: CogVideoXSchedule | None = None    # CogVideoX's training schedule
  mask_references: bool = False                # drop the references batch['ref_mask'] drops
  references: bool = True                      # False: the base model alone (task 'base')
  # u is mapped into [low, high) of the timestep table before use: (0, 1) the official
  # whole table; (0, 0.5) CogVideoX's noisier half (t >= 500), where a reference decides most.
  noise_window: tuple[float, float] = WHOLE_TABLE

  def draws(self, key: jax.Array, batch: dict) -> Draws:
    return draws(key, batch, self.family)

  def _refs(self, batch, ref_latents, **ref_inputs) -> dict:
    """The model's reference inputs: none for the base model, else the references (merged
    along the sequence) and the mask of the kept ones."""
    if not self.references:
      return {}
    refs = dict(ref_latents=ref_latents, **{k: _merge_refs(v) for k, v in ref_inputs.items()})
    if self.mask_references:
      refs['ref_mask'] = batch['ref_mask']
    return refs

  def _windowed(self, u: jax.Array) -> jax.Array:
    low, high = self.noise_window
    if (low, high) == WHOLE_TABLE:
      return u  # bit for bit the official draw
    return jnp.float32(low) + jnp.float32(high - low) * u

  def __call__(self, model: Callable, batch: dict, d: Draws):
    return (self._cogvideox if self.family == 'cogvideox' else self._wan)(model, batch, d)

  def _cogvideox(self, model, batch, d: Draws):
    lat = conditioning.cogvideox_latents(batch, d.posterior, self.vae['scaling_factor'])
    x0 = lat['latents']
    sigmas = jnp.asarray(cogvideox_sigma_table())[_index(self._windowed(d.u))]
    t = timesteps_of(sigmas)
    x_t = self.schedule.add_noise(x0, d.noise, t)
    hidden = conditioning.cogvideox_inputs(x_t, lat['image_latents'])
    refs = conditioning.cogvideox_reference_inputs(lat['ref_latents'], lat['ref_image_latents'])
    v = model(hidden, t, batch['text'], **self._refs(batch, refs, ref_text=batch['ref_text']))
    pred_x0 = self.schedule.get_velocity(v.astype(jnp.float32), x_t, t)
    acp = jnp.asarray(self.schedule.alphas_cumprod.astype(np.float32))[t]
    weights = (1.0 / (1.0 - acp)).reshape(-1, 1, 1, 1, 1)
    error = pred_x0 - x0
    per_sample = per_sample_mean(weights * jnp.square(error))
    return jnp.mean(per_sample), per_sample, dict(timesteps=t, prediction=v, error=error,
                                                  weights=weights)

  def _wan(self, model, batch, d: Draws):
    lat = conditioning.wan_latents(batch, d.posterior, self.vae['latents_mean'],
                                   self.vae['latents_std'])
    x0 = lat['latents']
    sigmas = jnp.asarray(wan_sigma_table())[_index(self._windowed(d.u))]
    t = timesteps_of(sigmas)
    s = sigmas.reshape(-1, 1, 1, 1, 1)
    x_t = (1.0 - s) * x0 + s * d.noise
    hidden = conditioning.wan_inputs(x_t, lat['condition'])
    refs = conditioning.wan_reference_inputs(lat['ref_latents'], lat['ref_condition'])
    refs = self._refs(batch, refs, ref_text=batch['ref_text'], ref_image=batch['ref_clip'])
    pred = model(hidden, t, batch['text'], image=batch['clip'], **refs)  # references at t = 1
    error = pred.astype(jnp.float32) - (d.noise - x0)
    per_sample = per_sample_mean(jnp.square(error))
    return jnp.mean(per_sample), per_sample, dict(timesteps=t, prediction=pred, error=error,
                                                  weights=jnp.ones((), jnp.float32))


def _merge_refs(x):
  """(B, R, L, D) per-reference tokens -> (B, R*L, D), the references' order kept."""
  x = jnp.asarray(x)
  return x.reshape(x.shape[0], -1, *x.shape[3:])
