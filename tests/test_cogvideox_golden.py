"""CogVideoX-VAP MoT forward against the official implementation's outputs (../shared/golden).

The weights load through the production key map; every per-block intermediate is compared so a
mismatch is localised, and the RoPE tables are compared with the official pipeline's.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from conftest import assert_close, assert_trig_close
from vap_jax.models.cogvideox import CogVideoXConfig
from vap_jax.nn.embeddings import timestep_features
from vap_jax.nn.rope import cogvideox_rope_angles
from vap_jax.weights.cogvideox import load_cogvideox


def _angles(model, frames, height, width, num_refs):
  """The float32 angles behind ``model.rope(frames, height, width, num_refs)``."""
  cfg, p = model.config, model.config.patch_size
  return cogvideox_rope_angles(cfg.attention_head_dim, frames, height // p, width // p,
                               base_h=cfg.sample_height // p, base_w=cfg.sample_width // p,
                               num_refs=num_refs)


@pytest.fixture(scope='module', params=[True, False], ids=['scan', 'loop'])
def model(golden_cog, request):
  # The folder is laid out like a diffusers transformer/ folder: config.json + one safetensors.
  return load_cogvideox(golden_cog, dtype='float32', scan_layers=request.param)


def test_config_reads_block_idx_from_diffusers_config(golden_cog, model):
  raw = json.loads((golden_cog / 'transformer' / 'config.json').read_text())
  assert model.config.block_idx_with_mot_ref == tuple(raw['block_idx_with_mot_ref']) == (0, 1)
  assert [model.layers(i)[1] is not None for i in range(3)] == [True, True, False]


@pytest.mark.parametrize('num_refs,key', [(0, 'target'), (1, 'ref_n1'), (2, 'ref_n2')])
def test_rope_tables_equal_official(golden_cog, model, num_refs, key):
  rope = load_file(golden_cog / 'rope.safetensors')
  cos, sin = model.rope(3, 8, 12, num_refs)
  angles = _angles(model, 3, 8, 12, num_refs)
  assert_trig_close(cos, rope[f'{key}_cos'], angles, what=f'{key} cos')
  assert_trig_close(sin, rope[f'{key}_sin'], angles, what=f'{key} sin')


@pytest.mark.parametrize('case', ['case_1ref', 'case_2ref'])
def test_mot_forward_equals_official(golden_cog, model, case):
  inputs = load_file(golden_cog / case / 'inputs.safetensors')
  expected = load_file(golden_cog / case / 'intermediates.safetensors')
  output = load_file(golden_cog / case / 'output.safetensors')['output']
  args = (inputs['hidden_states'], inputs['timestep'], inputs['encoder_hidden_states'])
  refs = dict(ref_latents=inputs['hidden_states_mot_ref'],
              ref_text=inputs['encoder_hidden_states_mot_ref'])
  n_refs = inputs['hidden_states_mot_ref'].shape[1] // inputs['hidden_states'].shape[1]

  # The model's own RoPE equals the tables the official pipeline passed in.
  for name, table in (('image_rotary_emb', model.rope(3, 8, 12)),
                      ('image_rotary_emb_mot_ref', model.rope(3, 8, 12, n_refs))):
    assert_trig_close(table[0], inputs[f'{name}_cos'], _angles(model, 3, 8, 12, n_refs if 'ref'
                                                                in name else 0), what=name)

  tol = dict(atol=1e-5, rtol=1e-5)
  t_feat = timestep_features(jnp.asarray(inputs['timestep']), model.config.inner_dim)
  assert_close(t_feat, expected['time_proj'], what='time_proj', **tol)
  assert_close(t_feat, expected['time_proj_mot_ref'], what='time_proj_mot_ref', **tol)
  target, ref = model.embed(*args, **refs)
  assert_close(target.temb, expected['temb'], what='temb', **tol)
  assert_close(ref.temb, expected['temb_mot_ref'], what='temb_mot_ref', **tol)
  assert_close(jnp.concatenate([target.text, target.video], 1), expected['patch_embed_out'],
               what='patch_embed', **tol)
  n_text = inputs['encoder_hidden_states'].shape[1]
  n_video = target.video.shape[1]
  for i in range(n_refs):
    chunk = jnp.concatenate([ref.text[:, i * n_text:(i + 1) * n_text],
                             ref.video[:, i * n_video:(i + 1) * n_video]], 1)
    assert_close(chunk, expected[f'patch_embed_mot_ref_out.ref{i}'], what=f'ref{i} embed', **tol)
  for k in range(model.config.num_layers):
    target, ref = model.block(*model.layers(k), target, ref)
    for name, value in (('hidden_states', target.video), ('encoder_hidden_states', target.text),
                        ('hidden_states_mot_ref', ref.video),
                        ('encoder_hidden_states_mot_ref', ref.text)):
      assert_close(value, expected[f'block{k}.{name}'], what=f'block{k}.{name}', **tol)
  assert_close(model.norm_final(target.video), expected['norm_final_out'], what='norm_final', **tol)
  out = np.asarray(nnx.jit(lambda m, *a, **k: m(*a, **k))(model, *args, **refs))
  assert_close(out, output, what='output', **tol)


def test_expert_changes_the_output(golden_cog, model):
  """Sanity: the reference matters, and dropping it gives a different (base) prediction."""
  inputs = load_file(golden_cog / 'case_1ref' / 'inputs.safetensors')
  args = (inputs['hidden_states'], inputs['timestep'], inputs['encoder_hidden_states'])
  with_ref = model(*args, ref_latents=inputs['hidden_states_mot_ref'],
                   ref_text=inputs['encoder_hidden_states_mot_ref'])
  without = model(*args)
  assert float(jnp.abs(with_ref - without).max()) > 1e-3


def test_config_rejects_unsupported_fields(golden_cog):
  raw = json.loads((golden_cog / 'transformer' / 'config.json').read_text())
  with pytest.raises(ValueError, match='patch_size_t'):
    CogVideoXConfig.from_source({**raw, 'patch_size_t': 2})
  with pytest.raises(ValueError, match='block_idx_with_mot_ref'):
    CogVideoXConfig.from_source({**raw, 'block_idx_with_mot_ref': [0, 7]})
