"""Host offload (`vap_jax.models.stack.offload`, ``vap-generate --offload``): the weights in pinned
host memory (all but the stacked vectors), the layer stacks streamed to the device one layer at
a time inside the scan. On a mesh the same numbers as one device; the traced program copies one
layer per loop trip and never a whole stack; the whole pipelines (text encoder, VAE, transformer
offloaded) make the same video. (Both backbones with 1 and 2 references and uneven streams on
one device: tests/test_context_parallel.py, beside the other layouts.)

(On CPU host and device memory are the same RAM and XLA:CPU elides the copies, so the memory
saving itself is read off the TPU compiler's plan in `benchmarks.aot --offload`.)
"""
import dataclasses

import jax
import jax.extend
import numpy as np
import pytest
from flax import nnx

from conftest import DATA, assert_close, config_file
from test_context_parallel import FAMILIES, _forward, _model
from vap_jax.models import stack
from vap_jax.parallel import make_mesh
from vap_jax.pipelines import common
from vap_jax.weights.loading import shard_model


def _offloaded_forward(model, inputs, mesh=None):
  call = common.compiled(stack.offload(model), lambda m, a, k: m(*a, **k), mesh)
  return call(*inputs)


def test_offload_on_a_mesh_equals_one_device():
  """Offload keeps each weight's sharding: CFG halves over data=2, sequence over context=4 with
  the all-gather joint attention, every weight sharded and in host memory."""
  model = _model('cogvideox')
  inputs = FAMILIES['cogvideox'][3](np.random.default_rng(1), batch=2, n_refs=2)
  expected = np.asarray(_forward(model, inputs))
  mesh, rules = make_mesh(dict(data=2, context=4)), config_file('cogvideox_tiny.py').rules
  parallel = nnx.clone(model)
  parallel.config = dataclasses.replace(model.config, context_parallel='allgather')
  parallel = shard_model(parallel, mesh, rules)
  assert_close(_offloaded_forward(parallel, inputs, mesh), expected, atol=1e-5, rtol=1e-5,
               what='offloaded on data=2 x context=4')


def _device_puts(jaxpr, in_loop=False):
  """(shape, inside a loop body) of every array copied to the device in ``jaxpr``."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'device_put':
      found += [(tuple(v.aval.shape), in_loop) for v in eqn.invars]
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _device_puts(sub, in_loop or eqn.primitive.name in ('scan', 'while'))
  return found


@pytest.mark.parametrize('family', FAMILIES)
def test_offload_streams_one_layer_per_loop_trip(family):
  """The traced forward copies stacked weights only inside the scans, one layer's slice each
  (no leading layer axis); outside the loops only the unstacked weights (embeddings, head)."""
  model = _model(family)
  inputs = FAMILIES[family][3](np.random.default_rng(0), batch=2, n_refs=2)
  graphdef, state = nnx.split(stack.offload(model))
  stacked, unstacked = set(), set()
  for path, var in nnx.to_flat_state(state):
    axes = var.get_metadata().get('logical_axes') or ()
    (stacked if axes[:1] == (stack.LAYER_AXIS,) else unstacked).add(tuple(var.shape))
  run = lambda s, a, k: nnx.merge(graphdef, stack.fetch_unstacked(s))(*a, **k)
  copies = _device_puts(jax.make_jaxpr(run)(state, *inputs).jaxpr)
  in_loop = {shape for shape, loop in copies if loop}
  outside = {shape for shape, loop in copies if not loop}
  layer_shapes = {shape[1:] for shape in stacked}
  assert in_loop and in_loop <= layer_shapes
  assert not outside & stacked  # never a whole stack
  assert outside <= unstacked


GOLDEN = {'cogvideox': DATA / 'cogvideox_pipeline', 'wan': DATA / 'wan_pipeline'}


@pytest.mark.parametrize('family', FAMILIES)
def test_offloaded_pipeline_equals_device_resident(family):
  """The whole pipeline (text encoder, VAE, transformer all offloaded) on the golden tiny
  components: the same video as with the weights on the device."""
  from safetensors.numpy import load_file

  from vap_jax.pipelines import Pipeline
  golden = GOLDEN[family]
  inputs = load_file(golden / 'inputs.safetensors')
  noise = load_file(golden / 'latents.safetensors')['initial_noise']
  size = dict(height=64, width=96) if family == 'cogvideox' else dict(height=48, width=64)
  kw = dict(num_frames=9, num_inference_steps=2, progress=False, noise=dict(latents=noise),
            **size)
  args = (inputs['image'], list(inputs['ref_videos']), 'a cat', ['a dog'])
  pipes = [Pipeline.from_pretrained(golden / 'components', dtype='float32', offload=offload)
           for offload in (False, True)]
  assert {a.sharding.memory_kind for a in jax.tree.leaves(nnx.state(pipes[1].vae))} == {
      'pinned_host'}
  expected, actual = (p(*args, **kw) for p in pipes)
  assert_close(actual.latents, expected.latents, atol=1e-5, rtol=1e-5, what=f'{family} latents')
  assert_close(actual.video, expected.video, atol=1e-5, what=f'{family} frames')
