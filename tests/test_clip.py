"""CLIP vision tower equals transformers' ``CLIPVisionModel`` (fp32) at every hidden-state layer,
loaded through the production key map; preprocessing equals ``CLIPImageProcessorPil`` on real
images; ViT-H/14 builds abstractly with the released parameter count; sharded == one device.
"""
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import assert_close, config_file
from vap_jax.models.clip import CLIPVisionConfig, preprocess
from vap_jax.parallel import make_mesh, sharding_context
from vap_jax.weights.component import source_config
from vap_jax.weights.encoders import (CLIP_SPEC, CLIP_VISION, convert, load_image_encoder,
                                      model_factory)
from vap_jax.weights.keymap import plan
from vap_jax.weights.loading import abstract_model, count_params
from vap_jax.weights.safetensors_io import SafetensorsCheckpoint

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            image_size=28, patch_size=7, hidden_act='gelu', layer_norm_eps=1e-5)


@pytest.fixture(scope='module', params=['gelu', 'quick_gelu'])
def clip(request, tmp_path_factory):
  from transformers import CLIPVisionConfig as HFConfig, CLIPVisionModel
  torch.manual_seed(0)
  model = CLIPVisionModel(HFConfig(**{**TINY, 'hidden_act': request.param})).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp('clip') / 'image_encoder'
  model.save_pretrained(folder, max_shard_size='20KB', safe_serialization=True)
  if request.param == 'quick_gelu':
    _to_transformers4_layout(folder, model)
  return model, folder


def _to_transformers4_layout(folder, model):
  """Rewrite as transformers 4 saved it (what the released Wan image_encoder/ holds): names under
  ``vision_model.``, plus the ``position_ids`` buffer; three shards with an index."""
  import json
  from safetensors.torch import save_file
  for f in list(folder.glob('*.safetensors*')):
    f.unlink()
  tensors = {f'vision_model.{k}': v.contiguous() for k, v in model.state_dict().items()}
  assert not any(k.startswith('vision_model.vision_model.') for k in tensors)
  positions = (TINY['image_size'] // TINY['patch_size']) ** 2 + 1
  tensors['vision_model.embeddings.position_ids'] = torch.arange(positions)[None]
  names = sorted(tensors)
  weight_map = {}
  for i in range(3):
    shard = f'model-{i + 1:05d}-of-00003.safetensors'
    save_file({k: tensors[k] for k in names[i::3]}, folder / shard)
    weight_map.update({k: shard for k in names[i::3]})
  (folder / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))


def _pixels(batch=2, seed=0):
  return np.random.default_rng(seed).standard_normal(
      (batch, 3, TINY['image_size'], TINY['image_size'])).astype(np.float32)


def test_every_hidden_state_equals_transformers(clip):
  torch_model, folder = clip
  model = load_image_encoder(folder.parent, dtype='float32')
  pixels = _pixels()
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(pixels), output_hidden_states=True)
  out = nnx.jit(lambda m, x: m(x))(model, pixels)
  assert len(out.hidden_states) == len(ref.hidden_states) == TINY['num_hidden_layers'] + 1
  worst = 0.0
  for i, (a, e) in enumerate(zip(out.hidden_states, ref.hidden_states)):
    _, rel = assert_close(a, e.numpy(), atol=1e-5, rtol=1e-5, what=f'hidden_states[{i}]')
    worst = max(worst, rel)
  assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), what='last_hidden_state')
  assert_close(out.pooler_output, ref.pooler_output.numpy(), what='pooler_output')
  for index in (-2, 0, -1):
    np.testing.assert_allclose(model.hidden_state(pixels, index), out.hidden_states[index],
                               rtol=1e-6, atol=1e-6)
  print(f'clip {torch_model.config.hidden_act}: worst hidden-state rel err {worst:.2e}')


def test_key_map_covers_checkpoint_and_model_both_ways(clip):
  _, folder = clip
  checkpoint = SafetensorsCheckpoint(folder)
  assert len(list(folder.glob('*.safetensors'))) > 2
  config = CLIPVisionConfig.from_source(source_config(CLIP_SPEC, folder))
  _, state = nnx.split(abstract_model(model_factory(config)))
  the_plan = plan(checkpoint, CLIP_VISION, state)
  assert (sorted(k for k, _ in the_plan.entries.values())
          == sorted(k for k in checkpoint.keys() if not CLIP_VISION.ignored(k)))
  ignored = {k for k in checkpoint.keys() if CLIP_VISION.ignored(k)}
  assert ignored <= {'vision_model.embeddings.position_ids'}
  assert len(the_plan.entries) == len(nnx.to_flat_state(state))


def test_converter_round_trip(clip, tmp_path):
  _, folder = clip
  convert('clip', folder.parent, tmp_path / 'orbax', param_dtype='float32', progress=False)
  pixels = _pixels()
  direct = load_image_encoder(folder, dtype='float32')(pixels).hidden_states[-2]
  restored = load_image_encoder(tmp_path / 'orbax', dtype='float32')(pixels).hidden_states[-2]
  np.testing.assert_array_equal(np.asarray(restored), np.asarray(direct))
  with pytest.raises(Exception, match="converted 'clip' model, not 't5'"):
    from vap_jax.weights.encoders import load_text_encoder
    load_text_encoder(tmp_path / 'orbax')


def test_sharded_forward_equals_one_device(clip):
  """Weights and activations over an 8-device (fsdp 2 x tensor 4) mesh."""
  torch_model, folder = clip
  if torch_model.config.hidden_act != 'gelu':
    pytest.skip('one activation is enough')
  pixels = _pixels(batch=2)
  single = load_image_encoder(folder, dtype='float32')(pixels).hidden_states
  mesh = make_mesh({'fsdp': 2, 'tensor': 4})
  model = load_image_encoder(folder, dtype='float32', mesh=mesh)
  kernel = model.layers[0].fc1.kernel[...]
  assert len(kernel.sharding.device_set) == 8 and not kernel.is_fully_replicated
  with sharding_context(mesh):
    sharded = nnx.jit(lambda m, x: m(x).hidden_states)(model, pixels)
  for a, e in zip(sharded, single):
    assert_close(a, e, atol=1e-5, rtol=1e-5)


def _images():
  """Real RGB content (gradients + shapes + noise) at several sizes and aspect ratios."""
  from PIL import Image, ImageDraw
  rng = np.random.default_rng(0)
  images = []
  for w, h in [(640, 480), (300, 500), (224, 224), (1000, 230), (225, 700), (97, 61)]:
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    noise = rng.integers(-30, 30, (h, w, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((w // 5, h // 5, w // 2, h // 2), fill=(250, 20, 40))
    draw.rectangle((w // 2, h // 3, 4 * w // 5, 9 * h // 10), fill=(10, 200, 90))
    images.append(image)
  images.append(images[0].convert('L'))   # greyscale input is converted to RGB
  images.append(images[1].convert('RGBA'))
  return images


def test_preprocess_equals_clip_image_processor():
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  images = _images()
  expected = CLIPImageProcessorPil()(images=images, return_tensors='np')['pixel_values']
  actual = preprocess(images)
  assert actual.shape == expected.shape == (len(images), 3, 224, 224)
  np.testing.assert_array_equal(actual, expected)
  # Numpy HWC uint8 input gives the same result as the PIL image.
  np.testing.assert_array_equal(preprocess([np.asarray(images[0])]), expected[:1])


def test_real_size_parameter_count():
  """ViT-H/14 (Wan's image_encoder): count derived from transformers on the meta device."""
  from transformers import CLIPVisionConfig as HFConfig, CLIPVisionModel
  hf_config = HFConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                       num_attention_heads=16, image_size=224, patch_size=14, hidden_act='gelu')
  with torch.device('meta'):
    expected = sum(p.numel() for p in CLIPVisionModel(hf_config).parameters())
  ours = CLIPVisionConfig.from_source(hf_config.to_dict())
  assert ours == CLIPVisionConfig() and ours.num_positions == 257
  named = CLIPVisionConfig(**config_file('encoders.py:clip_h14').model)
  model = abstract_model(model_factory(named))
  assert count_params(model) == expected
  from test_t5 import assert_shardable
  assert_shardable(nnx.state(model))
  print(f'clip vit-h/14: {expected} parameters')
