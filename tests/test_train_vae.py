"""VAE training (task 'vae', configs/train_vae.py): the objective against a hand computation,
the loss falling on a fixed batch, exact resume, the trained VAE written as a folder the loaders
read, checkpoints of the other task refused by name, the analytic FLOP count.

One run (the tiny golden pipeline's VAE, fixture VAP-Data clips of 9x32x32, one device) is
shared: every Trainer compiles its own step (~20 s on 2 cores), so the tests build only two."""
import dataclasses
import json
import shutil

import jax
import jax.extend
import numpy as np
import pytest
from flax import nnx

from conftest import DATA, assert_close, config_file
from vap_jax.cli.train import apply_overrides
from vap_jax.train.checkpoint import Checkpointer, CheckpointError
from vap_jax.train.trainer import Trainer
from vap_jax.train.vae_objective import VAEDraws

COMPONENTS = DATA / 'cogvideox_pipeline' / 'components'  # its vae/ is what trains


def _config(root, *extra):
  config = config_file('train_vae.py:toy_clips')
  apply_overrides(config, ['log.every=1', 'checkpoint.keep=2',
      f'model.checkpoint="{COMPONENTS}"', f'data.root="{root}"', 'data.buckets=[[9, 32, 32]]',
      'data.batch_size=2', 'data.max_failure_fraction=0.5', 'data.min_samples_before_cap=10',
      'optimizer.learning_rate=1e-2', 'schedule.warmup_steps=0', 'checkpoint.every=2',
      'checkpoint.async_save=false', 'log.tensorboard=false', *extra])
  return config


def _flat(params) -> dict:
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(params)}


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """4 steps, checkpoints at 2 and 4; the trainer (for more steps) and what step 4 saved."""
  from fixtures_vap_data import make_vap_data
  root = tmp_path_factory.mktemp('vae')
  make_vap_data(root / 'data')
  trainer = Trainer(_config(root / 'data'), root / 'run', devices=jax.devices()[:1])
  initial = jax.tree.map(np.array, trainer.state)
  summary = trainer.run(4, progress=False)
  return dict(trainer=trainer, root=root, work=root / 'run', summary=summary, initial=initial,
              params=_flat(trainer.state.params))


def test_a_run_logs_recon_and_kl(run):
  rows = [json.loads(line) for line in (run['work'] / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  for r in rows:
    for key in ('loss', 'recon', 'kl', 'grad_norm', 'tflops_per_device'):
      assert np.isfinite(r[key]) and r[key] > 0, key
    assert_close(r['loss'], r['recon'] + 1e-6 * r['kl'], atol=0, rtol=1e-6, what='loss')
  assert sorted(p.name for p in (run['work'] / 'checkpoints').iterdir()) == ['2', '4']
  trained = {path[0] for path in run['params']}
  assert trained == {'encoder', 'decoder'} and len(run['params']) > 100  # every parameter


def test_the_objective_equals_a_hand_computation(run):
  """Loss, recon and kl with injected eps equal numpy on the encoder's posterior and the model's
  decode of z: L1 per pixel value + kl_weight x KL summed over the latents per pixel value."""
  trainer = run['trainer']
  batch = jax.tree.map(np.asarray, next(trainer.loader))
  params = jax.tree.map(np.array, trainer.state.params)
  vae = lambda p: nnx.merge(trainer.graphdef, p, trainer.frozen)
  eps = np.random.default_rng(1).standard_normal((2, 4, 3, 4, 4)).astype(np.float32)
  objective = dataclasses.replace(trainer.objective, kl_weight=0.5)  # the KL term shows
  loss, per_sample, aux = jax.jit(lambda p, b, d: objective(vae(p), b, d))(params, batch,
                                                                            VAEDraws(eps))
  x = np.moveaxis(batch['video'], -1, 1).astype(np.float64)
  posterior = aux['posterior']  # the model's encode, as the objective called it
  mean, logvar = np.asarray(posterior.mean, np.float64), np.asarray(posterior.logvar, np.float64)
  z = mean + np.exp(0.5 * logvar) * eps
  out = np.asarray(jax.jit(lambda p, z: vae(p).decode(z))(params, z.astype(np.float32)),
                   np.float64)
  pixels = 3 * 9 * 32 * 32
  recon = np.abs(out - x).reshape(2, -1).sum(1) / pixels
  kl = (0.5 * (mean ** 2 + np.exp(logvar) - 1 - logvar)).reshape(2, -1).sum(1) / pixels
  assert_close(aux['metrics']['recon'], recon.mean(), atol=0, rtol=1e-5, what='recon')
  assert_close(aux['metrics']['kl'], kl.mean(), atol=0, rtol=1e-5, what='kl')
  assert_close(per_sample, recon + 0.5 * kl, atol=0, rtol=1e-5, what='per-sample loss')
  assert_close(loss, (recon + 0.5 * kl).mean(), atol=0, rtol=1e-5, what='loss')


def test_the_loss_falls_on_a_fixed_batch(run):
  """20 steps from the initial weights on one batch: the last losses are well below the first.
  At lr 1e-2: at 1e-3 this tiny VAE sits on its mean-colour plateau (L1 0.44 -> 0.385, reached in
  two steps) for 30+ steps before it learns more."""
  trainer = run['trainer']
  batch = trainer.put(next(trainer.loader))
  trainer.state = jax.device_put(run['initial'], jax.tree.map(lambda a: a.sharding,
                                                              trainer.state))
  losses = []
  for _ in range(20):
    trainer.state, metrics = trainer.step(trainer.state, trainer.frozen, batch)
    losses.append(float(metrics['loss']))
  assert np.mean(losses[-3:]) < 0.8 * losses[0], losses  # seen: 0.57-0.71


def test_resume_after_a_stop_is_the_same_run(run, tmp_path):
  """The run stopped after its step-2 checkpoint and started again: steps 3-4 and the saved
  state equal the uninterrupted run's, bit for bit."""
  work = tmp_path / 'stopped'
  shutil.copytree(run['work'], work)
  shutil.rmtree(work / 'checkpoints' / '4')
  again = Trainer(_config(run['root'] / 'data'), work, devices=jax.devices()[:1])
  assert again.resumed_from == 2
  again.run(4, progress=False)
  rows = [json.loads(line) for line in (work / 'metrics.jsonl').read_text().splitlines()]
  straight, resumed = rows[2:4], rows[4:]
  assert [r['step'] for r in resumed] == [3, 4]
  for a, b in zip(straight, resumed):
    for key in ('loss', 'recon', 'kl', 'grad_norm', 'data_first_index', 'data_index_sum'):
      assert a[key] == b[key], (a['step'], key, a[key], b[key])
  for path, value in _flat(again.state.params).items():
    np.testing.assert_array_equal(value, run['params'][path], err_msg=str(path))


def test_the_trained_vae_is_written_as_a_folder_the_loaders_read(run, tmp_path, capsys):
  from vap_jax.cli.export import main as vap_export
  from vap_jax.weights.checkpoint import verify
  from vap_jax.weights.vae import load_cogvideox_vae
  out = tmp_path / 'vae'
  assert vap_export(['--run', str(run['work']), '--dst', str(out)]) == 0
  assert 'wrote the cogvideox vae trained by' in capsys.readouterr().out
  assert json.loads((out / 'config.json').read_text())['model'] == 'cogvideox_vae'
  verify(out)  # checksums recorded as vap-convert records them
  loaded = _flat(nnx.state(load_cogvideox_vae(out)))
  assert sorted(loaded) == sorted(run['params'])
  for path, value in run['params'].items():
    np.testing.assert_array_equal(loaded[path], value, err_msg=str(path))
  assert vap_export(['--run', str(run['work']), '--dst', str(tmp_path / 'x'),
                     '--components-from', str(COMPONENTS)]) == 2
  assert 'trained a VAE: --components-from' in capsys.readouterr().err


def test_a_checkpoint_of_the_other_task_is_refused_by_name(run, tmp_path):
  vap = config_file('train_cogvideox.py:tiny')
  checkpointer = Checkpointer(run['work'], vap, every=2, keep=2)
  with pytest.raises(CheckpointError, match=r"is of a run that trains a VAE \(task='vae'\), "
                                            r"this run trains the VAP expert \(task='vap'\)"):
    checkpointer.restore(None, None, None)  # what a VAP Trainer's restore runs first
  checkpointer.close()
  work = tmp_path / 'vap'
  shutil.copytree(run['work'], work)
  saved = work / 'checkpoints' / '4' / 'config' / 'metadata'
  old = {k: v for k, v in vap.to_dict().items() if k != 'task'}  # a run from before tasks
  saved.write_text(json.dumps(json.loads(json.dumps(old, default=list))))
  with pytest.raises(CheckpointError, match=r"trains the VAP expert \(task='vap'\), this run "
                                            r"trains a VAE \(task='vae'\)"):
    Trainer(_config(run['root'] / 'data'), work, devices=jax.devices()[:1])


def test_a_random_init_starts_from_the_given_log_variance():
  """vae.init_logvar: the encoder's log-variance outputs start there, its means as initialised."""
  from vap_jax.parallel import DEFAULT_RULES
  from vap_jax.train.model import build_vae
  config = config_file('train_vae.py:toy_frames')
  plain = build_vae(config.model, mesh=None, rules=DEFAULT_RULES, seed=3)
  vae = build_vae(config.model, mesh=None, rules=DEFAULT_RULES, seed=3, init_logvar=-8.0)
  c = vae.config.latent_channels
  bias, before = vae.encoder.conv_out.bias[...], plain.encoder.conv_out.bias[...]
  np.testing.assert_array_equal(bias[c:], np.full(c, -8.0, np.float32))
  np.testing.assert_array_equal(bias[:c], before[:c])
  assert config.vae.init_logvar == -8.0 and config.data.buckets == [[1, 64, 64]]


def _traced_flops(fn, *args) -> int:
  """2 x multiply-adds of every convolution and dot product in the traced program (a scan's
  body once per iteration)."""
  def count(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      out = int(np.prod(eqn.outvars[0].aval.shape)) if eqn.outvars else 0
      if name == 'conv_general_dilated':
        rhs, spec = eqn.invars[1].aval.shape, eqn.params['dimension_numbers'].rhs_spec
        taps = int(np.prod([rhs[i] for i in spec[2:]]))
        total += 2 * out * taps * rhs[spec[1]]
      elif name == 'dot_general':
        (contract, _), _ = eqn.params['dimension_numbers']
        total += 2 * out * int(np.prod([eqn.invars[0].aval.shape[i] for i in contract]))
      repeats = eqn.params['length'] if name == 'scan' else 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        total += repeats * count(sub)
    return total
  return count(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize('frames', [9, 17])  # 17: diffusers' frame batches (9 + 8; 3 + 2)
def test_the_vae_flop_count_equals_the_traced_program(frames):
  from vap_jax.models.flops import cogvideox_vae_flops
  from vap_jax.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig
  from vap_jax.weights.loading import abstract_model
  config = CogVideoXVAEConfig(block_out_channels=(8, 16, 16, 24), latent_channels=4,
                              layers_per_block=2, norm_num_groups=4)
  graphdef, state = nnx.split(abstract_model(lambda: AutoencoderKLCogVideoX(config,
                                                                            rngs=nnx.Rngs(0))))
  video = jax.ShapeDtypeStruct((2, 3, frames, 16, 24), 'float32')
  traced = _traced_flops(lambda s, v: nnx.merge(graphdef, s).decode(
      nnx.merge(graphdef, s).encode(v).mean), state, video)
  counted = cogvideox_vae_flops(config, batch=2, frames=frames, height=16, width=24)
  assert counted['total'] == counted['expert'] == traced
