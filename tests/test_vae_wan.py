"""Wan2.1 VAE equals PyPI diffusers ``AutoencoderKLWan`` (fp32) at a tiny random config, loaded
from a multi-shard diffusers folder through the production key map; chunked == unchunked; tiled
== diffusers' tiled; converter round trip; the released config's parameter count."""
import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import assert_close
from vap_jax.models.vae_wan import AutoencoderKLWan, WanVAEConfig
from vap_jax.weights.keymap import plan
from vap_jax.weights.loading import abstract_model, count_params
from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint
from vap_jax.weights.vae import WAN, convert_wan_vae, load_wan_vae

# 3 levels: 4x spatial, 4x temporal (both temporal downsamples on).
TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
            temperal_downsample=[True, True], scale_factor_spatial=4,
            latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
TILE = dict(tile_sample_min_size=16, tile_sample_stride=12)


@pytest.fixture(scope='module')
def wan(tmp_path_factory):
  from diffusers import AutoencoderKLWan as Torch
  torch.manual_seed(0)
  model = Torch(**TINY).eval()
  with torch.no_grad():  # perturb constant tensors (norm gammas, zero biases)
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp('wan') / 'vae'
  model.save_pretrained(folder, max_shard_size='20KB', safe_serialization=True)
  return model, folder


@pytest.fixture(scope='module')
def jax_wan(wan):
  return load_wan_vae(wan[1].parent, **TILE)


def _video(frames=9, h=16, w=16, batch=2, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, frames, h, w)).astype(np.float32)


_encode = nnx.jit(lambda m, x, chunked, tiled: m.encode(x, chunked=chunked, tiled=tiled),
                  static_argnums=(2, 3))
_decode = nnx.jit(lambda m, z, chunked, tiled: m.decode(z, chunked=chunked, tiled=tiled),
                  static_argnums=(2, 3))


def _torch_encode_decode(model, x):
  with torch.no_grad():
    post = model.encode(torch.from_numpy(x)).latent_dist
    return post.mean.numpy(), post.logvar.numpy(), model.decode(post.mean).sample.numpy()


def test_checkpoint_is_multi_shard(wan):
  assert len(list(wan[1].glob('*.safetensors'))) > 3


def test_encode_decode_equal_diffusers_chunked_and_unchunked(wan, jax_wan):
  x = _video(9)
  mean, logvar, video = _torch_encode_decode(wan[0], x)
  assert 0.01 < np.mean(np.abs(video) < 1)  # not saturated by the final clamp
  for chunked in (True, False):
    post = _encode(jax_wan, x, chunked, False)
    assert_close(post.mean, mean, what=f'mean chunked={chunked}')
    assert_close(post.logvar, logvar, what=f'logvar chunked={chunked}')
    assert_close(post.mode(), mean, what='mode')
    assert_close(_decode(jax_wan, mean, chunked, False), video, what=f'decode chunked={chunked}')


def test_frames_past_1_plus_4k_are_dropped_like_diffusers(wan, jax_wan):
  x = _video(11)
  with torch.no_grad():
    mean = wan[0].encode(torch.from_numpy(x)).latent_dist.mean.numpy()
  assert_close(_encode(jax_wan, x, True, False).mean, mean, what='11-frame mean')


def test_posterior_sample(jax_wan):
  post = _encode(jax_wan, _video(9), True, False)
  a, b = post.sample(jax.random.key(0)), post.sample(jax.random.key(1))
  assert a.shape == post.mean.shape and not np.allclose(a, b)
  np.testing.assert_allclose((a - post.mean) / post.std, jax.random.normal(
      jax.random.key(0), a.shape), rtol=1e-4, atol=1e-4)


def test_tiled_encode_decode_equal_diffusers_tiled(wan, jax_wan):
  torch_model = wan[0]
  x = _video(5, 16, 24, batch=1, seed=3)  # 2 x 2 tiles
  torch_model.enable_tiling(16, 16, 12, 12)
  try:
    mean, logvar, video = _torch_encode_decode(torch_model, x)
  finally:
    torch_model.use_tiling = False
  # chunked == unchunked is tested above; the unchunked tiles compile twice as fast.
  post = _encode(jax_wan, x, False, True)
  assert_close(post.mean, mean, what='tiled mean')
  assert_close(post.logvar, logvar, what='tiled logvar')
  assert_close(_decode(jax_wan, mean, False, True), video, what='tiled decode')


def test_latent_normalisation_round_trip(jax_wan):
  z = np.random.default_rng(0).standard_normal((1, 4, 2, 3, 3)).astype(np.float32)
  n = jax_wan.normalize_latents(z)
  np.testing.assert_allclose(n[0, 1], (z[0, 1] + 0.2) / 0.5, rtol=1e-6)
  np.testing.assert_allclose(jax_wan.denormalize_latents(n), z, rtol=1e-5, atol=1e-6)


def test_key_map_covers_checkpoint_and_model_both_ways(wan):
  checkpoint = SafetensorsCheckpoint(wan[1])
  config = WanVAEConfig.from_source(json.loads((wan[1] / 'config.json').read_text()))
  _, state = nnx.split(abstract_model(lambda: AutoencoderKLWan(config, rngs=nnx.Rngs(0))))
  the_plan = plan(checkpoint, WAN, state)
  assert sorted(k for k, _ in the_plan.entries.values()) == sorted(checkpoint.keys())
  assert len(the_plan.entries) == len(nnx.to_flat_state(state))


def test_bad_checkpoints_and_configs_give_clear_errors(wan, tmp_path):
  from safetensors.numpy import save_file
  checkpoint = SafetensorsCheckpoint(wan[1])
  tensors = {k: checkpoint.read(k) for k in checkpoint.keys()}
  config = json.loads((wan[1] / 'config.json').read_text())

  def write(name, mutated, cfg=config):
    out = tmp_path / name
    out.mkdir()
    (out / 'config.json').write_text(json.dumps(cfg))
    save_file(mutated, out / 'diffusion_pytorch_model.safetensors')
    return out

  missing = dict(tensors)
  del missing['decoder.up_blocks.0.upsamplers.0.time_conv.weight']
  with pytest.raises(CheckpointError, match=r'missing.*\n.*up_blocks\.0\.upsamplers\.0\.time_conv'):
    load_wan_vae(write('missing', missing))
  misshaped = {**tensors, 'quant_conv.weight': np.zeros((8, 4, 1, 1, 1), np.float32)}
  with pytest.raises(CheckpointError, match=r'quant_conv\.weight: checkpoint \(8, 4, 1, 1, 1\)'):
    load_wan_vae(write('misshaped', misshaped))
  with pytest.raises(ValueError, match='is_residual'):
    load_wan_vae(write('wan22', tensors, {**config, 'is_residual': True}))
  with pytest.raises(CheckpointError, match='is not AutoencoderKLWan'):
    load_wan_vae(write('cog', tensors, {**config, '_class_name': 'AutoencoderKLCogVideoX'}))


def test_converter_round_trip_and_cli(wan, tmp_path):
  from vap_jax.cli.convert import vae_main as main
  count = convert_wan_vae(wan[1], tmp_path / 'orbax', progress=False, group_bytes=200_000)
  assert count == len(SafetensorsCheckpoint(wan[1]).keys())
  direct = nnx.state(load_wan_vae(wan[1]))
  restored = dict(nnx.to_flat_state(nnx.state(load_wan_vae(tmp_path / 'orbax'))))
  for path, var in nnx.to_flat_state(direct):
    np.testing.assert_array_equal(np.asarray(restored[path][...]), np.asarray(var[...]))
  assert main(['--kind', 'wan', '--src', str(tmp_path / 'nothing'), '--dst', str(tmp_path / 'x')]) == 2
  assert main(['--kind', 'wan', '--src', str(wan[1]), '--dst', str(tmp_path / 'orbax')]) == 2  # exists


def test_released_config_builds_abstractly_with_diffusers_parameter_count():
  from diffusers import AutoencoderKLWan as Torch
  with torch.device('meta'):
    expected = sum(p.numel() for p in Torch().parameters())
  model = abstract_model(lambda: AutoencoderKLWan(WanVAEConfig(), rngs=nnx.Rngs(0)))
  assert count_params(model) == expected
  assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct)
             for _, v in nnx.to_flat_state(nnx.state(model)))


@pytest.mark.parametrize('mesh_shape,batch,vae_rules', [
    (dict(data=2, context=4), 2, False),  # batch over 2 devices, width over 4
    (dict(fsdp=8), 1, True),  # a pipeline's one video: width strips over every device
])
def test_decode_sharded_over_batch_and_width_equals_one_device(wan, jax_wan, mesh_shape, batch,
                                                               vae_rules):
  from vap_jax.parallel import DEFAULT_RULES, VAE_RULES, make_mesh, sharding_context
  mesh = make_mesh(mesh_shape)
  model = load_wan_vae(wan[1], mesh=mesh)
  z = np.random.default_rng(5).standard_normal((batch, 4, 3, 4, 8)).astype(np.float32)
  expected = _decode(jax_wan, z, True, False)
  with sharding_context(mesh, VAE_RULES if vae_rules else DEFAULT_RULES):
    actual = _decode(model, z, True, False)
  assert len(actual.sharding.device_set) == 8
  if vae_rules:
    assert actual.sharding.shard_shape(actual.shape)[-1] == actual.shape[-1] // 8
  assert_close(actual, expected, what='sharded decode')


def _diffusers_to_original(key):
  """Test-only inverse of `wan_original_to_diffusers` for num_res_blocks=2 (checked against
  diffusers' own converter below)."""
  import re
  residual = {'norm1.gamma': 'residual.0.gamma', 'conv1.weight': 'residual.2.weight',
              'conv1.bias': 'residual.2.bias', 'norm2.gamma': 'residual.3.gamma',
              'conv2.weight': 'residual.6.weight', 'conv2.bias': 'residual.6.bias',
              'conv_shortcut.weight': 'shortcut.weight', 'conv_shortcut.bias': 'shortcut.bias'}
  top = {'quant_conv': 'conv1', 'post_quant_conv': 'conv2'}
  if m := re.fullmatch(r'(quant_conv|post_quant_conv)\.(.*)', key):
    return f'{top[m.group(1)]}.{m.group(2)}'
  part, rest = key.split('.', 1)
  for new, old in (('conv_in.', 'conv1.'), ('norm_out.', 'head.0.'), ('conv_out.', 'head.2.')):
    if rest.startswith(new):
      return f'{part}.{old}{rest[len(new):]}'
  if m := re.fullmatch(r'mid_block\.resnets\.(\d)\.(.*)', rest):
    return f'{part}.middle.{2 * int(m.group(1))}.{residual[m.group(2)]}'
  if m := re.fullmatch(r'mid_block\.attentions\.0\.(.*)', rest):
    return f'{part}.middle.1.{m.group(1)}'
  if m := re.fullmatch(r'down_blocks\.(\d+)\.(.*)', rest):
    return f'{part}.downsamples.{m.group(1)}.{residual.get(m.group(2), m.group(2))}'
  if m := re.fullmatch(r'up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)', rest):
    return f'{part}.upsamples.{4 * int(m.group(1)) + int(m.group(2))}.{residual[m.group(3)]}'
  m = re.fullmatch(r'up_blocks\.(\d+)\.upsamplers\.0\.(.*)', rest)
  return f'{part}.upsamples.{4 * int(m.group(1)) + 3}.{m.group(2)}'


def test_original_wan_naming_loads_like_diffusers(tmp_path):
  """Wan2.1 layout (4 levels, 2 res blocks) with few channels: original-named single file."""
  from diffusers import AutoencoderKLWan as Torch
  from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
  from safetensors.torch import save_file
  torch.manual_seed(0)
  cfg = dict(base_dim=8, z_dim=4, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
  model = Torch(**cfg)
  model.save_pretrained(tmp_path / 'vae')
  state = model.state_dict()
  original = {_diffusers_to_original(k): v.contiguous() for k, v in state.items()}
  assert sorted(convert_wan_vae_to_diffusers(original)) == sorted(state)  # the facts agree
  save_file(original, tmp_path / 'wan_2.1_vae.safetensors')
  single = load_wan_vae(tmp_path / 'wan_2.1_vae.safetensors', base_dim=8, z_dim=4,
                        latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
  folder = dict(nnx.to_flat_state(nnx.state(load_wan_vae(tmp_path / 'vae'))))
  for path, var in nnx.to_flat_state(nnx.state(single)):
    np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(folder[path][...]))
  del original['encoder.head.2.weight']
  save_file(original, tmp_path / 'broken.safetensors')
  with pytest.raises(CheckpointError, match=r'missing.*\n.*encoder\.conv_out\.kernel'):
    load_wan_vae(tmp_path / 'broken.safetensors', base_dim=8, z_dim=4)
