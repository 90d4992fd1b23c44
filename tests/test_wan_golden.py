"""Wan2.1-VAP MoT forward against the official implementation's outputs (../shared/golden).

Weights load through the production key map; RoPE tables, condition embeddings and every block's
target and reference tokens are compared so a mismatch is localised.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from conftest import DATA, assert_close
from vap_jax.weights.wan import load_wan

GOLDEN = DATA / 'wan_mot'
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope='module', params=[True, False], ids=['scan', 'loop'])
def model(request):
  return load_wan(GOLDEN, dtype='float32', scan_layers=request.param)


def _args(inputs):
  """Positional (latents, timestep, text) and keyword inputs of the model."""
  return ((inputs['hidden_states'], inputs['timestep'], inputs['encoder_hidden_states']),
          dict(image=inputs['encoder_hidden_states_image'],
               ref_latents=inputs['hidden_states_mot_ref'],
               ref_text=inputs['encoder_hidden_states_mot_ref'],
               ref_image=inputs['encoder_hidden_states_image_mot_ref'],
               ref_timestep=inputs['timestep_list_mot_ref'][:, 0]))


def test_experts_on_configured_blocks(model):
  assert model.config.block_idx_with_mot_ref == (0, 2)
  assert [model.layers(i)[1] is not None for i in range(4)] == [True, False, True, False]


@pytest.mark.parametrize('num_refs,key', [(0, 'target'), (1, 'ref')])
def test_rope_tables_equal_official(model, num_refs, key):
  rope = load_file(GOLDEN / 'rope.safetensors')
  cos, sin = model.rope(3, 6, 8, num_refs)
  assert_close(cos[:, ::2], rope[f'{key}_cos'][0, 0], atol=1e-7, what=f'{key} cos')
  assert_close(sin[:, 1::2], rope[f'{key}_sin'][0, 0], atol=1e-7, what=f'{key} sin')


@pytest.mark.parametrize('case', ['case_1ref', 'case_1ref_b2'])
def test_mot_forward_equals_official(model, case):
  inputs = load_file(GOLDEN / case / 'inputs.safetensors')
  expected = load_file(GOLDEN / case / 'intermediates.safetensors')
  output = load_file(GOLDEN / case / 'output.safetensors')['output']
  args, kw = _args(inputs)
  target, ref = model.embed(*args, **kw)
  b = args[0].shape[0]

  def tokens(name):  # (B, dim, F, H', W') conv output -> (B, tokens, dim)
    x = expected[name]
    return x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)
  assert_close(target.video, tokens('patch_embedding_out'), what='patch_embedding', **TOL)
  assert_close(ref.video, tokens('patch_embedding_mot_ref_out'), what='ref patch_embedding', **TOL)
  assert_close(target.temb, expected['condition_embedder.temb'], what='temb', **TOL)
  assert_close(target.modulation[:, 0].reshape(b, -1), expected['condition_embedder.timestep_proj'],
               what='timestep_proj', **TOL)
  assert_close(target.text, expected['condition_embedder.text'], what='text', **TOL)
  assert_close(target.image, expected['condition_embedder.image'], what='image', **TOL)
  # The reference temb has batch 1 per reference in the official code and broadcasts.
  ref_proj = expected['condition_embedder_mot_ref.timestep_proj']
  assert_close(ref.modulation[:, 0].reshape(b, -1), np.broadcast_to(ref_proj, (b, ref_proj.shape[1])),
               what='ref timestep_proj', **TOL)
  assert_close(ref.text, expected['condition_embedder_mot_ref.text'], what='ref text', **TOL)
  assert_close(ref.image, expected['condition_embedder_mot_ref.image'], what='ref image', **TOL)
  for k in range(model.config.num_layers):
    target, ref = model.block(*model.layers(k), target, ref)
    assert_close(target.video, expected[f'block{k}.hidden_states'], what=f'block{k}', **TOL)
    assert_close(ref.video, expected[f'block{k}.hidden_states_mot_ref'], what=f'block{k} ref', **TOL)
  out = np.asarray(nnx.jit(lambda m, *a, **k: m(*a, **k))(model, *args, **kw))
  assert_close(out, output, what='output', **TOL)


def test_reference_timestep_matters(model):
  """Sanity (golden checks.json: t=0 instead of 1 moves the output by ~3e-3)."""
  args, kw = _args(load_file(GOLDEN / 'case_1ref' / 'inputs.safetensors'))
  out_1 = model(*args, **{**kw, 'ref_timestep': 1})
  out_0 = model(*args, **{**kw, 'ref_timestep': 0})
  assert 1e-4 < float(jnp.abs(out_1 - out_0).max()) < 1e-1


def test_multi_reference_layout(model):
  """n references: frames concatenated, each with its own caption/CLIP tokens and t = -nF..-1.

  Every reference's cross-attention reads only its own caption, so right after block 0 (joint
  attention, then per-reference cross-attention) reference 1 does not see reference 0's caption.
  """
  inputs = load_file(GOLDEN / 'case_1ref' / 'inputs.safetensors')
  rng = np.random.default_rng(0)
  lat, t, text, image = (inputs[k] for k in ('hidden_states', 'timestep', 'encoder_hidden_states',
                                             'encoder_hidden_states_image'))
  ref_lat = np.concatenate([inputs['hidden_states_mot_ref'], rng.standard_normal(lat.shape)], 2)
  ref_text = np.concatenate([inputs['encoder_hidden_states_mot_ref']] * 2, 1)
  ref_image = np.concatenate([inputs['encoder_hidden_states_image_mot_ref']] * 2, 1)
  args = (lat, t, text)
  kw = dict(image=image, ref_latents=ref_lat.astype(np.float32), ref_image=ref_image)
  target, ref = model.embed(*args, ref_text=ref_text, **kw)
  assert ref.chunks == 2 and ref.video.shape[1] == 2 * target.video.shape[1]
  np.testing.assert_allclose(np.asarray(ref.rope[0]), model.rope(3, 6, 8, num_refs=2)[0])
  _, after = model.block(*model.layers(0), target, ref)
  changed = ref_text.copy()
  changed[:, :5] += 1.0  # reference 0's caption tokens
  target2, ref2 = model.embed(*args, ref_text=changed, **kw)
  _, after2 = model.block(*model.layers(0), target2, ref2)
  per_ref = lambda x: np.asarray(x.video).reshape(1, 2, -1, x.video.shape[-1])
  assert np.abs(per_ref(after)[:, 0] - per_ref(after2)[:, 0]).max() > 1e-3
  np.testing.assert_array_equal(per_ref(after)[:, 1], per_ref(after2)[:, 1])
  two = np.asarray(model(*args, ref_text=ref_text, **kw))
  one = np.asarray(model(*args, image=image, ref_latents=inputs['hidden_states_mot_ref'],
                         ref_text=inputs['encoder_hidden_states_mot_ref'],
                         ref_image=inputs['encoder_hidden_states_image_mot_ref']))
  assert np.isfinite(two).all() and np.abs(two - one).max() > 1e-4
