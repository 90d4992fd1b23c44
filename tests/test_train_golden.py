"""The training step against the official trainer (../shared/golden/*_train): the production
loader, objective, train step and optimizer, with the official draws injected.

Losses rel <= 1e-5, every expert gradient rel <= 1e-4 (of its tensor's max), parameters after two
clipped AdamW steps rel <= 1e-5 of their tensor's max -- except elements whose gradient is within
100x of Adam's eps (1e-8): there ``g / (|g| + eps)`` turns float32 gradient rounding (the golden
float64 rerun shows 3e-7 of max|g|) into an O(lr) change of the update, so those get the golden
README's absolute 2e-5. Parameters the official AdamW skips (no gradient ever) stay bitwise
unchanged; the frozen base too.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from conftest import DATA
from vap_jax.diffusion import CogVideoXDDIMScheduler
from vap_jax.models.stack import checkpoint_slots
from vap_jax.train import dpo, objectives, optimizer as opt
from vap_jax.train.step import init_state, make_train_step, split
from vap_jax.weights import keymap as km
from vap_jax.weights.cogvideox import COGVIDEOX, load_cogvideox
from vap_jax.weights.safetensors_io import SafetensorsCheckpoint
from vap_jax.weights.wan import WAN, load_wan

CASES = {'cogvideox': (DATA / 'cogvideox_mot', DATA / 'cogvideox_train', COGVIDEOX),
         'wan': (DATA / 'wan_mot', DATA / 'wan_train', WAN)}


def _cogvideox_batch(i):
  """The official inputs as a `make_latent_loader` batch: stored moments (channels first), the
  posterior draws zero so the sample is the given latents."""
  b, f = i['latents_vae'].shape[:2]
  first = lambda x: np.moveaxis(x, 2, 1)  # (B, T, C, h, w) -> (B, C, T, h, w)
  refs = lambda x, n: np.moveaxis(x.reshape(b, n, -1, *x.shape[2:]), 3, 2)  # -> (B, R, C, T, ..)
  batch = dict(latents_mean=first(i['latents_vae']), image_latents_mean=first(i['image_latents_vae']),
               ref_latents_mean=refs(i['ref_latents_vae'], 1),
               ref_image_latents_mean=refs(i['ref_image_latents_vae'], 1),
               text=i['encoder_hidden_states'],
               ref_text=i['encoder_hidden_states_mot_ref'].reshape(b, 1, -1, 16))
  for name in objectives.conditioning.COGVIDEOX_DRAWN:
    batch[f'{name}_logvar'] = np.zeros_like(batch[f'{name}_mean'])
  draws = objectives.Draws(jnp.asarray(i['u']), jnp.asarray(i['noise']),
                           {n: jnp.zeros(batch[f'{n}_mean'].shape) for n in
                            objectives.conditioning.COGVIDEOX_DRAWN})
  return batch, draws


def _wan_batch(i):
  """Wan's latents are already normalised: identity statistics (mean 0, std 1) keep them."""
  b = i['latents'].shape[0]
  ref = lambda x: x[:, None]  # one reference
  batch = dict(latents_mean=i['latents'], ref_latents_mean=ref(i['ref_latents']),
               condition=i['image_condition'], ref_condition=ref(i['ref_image_condition']),
               text=i['encoder_hidden_states'], ref_text=ref(i['encoder_hidden_states_mot_ref']),
               clip=i['encoder_hidden_states_image'],
               ref_clip=ref(i['encoder_hidden_states_image_mot_ref']))
  for name in objectives.conditioning.WAN_DRAWN:
    batch[f'{name}_logvar'] = np.zeros_like(batch[f'{name}_mean'])
  draws = objectives.Draws(jnp.asarray(i['u']), jnp.asarray(i['noise']),
                           {n: jnp.zeros(batch[f'{n}_mean'].shape) for n in
                            objectives.conditioning.WAN_DRAWN})
  assert b == 2
  return batch, draws


def _setup(family, max_norm=1.0):
  weights, golden, keymap = CASES[family]
  load = load_cogvideox if family == 'cogvideox' else load_wan
  model = load(weights, dtype='float32')
  inputs = load_file(golden / 'sft' / 'inputs.safetensors')
  if family == 'cogvideox':
    objective = objectives.Objective('cogvideox', {'scaling_factor': 0.7},
                                     CogVideoXDDIMScheduler(snr_shift_scale=1.0))
    batch, draws = _cogvideox_batch(inputs)
  else:
    channels = inputs['latents'].shape[1]
    objective = objectives.Objective('wan', {'latents_mean': [0.0] * channels,
                                             'latents_std': [1.0] * channels})
    batch, draws = _wan_batch(inputs)
  graphdef, trainable, frozen = split(model)
  schedule = opt.schedule(1e-3)
  optimizer = opt.adamw(schedule, b1=0.9, b2=0.99, eps=1e-8, weight_decay=1e-4,
                        max_grad_norm=max_norm,
                        decay=opt.decay_scales(trainable, model.unreachable()))
  step = make_train_step(graphdef, objective, optimizer, lr_schedule=schedule)
  # golden key -> (our slot, transform), through the production key map
  _, state = nnx.split(model)
  the_plan = km.plan(SafetensorsCheckpoint(weights / 'transformer'), keymap, state,
                     checkpoint_slots(model.config.block_idx_with_mot_ref))
  by_key = {key: (slot, transform) for slot, (key, transform) in the_plan.entries.items()}
  return dict(model=model, trainable=trainable, frozen=frozen, batch=batch, draws=draws,
              step=step, optimizer=optimizer, objective=objective, graphdef=graphdef,
              by_key=by_key, golden=golden)


def _ours(tree, slot):
  path, layer = slot
  value = np.asarray(dict(nnx.to_flat_state(tree))[path][...])
  return value if layer is None else value[layer]


def _compare(tree, expected: dict, s, rel: float, what: str, near_eps_atol: float | None = None):
  """Every tensor within ``rel`` of its max; with ``near_eps_atol``, the elements whose golden
  gradient is below 100 x Adam's eps within that absolute bound instead."""
  grads = load_file(s['golden'] / 'sft' / 'grads.safetensors') if near_eps_atol else {}
  for key, want in expected.items():
    slot, transform = s['by_key'][key]
    got, want = _ours(tree, slot), transform.array(want)
    bound = np.full(want.shape, rel * max(np.abs(want).max(), 1e-30))
    if near_eps_atol:
      bound = np.where(np.abs(transform.array(grads[key])) < 100 * 1e-8, near_eps_atol, bound)
    err = np.abs(got - want)
    assert (err <= bound).all(), f'{what} {key}: max err {err.max():.2e}'


@pytest.mark.parametrize('family', ['cogvideox', 'wan'])
def test_loss_and_gradients_equal_official(family):
  s = _setup(family)
  outputs = load_file(s['golden'] / 'sft' / 'outputs.safetensors')
  loss_and_grads = jax.jit(s['step'].loss_and_grads)
  (loss, per_sample), grads = loss_and_grads(s['trainable'], s['frozen'], s['batch'], s['draws'])
  np.testing.assert_allclose(per_sample, outputs['loss_per_sample'], rtol=1e-5)
  np.testing.assert_allclose(loss, outputs['loss'], rtol=1e-5)
  golden_grads = load_file(s['golden'] / 'sft' / 'grads.safetensors')
  # Our trainable set is exactly the official one (the expert's position table is a buffer).
  official = json.loads((s['golden'] / 'trainable_keys.json').read_text())['trainable_keys']
  assert set(golden_grads) == set(official)
  assert {s['by_key'][k][0] for k in golden_grads} == set(km.slots(s['trainable']))
  _compare(grads, golden_grads, s, 1e-4, 'gradient')
  call = json.loads((s['golden'] / 'sft' / 'call.json').read_text())
  unreachable = {s['by_key'][k][0] for k in call['grad_none_keys']}
  assert unreachable == set(map(lambda x: (x[0], x[1]), s['model'].unreachable()))


@pytest.mark.parametrize('family,case,max_norm', [
    ('cogvideox', 'optim', 1.0), ('cogvideox', 'optim_clip', 0.01),
    ('wan', 'optim', 1.0), ('wan', 'optim_clip', 0.01)])
def test_two_clipped_adamw_steps_equal_official(family, case, max_norm):
  s = _setup(family, max_norm)
  start = jax.tree.map(np.asarray, s['trainable'])
  state = init_state(s['trainable'], s['optimizer'], seed=0)
  steps = load_file(s['golden'] / case / 'steps.safetensors')
  step = jax.jit(s['step'])
  frozen_before = jax.tree.map(np.asarray, s['frozen'])
  for k in range(2):
    state, metrics = step(state, s['frozen'], s['batch'], s['draws'])
    np.testing.assert_allclose(metrics['loss'], steps['loss'][k], rtol=1e-5)
    np.testing.assert_allclose(metrics['grad_norm'], steps['grad_norm'][k], rtol=1e-5)
  _compare(state.params, load_file(s['golden'] / case / 'params_step2.safetensors'), s, 1e-5,
           f'{case} step 2', near_eps_atol=2e-5)
  # What never gets a gradient is bitwise unchanged (no decay); the base never changes.
  for slot in s['model'].unreachable():
    np.testing.assert_array_equal(_ours(state.params, slot), _ours(start, slot))
  for (path, a), (_, b) in zip(nnx.to_flat_state(frozen_before), nnx.to_flat_state(s['frozen'])):
    np.testing.assert_array_equal(a[...], b[...])


def _dpo_setup():
  """The official DPO case: the pair as two rows sharing the reference and the timestep draw;
  the reference model is the policy with the golden perturbed expert, read through the key map."""
  s = _setup('cogvideox')
  golden = s['golden'] / 'dpo'
  i = load_file(golden / 'inputs.safetensors')
  repeat = lambda x: np.repeat(x, 2, axis=0)  # the one reference, on both rows
  inputs = dict(i, u=np.repeat(i['u'], 2), ref_latents_vae=repeat(i['ref_latents_vae']),
                ref_image_latents_vae=repeat(i['ref_image_latents_vae']))
  batch, draws = _cogvideox_batch(inputs)
  batch['dpo_weight'] = np.ones(2, np.float32)
  reference = nnx.clone(s['model'])
  flat = dict(nnx.to_flat_state(nnx.state(reference)))
  for key, value in load_file(golden / 'ref_model_mot_ref.safetensors').items():
    (path, layer), transform = s['by_key'][key]
    var = flat[path]
    var[...] = (var[...].at[layer].set(transform.array(value)) if layer is not None
                else jnp.asarray(transform.array(value)))
  objective = dpo.DPOObjective(s['objective'], reference=lambda _: reference)
  step = make_train_step(s['graphdef'], objective, s['optimizer'])
  return s, golden, batch, draws, objective, step


def test_dpo_loss_and_gradients_equal_official():
  s, golden, batch, draws, objective, step = _dpo_setup()
  outputs = load_file(golden / 'outputs.safetensors')
  model = nnx.merge(s['graphdef'], s['trainable'], s['frozen'])
  loss, per_pair, aux = jax.jit(lambda b, d: objective(model, b, d))(batch, draws)
  m = aux['metrics']
  for ours, name in ((m['win_loss'], 'Lw'), (m['lose_loss'], 'Ll'), (m['win_loss_ref'], 'Lw_ref'),
                     (m['lose_loss_ref'], 'Ll_ref')):
    np.testing.assert_allclose(ours, outputs[name][0], rtol=1e-5, err_msg=name)
  # The logit is 250 x a difference of losses that agree to three digits: the official value,
  # a difference of float32 means, carries 250 x a few ulp(0.94) (6e-8) of its own rounding.
  np.testing.assert_allclose(m['logit'], outputs['inside_term'][0], atol=250 * 2 * 6e-8)
  np.testing.assert_allclose(loss, outputs['loss'], rtol=1e-5)
  (loss, _), grads = jax.jit(step.loss_and_grads)(s['trainable'], s['frozen'], batch, draws)
  np.testing.assert_allclose(loss, outputs['loss'], rtol=1e-5)
  golden_grads = load_file(golden / 'grads.safetensors')
  assert {s['by_key'][k][0] for k in golden_grads} == set(km.slots(s['trainable']))
  _compare(grads, golden_grads, s, 1e-4, 'DPO gradient')


def test_dpo_pair_shares_its_timestep_draw():
  s, _, batch, _, objective, _ = _dpo_setup()
  d = objective.draws(jax.random.key(0), dict(batch, index=np.arange(4)[:2]))
  assert d.u[0] == d.u[1] and d.noise.shape[0] == 2
  assert not np.array_equal(d.noise[0], d.noise[1])
