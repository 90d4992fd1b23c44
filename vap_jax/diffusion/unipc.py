"""UniPC multistep sampler in flow-matching mode (Wan): order-2 ``bh2`` predictor + corrector.

Only the configuration the VAP Wan pipeline uses is implemented (flow_prediction, use_flow_sigmas,
predict_x0, solver_order 2, lower_order_final, final sigma 0). All step coefficients (log-SNR
steps, phi functions, the corrector's 2x2 solve) are scalars that depend only on the step index,
so they are tabulated on the host; the traced step is then a handful of fused multiply-adds.

The flow sigma table follows the diffusers version the official code vendors (and the golden
vectors): ``1 - linspace(1, 1/T, N+1)``, shifted, flipped, last dropped, so it starts at
``shift(0.999)`` and timesteps are ``int(sigma * T)`` truncated. Current PyPI diffusers starts
at 1.0 instead.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vap_jax.diffusion.plans import check_options, pytree_dataclass


@pytree_dataclass
class UniPCPlan:
  """Per-step tables. ``p_*``: predictor sigma_i -> sigma_{i+1}; ``c_*``: corrector at step i."""
  timesteps: jax.Array  # (N,) int32
  sigmas: jax.Array  # (N+1,) float32
  p_ratio: jax.Array  # sigma_{i+1} / sigma_i
  p_ahphi: jax.Array  # alpha_{i+1} * expm1(-h)
  p_abh: jax.Array  # alpha_{i+1} * B(h)
  p_rho: jax.Array  # 0.5 at order 2, else 0
  p_rk: jax.Array  # r_1 (1 at order 1)
  c_on: jax.Array  # bool, corrector runs (i > 0)
  c_ratio: jax.Array
  c_ahphi: jax.Array
  c_abh: jax.Array
  c_rho0: jax.Array  # weight of the history difference (0 at order 1)
  c_rhot: jax.Array  # weight of the new model output difference
  c_rk: jax.Array

  def init_state(self, sample):
    """``(m0, m1, last_sample)``: last two x0 predictions and the sample before the last predictor."""
    z = jnp.zeros_like(sample)
    return (z, z, z)

  def step(self, state, model_output, step_index, sample):
    i = step_index
    m0, m1, last = state
    dt = sample.dtype
    g = lambda a: a[i].astype(dt)
    x0 = sample - g(self.sigmas) * model_output  # flow_prediction -> x0
    # UniC: correct the sample the previous predictor produced, using the new model output.
    d1 = (m1 - m0) / g(self.c_rk)
    corr = g(self.c_rho0) * d1 + g(self.c_rhot) * (x0 - m0)
    corrected = g(self.c_ratio) * last - g(self.c_ahphi) * m0 - g(self.c_abh) * corr
    sample = jnp.where(self.c_on[i], corrected, sample)
    m1, m0 = m0, x0
    # UniP: predict the next sample.
    d1 = (m1 - m0) / g(self.p_rk)
    prev = g(self.p_ratio) * sample - g(self.p_ahphi) * m0 - g(self.p_abh) * (g(self.p_rho) * d1)
    return prev.astype(dt), (m0, m1, sample)


@dataclasses.dataclass(frozen=True)
class UniPCMultistepScheduler:
  num_train_timesteps: int = 1000
  flow_shift: float = 1.0
  solver_order: int = 2
  lower_order_final: bool = True

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]):
    check_options('UniPCMultistepScheduler', cfg, {
        'prediction_type': ('flow_prediction',), 'use_flow_sigmas': (True,), 'predict_x0': (True,),
        'solver_type': ('bh2',), 'solver_order': (2,), 'thresholding': (False,), 'disable_corrector': ([],),
        'solver_p': (None,), 'use_karras_sigmas': (False,), 'use_exponential_sigmas': (False,),
        'use_beta_sigmas': (False,), 'final_sigmas_type': ('zero',), 'use_dynamic_shifting': (False,),
        'shift_terminal': (None,)})
    if not cfg.get('use_flow_sigmas', False) or cfg.get('prediction_type') != 'flow_prediction':
      raise ValueError('UniPCMultistepScheduler: only flow mode (use_flow_sigmas, flow_prediction)')
    return cls(num_train_timesteps=cfg.get('num_train_timesteps', 1000), flow_shift=float(cfg.get('flow_shift', 1.0)),
               solver_order=2, lower_order_final=cfg.get('lower_order_final', True))

  def sigmas64(self, n: int) -> np.ndarray:
    t, s = self.num_train_timesteps, self.flow_shift
    sig = 1.0 - np.linspace(1, 1 / t, n + 1)
    sig = np.flip(s * sig / (1 + (s - 1) * sig))[:-1].copy()
    if abs(sig[0] - 1) < 1e-6:
      sig[0] -= 1e-6
    return sig

  def set_timesteps(self, n: int) -> UniPCPlan:
    sig64 = self.sigmas64(n)
    ts = (sig64 * self.num_train_timesteps).astype(np.int64)
    sig = np.concatenate([sig64, [0.0]]).astype(np.float32)
    with np.errstate(divide='ignore', invalid='ignore'):
      lam = np.log(1 - sig) - np.log(sig)  # float32; lam[N] = +inf
    orders = []
    for i in range(n):
      o = min(self.solver_order, n - i) if self.lower_order_final else self.solver_order
      orders.append(min(o, i + 1))

    def coeffs(t, s0, s1, order):
      """Scalars of one UniP/UniC update from sigma index s0 to t (s1: the older history point)."""
      with np.errstate(divide='ignore', invalid='ignore'):
        h = lam[t] - lam[s0]
        hh = -h
        hphi1 = np.expm1(hh)
        bh = np.expm1(hh)
        rk = (lam[s1] - lam[s0]) / h if order == 2 else np.float32(1)
        b1 = (hphi1 / hh - 1) / bh
        b2 = ((hphi1 / hh - 1) / hh - np.float32(0.5)) * 2 / bh
      alpha = 1 - sig[t]
      return sig[t] / sig[s0], alpha * hphi1, alpha * bh, rk, b1, b2

    tab = {k: np.zeros(n, np.float32) for k in UniPCPlan.__dataclass_fields__ if k[:2] in ('p_', 'c_')}
    tab['c_on'] = np.arange(n) > 0
    for i in range(n):
      o = orders[i]
      ratio, ahphi, abh, rk, _, _ = coeffs(i + 1, i, i - 1, o)
      tab['p_ratio'][i], tab['p_ahphi'][i], tab['p_abh'][i] = ratio, ahphi, abh
      tab['p_rk'][i], tab['p_rho'][i] = (rk, 0.5) if o == 2 else (1.0, 0.0)
      if i == 0:
        tab['c_rk'][i] = 1.0
        continue
      o = orders[i - 1]  # the corrector uses the order of the predictor it corrects
      ratio, ahphi, abh, rk, b1, b2 = coeffs(i, i - 1, i - 2, o)
      tab['c_ratio'][i], tab['c_ahphi'][i], tab['c_abh'][i] = ratio, ahphi, abh
      if o == 1:
        tab['c_rk'][i], tab['c_rho0'][i], tab['c_rhot'][i] = 1.0, 0.0, 0.5
      else:
        rho = np.linalg.solve(np.array([[1.0, 1.0], [float(rk), 1.0]]), np.array([float(b1), float(b2)]))
        tab['c_rk'][i], tab['c_rho0'][i], tab['c_rhot'][i] = rk, rho[0], rho[1]
    return UniPCPlan(timesteps=jnp.asarray(ts.astype(np.int32)), sigmas=jnp.asarray(sig),
                     **{k: jnp.asarray(v) for k, v in tab.items()})
