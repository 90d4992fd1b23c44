"""Expert-off CogVideoX equals PyPI diffusers ``CogVideoXTransformer3DModel`` (fp32), loaded from
a multi-shard diffusers folder through the production key map; the Orbax converter round-trips.
"""
import json

import numpy as np
import pytest
import torch
from flax import nnx

from conftest import assert_close
from vap_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer
from vap_jax.weights.cogvideox import COGVIDEOX, convert, load_cogvideox
from vap_jax.models.stack import checkpoint_slots
from vap_jax.weights.keymap import plan, slots
from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4,
            time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=12, sample_height=8,
            sample_frames=9, patch_size=2, max_text_seq_length=8, attention_bias=True,
            use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True)


def _diffusers_folder(tmp_path_factory, name, **overrides):
  from diffusers import CogVideoXTransformer3DModel
  torch.manual_seed(0)
  model = CogVideoXTransformer3DModel(**{**TINY, **overrides}).eval()
  with torch.no_grad():  # make constant tensors (norm weights, zero biases) non-trivial
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
    if getattr(model.patch_embed, 'pos_embedding', None) is not None:
      model.patch_embed.pos_embedding.add_(0.1 * torch.randn_like(model.patch_embed.pos_embedding))
  folder = tmp_path_factory.mktemp(name) / 'transformer'
  model.save_pretrained(folder, max_shard_size='40KB', safe_serialization=True)
  return model, folder


@pytest.fixture(scope='module')
def learned(tmp_path_factory):
  return _diffusers_folder(tmp_path_factory, 'learned')


def _rope(cfg, frames, h, w):
  from diffusers.models.embeddings import get_3d_rotary_pos_embed
  from diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video import (
      get_resize_crop_region_for_grid)
  p = cfg['patch_size']
  crops = get_resize_crop_region_for_grid((h // p, w // p), cfg['sample_width'] // p,
                                          cfg['sample_height'] // p)
  return get_3d_rotary_pos_embed(cfg['attention_head_dim'], crops, (h // p, w // p), frames)


def _inputs(frames=3, h=8, w=12, batch=2, seed=1):
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((batch, frames, TINY['in_channels'], h, w)).astype(np.float32)
  text = rng.standard_normal((batch, TINY['max_text_seq_length'],
                              TINY['text_embed_dim'])).astype(np.float32)
  return latents, np.array([999, 3], np.int64)[:batch], text


def _torch_forward(model, cfg, latents, t, text):
  with torch.no_grad():
    return model(torch.from_numpy(latents), torch.from_numpy(text), torch.from_numpy(t),
                 image_rotary_emb=_rope(cfg, latents.shape[1], *latents.shape[3:]),
                 return_dict=False)[0].numpy()


def test_checkpoint_is_multi_shard(learned):
  _, folder = learned
  assert len(list(folder.glob('*.safetensors'))) > 3
  assert list(folder.glob('*.safetensors.index.json'))


@pytest.mark.parametrize('frames', [3, 2])  # 2 latent frames: diffusers swaps in sin-cos positions
def test_base_forward_equals_diffusers(learned, frames):
  torch_model, folder = learned
  model = load_cogvideox(folder, dtype='float32')
  assert model.expert is None
  latents, t, text = _inputs(frames)
  expected = _torch_forward(torch_model, dict(torch_model.config), latents, t, text)
  actual = nnx.jit(lambda m, *a: m(*a))(model, latents, t, text)
  assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_rotary_only_model_equals_diffusers(tmp_path_factory):
  """CogVideoX-5B T2V flavour: RoPE, no absolute positions, no patch bias."""
  torch_model, folder = _diffusers_folder(tmp_path_factory, 'rotary', in_channels=4,
                                          use_learned_positional_embeddings=False,
                                          patch_bias=False)
  model = load_cogvideox(folder, dtype='float32')
  latents, t, text = _inputs()
  latents = latents[:, :, :4]
  expected = _torch_forward(torch_model, dict(torch_model.config), latents, t, text)
  assert_close(model(latents, t, text), expected, atol=1e-5, rtol=1e-5)


def test_key_map_covers_checkpoint_and_model_both_ways(learned):
  _, folder = learned
  checkpoint = SafetensorsCheckpoint(folder)
  config = CogVideoXConfig.from_source(json.loads((folder / 'config.json').read_text()))
  _, state = nnx.split(nnx.eval_shape(lambda: CogVideoXTransformer(config, rngs=nnx.Rngs(0))))
  the_plan = plan(checkpoint, COGVIDEOX, state, checkpoint_slots(config.block_idx_with_mot_ref))
  assert sorted(k for k, _ in the_plan.entries.values()) == sorted(checkpoint.keys())
  assert set(the_plan.entries) == set(slots(state))  # every layer of every stack


def test_converter_round_trip_equals_direct_load(learned, tmp_path):
  _, folder = learned
  count = convert(folder.parent, tmp_path / 'orbax', param_dtype='float32', progress=False,
                  group_bytes=20_000)  # several partial writes
  assert count == len(SafetensorsCheckpoint(folder).keys())
  direct = nnx.state(load_cogvideox(folder, dtype='float32'))
  restored = nnx.state(load_cogvideox(tmp_path / 'orbax', dtype='float32'))
  flat_direct, flat_restored = nnx.to_flat_state(direct), dict(nnx.to_flat_state(restored))
  for path, var in flat_direct:
    np.testing.assert_array_equal(np.asarray(flat_restored[path][...]), np.asarray(var[...]),
                                  err_msg=str(path))
  with pytest.raises(FileExistsError):
    convert(folder, tmp_path / 'orbax', progress=False)
  # A live model saved by save_model restores the same way (e.g. after training).
  from vap_jax.weights import orbax_io
  from vap_jax.weights.cogvideox import model_factory
  config = CogVideoXConfig.from_source(json.loads((folder / 'config.json').read_text()))
  orbax_io.save_model(load_cogvideox(folder, dtype='float32'), tmp_path / 'saved')
  saved = nnx.state(orbax_io.restore_model(model_factory(config), tmp_path / 'saved'))
  for path, var in nnx.to_flat_state(saved):
    np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(flat_restored[path][...]))


def test_converter_cli_and_bf16(learned, tmp_path, capsys):
  from vap_jax.cli.convert import cogvideox_main as main
  _, folder = learned
  assert main(['--src', str(folder), '--dst', str(tmp_path / 'bf16')]) == 0
  model = load_cogvideox(tmp_path / 'bf16', dtype='bfloat16')
  assert str(model.blocks.attn1.to_q.kernel.dtype) == 'bfloat16'
  out = np.asarray(model(*_inputs()), np.float32)
  assert np.isfinite(out).all()
  assert main(['--src', str(tmp_path / 'missing'), '--dst', str(tmp_path / 'x')]) == 2
  assert 'config.json' in capsys.readouterr().err


def test_bad_checkpoints_give_clear_errors(learned, tmp_path):
  from safetensors.numpy import save_file
  _, folder = learned
  checkpoint = SafetensorsCheckpoint(folder)
  tensors = {k: checkpoint.read(k) for k in checkpoint.keys()}
  config = (folder / 'config.json').read_text()

  def write(name, mutated):
    out = tmp_path / name
    out.mkdir()
    (out / 'config.json').write_text(config)
    save_file(mutated, out / 'diffusion_pytorch_model.safetensors')
    return out

  missing = dict(tensors)
  del missing['transformer_blocks.1.attn1.to_k.weight']
  with pytest.raises(CheckpointError, match=r'missing.*\n.*blocks\.attn1\.to_k\.kernel\[1\]'):
    load_cogvideox(write('missing', missing), dtype='float32')
  extra = {**tensors, 'transformer_blocks.0.attn1.lora_A.weight': np.zeros((2, 2), np.float32)}
  with pytest.raises(CheckpointError, match='lora_A'):
    load_cogvideox(write('extra', extra), dtype='float32')
  misshaped = {**tensors, 'proj_out.weight': np.zeros((3, 32), np.float32)}
  with pytest.raises(CheckpointError, match=r'proj_out\.weight: checkpoint \(3, 32\)'):
    load_cogvideox(write('misshaped', misshaped), dtype='float32')
  expert = {**tensors, 'transformer_blocks.0.attn1_mot_ref.to_q.weight': tensors[
      'transformer_blocks.0.attn1.to_q.weight']}
  with pytest.raises(CheckpointError, match='does the config match'):
    load_cogvideox(write('expert', expert), dtype='float32')
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'config.json').write_text(config)
  (broken / 'diffusion_pytorch_model.safetensors').write_bytes(b'not a safetensors file')
  with pytest.raises(CheckpointError, match='cannot read safetensors file'):
    load_cogvideox(broken, dtype='float32')


def test_orbax_and_safetensors_load_onto_a_mesh(learned, tmp_path, monkeypatch):
  """Both layouts load straight onto an 8-device mesh and give the one-device output."""
  from jax.sharding import PartitionSpec as P

  from vap_jax.parallel import make_mesh, sharding_context
  torch_model, folder = learned
  convert(folder, tmp_path / 'orbax', param_dtype='float32', progress=False)
  mesh = make_mesh(dict(fsdp=2, tensor=4))
  inputs = _inputs()
  expected = _torch_forward(torch_model, dict(torch_model.config), *inputs)
  whole, parts = [], []
  read, read_slice = SafetensorsCheckpoint.read, SafetensorsCheckpoint.read_slice
  monkeypatch.setattr(SafetensorsCheckpoint, 'read', lambda self, key: whole.append(key) or
                      read(self, key))
  monkeypatch.setattr(SafetensorsCheckpoint, 'read_slice', lambda self, key, index: (
      parts.append((key, index)) or read_slice(self, key, index)))
  for source in (folder, tmp_path / 'orbax'):
    model = load_cogvideox(source, mesh=mesh, dtype='float32')
    if source == folder:
      # Each device's part is read on its own (multi-host: a process reads only its part);
      # only the patchify kernel, whose reshape does not commute with slicing, is read whole.
      assert whole == ['patch_embed.proj.weight']
      q = [index for key, index in parts if key == 'transformer_blocks.1.attn1.to_q.weight']
      assert len(q) == 8 and len(set(map(str, q))) == 8  # (fsdp, tensor) = 2 x 4 distinct parts
    kernel = model.blocks.ff.proj_in.kernel[...]
    assert kernel.sharding.spec == P(None, 'fsdp', 'tensor') and len(kernel.sharding.device_set) == 8
    with sharding_context(mesh):
      actual = nnx.jit(lambda m, *a: m(*a))(model, *inputs)
    assert_close(actual, expected, atol=1e-5, rtol=1e-5, what=f'{source.name} on mesh')
