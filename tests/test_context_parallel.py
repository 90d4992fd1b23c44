"""Context-parallel joint attention (`vap_jax.parallel.context`): on 8 CPU devices the
all-gather-K/V and Ulysses layouts give the one-device numbers for both backbones, with 1 and 2
references and stream lengths that do not divide the context degree; the compiled step has no
collective but the K/V gathers inside each block."""
import dataclasses
import re

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import assert_close, config_file
from test_sharding import _cog_inputs, _wan_inputs, perturbed
from vap_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer
from vap_jax.models.wan import WanConfig, WanTransformer
from vap_jax.parallel import make_mesh, sharding_context
from vap_jax.weights.loading import shard_model


def _cog(rng, batch, n_refs, text=5):
  """CogVideoX streams of 5 + 72 tokens per reference: 77 does not divide 4 or 8."""
  return _cog_inputs(rng, batch, n_refs, text=text)


def _wan(rng, batch, n_refs):
  """Wan streams of 3 x 3 x 5 = 45 video tokens per reference (6 x 10 latents)."""
  return _wan_inputs(rng, batch, n_refs, size=(6, 10))


# 8 heads, so Ulysses can split them over a context axis of 8 (Wan keeps its width of 48);
# CogVideoX text of 5 tokens, so its streams are uneven too
EIGHT_HEADS = {'cogvideox': dict(num_attention_heads=8, max_text_seq_length=5),
               'wan': dict(num_attention_heads=8, attention_head_dim=6)}
FAMILIES = {'cogvideox': ('cogvideox_tiny.py', CogVideoXConfig, CogVideoXTransformer, _cog),
            'wan': ('wan_tiny.py', WanConfig, WanTransformer, _wan)}


def _model(family, **changes):
  name, config_cls, model_cls, _ = FAMILIES[family]
  config = config_cls(**{**config_file(name).model, **EIGHT_HEADS[family], **changes})
  return perturbed(model_cls(config, rngs=nnx.Rngs(0)))


def _forward(model, inputs):
  return nnx.jit(lambda m, *a, **k: m(*a, **k))(model, *inputs[0], **inputs[1])


@pytest.fixture(scope='module', params=[(f, n) for f in FAMILIES for n in (1, 2)],
                ids=lambda p: f'{p[0]}-{p[1]}ref')
def one_device(request):
  family, refs = request.param
  model = _model(family)
  inputs = FAMILIES[family][3](np.random.default_rng(0), batch=2, n_refs=refs)
  return family, model, inputs, np.asarray(_forward(model, inputs))


@pytest.mark.parametrize('kind,mesh_shape', [
    ('allgather', dict(data=2, context=4)),
    ('ulysses', dict(context=8)),
    ('allgather', dict(context=4, tensor=2)),
    ('ulysses', dict(context=2, tensor=4)),
    ('gspmd', dict(fsdp=8)),  # layer-wise FSDP (the batch of 2 padded over 8)
    ('gspmd', dict(fsdp=4, tensor=2)),
])
def test_context_parallel_forward_equals_one_device(one_device, kind, mesh_shape):
  """Every inference layout on 8 devices gives the one-device output (offload:
  tests/test_offload.py, on the same inputs)."""
  family, model, inputs, expected = one_device
  config = config_file(FAMILIES[family][0])
  parallel = nnx.clone(model)
  parallel.config = dataclasses.replace(model.config, context_parallel=kind)
  mesh = make_mesh(mesh_shape)
  parallel = shard_model(parallel, mesh, config.rules)
  with sharding_context(mesh, config.rules):
    actual = _forward(parallel, inputs)
  assert_close(actual, expected, atol=1e-5, rtol=1e-5, what=f'{family} {kind} {mesh_shape}')


def test_context_parallel_gradients_equal_one_device():
  """The same op trains: gradients w.r.t. the expert through both layouts (blockwise, the
  training op: its flash backward inside the shard_map)."""
  model = _model('cogvideox', attention='blockwise')
  inputs = _cog(np.random.default_rng(1), batch=2, n_refs=2)
  config = config_file('cogvideox_tiny.py')

  def grads(m):
    graphdef, expert, rest = nnx.split(m, nnx.All(nnx.Param, nnx.PathContains('expert')), ...)
    loss = lambda e: (nnx.merge(graphdef, e, rest)(*inputs[0], **inputs[1]) ** 2).mean()
    return jax.jit(jax.grad(loss))(expert)
  expected = grads(model)
  for kind, mesh_shape in (('allgather', dict(data=2, context=4)), ('ulysses', dict(context=8))):
    parallel = nnx.clone(model)
    parallel.config = dataclasses.replace(model.config, context_parallel=kind)
    mesh = make_mesh(mesh_shape)
    parallel = shard_model(parallel, mesh, config.rules)
    with sharding_context(mesh, config.rules):
      actual = grads(parallel)
    for (path, a), (_, b) in zip(nnx.to_flat_state(actual), nnx.to_flat_state(expected)):
      assert_close(a[...], b[...], atol=1e-6, rtol=1e-5, what=f'{kind} {path}')


def test_offloaded_forward_equals_one_device(one_device):
  """The weights in pinned host memory, the stacks streamed layer by layer (`stack.offload`;
  the rest of its tests: tests/test_offload.py)."""
  from vap_jax.models import stack
  from vap_jax.pipelines import common
  family, model, inputs, expected = one_device
  offloaded = stack.offload(nnx.clone(model))
  for path, var in nnx.to_flat_state(nnx.state(offloaded)):  # all but the stacked vectors
    kind = var.get_value().sharding.memory_kind
    assert kind == ('pinned_host' if stack.offloads(var) else 'device'), path
    assert stack.offloads(var) or len(var.shape) == 2
  actual = common.compiled(offloaded, lambda m, a, k: m(*a, **k))(*inputs)
  assert actual.sharding.memory_kind == 'device'
  assert_close(actual, expected, atol=1e-5, rtol=1e-5, what=f'{family} offloaded')


COLLECTIVES = ('all-gather', 'all-to-all', 'collective-permute', 'all-reduce', 'reduce-scatter')


def _collectives(model, inputs, mesh, rules) -> dict[str, int]:
  """How many of each collective the compiled forward of ``model`` on ``mesh`` runs."""
  graphdef, state = nnx.split(shard_model(model, mesh, rules))
  with sharding_context(mesh, rules):
    hlo = jax.jit(lambda s, *a, **k: nnx.merge(graphdef, s)(*a, **k)).lower(
        state, *inputs[0], **inputs[1]).compile().as_text()
  return {c: len(re.findall(rf'= \S+ {c}(-start)?\(', hlo)) for c in COLLECTIVES}


def test_allgather_blocks_gather_only_keys_and_values():
  """What one more block costs in collectives, sequence-sharded over 8 devices (weights
  replicated, blocks unrolled): with the all-gather layout, the gathers of its streams' keys and
  values (CogVideoX: text and video of each stream, so 4 per stream) and nothing else -- no
  gather of Q, no all-to-all or permute at stream or part boundaries; GSPMD's layout reshards
  there instead."""
  inputs = _cog(np.random.default_rng(0), batch=1, n_refs=1, text=8)
  mesh, rules = make_mesh(dict(context=8)), config_file('cogvideox_tiny.py').rules

  def counts(kind, layers, experts):
    model = _model('cogvideox', context_parallel=kind, scan_layers=False, num_layers=layers,
                   block_idx_with_mot_ref=experts, max_text_seq_length=8)
    return _collectives(model, inputs, mesh, rules)
  for kind in ('allgather', 'gspmd'):
    a, b, c = (counts(kind, *shape) for shape in ((3, (0, 1)), (4, (0, 1)), (4, (0, 1, 2))))
    base_block = {k: b[k] - a[k] for k in COLLECTIVES}    # one more base-only block
    expert_stream = {k: c[k] - b[k] for k in COLLECTIVES}  # the reference stream on a block
    if kind == 'allgather':
      for delta in (base_block, expert_stream):
        assert delta == {'all-gather': 4, 'all-to-all': 0, 'collective-permute': 0,
                         'all-reduce': 0, 'reduce-scatter': 0}, (kind, delta)
    else:
      assert base_block['collective-permute'] + expert_stream['collective-permute'] > 0, (
          kind, base_block, expert_stream)
