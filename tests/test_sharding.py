"""Tiny CogVideoX-VAP and Wan-VAP models (two references) sharded over 8 CPU devices give the
one-device numbers, for FSDP, tensor, context and data parallel meshes."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import assert_close, config_file
from vap_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer
from vap_jax.models.wan import WanConfig, WanTransformer
from vap_jax.parallel import (DEFAULT_RULES, FSDP_CONTEXT_RULES, logical_to_spec, make_mesh,
                              param_shardings, sharding_context)
from vap_jax.weights.loading import shard_model


def _cog_inputs(rng, batch, n_refs=2, text=8):
  cfg = config_file('cogvideox_tiny.py').model
  lat = lambda f: rng.standard_normal((batch, f, cfg.in_channels, 8, 12)).astype(np.float32)
  txt = lambda n: rng.standard_normal((batch, n, cfg.text_embed_dim)).astype(np.float32)
  return (lat(3), np.arange(batch) * 97 + 5, txt(text)), dict(ref_latents=lat(3 * n_refs),
                                                              ref_text=txt(text * n_refs))


def _wan_inputs(rng, batch, n_refs=2, size=(8, 8)):
  cfg = config_file('wan_tiny.py').model
  lat = lambda f: rng.standard_normal((batch, cfg.in_channels, f, *size)).astype(np.float32)
  seq = lambda n, d: rng.standard_normal((batch, n, d)).astype(np.float32)
  return (lat(3), np.arange(batch) * 97 + 5, seq(6, cfg.text_dim)), dict(
      image=seq(5, cfg.image_dim), ref_latents=lat(3 * n_refs),
      ref_text=seq(6 * n_refs, cfg.text_dim), ref_image=seq(5 * n_refs, cfg.image_dim))


def perturbed(model):
  """``model`` with every parameter moved by 0.1 N(0, 1): zero biases and unit norms matter."""
  state = nnx.state(model)
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
  nnx.update(model, jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), state))
  return model


MODELS = {
    'cogvideox': ('cogvideox_tiny.py', lambda c: CogVideoXTransformer(CogVideoXConfig(**c), rngs=nnx.Rngs(0)),
                  _cog_inputs),
    'wan': ('wan_tiny.py', lambda c: WanTransformer(WanConfig(**c), rngs=nnx.Rngs(0)), _wan_inputs),
}


@pytest.fixture(scope='module', params=sorted(MODELS))
def reference(request):
  name, build, make_inputs = MODELS[request.param]
  config = config_file(name)
  model = perturbed(build(config.model))
  inputs = make_inputs(np.random.default_rng(0), batch=8)
  expected = np.asarray(nnx.jit(lambda m, *a, **k: m(*a, **k))(model, *inputs[0], **inputs[1]))
  return config, model, inputs, expected


@pytest.mark.parametrize('mesh_shape', [
    dict(fsdp=2, tensor=4),
    dict(context=2, tensor=4),
    dict(data=2, fsdp=4),
    dict(data=2, context=2, tensor=2),
])
def test_sharded_forward_equals_single_device(reference, mesh_shape):
  config, model, inputs, expected = reference
  mesh = make_mesh(mesh_shape)
  sharded = shard_model(nnx.clone(model), mesh, config.rules)
  kernel = sharded.blocks.attn1.to_q.kernel[...]
  assert len(kernel.sharding.device_set) == 8
  with sharding_context(mesh, config.rules):
    actual = nnx.jit(lambda m, *a, **k: m(*a, **k))(sharded, *inputs[0], **inputs[1])
  assert_close(actual, expected, atol=1e-5, rtol=1e-5, what=f'sharded {mesh_shape}')


def test_rules_are_ordered_and_use_each_mesh_axis_once():
  mesh = make_mesh(dict(fsdp=2, tensor=4))
  assert logical_to_spec(('embed', 'heads'), DEFAULT_RULES, mesh) == P('fsdp', 'tensor')
  assert logical_to_spec(('embed', 'embed'), DEFAULT_RULES, mesh) == P('fsdp', None)
  assert logical_to_spec(('activation_batch', 'activation_length'), DEFAULT_RULES, mesh) == \
      P('fsdp', None)  # data and context have size 1 here
  rules = (('heads', 'tensor'), ('heads', 'fsdp'))
  assert logical_to_spec(('heads', 'heads'), rules, mesh) == P('tensor', 'fsdp')


def test_mesh_and_sharding_errors_are_clear():
  with pytest.raises(ValueError, match='needs 16 devices, 8 are available'):
    make_mesh(dict(fsdp=4, tensor=4))
  with pytest.raises(ValueError, match='not among'):
    make_mesh(dict(model=8))
  assert make_mesh(dict(fsdp=-1, tensor=2)).shape['fsdp'] == 4

  class Odd(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(np.zeros((4, 6), np.float32), logical_axes=('embed', 'heads'))
  with pytest.raises(ValueError, match=r'parameter w of shape \(4, 6\).*6 is not divisible by 4'):
    param_shardings(nnx.state(Odd()), make_mesh(dict(fsdp=2, tensor=4)), DEFAULT_RULES)

  class WrongRank(nnx.Module):  # 3 dimensions, 2 names: must not zip names onto wrong dims
    def __init__(self):
      self.w = nnx.Param(np.zeros((2, 4, 6), np.float32), logical_axes=('embed', 'heads'))
  with pytest.raises(ValueError, match=r"parameter w: logical axes \('embed', 'heads'\) name 2 "
                                       r'dimensions but its shape has 3'):
    param_shardings(nnx.state(WrongRank()), make_mesh(dict(fsdp=2, tensor=4)), DEFAULT_RULES)


@pytest.mark.parametrize('mesh_shape,rules,q_kernel,ff_out', [
    (dict(fsdp=8), DEFAULT_RULES, P(None, 'fsdp', None), P(None, None, 'fsdp')),
    (dict(tensor=4, data=2), DEFAULT_RULES, P(None, None, 'tensor'), P(None, 'tensor', None)),
    # FSDP over fsdp x context: a context-parallel mesh does not replicate the weights
    (dict(fsdp=2, context=4), FSDP_CONTEXT_RULES, P(None, ('fsdp', 'context'), None),
     P(None, None, ('fsdp', 'context'))),
])
def test_stacked_parameters_shard_as_the_rules_say(mesh_shape, rules, q_kernel, ff_out):
  """Every variable of both stacked trees gets the PartitionSpec its logical axes give under the
  rules (layer axis unsharded), on fsdp, tensor and fsdp+context meshes."""
  mesh = make_mesh(mesh_shape)
  for name, build, _ in MODELS.values():
    model = shard_model(build(config_file(name).model), mesh, rules)
    stacks = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
      axes = var.get_metadata()['logical_axes']
      spec = var[...].sharding.spec
      assert spec == logical_to_spec(axes, rules, mesh), path
      if axes[0] == 'layers':
        stacks += 1
        assert spec[0] is None, path
    assert stacks > 10
    assert model.blocks.attn1.to_q.kernel[...].sharding.spec == q_kernel
    assert model.expert.blocks.attn1.to_q.kernel[...].sharding.spec == q_kernel
    ffn = model.blocks.ff if name.startswith('cog') else model.blocks.ffn
    assert ffn.proj_out.kernel[...].sharding.spec == ff_out


def test_scanned_fsdp_gathers_one_layer_at_a_time():
  """Layer-wise FSDP: with the blocks scanned on fsdp=8, the compiled forward gathers each
  layer's weights inside the loop body (one layer at a time); outside it only the non-block
  weights (embeddings, head) are gathered -- never a whole stack."""
  import re
  from vap_jax.weights.loading import shard_model as shard
  config = config_file('cogvideox_tiny.py')
  fields = dict(config.model, num_layers=6, block_idx_with_mot_ref=tuple(range(6)))
  model = CogVideoXTransformer(CogVideoXConfig(**fields), rngs=nnx.Rngs(0))
  mesh = make_mesh(dict(fsdp=8))
  graphdef, state = nnx.split(shard(model, mesh, config.rules))
  args, kw = _cog_inputs(np.random.default_rng(0), batch=8, n_refs=1)
  with sharding_context(mesh, config.rules):
    hlo = jax.jit(lambda s, *a, **k: nnx.merge(graphdef, s)(*a, **k)).lower(
        state, *args, **kw).compile().as_text()
  computations, name = {}, None
  for line in hlo.split('\n'):
    header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) \(.*\{$', line)
    if header:
      name = header.group(1)
      computations[name] = []
    elif name is not None and re.search(r' all-gather(?:-start)?\(', line):
      computations[name].append(re.search(r'= (\w+\[[\d,]*\])', line).group(1))
  bodies = set(re.findall(r'body=%?([\w.\-]+)', hlo))
  inside = [s for n, shapes in computations.items() if n in bodies for s in shapes]
  outside = [s for n, shapes in computations.items() if n not in bodies for s in shapes]
  width = 16 * 4  # attention_head_dim x heads of the tiny config
  assert f'f32[{width},{width}]' in inside  # the q/k/v/out kernels of the layer in flight
  assert not any(re.match(r'f32\[6,', s) for s in outside), outside  # no whole-stack gather
