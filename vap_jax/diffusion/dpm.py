"""CogVideoX's DPM sampler: stochastic DPM-Solver++(2M) on the CogVideoX v-prediction schedule.

Follows diffusers' ``CogVideoXDPMScheduler``, the second scheduler the official CogVideoX VAP
pipeline accepts. The noise schedule (betas, SNR shift, zero-terminal-SNR, spacing, ``prev = t - T//N``)
is the one the DDIM sampler uses (``CogVideoXSchedule``). Per step i, with ``lambda = log sqrt(a/(1-a))``
and ``h = lambda_prev - lambda_t``::

    x0   = sqrt(a_t) x - sqrt(1-a_t) v
    D    = x0                                    (first step, or prev timestep < 0)
    D    = (1 + 1/2r) x0 - (1/2r) x0_old         (otherwise; r = h_last / h, x0_old = previous x0)
    prev = sqrt((1-a_prev)/(1-a_t)) e^{-h} x - expm1(-2h) sqrt(a_prev) D
           + sqrt(1-a_prev) sqrt(1 - e^{-2h}) noise

All coefficients are tabulated on the host in float64 and cast to float32 (torch's 0-d promotion),
so the traced step is a few multiply-adds and a ``where`` on the multistep flag.

What diffusers' ``step`` accepts but ignores, and so does this port: ``eta`` (the noise term is
always on, with the SDE coefficient above; ``eta=0`` does *not* make it deterministic),
``variance_noise``, ``use_clipped_model_output`` and the ``clip_sample*``/``sample_max_value`` config
keys. The noise is an explicit input instead (see ``DPMPlan.step``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vap_jax.diffusion.plans import check_options, host_f32, pytree_dataclass
from vap_jax.diffusion.schedulers import CogVideoXSchedule


@pytree_dataclass
class DPMPlan:
  """``set_timesteps`` output: per-step float32 coefficients (see the module docstring).

  ``multistep[i]`` is True where diffusers takes the second-order branch (``i > 0`` and
  ``t_i - T//N >= 0``); there ``mult3 = 1 + 1/(2r)``, ``mult4 = 1/(2r)``, elsewhere 1 and 0.
  """
  timesteps: jax.Array  # (N,) int32
  c_sample: jax.Array  # (N,) sqrt(alpha_bar_t)
  c_out: jax.Array  # (N,) sqrt(1 - alpha_bar_t)
  mult1: jax.Array  # (N,) coefficient of the sample
  mult2: jax.Array  # (N,) coefficient of the (extrapolated) x0, subtracted
  mult3: jax.Array  # (N,) weight of the current x0 in the extrapolation
  mult4: jax.Array  # (N,) weight of the previous x0, subtracted
  mult_noise: jax.Array  # (N,) coefficient of the injected noise
  multistep: jax.Array  # (N,) bool

  needs_noise: ClassVar[bool] = True  # pipelines: ``step`` takes a fresh standard-normal ``noise`` each step

  def init_state(self, sample, dtype=None):
    """The previous step's x0 (diffusers' ``old_pred_original_sample``); zeros, unused at step 0.

    ``dtype`` defaults to ``promote(sample.dtype, float32)``: the x0 diffusers carries is float32
    when the pipeline casts the model output to float (the CogVideoX pipelines do) and the latents are bf16.
    """
    dtype = jnp.promote_types(sample.dtype, jnp.float32) if dtype is None else dtype
    return jnp.zeros(sample.shape, dtype)

  def step(self, state, model_output, step_index, sample, noise=None):
    """One SDE-DPM-Solver++(2M) step; returns ``(prev_sample, pred_original_sample)``.

    This is diffusers' ``(latents, old_pred_original_sample) = scheduler.step(model_output,
    old_pred_original_sample, t, timesteps[i-1] if i > 0 else None, latents)`` with the state
    holding ``old_pred_original_sample``: the second output is the next call's ``state``.

    ``noise``: standard-normal, ``sample.shape`` (diffusers draws it in ``sample.dtype``); required
    at every step. A JAX pipeline passes ``jax.random.normal(jax.random.fold_in(key, i),
    sample.shape, sample.dtype)``. To reproduce a torch generator stream, note that diffusers calls
    ``randn`` once per step where ``multistep[i]`` is False and twice where it is True, and uses the
    last draw. ``step_index`` may be traced.
    """
    if noise is None:
      raise ValueError('CogVideoXDPMScheduler step needs noise (standard normal, shape of sample): '
                       'diffusers always adds its SDE noise term, eta does not turn it off')
    if noise.shape != sample.shape:
      raise ValueError(f'CogVideoXDPMScheduler step: noise shape {noise.shape} != sample shape {sample.shape}')
    i = step_index
    dt = model_output.dtype
    g = lambda a: a[i].astype(dt)
    x0 = g(self.c_sample) * sample - g(self.c_out) * model_output
    d = jnp.where(self.multistep[i], g(self.mult3) * x0 - g(self.mult4) * state, x0)
    prev = g(self.mult1) * sample - g(self.mult2) * d + g(self.mult_noise) * noise
    return prev, x0.astype(state.dtype)


@dataclasses.dataclass(frozen=True)
class CogVideoXDPMScheduler(CogVideoXSchedule):
  """CogVideoX's DPM-Solver++(2M) SDE sampler on the shared CogVideoX schedule (v-prediction only).

  Field defaults are the CogVideoX-5B(-I2V) scheduler config; ``from_config`` fills keys missing
  from a json with diffusers' own ``CogVideoXDPMScheduler`` defaults instead.
  """

  # diffusers' constructor defaults, used by from_config for keys a config leaves out.
  DIFFUSERS_DEFAULTS: ClassVar[Mapping[str, Any]] = {
      'num_train_timesteps': 1000, 'beta_start': 0.00085, 'beta_end': 0.012, 'beta_schedule': 'scaled_linear',
      'trained_betas': None, 'clip_sample': True, 'set_alpha_to_one': True, 'steps_offset': 0,
      'prediction_type': 'epsilon', 'clip_sample_range': 1.0, 'sample_max_value': 1.0, 'timestep_spacing': 'leading',
      'rescale_betas_zero_snr': False, 'snr_shift_scale': 3.0}

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]):
    cfg = {**cls.DIFFUSERS_DEFAULTS, **cfg}
    # clip_sample, clip_sample_range, sample_max_value: diffusers' DPM step never reads them.
    check_options('CogVideoXDPMScheduler', cfg, {
        'trained_betas': (None,), 'beta_schedule': ('scaled_linear', 'linear'), 'prediction_type': ('v_prediction',),
        'timestep_spacing': ('trailing', 'linspace', 'leading')})
    keys = [f.name for f in dataclasses.fields(cls)]
    return cls(**{k: cfg[k] for k in keys})

  def set_timesteps(self, n: int) -> DPMPlan:
    ts, at, ap = self.step_alphas(n)
    prev = ts - self.num_train_timesteps // n
    with np.errstate(divide='ignore', invalid='ignore'):
      lam = lambda a: np.log((a / (1 - a)) ** 0.5)  # -inf at a = 0 (zero SNR), +inf at a = 1
      lam_t, lam_prev = lam(at), lam(ap)
      h = lam_prev - lam_t
      mult1 = ((1 - ap) / (1 - at)) ** 0.5 * np.exp(-h)
      mult2 = np.expm1(-2 * h) * ap ** 0.5
      mult_noise = (1 - ap) ** 0.5 * (1 - np.exp(-2 * h)) ** 0.5
      multistep = (np.arange(n) > 0) & (prev >= 0)
      lam_back = np.concatenate([[np.nan], lam_t[:-1]])  # diffusers' timestep_back = timesteps[i-1]
      r = (lam_t - lam_back) / h
      mult3 = np.where(multistep, 1 + 1 / (2 * r), 1.0)
      mult4 = np.where(multistep, 1 / (2 * r), 0.0)
    tab = dict(c_sample=at ** 0.5, c_out=(1 - at) ** 0.5, mult1=mult1, mult2=mult2, mult3=mult3, mult4=mult4,
               mult_noise=mult_noise)
    for k, v in tab.items():
      if not np.all(np.isfinite(v)):
        raise ValueError(f'CogVideoXDPMScheduler.set_timesteps({n}): non-finite {k} at steps '
                         f'{np.flatnonzero(~np.isfinite(v)).tolist()} (timesteps {ts.tolist()})')
    return DPMPlan(timesteps=jnp.asarray(ts.astype(np.int32)), multistep=jnp.asarray(multistep),
                   **{k: host_f32(v) for k, v in tab.items()})
