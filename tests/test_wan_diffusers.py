"""Expert-off Wan equals PyPI diffusers ``WanTransformer3DModel`` (tiny I2V config, fp32), loaded
from multi-shard safetensors through the production key map, in diffusers and in original-Wan
naming; key-map coverage, errors and the Orbax round trip.
"""
import json
import re

import numpy as np
import pytest
import torch
from flax import nnx

from conftest import assert_close
from vap_jax.models.wan import WanConfig, WanTransformer
from vap_jax.models.stack import checkpoint_slots
from vap_jax.weights.keymap import plan, slots
from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint
from vap_jax.weights.wan import WAN, convert, load_wan

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12,
            out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, image_dim=20,
            added_kv_proj_dim=24, rope_max_seq_len=32, cross_attn_norm=True,
            qk_norm='rms_norm_across_heads')

# diffusers name -> original Wan name (VAP_SPEC §4.3), to write an original-format checkpoint.
TO_ORIGINAL = [
    (r'condition_embedder\.time_embedder\.linear_1', 'time_embedding.0'),
    (r'condition_embedder\.time_embedder\.linear_2', 'time_embedding.2'),
    (r'condition_embedder\.time_proj', 'time_projection.1'),
    (r'condition_embedder\.text_embedder\.linear_1', 'text_embedding.0'),
    (r'condition_embedder\.text_embedder\.linear_2', 'text_embedding.2'),
    (r'condition_embedder\.image_embedder\.norm1', 'img_emb.proj.0'),
    (r'condition_embedder\.image_embedder\.ff\.net\.0\.proj', 'img_emb.proj.1'),
    (r'condition_embedder\.image_embedder\.ff\.net\.2', 'img_emb.proj.3'),
    (r'condition_embedder\.image_embedder\.norm2', 'img_emb.proj.4'),
    (r'^scale_shift_table', 'head.modulation'), (r'^proj_out', 'head.head'),
    (r'scale_shift_table', 'modulation'),
    (r'attn1\.to_out\.0', 'self_attn.o'), (r'attn1\.to_([qkv])', r'self_attn.\1'),
    (r'attn1\.norm_', 'self_attn.norm_'), (r'attn2\.to_out\.0', 'cross_attn.o'),
    (r'attn2\.to_([qkv])', r'cross_attn.\1'), (r'attn2\.add_([kv])_proj', r'cross_attn.\1_img'),
    (r'attn2\.norm_added_k', 'cross_attn.norm_k_img'), (r'attn2\.norm_', 'cross_attn.norm_'),
    (r'\.norm2\.', '.norm3.'), (r'ffn\.net\.0\.proj', 'ffn.0'), (r'ffn\.net\.2', 'ffn.2'),
]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  from diffusers import WanTransformer3DModel
  torch.manual_seed(0)
  model = WanTransformer3DModel(**TINY).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp('wan') / 'transformer'
  model.save_pretrained(folder, max_shard_size='20KB', safe_serialization=True)
  return model, folder


def _inputs(batch=2, frames=3, seed=1):
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((batch, 12, frames, 6, 8)).astype(np.float32)
  text = np.zeros((batch, 512, 16), np.float32)  # diffusers hard-codes 512 text tokens
  text[:, :7] = rng.standard_normal((batch, 7, 16))
  image = rng.standard_normal((batch, 257, 20)).astype(np.float32)
  return latents, np.array([999, 17][:batch], np.int64), text, image


def _torch_forward(model, latents, t, text, image):
  with torch.no_grad():
    return model(torch.from_numpy(latents), torch.from_numpy(t), torch.from_numpy(text),
                 encoder_hidden_states_image=torch.from_numpy(image), return_dict=False)[0].numpy()


def test_base_forward_equals_diffusers(reference):
  torch_model, folder = reference
  assert len(list(folder.glob('*.safetensors'))) > 3
  model = load_wan(folder, dtype='float32')
  inputs = _inputs()
  assert_close(nnx.jit(lambda m, *a: m(*a[:3], image=a[3]))(model, *inputs),
               _torch_forward(torch_model, *inputs), atol=1e-5, rtol=1e-5)


def test_original_wan_naming_loads_the_same_model(reference, tmp_path):
  from safetensors.numpy import save_file
  torch_model, _ = reference
  tensors = {}
  for key, value in torch_model.state_dict().items():
    for pattern, repl in TO_ORIGINAL:
      key = re.sub(pattern, repl, key)
    tensors[key] = value.numpy()
  assert 'blocks.0.cross_attn.k_img.weight' in tensors and 'head.modulation' in tensors
  (tmp_path / 'config.json').write_text(json.dumps(dict(
      model_type='i2v', dim=24, ffn_dim=32, freq_dim=256, in_dim=12, out_dim=4, num_heads=2,
      num_layers=2, text_len=512, eps=1e-6, patch_size=[1, 2, 2])))
  save_file(tensors, tmp_path / 'diffusion_pytorch_model.safetensors')
  model = load_wan(tmp_path, dtype='float32')
  inputs = _inputs()
  assert_close(model(*inputs[:3], image=inputs[3]), _torch_forward(torch_model, *inputs),
               atol=1e-5, rtol=1e-5)


def test_key_map_covers_checkpoint_and_model_both_ways(reference):
  _, folder = reference
  checkpoint = SafetensorsCheckpoint(folder)
  config = WanConfig.from_source(json.loads((folder / 'config.json').read_text()))
  _, state = nnx.split(nnx.eval_shape(lambda: WanTransformer(config, rngs=nnx.Rngs(0))))
  the_plan = plan(checkpoint, WAN, state, checkpoint_slots(config.block_idx_with_mot_ref))
  assert sorted(k for k, _ in the_plan.entries.values()) == sorted(checkpoint.keys())
  assert set(the_plan.entries) == set(slots(state))  # every layer of every stack


def test_expert_key_map_covers_the_vap_checkpoint(golden_wan_folder=None):
  from conftest import DATA
  folder = DATA / 'wan_mot' / 'transformer'
  config = WanConfig.from_source(json.loads((folder / 'config.json').read_text()))
  _, state = nnx.split(nnx.eval_shape(lambda: WanTransformer(config, rngs=nnx.Rngs(0))))
  the_plan = plan(SafetensorsCheckpoint(folder), WAN, state,
                  checkpoint_slots(config.block_idx_with_mot_ref))
  assert set(the_plan.entries) == set(slots(state))
  # Expert block 2 is the second expert layer: slot 1 of the expert stack.
  assert the_plan.entries[('expert', 'blocks', 'attn2', 'norm_added_k', 'scale'), 1][0] == \
      'blocks.2.attn2_mot_ref.norm_added_k.weight'
  assert (('expert', 'condition_embedder', 'image_ff', 'proj_out', 'kernel'), None) in \
      the_plan.entries


def test_round_trip_and_clear_errors(reference, tmp_path):
  from safetensors.numpy import save_file
  torch_model, folder = reference
  convert(folder.parent, tmp_path / 'orbax', param_dtype='float32', progress=False,
          group_bytes=20_000)
  inputs = _inputs()
  assert_close(load_wan(tmp_path / 'orbax', dtype='float32')(*inputs[:3], image=inputs[3]),
               _torch_forward(torch_model, *inputs), atol=1e-5, rtol=1e-5)
  tensors = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / 'config.json').write_text((folder / 'config.json').read_text())
  del tensors['blocks.1.attn2.norm_added_k.weight']
  tensors['blocks.0.ffn.net.2.weight'] = np.zeros((3, 3), np.float32)
  save_file(tensors, bad / 'diffusion_pytorch_model.safetensors')
  with pytest.raises(CheckpointError) as err:
    load_wan(bad, dtype='float32')
  assert 'blocks.0.ffn.net.2.weight: checkpoint (3, 3)' in str(err.value)
  assert 'blocks.attn2.norm_added_k.scale[1]' in str(err.value)
  with pytest.raises(ValueError, match='image tokens are required'):
    load_wan(folder, dtype='float32')(*inputs[:3])
