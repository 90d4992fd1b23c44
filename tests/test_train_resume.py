"""Training that survives: exact resume after kill -9 and after SIGTERM (2 Grain workers), a
crash mid-save, restoring onto another mesh or device count, several processes, clear errors.

The runs are the real command in subprocesses (tiny CogVideoX-VAP, precomputed fixture data)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import DATA, assert_close, config_file, xla_flags
from vap_jax.train.checkpoint import CheckpointError
from vap_jax.train.trainer import EXIT_PREEMPTED, Trainer

COMPONENTS = DATA / 'cogvideox_pipeline' / 'components'
ROOT = DATA.parent.parent


def _command(latents, workdir, *extra):
  return [sys.executable, '-m', 'vap_jax.cli.train', '--config',
          str(ROOT / 'configs' / 'train_cogvideox.py:tiny'), '--workdir', str(workdir),
          '--set', f'model.checkpoint="{COMPONENTS}"', '--set', f'data.latents="{latents}"',
          '--set', 'checkpoint.every=2', '--set', 'data.workers=2', '--no-progress', *extra]


def _env(devices=8):
  return {**os.environ, 'JAX_PLATFORMS': 'cpu',
          'XLA_FLAGS': xla_flags(devices)}


def _run(latents, workdir, steps, *extra):
  result = subprocess.run(_command(latents, workdir, '--steps', str(steps), *extra),
                          env=_env(), capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _metrics(workdir) -> dict[int, dict]:
  """step -> its last logged row (steps redone after a kill are logged again)."""
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r for r in rows}


def _final_state(workdir, step):
  path = workdir / 'checkpoints' / str(step) / 'state'
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(path)


def _wait_for(path, timeout=300):
  start = time.time()
  while not path.exists():
    assert time.time() - start < timeout, f'{path} did not appear'
    time.sleep(0.2)


@pytest.fixture(scope='module')
def uninterrupted(cog_latents, tmp_path_factory):
  work = tmp_path_factory.mktemp('straight')
  _run(cog_latents, work, 6)
  return work


def _assert_same_run(a, b, final_step=6):
  ma, mb = _metrics(a), _metrics(b)
  assert sorted(ma) == sorted(mb) == list(range(1, final_step + 1))
  for step in ma:  # same batches, same draws: the same losses, bit for bit
    for key in ('loss', 'grad_norm', 'data_first_index', 'data_index_sum'):
      assert ma[step][key] == mb[step][key], (step, key, ma[step][key], mb[step][key])
  sa, sb = _final_state(a, final_step), _final_state(b, final_step)
  assert sa.keys() == sb.keys()
  for key in sa:
    np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


def test_kill_9_after_a_save_then_resume_is_the_same_run(cog_latents, uninterrupted, tmp_path):
  work = tmp_path / 'killed'
  process = subprocess.Popen(_command(cog_latents, work, '--steps', '6'), env=_env(), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for(work / 'checkpoints' / '2' / 'commit_success.txt')
  process.send_signal(signal.SIGKILL)
  process.wait()
  _run(cog_latents, work, 6)
  _assert_same_run(uninterrupted, work)


def test_sigterm_saves_at_the_next_step_and_exits_75(cog_latents, uninterrupted, tmp_path):
  work = tmp_path / 'preempted'
  process = subprocess.Popen(_command(cog_latents, work, '--steps', '6'), env=_env(), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for(work / 'metrics.jsonl')  # training has started
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=300)
  assert process.returncode == EXIT_PREEMPTED, err[-3000:]
  assert 'preempted' in out
  saved = ocp.CheckpointManager(work / 'checkpoints').latest_step()
  assert saved is not None and saved < 6
  _run(cog_latents, work, 6)
  _assert_same_run(uninterrupted, work)


def _config(latents, **changes):
  config = config_file('train_cogvideox.py:tiny')
  config.model.checkpoint = str(COMPONENTS)
  config.data.latents = str(latents)
  config.checkpoint.every = 2
  config.checkpoint.async_save = False
  for key, value in changes.items():
    node, leaf = key.split('__') if '__' in key else (None, key)
    (config[node] if node else config)[leaf] = value
  return config


@pytest.fixture(scope='module')
def two_steps(cog_latents, tmp_path_factory):
  """The workdir of a finished 2-step run (tests copy it)."""
  work = tmp_path_factory.mktemp('two_steps')
  Trainer(_config(cog_latents), work).run(2, progress=False)
  return work


def test_a_crash_during_a_save_leaves_the_previous_checkpoint(cog_latents, two_steps, tmp_path):
  """What a kill mid-save leaves -- a half-written temporary step folder -- is ignored (and
  cleaned up); the run resumes from the last finished one."""
  shutil.copytree(two_steps, tmp_path, dirs_exist_ok=True)
  partial = tmp_path / 'checkpoints' / '4.orbax-checkpoint-tmp-1234'
  shutil.copytree(tmp_path / 'checkpoints' / '2', partial)
  (partial / 'state' / 'manifest.ocdbt').write_bytes(b'\x00' * 10)
  again = Trainer(_config(cog_latents), tmp_path)
  assert again.resumed_from == 2 and int(again.state.step) == 2
  assert not partial.exists()


@pytest.fixture(scope='module')
def fsdp8_run(cog_latents, tmp_path_factory):
  """A run on fsdp=8: (the losses of 3 uninterrupted steps, a workdir stopped after step 2)."""
  config = _config(cog_latents, mesh=dict(data=1, fsdp=8))
  root = tmp_path_factory.mktemp('fsdp8')
  losses = Trainer(config, root / 'straight').run(3, progress=False)['losses']
  Trainer(config, root / 'stopped').run(2, progress=False)
  return losses, root / 'stopped'


@pytest.mark.parametrize('target', [dict(mesh=dict(data=2, fsdp=4)), dict(devices=4)],
                         ids=['data2-fsdp4', '4-devices'])
def test_restore_onto_another_mesh(cog_latents, fsdp8_run, tmp_path, target):
  """Saved on fsdp=8, resumed on data=2 x fsdp=4 or on 4 devices: the next step's loss equals the
  uninterrupted run's."""
  losses, stopped = fsdp8_run
  shutil.copytree(stopped, tmp_path / 'moved')
  devices = jax.devices()[:target.get('devices', 8)]
  mesh = target.get('mesh', dict(data=1, fsdp=len(devices)))
  moved = Trainer(_config(cog_latents, mesh=mesh), tmp_path / 'moved', devices=devices)
  assert moved.resumed_from == 2
  assert moved.state.params['expert']['blocks']['ff']['proj_in']['kernel'][...].sharding.mesh \
      .shape == moved.mesh.shape
  loss = moved.run(3, progress=False)['losses'][-1]
  assert_close(loss, losses[-1], atol=0, rtol=1e-6, what='loss after the move')


def test_a_checkpoint_of_another_run_is_refused_by_name(cog_latents, two_steps, tmp_path):
  shutil.copytree(two_steps, tmp_path, dirs_exist_ok=True)
  saved = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
  with pytest.raises(ValueError, match=r'blocks.attn1.to_k.kernel of shape \(3, 32, 32\) '
                                       r'cannot be sharded .* 32 is not divisible by 3'):
    Trainer(_config(cog_latents, mesh=dict(data=1, fsdp=3)), tmp_path, devices=jax.devices()[:3])
  with pytest.raises(CheckpointError, match=r'made with other settings: '
                                            r'data.caption_dropout: saved 0.02, now 0.1'):
    Trainer(_config(cog_latents, data__caption_dropout=0.1), tmp_path)
  with pytest.raises(CheckpointError, match='optimizer.learning_rate: saved 0.001, now 0.002'):
    Trainer(_config(cog_latents, optimizer__learning_rate=2e-3), tmp_path)
  with pytest.raises(CheckpointError,
                     match=r'noise_window: saved \[0.0, 1.0\], now \[0.5, 1.0\]'):
    Trainer(_config(cog_latents, noise_window=(0.5, 1.0)), tmp_path)
  metadata = tmp_path / 'checkpoints' / '2' / 'config' / 'metadata'
  config = json.loads(metadata.read_text())
  # A run from before the setting existed drew from the whole table: it resumes as that.
  metadata.write_text(json.dumps({k: v for k, v in config.items() if k != 'noise_window'}))
  assert Trainer(_config(cog_latents), tmp_path).resumed_from == 2
  metadata.write_text(json.dumps(dict(config, family='wan')))
  with pytest.raises(CheckpointError, match='is of a wan run, this run trains cogvideox'):
    Trainer(_config(cog_latents), tmp_path)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == saved


def test_a_damaged_checkpoint_is_one_clear_error(cog_latents, two_steps, tmp_path, capsys):
  shutil.copytree(two_steps, tmp_path, dirs_exist_ok=True)
  for f in (tmp_path / 'checkpoints' / '2' / 'state').rglob('*'):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(f.read_bytes()[:100])  # truncated array data
  before = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
  from vap_jax.cli.train import main
  assert main(['--config', str(ROOT / 'configs' / 'train_cogvideox.py:tiny'), '--workdir',
               str(tmp_path), '--set', f'model.checkpoint="{COMPONENTS}"', '--set',
               f'data.latents="{cog_latents}"', '--set', 'checkpoint.every=2',
               '--no-progress']) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: checkpoint {tmp_path / "checkpoints" / "2"}') and \
      err.count('\n') == 1
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == before  # untouched


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one_and_resume(cog_latents, uninterrupted, tmp_path):
  """Two jax.distributed processes on localhost, 4 CPU devices each, each reading its own half
  of every batch: the losses equal the one-process 8-device run's; stopped and resumed."""
  work = tmp_path / 'two'

  def run_pair(steps):
    port = _free_port()
    processes = [subprocess.Popen(
        _command(cog_latents, work, '--steps', str(steps), '--set', 'data.workers=0',
                 '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2',
                 '--process-id', str(i)), env=_env(4), cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in processes:
      _, err = p.communicate(timeout=600)
      assert p.returncode == 0, err[-3000:]

  run_pair(3)
  run_pair(5)  # resumes from step 3
  ours, single = _metrics(work), _metrics(uninterrupted)
  assert sorted(ours) == [1, 2, 3, 4, 5]
  for step in ours:
    assert_close(ours[step]['loss'], single[step]['loss'], atol=0, rtol=1e-5, what=f'step {step}')


def test_a_run_exports_to_the_pytorch_layout(cog_latents, two_steps, tmp_path, capsys):
  """vap-export --run: the trained expert from the checkpoint beside the base the run started
  from, as a diffusers pipeline folder; loading it back gives the trainer's model exactly."""
  from vap_jax.cli.export import main as vap_export
  from vap_jax.weights import keymap as km
  from vap_jax.weights.cogvideox import load_cogvideox
  shutil.copytree(two_steps, tmp_path / 'run')
  trainer = Trainer(_config(cog_latents), tmp_path / 'run')  # resumed at step 2
  trained = km.flat_variables(nnx.state(trainer.model()))
  assert vap_export(['--run', str(tmp_path / 'run'), '--components-from', str(COMPONENTS),
                     '--link', '--dst', str(tmp_path / 'out'), '--dtype', 'float32',
                     '--no-progress']) == 0
  assert 'exported the cogvideox VAP transformer' in capsys.readouterr().out
  config = json.loads((tmp_path / 'out' / 'transformer' / 'config.json').read_text())
  assert config['_class_name'] == 'CogVideoXTransformer3DMOTModel'
  assert config['block_idx_with_mot_ref'] == list(trainer.model_config.block_idx_with_mot_ref)
  exported = km.flat_variables(nnx.state(load_cogvideox(tmp_path / 'out', dtype='float32')))
  assert sorted(exported) == sorted(trained)
  experts = 0
  for path, variable in trained.items():
    np.testing.assert_array_equal(exported[path][...], variable[...], err_msg=str(path))
    experts += path[0] == 'expert'
  assert experts > 0

  assert vap_export(['--run', str(tmp_path / 'run'), '--step', '3', '--dst',
                     str(tmp_path / 'none')]) == 2
  assert 'has no checkpoint of step 3 (it has [' in capsys.readouterr().err
  assert vap_export(['--run', str(tmp_path), '--dst', str(tmp_path / 'none')]) == 2
  assert 'holds no finished checkpoint' in capsys.readouterr().err
