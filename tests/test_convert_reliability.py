"""Converted folders survive what happens to files on disk.

A ``vap-convert`` killed (SIGKILL) anywhere in its writing resumes when the same command runs
again: finished components are kept, and the result loads to exactly the parameters of an
uninterrupted conversion and generates the same video bytes. ``--overwrite`` works on a killed
folder too. The kills are real ``kill -9`` of a subprocess, at points chosen in its writer
(`kill_convert.py`), so every run stops at the same place on any machine.

A damaged converted file (flipped byte, garbage, cut short, missing) is reported in one line
naming the file: on load when its size changed or Orbax cannot read it, and always by
``vap-convert --verify`` / ``vap-generate --verify``, which check the recorded sha256.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from tiny_checkpoint import write_tiny_checkpoint
from vap_jax.cli.convert import main as vap_convert
from vap_jax.weights import checkpoint as ckpt
from vap_jax.weights.cogvideox import load_cogvideox
from vap_jax.weights.encoders import load_text_encoder
from vap_jax.weights.safetensors_io import CheckpointError
from vap_jax.weights.vae import load_cogvideox_vae

ARGS = ['--dtype', 'float32', '--no-progress']
LOADERS = {'transformer': load_cogvideox, 'vae': load_cogvideox_vae,
           'text_encoder': load_text_encoder}
KILLER = Path(__file__).parent / 'kill_convert.py'


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  root = tmp_path_factory.mktemp('resume')
  src = write_tiny_checkpoint(root / 'src', 'cogvideox')
  dst = root / 'uninterrupted'
  assert vap_convert(['--src', str(src), '--dst', str(dst), *ARGS]) == 0
  return src, dst, {name: _params(load(dst, dtype='float32')) for name, load in LOADERS.items()}


def _params(model) -> dict:
  return {tuple(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def _killed(point: str, arg: str, argv: list[str]) -> None:
  run = subprocess.run([sys.executable, str(KILLER), point, arg, '--', *argv],
                       capture_output=True, text=True,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(KILLER.parent)})
  assert run.returncode == -9, f'not killed at {point} {arg}: {run.returncode}\n{run.stderr}'


def _assert_same_as(dst: Path, expected: dict, src: Path) -> None:
  assert ckpt.check_components(dst) == 'cogvideox'
  for name, load in LOADERS.items():
    got = _params(load(dst, dtype='float32'))
    assert got.keys() == expected[name].keys(), name
    for key in got:
      np.testing.assert_array_equal(got[key], expected[name][key], err_msg=f'{name} {key}')
  for name in ('tokenizer', 'scheduler'):
    for f in (src / name).iterdir():
      assert (dst / name / f.name).read_bytes() == f.read_bytes()


@pytest.mark.parametrize('point,arg,kept', [
    ('save', 'vae:2', ['transformer']),              # inside the VAE's Orbax partial saves
    ('finalize', 'vae', ['transformer']),            # every group written, not finalized
    ('config', 'text_encoder', ['transformer', 'vae']),  # state finalized, no config.json yet
    ('manifest', '1', []),                           # the very first manifest, half written
    ('copy', 'tokenizer', ['transformer', 'vae', 'text_encoder']),  # copying the tokenizer
])
def test_killed_conversion_resumes(uninterrupted, tmp_path, caplog, point, arg, kept):
  src, _, expected = uninterrupted
  argv = ['--src', str(src), '--dst', str(tmp_path / 'dst'), *ARGS]
  _killed(point, arg, argv)
  with caplog.at_level('INFO', logger='vap_jax.weights.checkpoint'):
    assert vap_convert(argv) == 0
  for name in LOADERS:
    assert (f'{name}: already converted' in caplog.text) == (name in kept), name
  _assert_same_as(tmp_path / 'dst', expected, src)


def test_killed_conversion_can_be_overwritten(uninterrupted, tmp_path):
  src, _, expected = uninterrupted
  argv = ['--src', str(src), '--dst', str(tmp_path / 'dst'), *ARGS]
  _killed('save', 'vae:1', argv)
  assert vap_convert(argv + ['--overwrite']) == 0
  _assert_same_as(tmp_path / 'dst', expected, src)


def test_resumed_conversion_generates_the_same_video(uninterrupted, tmp_path):
  src, dst, _ = uninterrupted
  resumed = tmp_path / 'resumed'
  argv = ['--src', str(src), '--dst', str(resumed), *ARGS]
  _killed('save', 'transformer:2', argv)
  assert vap_convert(argv) == 0
  videos = []
  for ckpt_dir in (dst, resumed):
    assert _generate(ckpt_dir, tmp_path, out=f'{ckpt_dir.name}.mp4') == 0
    videos.append((tmp_path / f'{ckpt_dir.name}.mp4').read_bytes())
  assert videos[0] == videos[1]

def _damaged(dst: Path, tmp_path: Path, how: str) -> tuple[Path, Path]:
  """A copy of ``dst`` whose largest transformer data file is damaged ``how``."""
  copy = tmp_path / f'damaged_{how}'
  shutil.copytree(dst, copy)
  files = json.loads((copy / 'transformer' / 'config.json').read_text())['files']
  rel = max((k for k in files if '/d/' in k), key=lambda k: files[k]['bytes'])
  path = copy / 'transformer' / rel
  data = bytearray(path.read_bytes())
  if how == 'flip':
    data[len(data) // 2] ^= 1
  elif how == 'garbage':
    data = bytearray(np.random.default_rng(0).integers(0, 256, len(data), np.uint8).tobytes())
  elif how == 'cut':
    data = data[:len(data) // 2]
  if how == 'missing':
    path.unlink()
  else:
    path.write_bytes(bytes(data))
  return copy, path


def _generate(ckpt: Path, tmp_path: Path, *extra, out: str = 'o.mp4') -> int:
  from example_inputs import write_example
  from vap_jax.cli.generate import main as generate
  if not (tmp_path / 'image.png').exists():
    write_example(tmp_path)
  return generate(['--ckpt', str(ckpt), '--image', str(tmp_path / 'image.png'),
                   '--ref-video', str(tmp_path / 'ref.mp4'), '--ref-prompt', 'a cat',
                   '--prompt', 'a cat', '--frames', '9', '--height', '64', '--width', '96',
                   '--steps', '2', '--dtype', 'float32', '--out', str(tmp_path / out), *extra])


def _one_line(capsys) -> str:
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1, err
  return err


def test_verify_passes_on_an_intact_folder_and_refuses_one_without_checksums(
    uninterrupted, tmp_path, capsys):
  src, dst, _ = uninterrupted
  assert vap_convert(['--verify', str(dst)]) == 0
  out = capsys.readouterr().out
  assert out.startswith('verified ') and 'all match their checksums' in out
  manifest = json.loads((dst / 'manifest.json').read_text())
  assert sorted(manifest['files']) == sorted(
      f'{name}/{f.name}' for name in ('tokenizer', 'scheduler') for f in (src / name).iterdir())
  assert vap_convert(['--verify', str(src)]) == 2
  assert 'is not a converted folder' in _one_line(capsys)
  old = tmp_path / 'old'  # converted before checksums were recorded
  shutil.copytree(dst / 'vae', old)
  config = json.loads((old / 'config.json').read_text())
  del config['files']
  (old / 'config.json').write_text(json.dumps(config))
  assert vap_convert(['--verify', str(old)]) == 2
  assert 'has no recorded checksums' in _one_line(capsys)
  load_cogvideox_vae(old)  # and still loads


@pytest.mark.parametrize('how,message', [
    ('flip', 'is damaged: its sha256 differs'),
    ('garbage', 'is damaged: its sha256 differs'),
    ('cut', 'were written at conversion (damaged or cut short)'),
    ('missing', 'is missing (it was written at conversion)'),
])
def test_damaged_file_is_named_by_verify(uninterrupted, tmp_path, capsys, how, message):
  copy, path = _damaged(uninterrupted[1], tmp_path, how)
  assert vap_convert(['--verify', str(copy)]) == 2
  err = _one_line(capsys)
  assert str(path) in err and message in err
  assert _generate(copy, tmp_path, '--verify') == 2  # before any weights load
  assert _one_line(capsys) == err
  assert not (tmp_path / 'o.mp4').exists()


@pytest.mark.parametrize('how,message', [
    ('garbage', 'is damaged: its sha256 differs'),   # Orbax fails to read it
    ('cut', 'were written at conversion (damaged or cut short)'),  # caught by its size
    ('missing', 'is missing (it was written at conversion)'),
])
def test_damaged_file_is_one_line_on_load(uninterrupted, tmp_path, capsys, how, message):
  copy, path = _damaged(uninterrupted[1], tmp_path, how)
  assert _generate(copy, tmp_path) == 2
  err = _one_line(capsys)
  assert str(path) in err and message in err
  with pytest.raises(CheckpointError, match='convert it again'):
    load_cogvideox(copy / 'transformer')


def test_write_failure_is_one_line(uninterrupted, tmp_path, capsys, monkeypatch):
  """A read-only or full disk met while writing (the up-front check cannot foresee a folder made
  read-only, or space running out): one line naming the file and the cause, exit status 2."""
  src = uninterrupted[0]
  dst = tmp_path / 'dst'

  def refuse(folder, manifest):
    raise PermissionError(13, 'Permission denied', str(folder / 'manifest.json.tmp'))
  monkeypatch.setattr(ckpt, '_write_manifest', refuse)
  assert vap_convert(['--src', str(src), '--dst', str(dst), *ARGS]) == 2
  assert capsys.readouterr().err == f'error: {dst / "manifest.json.tmp"}: Permission denied\n'


def _edit_config(folder: Path, edit) -> None:
  config = json.loads((folder / 'config.json').read_text())
  edit(config.get('source_config', config))
  (folder / 'config.json').write_text(json.dumps(config))


@pytest.mark.parametrize('name,edit,message', [
    ('transformer', lambda c: c.update(num_attention_heads='two'),
     "field num_attention_heads is 'two', expected int"),
    ('transformer', lambda c: c.pop('num_layers'),
     'field num_layers is missing (expected int; it sets the size of the model)'),
    ('transformer', lambda c: c.update(block_idx_with_mot_ref=[0, 7]),
     'block_idx_with_mot_ref [7] outside the 3 layers'),
    ('text_encoder', lambda c: c.update(d_model=16.5), 'field d_model is 16.5, expected int'),
    ('vae', lambda c: c.update(block_out_channels=8),
     'field block_out_channels is 8, expected a list of int'),
])
def test_bad_config_is_one_line_naming_file_and_field(uninterrupted, tmp_path, capsys, name,
                                                      edit, message):
  """Before any tensor is read or written: vap-convert on a downloaded folder, vap-generate on a
  converted one."""
  src, dst, _ = uninterrupted
  for kind, folder in (('src', src), ('dst', dst)):
    bad = tmp_path / kind
    shutil.copytree(folder, bad)
    _edit_config(bad / name, edit)
    if kind == 'src':
      assert vap_convert(['--src', str(bad), '--dst', str(tmp_path / 'out'), *ARGS]) == 2
      assert not (tmp_path / 'out').exists()
    else:
      assert _generate(bad, tmp_path) == 2
    assert _one_line(capsys) == f'error: {bad / name / "config.json"}: {message}\n'
