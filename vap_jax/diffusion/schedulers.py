"""CogVideoX DDIM and flow-match Euler samplers, plus ``from_config`` for diffusers configs.

``CogVideoXSchedule`` is the host-side CogVideoX noise schedule shared with the DPM sampler (``dpm.py``);
``vap_jax.diffusion.from_config`` builds any of the samplers from a diffusers config.

The math follows diffusers' ``CogVideoXDDIMScheduler`` and ``FlowMatchEulerDiscreteScheduler``
(what the VAP pipelines call), including their float64/float32 choices: DDIM keeps
``alphas_cumprod`` in float64 and casts each step's coefficients to float32 before they touch the
sample, exactly like torch's 0-d tensor promotion does. Plans are pytrees, so they can be closed over
or passed into a jitted step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vap_jax.diffusion.plans import check_options, host_f32, pytree_dataclass


# ----------------------------------------------------------------------------------------------- DDIM


@pytree_dataclass
class DDIMPlan:
  """``set_timesteps`` output. Per step i: ``x0 = c_sample*x - c_out*v``; ``prev = a*x + b*x0``."""
  timesteps: jax.Array  # (N,) int32
  c_sample: jax.Array  # (N,) float32 sqrt(alpha_bar_t)
  c_out: jax.Array  # (N,) float32 sqrt(1 - alpha_bar_t)
  a: jax.Array  # (N,) float32
  b: jax.Array  # (N,) float32

  def init_state(self, sample=None):
    return ()

  def step(self, state, model_output, step_index, sample):
    """One deterministic (eta=0) v-prediction DDIM step; returns ``(prev_sample, state)``."""
    dt = model_output.dtype
    c1, c2 = self.c_sample[step_index].astype(dt), self.c_out[step_index].astype(dt)
    a, b = self.a[step_index].astype(dt), self.b[step_index].astype(dt)
    x0 = c1 * sample - c2 * model_output
    return a * sample + b * x0, state


@dataclasses.dataclass(frozen=True)
class CogVideoXSchedule:
  """The host-side noise schedule both CogVideoX samplers (DDIM and DPM) share.

  v-prediction, scaled-linear (or linear) betas, the SD3-style SNR shift, optional zero-terminal-SNR
  rescale, and diffusers' leading/linspace/trailing timestep spacings. Subclasses add ``set_timesteps``.
  """
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = 'scaled_linear'
  set_alpha_to_one: bool = True
  steps_offset: int = 0
  prediction_type: str = 'v_prediction'
  timestep_spacing: str = 'trailing'
  rescale_betas_zero_snr: bool = True
  snr_shift_scale: float = 1.0

  def __post_init__(self):
    if self.beta_schedule not in ('scaled_linear', 'linear'):
      raise ValueError(f'beta_schedule {self.beta_schedule!r} is not supported')
    if self.prediction_type != 'v_prediction':
      raise ValueError(f'prediction_type {self.prediction_type!r} is not supported (v_prediction only)')
    if self.timestep_spacing not in ('trailing', 'linspace', 'leading'):
      raise ValueError(f'timestep_spacing {self.timestep_spacing!r} is not supported')

  @property
  def alphas_cumprod(self) -> np.ndarray:
    """(T,) float64 on the host, after the SNR shift and the optional zero-terminal-SNR rescale."""
    t = self.num_train_timesteps
    if self.beta_schedule == 'scaled_linear':
      betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, t, dtype=np.float64) ** 2
    else:  # diffusers builds the linear schedule in float32
      betas = np.linspace(self.beta_start, self.beta_end, t, dtype=np.float32).astype(np.float64)
    ac = np.cumprod(1.0 - betas)
    ac = ac / (self.snr_shift_scale + (1 - self.snr_shift_scale) * ac)
    if self.rescale_betas_zero_snr:
      s = np.sqrt(ac)
      s0, st = s[0], s[-1]
      s = (s - st) * (s0 / (s0 - st))
      ac = s ** 2
    return ac

  @property
  def final_alpha_cumprod(self) -> float:
    return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

  def timesteps(self, n: int) -> np.ndarray:
    t = self.num_train_timesteps
    if n > t:
      raise ValueError(f'num_inference_steps {n} > num_train_timesteps {t}')
    if self.timestep_spacing == 'linspace':
      ts = np.linspace(0, t - 1, n).round()[::-1].astype(np.int64)
    elif self.timestep_spacing == 'leading':
      ts = (np.arange(0, n) * (t // n)).round()[::-1].astype(np.int64) + self.steps_offset
    else:
      ts = np.round(np.arange(t, 0, -t / n)).astype(np.int64) - 1
    return ts

  def step_alphas(self, n: int):
    """Host float64 ``(timesteps, alpha_bar_t, alpha_bar_prev)`` per step; ``prev = t - T // n`` as diffusers."""
    ac, ts = self.alphas_cumprod, self.timesteps(n)
    prev = ts - self.num_train_timesteps // n
    ap = np.where(prev >= 0, ac[np.clip(prev, 0, None)], self.final_alpha_cumprod)
    return ts, ac[ts], ap

  def _sqrt_alphas(self, timesteps, dtype):
    # diffusers casts alphas_cumprod to the sample dtype *before* the square roots.
    ac = jnp.asarray(self.alphas_cumprod.astype(np.dtype(dtype)))[timesteps]
    return ac ** 0.5, (1 - ac) ** 0.5

  def add_noise(self, original, noise, timesteps):
    """Training forward process: ``sqrt(a_t) x0 + sqrt(1 - a_t) eps`` with per-sample timesteps."""
    sa, sb = self._sqrt_alphas(timesteps, original.dtype)
    shape = (-1,) + (1,) * (original.ndim - 1)
    return sa.reshape(shape) * original + sb.reshape(shape) * noise

  def get_velocity(self, sample, noise, timesteps):
    """v-prediction target: ``sqrt(a_t) eps - sqrt(1 - a_t) x0``."""
    sa, sb = self._sqrt_alphas(timesteps, sample.dtype)
    shape = (-1,) + (1,) * (sample.ndim - 1)
    return sa.reshape(shape) * noise - sb.reshape(shape) * sample


@dataclasses.dataclass(frozen=True)
class CogVideoXDDIMScheduler(CogVideoXSchedule):
  """CogVideoX's DDIM: v-prediction, scaled-linear betas, SNR shift, zero-terminal-SNR, trailing."""

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> 'CogVideoXDDIMScheduler':
    check_options('CogVideoXDDIMScheduler', cfg, {
        'clip_sample': (False,), 'trained_betas': (None,), 'thresholding': (False,)})
    keys = [f.name for f in dataclasses.fields(cls)]
    return cls(**{k: cfg[k] for k in keys if k in cfg})

  def set_timesteps(self, n: int) -> DDIMPlan:
    ts, at, ap = self.step_alphas(n)
    a = ((1 - ap) / (1 - at)) ** 0.5
    b = ap ** 0.5 - at ** 0.5 * a
    return DDIMPlan(timesteps=jnp.asarray(ts.astype(np.int32)), c_sample=host_f32(at ** 0.5), c_out=host_f32((1 - at) ** 0.5),
                    a=host_f32(a), b=host_f32(b))


# ----------------------------------------------------------------------------------- flow-match Euler


@pytree_dataclass
class FlowMatchPlan:
  """``sigmas`` has N+1 entries (a trailing 0); ``timesteps = sigmas[:N] * T`` (float32)."""
  timesteps: jax.Array  # (N,) float32
  sigmas: jax.Array  # (N+1,) float32

  def init_state(self, sample=None):
    return ()

  def step(self, state, model_output, step_index, sample):
    """Euler step ``x + (sigma_{i+1} - sigma_i) * v`` in float32, cast back to the output dtype."""
    dt = self.sigmas[step_index + 1] - self.sigmas[step_index]
    prev = sample.astype(jnp.float32) + dt * model_output
    return prev.astype(model_output.dtype), state


@dataclasses.dataclass(frozen=True)
class FlowMatchEulerDiscreteScheduler:
  """Deterministic flow-matching Euler sampler with a static ``shift`` (Wan, SD3)."""
  num_train_timesteps: int = 1000
  shift: float = 1.0

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> 'FlowMatchEulerDiscreteScheduler':
    check_options('FlowMatchEulerDiscreteScheduler', cfg, {
        'use_dynamic_shifting': (False,), 'invert_sigmas': (False,), 'shift_terminal': (None,),
        'use_karras_sigmas': (False,), 'use_exponential_sigmas': (False,), 'use_beta_sigmas': (False,),
        'stochastic_sampling': (False,)})
    return cls(num_train_timesteps=cfg.get('num_train_timesteps', 1000),
               shift=float(cfg.get('shift', 1.0)))

  @property
  def train_sigmas(self) -> np.ndarray:
    """The (T,) float32 table training indexes: shifted ``linspace(1, T, T)[::-1] / T``."""
    t = self.num_train_timesteps
    s = (np.linspace(1, t, t, dtype=np.float32)[::-1] / np.float32(t)).astype(np.float32)
    shift = np.float32(self.shift)
    return (shift * s / (1 + (shift - 1) * s)).astype(np.float32)

  def sigmas(self, n: int) -> np.ndarray:
    t = self.num_train_timesteps
    tr = self.train_sigmas
    # As diffusers: the endpoints are the already-shifted training sigmas, and get shifted again.
    s = np.linspace(float(tr[0]) * t, float(tr[-1]) * t, n) / t
    s = (self.shift * s / (1 + (self.shift - 1) * s)).astype(np.float32)
    return np.concatenate([s, np.zeros(1, np.float32)])

  def set_timesteps(self, n: int) -> FlowMatchPlan:
    s = self.sigmas(n)
    return FlowMatchPlan(timesteps=jnp.asarray(s[:-1] * np.float32(self.num_train_timesteps)),
                         sigmas=jnp.asarray(s))

  def add_noise(self, sample, noise, sigma):
    """Training interpolation ``sigma * noise + (1 - sigma) * x0`` (per-sample ``sigma``)."""
    sigma = jnp.asarray(sigma, sample.dtype).reshape((-1,) + (1,) * (sample.ndim - 1))
    return sigma * noise + (1.0 - sigma) * sample
