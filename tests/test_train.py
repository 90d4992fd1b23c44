"""vap-train end to end on CPU (precomputed fixture data, the tiny golden CogVideoX-VAP), the
train step on 8-device meshes equal to one device, gradient accumulation, clear config errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import DATA, assert_close, config_file
from vap_jax.cli.train import main as vap_train
from vap_jax.parallel import DEFAULT_RULES, FSDP_CONTEXT_RULES
from vap_jax.train import objectives
from vap_jax.train.trainer import Trainer

COMPONENTS = DATA / 'cogvideox_pipeline' / 'components'


@pytest.fixture(scope='module')
def latents(cog_latents):
  return cog_latents


def _config(latents, **changes):
  config = config_file('train_cogvideox.py:tiny')
  config.model.checkpoint = str(COMPONENTS)
  config.data.latents = str(latents)
  for key, value in changes.items():
    node, *path = key.split('__')
    target = config[node] if path else config
    target[path[0] if path else node] = value
  return config


def test_vap_train_runs_and_logs(latents, tmp_path, capsys):
  work = tmp_path / 'run'
  assert vap_train(['--config', 'configs/train_cogvideox.py:tiny', '--workdir', str(work),
                    '--set', f'model.checkpoint="{COMPONENTS}"', '--set',
                    f'data.latents="{latents}"', '--steps', '4', '--no-progress']) == 0
  out = capsys.readouterr().out
  assert out.startswith('trained 4 steps; loss ')
  rows = [json.loads(line) for line in (work / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  for r in rows:
    for key in ('loss', 'grad_norm', 'learning_rate', 'step_seconds', 'data_wait_seconds',
                'samples_per_second', 'tflops_per_device'):
      assert np.isfinite(r[key]), key
  assert rows[0]['learning_rate'] == 0.0 and rows[1]['learning_rate'] > 0  # official warmup
  assert list((work / 'tensorboard').glob('events.out.tfevents.*'))


def test_training_changes_only_the_expert(latents, tmp_path):
  trainer = Trainer(_config(latents), tmp_path)
  before = jax.tree.map(np.asarray, (trainer.state.params, trainer.frozen))
  trainer.run(3, progress=False)
  params, frozen = trainer.state.params, trainer.frozen
  for (path, a), (_, b) in zip(nnx.to_flat_state(before[1]), nnx.to_flat_state(frozen)):
    np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))  # base: bit-identical
  changed = [not np.array_equal(a[...], b[...]) for (_, a), (_, b) in
             zip(nnx.to_flat_state(before[0]), nnx.to_flat_state(params))]
  assert all(path[0] == 'expert' for path, _ in nnx.to_flat_state(params)) and sum(changed) > 10


def _random_batch(trainer, batch):
  """A loader-shaped batch of ``batch`` samples (shapes from the real data)."""
  one = next(trainer.loader)
  rng = np.random.default_rng(0)
  out = {k: rng.standard_normal((batch,) + v.shape[1:]).astype(np.float32)
         for k, v in one.items() if k not in ('ref_mask', 'index')}
  return dict(out, ref_mask=np.ones((batch,) + one['ref_mask'].shape[1:], bool),
              index=np.arange(batch))


@pytest.fixture(scope='module')
def one_device_step(latents, tmp_path_factory):
  """A batch of 8, its draws, and one step of it on one device: (batch, draws, state, metrics)."""
  one = Trainer(_config(latents, mesh=dict(data=1)), tmp_path_factory.mktemp('one'),
                devices=jax.devices()[:1])
  batch = _random_batch(one, 8)
  draws = objectives.draws(jax.random.key(3), batch, 'cogvideox')
  return (batch, draws) + one.step(one.state, one.frozen, one.put(batch), draws)


@pytest.mark.parametrize('mesh_shape,rules', [
    (dict(fsdp=8), DEFAULT_RULES),
    (dict(fsdp=4, tensor=2), DEFAULT_RULES),
    (dict(data=2, fsdp=4), DEFAULT_RULES),
    (dict(fsdp=4, context=2), FSDP_CONTEXT_RULES),
])
def test_a_step_on_a_mesh_equals_one_device(latents, one_device_step, tmp_path, mesh_shape,
                                            rules):
  """Loss, gradient norm and every updated expert parameter of one step (same draws) on 8
  devices equal the one-device step."""
  batch, draws, state, metrics = one_device_step
  many = Trainer(_config(latents, mesh=mesh_shape, rules=rules), tmp_path / 'many')
  assert many.mesh.size == 8
  state8, metrics8 = many.step(many.state, many.frozen, many.put(batch), draws)
  for key in ('loss', 'grad_norm'):
    assert_close(metrics8[key], metrics[key], atol=0, rtol=1e-5, what=key)
  for (path, a), (_, b) in zip(nnx.to_flat_state(state8.params), nnx.to_flat_state(state.params)):
    assert_close(a[...], b[...], atol=1e-6, rtol=1e-5, what='.'.join(map(str, path)))


def test_gradient_accumulation_equals_one_big_batch(latents, tmp_path):
  big = Trainer(_config(latents, mesh=dict(data=1)), tmp_path / 'big', devices=jax.devices()[:1])
  batch = _random_batch(big, 4)
  draws = objectives.draws(jax.random.key(5), batch, 'cogvideox')
  state, metrics = big.step(big.state, big.frozen, big.put(batch), draws)
  acc = Trainer(_config(latents, mesh=dict(data=1), accumulation=2), tmp_path / 'acc',
                devices=jax.devices()[:1])
  state2, metrics2 = acc.step(acc.state, acc.frozen, acc.put(batch), draws)
  assert_close(metrics2['loss'], metrics['loss'], atol=0, rtol=1e-5, what='loss')
  for (path, a), (_, b) in zip(nnx.to_flat_state(state2.params), nnx.to_flat_state(state.params)):
    assert_close(a[...], b[...], atol=1e-6, rtol=1e-5, what='.'.join(map(str, path)))


@pytest.mark.parametrize('override,message', [
    ('optimizer.learnin_rate=1', "--set optimizer.learnin_rate: the config has no 'learnin_rate'"),
    ('steps', "--set 'steps': expected KEY=VALUE"),
    ('data.latents="/nonexistent"', '/nonexistent/precompute.json not found'),
])
def test_bad_settings_are_one_line(latents, tmp_path, capsys, override, message):
  assert vap_train(['--config', 'configs/train_cogvideox.py:tiny', '--workdir', str(tmp_path),
                    '--set', f'model.checkpoint="{COMPONENTS}"', '--set',
                    f'data.latents="{latents}"', '--set', override, '--no-progress']) == 2
  err = capsys.readouterr().err
  assert message in err and err.count('\n') == 1


def test_reference_dropout_keeps_at_least_one_reference_last(latents):
  """mask_ref_ratio at train time: dropped references are marked False and moved first; with
  ratio 1 exactly one is kept (the official 'at least one'), and it is the last."""
  from vap_jax.data.latent_source import make_latent_loader
  loader = make_latent_loader(latents, batch_size=4, keys='train', reference_dropout=1.0,
                              shard=(0, 1))
  mask = next(loader)['ref_mask']
  assert mask.shape == (4, 2) and (mask.sum(1) == 1).all() and mask[:, -1].all()


@pytest.mark.parametrize('family', ['cogvideox', 'wan'])
def test_noise_window_draws_timesteps_inside_it(family):
  """``noise_window`` (low, high) maps the draw into that part of the timestep table: (0, 0.25)
  keeps the noisiest quarter (t >= 750); the whole table is the official draw itself."""
  u = jnp.linspace(0.0, 0.9999, 64, dtype=jnp.float32)
  table = (objectives.cogvideox_sigma_table() if family == 'cogvideox'
           else objectives.wan_sigma_table())
  noisy = objectives.Objective(family, {}, noise_window=(0.0, 0.25))
  t = objectives.timesteps_of(jnp.asarray(table)[objectives._index(noisy._windowed(u))])
  assert int(t.min()) >= 749 and int(t.max()) >= 995
  whole = objectives.Objective(family, {})
  assert whole._windowed(u) is u
  with pytest.raises(ValueError, match='noise_window'):
    from vap_jax.train.trainer import objective_for
    objective_for(family, DATA / 'missing', noise_window=(0.5, 0.5))


def test_base_task_trains_a_whole_base_model_that_a_vap_run_starts_from(latents, tmp_path):
  """task 'base' (the stage before VAP): every parameter of a transformer without an expert
  trains on the same latents, the references unread; written as a converted transformer it is
  the frozen base of a 'vap' run, whose expert starts as a copy of its blocks."""
  from vap_jax.train.model import write_trained
  from vap_jax.weights.cogvideox import load_cogvideox
  base = dict(task='base', model__checkpoint='', model__block_idx_with_mot_ref=(),
              model__config='configs/cogvideox_tiny.py:base')
  trainer = Trainer(_config(latents, **base), tmp_path / 'base')
  assert not trainer.objective.references
  trained = {path for path, _ in nnx.to_flat_state(trainer.state.params)}
  assert trained == {path for path, _ in nnx.to_flat_state(nnx.state(trainer.model(), nnx.Param))}
  before = jax.tree.map(np.asarray, trainer.state.params)
  summary = trainer.run(2, progress=False)
  assert np.isfinite(summary['losses']).all()
  changed = [not np.array_equal(a[...], b[...]) for (_, a), (_, b) in
             zip(nnx.to_flat_state(before), nnx.to_flat_state(trainer.state.params))]
  assert sum(changed) > 0.9 * len(changed)
  written = write_trained(tmp_path / 'base', tmp_path / 'transformer')
  assert written['component'] == 'transformer' and written['task'] == 'base'
  loaded = load_cogvideox(tmp_path / 'transformer', dtype='float32', param_dtype='float32')
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(loaded, nnx.Param)),
                               nnx.to_flat_state(trainer.state.params)):
    np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))
  vap = Trainer(_config(latents, model__checkpoint=str(tmp_path / 'transformer')), tmp_path / 'v')
  expert = vap.model().expert.blocks
  np.testing.assert_array_equal(expert.attn1.to_q.kernel[...][1],
                                loaded.blocks.attn1.to_q.kernel[...][1])
  # The other init: the same copy, the references' values zero (no content read at step 0).
  zeroed = Trainer(_config(latents, model__checkpoint=str(tmp_path / 'transformer'),
                           model__expert_init='copy_zero_values'), tmp_path / 'z').model()
  assert not np.any(zeroed.expert.blocks.attn1.to_v.kernel[...])
  assert not np.any(zeroed.expert.blocks.attn1.to_v.bias[...])
  np.testing.assert_array_equal(zeroed.expert.blocks.attn1.to_k.kernel[...],
                                expert.attn1.to_k.kernel[...])
  np.testing.assert_array_equal(zeroed.expert.blocks.ff.proj_in.kernel[...],
                                expert.ff.proj_in.kernel[...])
  with pytest.raises(ValueError, match="task 'base' trains a transformer without an expert"):
    Trainer(_config(latents, task='base'), tmp_path / 'refused')
