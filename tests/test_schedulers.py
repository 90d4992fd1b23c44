"""Samplers vs golden vectors from the official (vendored diffusers) schedulers.

Each chain runs under one jitted step function with a traced step index, replaying the golden
model outputs in order, which is how the pipelines' compiled denoising loop will call it.
"""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import vap_jax.diffusion as vd
from vap_jax.diffusion import schedulers as vs

DATA = Path(__file__).parent / 'data' / 'schedulers'


def _load(name):
  cfg = json.loads((DATA / f'{name}.config.json').read_text())
  return cfg, load_file(str(DATA / f'{name}.safetensors'))


def _run_chain(plan, g, n):
  """Replay the golden chain with one compiled step; returns per-step max abs error vs golden."""
  step = jax.jit(plan.step)
  x = jnp.asarray(g[f'N{n}.sample_init'])
  state = plan.init_state(x)
  errs = []
  for i in range(n):
    mo = jnp.asarray(g[f'N{n}.step{i:02d}.model_output'])
    x, state = step(state, mo, jnp.int32(i), x)
    ref = g[f'N{n}.step{i:02d}.prev_sample']
    errs.append(float(np.abs(np.asarray(x, np.float64) - ref).max()))
    x = jnp.asarray(ref)  # feed the golden sample back so errors do not compound
  assert step._cache_size() == 1
  return np.asarray(errs)


CASES = [('cogvideox_ddim', 'CogVideoXDDIMScheduler'), ('flowmatch_euler_shift5', 'FlowMatchEulerDiscreteScheduler'),
         ('wan_unipc_flow_shift3', 'UniPCMultistepScheduler')]


@pytest.mark.parametrize('name,cls', CASES)
@pytest.mark.parametrize('n', [50, 4])
def test_golden_chain(name, cls, n):
  cfg, g = _load(name)
  sched = vd.from_config(cfg, class_name=cls)
  plan = sched.set_timesteps(n)
  np.testing.assert_array_equal(np.asarray(plan.timesteps), g[f'N{n}.timesteps'])
  if f'N{n}.sigmas' in g:
    np.testing.assert_allclose(np.asarray(plan.sigmas), g[f'N{n}.sigmas'], rtol=0, atol=1e-7)
  errs = _run_chain(plan, g, n)
  print(f'{name} N={n}: max step err {errs.max():.2e}')
  assert errs.max() < 1e-5, errs


def test_ddim_tables_and_training_ops():
  cfg, g = _load('cogvideox_ddim')
  sched = vd.from_config(cfg, class_name='CogVideoXDDIMScheduler')
  np.testing.assert_allclose(sched.alphas_cumprod, g['alphas_cumprod'], rtol=1e-12, atol=1e-15)
  assert sched.final_alpha_cumprod == float(g['final_alpha_cumprod'])
  x0, noise, t = (jnp.asarray(g[f'train.{k}']) for k in ('x0', 'noise', 'timesteps'))
  np.testing.assert_allclose(sched.add_noise(x0, noise, t), g['train.add_noise'], atol=1e-6)
  np.testing.assert_allclose(sched.get_velocity(x0, noise, t), g['train.get_velocity'], atol=1e-6)


def test_flowmatch_train_sigmas():
  _, g = _load('flowmatch_euler_shift5')
  np.testing.assert_array_equal(vs.FlowMatchEulerDiscreteScheduler().train_sigmas, g['default_shift1_train_sigmas'])


def test_dynamic_cfg_matches_official():
  ts = vs.CogVideoXDDIMScheduler().timesteps(50)
  g = vd.cogvideox_dynamic_guidance(6.0, ts)
  want = [2.2915, 2.5435, 6.9744, 6.4204, 2.7881, 4.2719, 1.0376]
  np.testing.assert_allclose(g[:7], want, atol=1e-4)
  ramp = vd.cogvideox_dynamic_guidance(6.0, ts, use_step_index=True)
  assert ramp[0] == 7.0 and np.all(np.diff(ramp) <= 0) and ramp[-1] < 1.001
  u, c = jnp.ones(3), jnp.full(3, 3.0)
  np.testing.assert_allclose(vd.apply_guidance(u, c, 2.5), np.full(3, 6.0))


def test_from_config_errors():
  with pytest.raises(ValueError, match='PNDMScheduler'):
    vd.from_config({'_class_name': 'PNDMScheduler'})
  with pytest.raises(ValueError, match='use_dynamic_shifting'):
    vd.from_config({'_class_name': 'FlowMatchEulerDiscreteScheduler', 'use_dynamic_shifting': True})
  with pytest.raises(ValueError, match='prediction_type'):
    vd.from_config({'_class_name': 'CogVideoXDDIMScheduler', 'prediction_type': 'epsilon'})
  with pytest.raises(ValueError, match='solver_order'):
    vd.from_config({'_class_name': 'UniPCMultistepScheduler', 'solver_order': 3, 'use_flow_sigmas': True,
                    'prediction_type': 'flow_prediction'})
  with pytest.raises(ValueError, match='_class_name'):
    vd.from_config({})


def test_vs_pypi_diffusers_variations():
  """Config variations the golden files do not cover, checked against installed diffusers."""
  diffusers = pytest.importorskip('diffusers')
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((1, 4, 2, 3, 3)).astype(np.float32)
  outs = [rng.standard_normal(x0.shape).astype(np.float32) for _ in range(7)]
  for ours, ref in [
      (vs.CogVideoXDDIMScheduler(snr_shift_scale=3.0), diffusers.CogVideoXDDIMScheduler(
          beta_schedule='scaled_linear', prediction_type='v_prediction', rescale_betas_zero_snr=True,
          timestep_spacing='trailing', snr_shift_scale=3.0)),
      (vs.FlowMatchEulerDiscreteScheduler(shift=3.0), diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)),
  ]:
    plan = ours.set_timesteps(7)
    ref.set_timesteps(7)
    np.testing.assert_allclose(np.asarray(plan.timesteps), ref.timesteps.numpy(), rtol=0, atol=0)
    step = jax.jit(plan.step)
    x, xt, state = jnp.asarray(x0), torch.from_numpy(x0), plan.init_state(x0)
    for i, t in enumerate(ref.timesteps):
      x, state = step(state, jnp.asarray(outs[i]), jnp.int32(i), x)
      xt = ref.step(torch.from_numpy(outs[i]), t, xt, return_dict=False)[0]
      np.testing.assert_allclose(np.asarray(x), xt.numpy(), atol=1e-5)


@pytest.mark.parametrize('name,cls', CASES)
def test_free_running_chain_in_fori_loop(name, cls):
  """The whole N=50 loop as one ``lax.fori_loop`` (no golden feedback): the final sample still matches."""
  cfg, g = _load(name)
  plan = vd.from_config(cfg, class_name=cls).set_timesteps(50)
  outs = jnp.stack([jnp.asarray(g[f'N50.step{i:02d}.model_output']) for i in range(50)])
  x0 = jnp.asarray(g['N50.sample_init'])

  @jax.jit
  def run(plan, x):
    def body(i, carry):
      x, state = carry
      return plan.step(state, outs[i], i, x)
    return jax.lax.fori_loop(0, 50, body, (x, plan.init_state(x)))[0]

  x = run(plan, x0)
  err = float(np.abs(np.asarray(x, np.float64) - g['N50.step49.prev_sample']).max())
  print(f'{name} free-running N=50 final err {err:.2e}')
  assert err < 1e-4
