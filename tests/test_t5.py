"""T5 v1.1 and umT5 encoders equal transformers' ``T5EncoderModel`` / ``UMT5EncoderModel`` (fp32),
loaded from multi-shard HF folders through the production key map; converter round trip; real
sizes build abstractly with the released parameter counts.
"""
import dataclasses
import json

import numpy as np
import pytest
import torch
from flax import nnx

from conftest import assert_close, config_file
from vap_jax.models.t5 import T5Config, T5Encoder, relative_position_buckets
from vap_jax.weights.component import source_config
from vap_jax.weights.encoders import T5, T5_SPEC, load_text_encoder, model_factory
from vap_jax.weights.keymap import plan
from vap_jax.parallel import make_mesh, sharding_context
from vap_jax.weights.loading import abstract_model, count_params, shard_model
from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint

TINY = dict(vocab_size=160, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
            feed_forward_proj='gated-gelu', dropout_rate=0.0)


def make_hf_encoder(folder, flavour, seed=0, **overrides):
  """A tiny random transformers encoder with perturbed norms, saved as a multi-shard folder."""
  from transformers import T5Config as HFT5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel
  torch.manual_seed(seed)
  cfg_cls, model_cls = (HFT5Config, T5EncoderModel) if flavour == 't5' else (UMT5Config, UMT5EncoderModel)
  model = model_cls(cfg_cls(**{**TINY, **overrides})).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder, max_shard_size='20KB', safe_serialization=True)
  return model


@pytest.fixture(scope='module', params=['t5', 'umt5'])
def encoder(request, tmp_path_factory):
  folder = tmp_path_factory.mktemp(request.param) / 'text_encoder'
  model = make_hf_encoder(folder, request.param)
  if request.param == 'umt5':  # transformers 4 also saved the tied copy of the embedding
    _add_shard(folder, {'encoder.embed_tokens.weight': model.shared.weight.detach().clone()})
  return request.param, model, folder


def _add_shard(folder, tensors):
  from safetensors.torch import save_file
  save_file(tensors, folder / 'extra.safetensors')
  index_file = folder / 'model.safetensors.index.json'
  index = json.loads(index_file.read_text())
  index['weight_map'].update({k: 'extra.safetensors' for k in tensors})
  index_file.write_text(json.dumps(index))


def _ids(batch=3, length=11, lengths=(11, 6, 1), seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, TINY['vocab_size'], (batch, length))
  mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
  return np.where(mask > 0, ids, 0), mask


@pytest.mark.parametrize('masked', [False, True])
def test_encoder_equals_transformers(encoder, masked):
  flavour, torch_model, folder = encoder
  model = load_text_encoder(folder.parent, dtype='float32')
  assert model.config.per_layer_position_bias == (flavour == 'umt5')
  ids, mask = _ids()
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
                           if masked else None).last_hidden_state.numpy()
  actual = nnx.jit(lambda m, i, a: m(i, a))(model, ids, mask if masked else None)
  err, rel = assert_close(actual, expected, atol=1e-5, rtol=1e-5, what=f'{flavour} masked={masked}')
  print(f'{flavour} masked={masked}: max abs {err:.2e} rel {rel:.2e}')


def test_relative_position_buckets_equal_transformers():
  from transformers.models.t5.modeling_t5 import T5Attention
  q, k = np.arange(700)[:, None], np.arange(700)[None]
  for buckets, distance in [(32, 128), (8, 16)]:
    expected = T5Attention._relative_position_bucket(torch.from_numpy(k - q), bidirectional=True,
                                                     num_buckets=buckets, max_distance=distance)
    np.testing.assert_array_equal(relative_position_buckets(700, 700, buckets, distance),
                                  expected.numpy())


def test_key_map_covers_checkpoint_and_model_both_ways(encoder):
  flavour, _, folder = encoder
  checkpoint = SafetensorsCheckpoint(folder)
  assert len(list(folder.glob('*.safetensors'))) > 2
  config = T5Config.from_source(source_config(T5_SPEC, folder))
  _, state = nnx.split(abstract_model(model_factory(config)))
  the_plan = plan(checkpoint, T5, state)
  used = sorted(k for k, _ in the_plan.entries.values())
  assert used == sorted(k for k in checkpoint.keys() if not T5.ignored(k))
  ignored = {k for k in checkpoint.keys() if T5.ignored(k)}
  assert ignored == ({'encoder.embed_tokens.weight'} if flavour == 'umt5' else set())
  assert len(the_plan.entries) == len(nnx.to_flat_state(state))


def test_mismatched_config_is_reported(encoder, tmp_path):
  _, _, folder = encoder
  raw = json.loads((folder / 'config.json').read_text())
  bad = tmp_path / 'text_encoder'
  bad.mkdir()
  for f in folder.iterdir():
    (bad / f.name).symlink_to(f)
  (bad / 'config.json').unlink()
  (bad / 'config.json').write_text(json.dumps({**raw, 'num_layers': 3, 'd_ff': 40}))
  with pytest.raises(CheckpointError, match='missing from the checkpoint') as e:
    load_text_encoder(bad, dtype='float32')
  assert 'wrong shape' in str(e.value) and 'layers.2.ff.wo.kernel' in str(e.value)
  (bad / 'config.json').unlink()
  (bad / 'config.json').write_text(json.dumps({**raw, 'model_type': 'bert'}))
  with pytest.raises(CheckpointError, match='model_type'):
    load_text_encoder(bad)


def test_converter_round_trip(encoder, tmp_path):
  _, _, folder = encoder
  from vap_jax.cli.convert import encoder_main as main
  assert main(['--kind', 't5', '--src', str(folder), '--dst', str(tmp_path / 'orbax'),
               '--dtype', 'float32']) == 0
  assert main(['--kind', 't5', '--src', str(tmp_path / 'nowhere'), '--dst', str(tmp_path / 'x')]) == 2
  ids, mask = _ids()
  direct = load_text_encoder(folder, dtype='float32')(ids, mask)
  restored = load_text_encoder(tmp_path / 'orbax', dtype='float32')(ids, mask)
  np.testing.assert_array_equal(np.asarray(restored), np.asarray(direct))


def test_ungated_relu_variant_equals_transformers(tmp_path):
  """Original T5 feed-forward (wi, ReLU): the key map's non-gated branch."""
  folder = tmp_path / 'text_encoder'
  torch_model = make_hf_encoder(folder, 't5', feed_forward_proj='relu')
  model = load_text_encoder(folder, dtype='float32')
  ids, mask = _ids()
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
                           ).last_hidden_state.numpy()
  assert_close(model(ids, mask), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('flavour', ['t5', 'umt5'])
def test_real_size_parameter_count(flavour):
  """T5 v1.1 XXL / umT5-XXL encoders: counts derived from transformers on the meta device."""
  from transformers import T5Config as HFT5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel
  real = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
              feed_forward_proj='gated-gelu', relative_attention_num_buckets=32,
              relative_attention_max_distance=128)
  if flavour == 't5':
    hf_config, hf_cls, ours = HFT5Config(vocab_size=32128, **real), T5EncoderModel, T5Config.t5_v1_1_xxl()
  else:
    hf_config, hf_cls, ours = UMT5Config(vocab_size=256384, **real), UMT5EncoderModel, T5Config.umt5_xxl()
  with torch.device('meta'):
    expected = sum(p.numel() for p in hf_cls(hf_config).parameters())  # tied embedding counted once
  assert T5Config.from_source(hf_config.to_dict()) == ours
  named = T5Config(**config_file(f'encoders.py:{flavour}_xxl').model)
  assert dataclasses.replace(named, dtype='float32', param_dtype='float32') == ours
  model = abstract_model(model_factory(named))
  assert count_params(model) == expected
  assert_shardable(nnx.state(model))
  print(f'{flavour} xxl encoder: {expected} parameters')


def assert_shardable(state):
  """Every variable names a logical axis per dimension and shards evenly on fsdp 2 x tensor 4."""
  from vap_jax.parallel import DEFAULT_RULES, param_shardings
  for path, var in nnx.to_flat_state(state):
    axes = var.get_metadata().get('logical_axes')
    assert axes is not None and len(axes) == len(var.shape), path
  shardings = param_shardings(state, make_mesh({'fsdp': 2, 'tensor': 4}), DEFAULT_RULES)
  assert any(s.spec != () and any(s.spec) for _, s in nnx.to_flat_state(shardings))


def test_sharded_forward_equals_one_device():
  """umT5 tiny (random init) over fsdp 2 x tensor 4, with a padding mask: same numbers."""
  config = T5Config(**config_file('encoders.py:umt5_tiny').model)
  model = T5Encoder(config, rngs=nnx.Rngs(0))
  ids, mask = _ids(batch=2, lengths=(11, 5))
  single = model(ids, mask)
  mesh = make_mesh({'fsdp': 2, 'tensor': 4})
  sharded_model = shard_model(model, mesh)
  assert not sharded_model.embed[...].is_fully_replicated
  with sharding_context(mesh):
    sharded = nnx.jit(lambda m, i, a: m(i, a))(sharded_model, ids, mask)
  assert_close(sharded, single, atol=1e-5, rtol=1e-5)
