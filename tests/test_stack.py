"""Stacked, scanned layers: run plans for the real placements, scan == loop for irregular ones,
and gradients w.r.t. the expert through scan and every remat policy equal the plain ones."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_close, config_file
from vap_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer
from vap_jax.models.common import TRAINABLE
from vap_jax.models.stack import REMAT_POLICIES, Run, plan_runs
from vap_jax.models.wan import WanConfig, WanTransformer
from vap_jax.nn.layers import Buffer


@pytest.mark.parametrize('layers,experts,runs', [
    (40, range(0, 40, 4), [Run(0, 0, 10, 3)]),                        # Wan d10 (released)
    (40, range(0, 40, 2), [Run(0, 0, 20, 1)]),                        # Wan d20
    (42, range(41), [Run(0, 0, 41, 0), Run(41, None, 1)]),            # CogVideoX (released)
    (42, (0, 40), [Run(0, 0, 1, 39), Run(40, 1, 1, 1)]),              # ablation
    (4, (1, 3), [Run(0, None, 1), Run(1, 0, 1, 1), Run(3, 1, 1, 0)]),  # tests' irregular one
    (6, (), [Run(0, None, 6)]),                                       # base model
])
def test_runs_cover_every_layer_in_order(layers, experts, runs):
  planned = plan_runs(layers, tuple(experts))
  assert list(planned) == runs
  covered = [i for r in planned for i in range(r.base_start, r.base_start + r.base_layers)]
  assert covered == list(range(layers))
  slots = [r.expert_start + g for r in planned if r.expert_start is not None for g in range(r.count)]
  assert slots == list(range(len(tuple(experts))))


def _cog(experts=(1, 3), layers=4, **runtime):
  cfg = dict(config_file('cogvideox_tiny.py').model, num_layers=layers,
             block_idx_with_mot_ref=experts, **runtime)
  model = CogVideoXTransformer(CogVideoXConfig(**cfg), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  lat = lambda f: rng.standard_normal((2, f, 8, 8, 12)).astype(np.float32)
  txt = lambda n: rng.standard_normal((2, n, 16)).astype(np.float32)
  return model, (lat(3), np.array([17, 900]), txt(8)), dict(ref_latents=lat(6), ref_text=txt(16))


def _wan(experts=(0, 3), layers=5, **runtime):
  cfg = dict(config_file('wan_tiny.py').model, num_layers=layers, block_idx_with_mot_ref=experts,
             **runtime)
  model = WanTransformer(WanConfig(**cfg), rngs=nnx.Rngs(0))
  c = model.config
  rng = np.random.default_rng(0)
  lat = lambda f: rng.standard_normal((2, c.in_channels, f, 8, 8)).astype(np.float32)
  seq = lambda n, d: rng.standard_normal((2, n, d)).astype(np.float32)
  return model, (lat(3), np.array([17, 900]), seq(6, c.text_dim)), dict(
      image=seq(5, c.image_dim), ref_latents=lat(6), ref_text=seq(12, c.text_dim),
      ref_image=seq(10, c.image_dim))


def _perturbed(model):
  """Zero biases and unit norms make layers alike: perturb every parameter so each matters."""
  state = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
  nnx.update(model, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), state))
  return model


def _with(model, **runtime):
  """The same weights under other runtime settings (scan_layers, remat)."""
  config = dataclasses.replace(model.config, **runtime)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: type(model)(config, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


@pytest.mark.parametrize('build', [_cog, _wan], ids=['cogvideox', 'wan'])
def test_scan_equals_loop_for_an_irregular_placement(build):
  model, args, refs = build()
  model = _perturbed(model)
  run = nnx.jit(lambda m, *a, **k: m(*a, **k))
  scanned = run(model, *args, **refs)
  looped = run(_with(model, scan_layers=False), *args, **refs)
  assert_close(scanned, looped, atol=1e-6, rtol=1e-6, what='scan vs loop')
  # and without references: the expert runs become base-only runs
  base = {k: v for k, v in refs.items() if not k.startswith('ref_')}  # Wan's CLIP tokens
  assert_close(run(model, *args, **base), run(_with(model, scan_layers=False), *args, **base),
               atol=1e-6, rtol=1e-6, what='base model, scan vs loop')


def _expert_grads(model, args, refs):
  graphdef, trainable, rest = nnx.split(model, TRAINABLE, ...)

  def loss(trainable):
    out = nnx.merge(graphdef, trainable, rest)(*args, **refs)
    return jnp.mean(out.astype(jnp.float32) ** 2)
  return jax.jit(jax.grad(loss))(trainable)


@pytest.mark.parametrize('build,policies', [
    (functools.partial(_cog, experts=(1,), layers=3), REMAT_POLICIES),
    # The remat machinery is shared (models/stack.py): the other backbone checks its own tags,
    # and offloading, whose groups with base-only blocks run unrolled.
    (functools.partial(_wan, experts=(0, 2), layers=3), ('save_attention', 'offload_hidden')),
], ids=['cogvideox', 'wan'])
def test_expert_gradients_through_scan_and_every_remat_policy(build, policies):
  """The float32 gradient of a scalar loss w.r.t. every expert parameter is the same whether the
  blocks are scanned or looped, under any remat policy (3 layers: a base-only head or a tail and
  groups of two gaps)."""
  model, args, refs = build()
  model = _perturbed(model)
  expected = _expert_grads(_with(model, scan_layers=False, remat='none'), args, refs)
  flat_expected = dict(nnx.to_flat_state(expected))
  assert all(path[0] == 'expert' for path in flat_expected)
  for remat in policies:
    got = dict(nnx.to_flat_state(_expert_grads(_with(model, remat=remat), args, refs)))
    assert got.keys() == flat_expected.keys()
    for path, g in got.items():
      want = np.asarray(flat_expected[path][...])
      err = np.abs(np.asarray(g[...]) - want).max() / max(np.abs(want).max(), 1e-12)
      assert err <= 1e-5, f'{remat}: {".".join(map(str, path))} rel err {err:.2e}'


def test_trainable_is_the_expert_params_not_its_buffers():
  model, _, _ = _cog(experts=(0, 1), layers=3)
  trainable = nnx.to_flat_state(nnx.state(model, TRAINABLE))
  assert trainable and all(path[0] == 'expert' and isinstance(v, nnx.Param)
                           for path, v in trainable)
  # The expert's learned position table is a checkpoint buffer: frozen.
  assert isinstance(model.expert.patch_embed.pos_embedding, Buffer)
  assert not any('pos_embedding' in path for path, _ in trainable)


def test_unknown_remat_policy_is_refused():
  with pytest.raises(ValueError, match="remat 'some' is not one of"):
    _cog(remat='some')


@pytest.mark.parametrize('build', [_cog, _wan], ids=['cogvideox', 'wan'])
def test_a_dropped_reference_is_as_if_absent(build):
  """Reference dropout: with 2 references and ``ref_mask`` [False, True], the prediction equals
  the model given only the second one (kept references sit last, next to the target in time)."""
  model, args, kw = build()
  model = _perturbed(model)
  frames_axis = 2 if build is _wan else 1  # Wan latents are (B, C, F, H, W)
  second = {k: np.split(v, 2, axis=frames_axis if k == 'ref_latents' else 1)[1]
            for k, v in kw.items() if k.startswith('ref_')}
  others = {k: v for k, v in kw.items() if not k.startswith('ref_')}
  masked = model(*args, **kw, ref_mask=np.array([[False, True]] * 2))
  assert_close(masked, model(*args, **others, **second), atol=1e-5, rtol=1e-5, what='masked')
  assert np.abs(np.asarray(masked) - np.asarray(model(*args, **kw))).max() > 1e-4
