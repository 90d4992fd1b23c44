"""CogVideoX VAE equals PyPI diffusers ``AutoencoderKLCogVideoX`` (fp32) at a tiny random config,
loaded from a multi-shard diffusers folder through the production key map, including diffusers'
frame batching (17 frames = 9 + 8, 5 latents = 3 + 2) and tiling; converter round trip; the
released CogVideoX-5b-I2V config's parameter count."""
import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import assert_close
from vap_jax.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig
from vap_jax.weights.keymap import plan
from vap_jax.weights.loading import abstract_model, count_params
from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint
from vap_jax.weights.vae import COGVIDEOX, convert_cogvideox_vae, load_cogvideox_vae

# 3 levels: 4x spatial, 4x temporal.
TINY = dict(block_out_channels=(8, 16, 16), down_block_types=['CogVideoXDownBlock3D'] * 3,
            up_block_types=['CogVideoXUpBlock3D'] * 3, latent_channels=4, layers_per_block=1,
            norm_num_groups=4, sample_height=32, sample_width=32, scaling_factor=0.7)
TILE = dict(tile_sample_min_height=16, tile_sample_min_width=16, tile_overlap_factor_height=0.25,
            tile_overlap_factor_width=0.25)


@pytest.fixture(scope='module')
def cog(tmp_path_factory):
  from diffusers import AutoencoderKLCogVideoX as Torch
  torch.manual_seed(0)
  model = Torch(**TINY).eval()
  with torch.no_grad():  # perturb constant tensors (norm scales, zero biases)
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp('cog') / 'vae'
  model.save_pretrained(folder, max_shard_size='20KB', safe_serialization=True)
  return model, folder


@pytest.fixture(scope='module')
def jax_cog(cog):
  return load_cogvideox_vae(cog[1].parent, **TILE)


def _video(frames=17, h=16, w=16, batch=2, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, frames, h, w)).astype(np.float32)


_encode = nnx.jit(lambda m, x, tiled: m.encode(x, tiled=tiled), static_argnums=2)
_decode = nnx.jit(lambda m, z, tiled: m.decode(z, tiled=tiled), static_argnums=2)


def _torch_encode_decode(model, x):
  with torch.no_grad():
    post = model.encode(torch.from_numpy(x)).latent_dist
    return post.mean.numpy(), post.logvar.numpy(), model.decode(post.mean).sample.numpy()


def test_checkpoint_is_multi_shard(cog):
  assert len(list(cog[1].glob('*.safetensors'))) > 3


def test_encode_decode_equal_diffusers_with_frame_batches(cog, jax_cog):
  x = _video(17)
  mean, logvar, video = _torch_encode_decode(cog[0], x)
  assert mean.shape == (2, 4, 5, 4, 4) and video.shape == x.shape
  post = _encode(jax_cog, x, False)
  assert_close(post.mean, mean, what='mean')
  assert_close(post.logvar, logvar, what='logvar')
  assert_close(post.mode(), mean, what='mode')
  scale = np.abs(video).max()  # decoder outputs reach ~20 at random weights
  assert_close(np.asarray(_decode(jax_cog, mean, False)) / scale, video / scale, what='decode')


def test_image_as_one_frame_video(cog, jax_cog):
  """The I2V pipelines encode the conditioning image as a 1-frame video (one frame batch, which
  is also what the unbatched path computes)."""
  x = _video(1, batch=1, seed=1)
  mean, logvar, image = _torch_encode_decode(cog[0], x)
  post = _encode(jax_cog, x, False)
  assert_close(post.mean, mean, what='image mean')
  assert_close(post.logvar, logvar, what='image logvar')
  scale = np.abs(image).max()
  decoded = np.asarray(_decode(jax_cog, mean, False))
  assert_close(decoded / scale, image / scale, what='image decode')
  unbatched = nnx.jit(lambda m, z: m.decode(z, chunked=False))(jax_cog, mean)
  np.testing.assert_allclose(unbatched, decoded, rtol=1e-5, atol=1e-5 * scale)


def test_tiled_encode_decode_equal_diffusers_tiled(cog, jax_cog):
  torch_model = cog[0]
  x = _video(9, 16, 24, batch=1, seed=3)  # 2 x 2 tiles
  torch_model.enable_tiling(16, 16, 0.25, 0.25)
  try:
    mean, logvar, video = _torch_encode_decode(torch_model, x)
  finally:
    torch_model.use_tiling = False
  post = _encode(jax_cog, x, True)
  assert_close(post.mean, mean, what='tiled mean')
  assert_close(post.logvar, logvar, what='tiled logvar')
  scale = np.abs(video).max()
  assert_close(np.asarray(_decode(jax_cog, mean, True)) / scale, video / scale,
               what='tiled decode')


def test_posterior_sample(jax_cog):
  post = _encode(jax_cog, _video(1, batch=1, seed=1), False)
  a = post.sample(jax.random.key(0))
  np.testing.assert_allclose((a - post.mean) / post.std, jax.random.normal(
      jax.random.key(0), a.shape), rtol=1e-4, atol=1e-4)


def test_key_map_covers_checkpoint_and_model_both_ways(cog):
  checkpoint = SafetensorsCheckpoint(cog[1])
  config = CogVideoXVAEConfig.from_source(json.loads((cog[1] / 'config.json').read_text()))
  _, state = nnx.split(abstract_model(lambda: AutoencoderKLCogVideoX(config, rngs=nnx.Rngs(0))))
  the_plan = plan(checkpoint, COGVIDEOX, state)
  assert sorted(k for k, _ in the_plan.entries.values()) == sorted(checkpoint.keys())
  assert len(the_plan.entries) == len(nnx.to_flat_state(state))


def test_bad_checkpoints_and_configs_give_clear_errors(cog, tmp_path):
  from safetensors.numpy import save_file
  checkpoint = SafetensorsCheckpoint(cog[1])
  tensors = {k: checkpoint.read(k) for k in checkpoint.keys()}
  config = json.loads((cog[1] / 'config.json').read_text())

  def write(name, mutated, cfg=config):
    out = tmp_path / name
    out.mkdir()
    (out / 'config.json').write_text(json.dumps(cfg))
    save_file(mutated, out / 'diffusion_pytorch_model.safetensors')
    return out

  missing = dict(tensors)
  del missing['decoder.norm_out.conv_y.conv.weight']
  with pytest.raises(CheckpointError, match=r'missing.*\n.*decoder\.norm_out\.conv_y\.kernel'):
    load_cogvideox_vae(write('missing', missing))
  extra = {**tensors, 'quant_conv.weight': np.zeros((8, 8, 1, 1, 1), np.float32)}
  with pytest.raises(CheckpointError, match=r'match no cogvideox_vae key-map rule:\n  quant_conv'):
    load_cogvideox_vae(write('extra', extra))
  with pytest.raises(ValueError, match='use_quant_conv'):
    load_cogvideox_vae(write('quant', tensors, {**config, 'use_quant_conv': True}))


def test_converter_round_trip_and_cli(cog, tmp_path):
  from vap_jax.cli.convert import vae_main as main
  assert main(['--kind', 'cogvideox', '--src', str(cog[1]), '--dst', str(tmp_path / 'orbax'),
               '--dtype', 'bfloat16']) == 0
  direct = nnx.state(load_cogvideox_vae(cog[1], param_dtype='bfloat16'))
  restored = dict(nnx.to_flat_state(nnx.state(load_cogvideox_vae(tmp_path / 'orbax',
                                                                 param_dtype='bfloat16'))))
  for path, var in nnx.to_flat_state(direct):
    assert restored[path][...].dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(restored[path][...]), np.asarray(var[...]))
  with pytest.raises(FileExistsError):
    convert_cogvideox_vae(cog[1], tmp_path / 'orbax', progress=False)
  from vap_jax.weights.vae import load_wan_vae
  with pytest.raises(CheckpointError, match="not 'wan_vae'"):
    load_wan_vae(tmp_path / 'orbax')


def test_released_config_builds_abstractly_with_diffusers_parameter_count():
  from diffusers import AutoencoderKLCogVideoX as Torch
  with torch.device('meta'):
    expected = sum(p.numel() for p in Torch(scaling_factor=0.7).parameters())
  model = abstract_model(lambda: AutoencoderKLCogVideoX(CogVideoXVAEConfig(), rngs=nnx.Rngs(0)))
  assert count_params(model) == expected


@pytest.mark.parametrize('mesh_shape,batch,vae_rules', [
    (dict(data=2, context=4), 2, False),  # batch over 2 devices, width over 4
    (dict(fsdp=8), 1, True),  # a pipeline's one video: width strips over every device
])
def test_decode_sharded_over_batch_and_width_equals_one_device(cog, jax_cog, mesh_shape, batch,
                                                               vae_rules):
  from vap_jax.parallel import DEFAULT_RULES, VAE_RULES, make_mesh, sharding_context
  mesh = make_mesh(mesh_shape)
  model = load_cogvideox_vae(cog[1], mesh=mesh)
  z = np.random.default_rng(5).standard_normal((batch, 4, 3, 4, 8)).astype(np.float32)
  expected = np.asarray(_decode(jax_cog, z, False))
  with sharding_context(mesh, VAE_RULES if vae_rules else DEFAULT_RULES):
    actual = _decode(model, z, False)
  assert len(actual.sharding.device_set) == 8
  if vae_rules:
    assert actual.sharding.shard_shape(actual.shape)[-1] == actual.shape[-1] // 8
  scale = np.abs(expected).max()
  assert_close(np.asarray(actual) / scale, expected / scale, what='sharded decode')