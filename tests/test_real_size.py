"""Real-size configs build abstractly with the parameter counts of VAP_SPEC §4.4."""
import dataclasses

import jax
from flax import nnx

from conftest import config_file
from vap_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer
from vap_jax.models.common import TRAINABLE
from vap_jax.models import stack, wan
from vap_jax.nn.layers import Buffer
from vap_jax.weights.loading import abstract_model, count_params


def test_cogvideox_5b_vap_parameter_counts():
  config = CogVideoXConfig(**config_file('cogvideox_5b_vap.py').model)
  model = abstract_model(lambda: CogVideoXTransformer(config, rngs=nnx.Rngs(0)))
  total = count_params(model)
  expert = count_params(model, TRAINABLE)
  assert expert == 5_434_921_216
  assert total - expert == 5_570_479_680
  buffers = [v for _, v in nnx.to_flat_state(nnx.state(model, Buffer))]
  assert [tuple(b.shape) for b in buffers] == [(1, 226 + 17550, 3072)] * 2
  assert model.blocks.attn1.to_q.kernel.shape == (42, 3072, 3072)
  assert model.expert.blocks.attn1.to_q.kernel.shape == (41, 3072, 3072)
  assert model.layers(41)[1] is None and model.layers(40)[1] is not None
  assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct)
             for _, v in nnx.to_flat_state(nnx.state(model)))


def test_abstract_build_matches_nnx_eval_shape():
  """The fast abstract build gives exactly nnx.eval_shape's shapes/dtypes/metadata (2 layers)."""
  config = dataclasses.replace(CogVideoXConfig(**config_file('cogvideox_5b_vap.py').model),
                               num_layers=2, block_idx_with_mot_ref=(0,))
  factory = lambda: CogVideoXTransformer(config, rngs=nnx.Rngs(0))
  fast = nnx.to_flat_state(nnx.state(abstract_model(factory)))
  slow = nnx.to_flat_state(nnx.state(nnx.eval_shape(factory)))
  assert [p for p, _ in fast] == [p for p, _ in slow]
  for (path, a), (_, b) in zip(fast, slow):
    assert (a.shape, a.dtype, type(a)) == (b.shape, b.dtype, type(b)), path
    assert a.get_metadata()['logical_axes'] == b.get_metadata()['logical_axes'], path


def test_wan_i2v_14b_vap_parameter_counts():
  config = wan.WanConfig(**config_file('wan_i2v_14b_vap.py').model)
  model = abstract_model(lambda: wan.WanTransformer(config, rngs=nnx.Rngs(0)))
  expert = count_params(model, TRAINABLE)
  assert expert == 4_279_386_880
  assert count_params(model) - expert == 16_394_878_784
  assert [i for i in range(40) if model.layers(i)[1] is not None] == list(range(0, 40, 4))
  assert model.runs == (stack.Run(0, 0, 10, 3),)  # 10 groups of [base+expert, 3 base blocks]
  d20 = wan.WanConfig(**config_file('wan_i2v_14b_vap.py:d20').model)
  assert count_params(abstract_model(lambda: wan.WanTransformer(d20, rngs=nnx.Rngs(0))),
                      TRAINABLE) == 8_317_771_520


def test_every_variable_has_logical_axes_and_real_sizes_shard():
  """Both real-size transformers: every variable names one logical axis (or None) per dimension,
  and the default rules place them evenly on an fsdp=2 x tensor=4 mesh."""
  from vap_jax.parallel import DEFAULT_RULES, make_mesh, param_shardings
  mesh = make_mesh(dict(fsdp=2, tensor=4))
  for build in (lambda: CogVideoXTransformer(CogVideoXConfig(**config_file('cogvideox_5b_vap.py').model),
                                             rngs=nnx.Rngs(0)),
                lambda: wan.WanTransformer(wan.WanConfig(**config_file('wan_i2v_14b_vap.py').model),
                                           rngs=nnx.Rngs(0))):
    state = nnx.state(abstract_model(build))
    for path, var in nnx.to_flat_state(state):
      axes = var.get_metadata().get('logical_axes')
      assert axes is not None and len(axes) == len(var.shape), path
    param_shardings(state, mesh, DEFAULT_RULES)  # raises if any dimension does not divide
