"""CogVideoXDPMScheduler vs PyPI diffusers, driven the way the CogVideoX pipelines drive it.

diffusers' DPM step ignores ``variance_noise`` and draws its noise from ``generator`` (once per
first-order step, twice per second-order step, using the last draw), so the reference runs with a
seeded torch generator and the same draws are replayed from a second generator into our explicit
``noise`` argument.
"""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vap_jax.diffusion as vd
from conftest import assert_close

diffusers = pytest.importorskip('diffusers')
torch = pytest.importorskip('torch')

COG_CFG = json.loads((Path(__file__).parent / 'data' / 'schedulers' / 'cogvideox_ddim.config.json').read_text())
# Exercises the other branches: no zero-SNR, SNR shift 3, leading spacing, final alpha = alpha_bar_0 (noisy last step).
VARIANT_CFG = {**COG_CFG, 'rescale_betas_zero_snr': False, 'snr_shift_scale': 3.0, 'timestep_spacing': 'leading',
               'steps_offset': 1, 'set_alpha_to_one': False}
SHAPE = (1, 3, 4, 6, 8)  # (B, F, C, H, W)
SEED = 1234


def _inputs(n):
  rng = np.random.default_rng(n)
  x = rng.standard_normal(SHAPE).astype(np.float32)
  outs = rng.standard_normal((n,) + SHAPE).astype(np.float32)
  return x, outs


def _torch_chain(cfg, n, x, outs, eta):
  """The pipeline's loop: ``latents, old = step(out, old, t, timesteps[i-1] if i > 0 else None, latents, ...)``."""
  ref = diffusers.CogVideoXDPMScheduler.from_config(cfg)
  ref.set_timesteps(n)
  ts = ref.timesteps
  gen = torch.Generator().manual_seed(SEED)
  latents, old, xs, x0s = torch.from_numpy(x), None, [], []
  for i, t in enumerate(ts):
    latents, old = ref.step(torch.from_numpy(outs[i]), old, t, ts[i - 1] if i > 0 else None, latents, eta=eta,
                            generator=gen, return_dict=False)
    xs.append(latents.numpy().copy())
    x0s.append(old.numpy().copy())
  return ts.numpy(), np.stack(xs), np.stack(x0s)


def _torch_noise(plan):
  """The draws diffusers consumes, replayed: 1 randn per step, 2 where ``multistep`` (the last one is used)."""
  gen = torch.Generator().manual_seed(SEED)
  noise = []
  for ms in np.asarray(plan.multistep):
    for _ in range(1 + int(ms)):
      z = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
    noise.append(z.numpy())
  return np.stack(noise)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize('cfg_name', ['cogvideox', 'variant'])
@pytest.mark.parametrize('n', [50, 4])
def test_dpm_chain_matches_diffusers(cfg_name, n):
  """Free-running chain (no feedback), one jitted step, eta 0 and 1 (diffusers ignores eta)."""
  cfg = {'cogvideox': COG_CFG, 'variant': VARIANT_CFG}[cfg_name]
  x, outs = _inputs(n)
  plan = vd.from_config({**cfg, '_class_name': 'CogVideoXDPMScheduler'}).set_timesteps(n)
  ts, want0, want_x00 = _torch_chain(cfg, n, x, outs, eta=0.0)
  _, want1, _ = _torch_chain(cfg, n, x, outs, eta=1.0)
  np.testing.assert_array_equal(want0, want1)  # diffusers' DPM step does not read eta
  np.testing.assert_array_equal(np.asarray(plan.timesteps), ts)
  noise = _torch_noise(plan)

  step = jax.jit(plan.step)
  xj = jnp.asarray(x)
  state = plan.init_state(xj)
  errs, x0_errs = [], []
  for i in range(n):
    xj, state = step(state, jnp.asarray(outs[i]), jnp.int32(i), xj, jnp.asarray(noise[i]))
    errs.append(_rel(xj, want0[i]))
    x0_errs.append(_rel(state, want_x00[i]))
  assert step._cache_size() == 1
  print(f'DPM {cfg_name} N={n}: max rel err prev_sample {max(errs):.2e}, x0 {max(x0_errs):.2e}')
  assert max(errs) <= 1e-5 and max(x0_errs) <= 1e-5, (errs, x0_errs)
  assert_close(xj, want0[-1], what='final sample')


@pytest.mark.parametrize('n', [50, 4])
def test_dpm_loop_in_fori_loop(n):
  """The whole loop as one jitted ``lax.fori_loop``, noise stacked per step, matches diffusers' final sample."""
  x, outs = _inputs(n)
  plan = vd.CogVideoXDPMScheduler().set_timesteps(n)  # field defaults = the CogVideoX-5B config
  _, want, want_x0 = _torch_chain(COG_CFG, n, x, outs, eta=0.0)
  noise, outs = jnp.asarray(_torch_noise(plan)), jnp.asarray(outs)

  @jax.jit
  def run(plan, x):
    def body(i, carry):
      x, state = carry
      return plan.step(state, outs[i], i, x, noise[i])
    return jax.lax.fori_loop(0, n, body, (x, plan.init_state(x)))

  xj, x0 = run(plan, jnp.asarray(x))
  rel, rel0 = _rel(xj, want[-1]), _rel(x0, want_x0[-1])
  print(f'DPM fori_loop N={n}: final rel err {rel:.2e}, x0 {rel0:.2e}')
  assert rel <= 1e-5 and rel0 <= 1e-5


def test_dpm_tables_match_ddim_schedule():
  """DPM and DDIM share one host schedule; DPM's defaults are the CogVideoX config."""
  dpm = vd.from_config(COG_CFG, class_name='CogVideoXDPMScheduler')
  assert dpm == vd.CogVideoXDPMScheduler()
  ddim = vd.from_config(COG_CFG, class_name='CogVideoXDDIMScheduler')
  np.testing.assert_array_equal(dpm.alphas_cumprod, ddim.alphas_cumprod)
  ref = diffusers.CogVideoXDPMScheduler.from_config(VARIANT_CFG)
  ours = vd.from_config(VARIANT_CFG, class_name='CogVideoXDPMScheduler')
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-12, atol=1e-15)
  plan = dpm.set_timesteps(50)
  ms = np.asarray(plan.multistep)
  assert not ms[0] and not ms[-1] and ms[1:-1].all()  # first step and the step to t < 0 are first order
  assert float(plan.mult_noise[-1]) == 0.0 and float(plan.mult2[-1]) == -1.0  # last step returns x0


def test_dpm_config_and_input_errors():
  with pytest.raises(ValueError, match='prediction_type'):  # missing key -> diffusers default 'epsilon'
    vd.from_config({'_class_name': 'CogVideoXDPMScheduler'})
  with pytest.raises(ValueError, match='trained_betas'):
    vd.from_config({**COG_CFG, 'trained_betas': [0.1] * 1000}, class_name='CogVideoXDPMScheduler')
  with pytest.raises(ValueError, match='beta_schedule'):
    vd.from_config({**COG_CFG, 'beta_schedule': 'squaredcos_cap_v2'}, class_name='CogVideoXDPMScheduler')
  # clip_sample is accepted: diffusers' DPM step never clips.
  vd.from_config({**COG_CFG, 'clip_sample': True}, class_name='CogVideoXDPMScheduler')
  plan = vd.CogVideoXDPMScheduler().set_timesteps(4)
  assert plan.needs_noise
  x = jnp.zeros(SHAPE)
  with pytest.raises(ValueError, match='needs noise'):
    plan.step(plan.init_state(x), x, 0, x)
  with pytest.raises(ValueError, match='noise shape'):
    plan.step(plan.init_state(x), x, 0, x, jnp.zeros((2,)))
