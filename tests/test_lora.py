"""LoRA: a LoRA-adapted linear equals PyPI peft; adapters written by us load in diffusers/peft
and theirs in ours (whole tiny CogVideoX through the production key map); merged equals
unmerged; the official target regex selects the base and expert attention projections of the
scanned stack; adapters are sharded like their kernels.
"""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import DATA, assert_close
from test_cogvideox_diffusers import _diffusers_folder, _inputs, _torch_forward
from vap_jax.nn import lora
from vap_jax.nn.layers import Linear
from vap_jax.weights import lora as lora_files
from vap_jax.weights.cogvideox import load_cogvideox


def _randomize_b(model, seed=1):
  """Non-zero B everywhere (a trained adapter), so the adapters change the output."""
  for i, (_, layer) in enumerate(lora.adapted(model)):
    b = layer.lora.b
    b[...] = 0.05 * jax.random.normal(jax.random.key(seed + i), b.shape, b.dtype)


def test_adapted_linear_equals_peft():
  from peft import LoraConfig, get_peft_model
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Linear(24, 40))
  peft_net = get_peft_model(net, LoraConfig(r=4, lora_alpha=12, target_modules=['0'],
                                            init_lora_weights=False))
  layer = peft_net.base_model.model[0]
  ours = Linear(24, 40, axes=('embed', 'heads'), dtype=jnp.float32, param_dtype=jnp.float32,
                rngs=nnx.Rngs(0))
  ours.kernel[...] = layer.base_layer.weight.detach().numpy().T
  ours.bias[...] = layer.base_layer.bias.detach().numpy()
  ours.lora = lora.LoRA(layer.lora_A['default'].weight.detach().numpy().T,
                        layer.lora_B['default'].weight.detach().numpy().T, 12 / 4,
                        kernel_axes=('embed', 'heads'))
  x = np.random.default_rng(0).standard_normal((3, 5, 24)).astype(np.float32)
  with torch.no_grad():
    expected = peft_net(torch.from_numpy(x)).numpy()
  # float32 sums of 24 + 4 products: a few ulp of the output's scale
  assert_close(ours(x), expected, atol=1e-6 * np.abs(expected).max(), rtol=1e-6)
  # PEFT's init: B zero, A uniform within 1/sqrt(in)
  fresh = lora.init(jax.random.key(0), ours.kernel, 4, 12)
  assert not np.asarray(fresh.b[...]).any() and np.abs(fresh.a[...]).max() <= 24 ** -0.5


@pytest.fixture(scope='module')
def diffusers_base(tmp_path_factory):
  return _diffusers_folder(tmp_path_factory, 'lora_base')


def test_diffusers_adapters_load_in_ours(diffusers_base, tmp_path):
  from diffusers import CogVideoXImageToVideoPipeline
  from peft import LoraConfig
  from peft.utils import get_peft_model_state_dict
  torch_model, folder = diffusers_base
  config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_files.OFFICIAL_TARGET,
                      init_lora_weights=False)
  torch_model.add_adapter(config)
  try:
    state = get_peft_model_state_dict(torch_model)
    CogVideoXImageToVideoPipeline.save_lora_weights(
        tmp_path / 'diffusers', transformer_lora_layers=state,
        transformer_lora_adapter_metadata=config.to_dict())
    # PEFT's save_pretrained layout: adapter_model.safetensors + adapter_config.json
    from safetensors.torch import save_file
    config.save_pretrained(tmp_path / 'peft')
    save_file({f'base_model.model.{k}': v.contiguous() for k, v in state.items()},
              tmp_path / 'peft' / 'adapter_model.safetensors')
    latents, t, text = _inputs()
    expected = _torch_forward(torch_model, dict(torch_model.config), latents, t, text)
  finally:
    torch_model.delete_adapters('default')
  for layout in ('diffusers', 'peft'):
    model = load_cogvideox(folder, dtype='float32')
    names = lora_files.load(model, tmp_path / layout)
    assert len(names) == 2 * 4  # two blocks, to_q/to_k/to_v/to_out.0
    assert_close(model(latents, t, text), expected, atol=1e-5, rtol=1e-5, what=layout)


def test_our_adapters_load_in_diffusers(diffusers_base, tmp_path):
  torch_model, folder = diffusers_base
  model = load_cogvideox(folder, dtype='float32')
  names = lora_files.add(model, rank=4, alpha=8)
  _randomize_b(model)
  file = lora_files.save(model, tmp_path)
  latents, t, text = _inputs()
  ours = model(latents, t, text)
  from diffusers import CogVideoXImageToVideoPipeline
  pipe = CogVideoXImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=None,
                                       transformer=torch_model, scheduler=None)
  pipe.load_lora_weights(str(file.parent), adapter_name='ours')  # what a diffusers user runs
  try:
    expected = _torch_forward(torch_model, dict(torch_model.config), latents, t, text)
    loaded = {n for n, m in torch_model.named_modules() if hasattr(m, 'lora_A') and 'ours' in m.lora_A}
  finally:
    torch_model.delete_adapters('ours')
  assert loaded == set(names)
  assert_close(ours, expected, atol=1e-5, rtol=1e-5)
  # ...and back: the file reloads into a fresh model with the same output
  again = load_cogvideox(folder, dtype='float32')
  lora_files.load(again, file)
  assert_close(again(latents, t, text), ours, atol=1e-6, rtol=1e-6)


def _vap_model():
  return load_cogvideox(DATA / 'cogvideox_mot', dtype='float32')


def _vap_inputs(model, seed=0):
  rng = np.random.default_rng(seed)
  c = model.config
  x = rng.standard_normal((1, 3, c.in_channels, 8, 12)).astype(np.float32)
  text = rng.standard_normal((1, c.max_text_seq_length, c.text_embed_dim)).astype(np.float32)
  return dict(hidden_states=x, timestep=np.array([500]), text=text, ref_latents=x[:, ::-1],
              ref_text=text[:, ::-1])


def _call(model, inputs):
  i = inputs
  return model(i['hidden_states'], i['timestep'], i['text'], ref_latents=i['ref_latents'],
               ref_text=i['ref_text'])


def test_official_target_on_the_vap_stack_merge_and_scale():
  model = _vap_model()
  inputs = _vap_inputs(model)
  before = _call(model, inputs)
  names = lora_files.add(model, rank=4, alpha=4)
  layers, experts = model.config.num_layers, len(model.config.block_idx_with_mot_ref)
  assert len(names) == 4 * (layers + experts)
  assert any('attn1_mot_ref.to_out.0' in n for n in names)
  assert all(re.fullmatch(lora_files.OFFICIAL_TARGET, n) for n in names)
  assert_close(_call(model, inputs), before, atol=0, rtol=0)  # B = 0: the base model
  _randomize_b(model)
  unmerged = _call(model, inputs)
  assert np.abs(unmerged - before).max() > 1e-3
  # adapters off = the model they started from
  np.testing.assert_array_equal(_call(lora.adapters_off(model), inputs), before)
  # scanned == looped with adapters
  loop = nnx.clone(model)
  loop.config = type(model.config)(**{**model.config.__dict__, 'scan_layers': False})
  assert_close(_call(loop, inputs), unmerged, atol=1e-6, rtol=1e-6)
  merged = nnx.clone(model)
  assert lora.merge(merged) == 4 * 2
  assert not lora.adapted(merged)
  assert_close(_call(merged, inputs), unmerged, atol=1e-5, rtol=1e-5)
  lora.set_scale(model, 0.0)
  assert_close(_call(model, inputs), before, atol=0, rtol=0)


def test_bad_targets_and_files(tmp_path):
  model = _vap_model()
  with pytest.raises(ValueError, match='matches no linear layer'):
    lora_files.add(model, r'nothing\.here', rank=2, alpha=2)
  with pytest.raises(ValueError, match='all its layers or none'):
    lora_files.add(model, r'transformer_blocks\.0\.attn1\.to_q', rank=2, alpha=2)
  lora_files.add(model, r'transformer_blocks\.\d+\.attn1\.to_q', rank=2, alpha=2)
  file = lora_files.save(model, tmp_path / 'a.safetensors')
  from safetensors.numpy import load_file, save_file
  tensors = load_file(file)
  save_file({k: v for k, v in tensors.items() if '.0.' not in k}, str(tmp_path / 'part.safetensors'))
  with pytest.raises(ValueError, match='missing'):
    lora_files.load(_vap_model(), tmp_path / 'part.safetensors')
  save_file({**tensors, 'transformer.nope.lora_A.weight': np.zeros((2, 3), np.float32),
             'transformer.nope.lora_B.weight': np.zeros((3, 2), np.float32)},
            str(tmp_path / 'extra.safetensors'))
  with pytest.raises(ValueError, match='name no linear layer'):
    lora_files.load(_vap_model(), tmp_path / 'extra.safetensors')
  with pytest.raises(FileNotFoundError):
    lora_files.load(_vap_model(), tmp_path / 'missing')
  meta = json.loads(__import__('safetensors').safe_open(str(file), 'np').metadata()[
      lora_files.METADATA_KEY])
  assert meta['transformer.r'] == 2 and meta['transformer.lora_alpha'] == 2


def test_adapters_are_sharded_like_their_kernels():
  from vap_jax.parallel import make_mesh, param_shardings
  from vap_jax.parallel.sharding import DEFAULT_RULES
  model = _vap_model()
  lora_files.add(model, rank=4, alpha=4)
  mesh = make_mesh({'fsdp': 2, 'tensor': 2}, devices=jax.devices()[:4])
  flat = dict(nnx.to_flat_state(param_shardings(nnx.state(model), mesh, DEFAULT_RULES)))
  q = ('blocks', 'attn1', 'to_q')
  kernel, a, b = (flat[q + n].spec for n in (('kernel',), ('lora', 'a'), ('lora', 'b')))
  assert a[:2] == kernel[:2] and b[0] == kernel[0] and b[2] == kernel[2]
  assert a[2] is None and b[1] is None


def test_wan_lora_sft_trains_only_its_adapters():
  """LoRA SFT of the Wan base (the expert unused): DiffSynth-Studio's targets, the SFT objective
  without references, two steps of the real train step on the golden Wan batch."""
  from safetensors.numpy import load_file
  from test_train_golden import _wan_batch
  from vap_jax.config import load_config
  from vap_jax.train import objectives, optimizer as opt
  from vap_jax.train.step import init_state, make_train_step, split
  from vap_jax.weights.wan import load_wan
  model = load_wan(DATA / 'wan_mot', dtype='float32')
  target = load_config('configs/lora_sft.py:wan_tiny').lora.target
  names = lora_files.add(model, target, rank=4, alpha=4)
  parts = ('attn1.to_q', 'attn1.to_k', 'attn1.to_v', 'attn1.to_out.0', 'attn2.to_q', 'attn2.to_k',
           'attn2.to_v', 'attn2.to_out.0', 'ffn.net.0.proj', 'ffn.net.2')
  assert sorted(names) == sorted(f'blocks.{i}.{p}' for i in range(model.config.num_layers)
                                 for p in parts)
  graphdef, trainable, frozen = split(model, 'lora')
  channels = model.config.out_channels
  objective = objectives.Objective('wan', {'latents_mean': [0.0] * channels,
                                           'latents_std': [1.0] * channels}, references=False)
  optimizer = opt.adamw(opt.schedule(1e-2))
  step = jax.jit(make_train_step(graphdef, objective, optimizer))
  batch, draws = _wan_batch(load_file(DATA / 'wan_train' / 'sft' / 'inputs.safetensors'))
  state = init_state(trainable, optimizer, seed=0)
  state, first = step(state, frozen, batch, draws)
  state, second = step(state, frozen, batch, draws)
  assert np.isfinite(first['loss']) and second['loss'] < first['loss']
  b = [np.asarray(v[...]) for path, v in nnx.to_flat_state(state.params) if path[-1] == 'b']
  assert len(b) == len(parts) and all(np.abs(x).max() > 0 for x in b)
