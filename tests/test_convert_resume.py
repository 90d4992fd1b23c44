"""A ``vap-convert`` killed (SIGKILL) anywhere in its writing resumes when the same command runs
again: finished components are kept, and the result loads to exactly the parameters of an
uninterrupted conversion and generates the same video bytes. ``--overwrite`` works on a killed
folder too. The kills are real ``kill -9`` of a subprocess, at points chosen in its writer
(`kill_convert.py`), so every run stops at the same place on any machine."""
import os
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
    ('manifest', '3', ['transformer', 'vae']),       # the manifest after the VAE
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
  from example_inputs import write_example
  from vap_jax.cli.generate import main as generate
  src, dst, _ = uninterrupted
  resumed = tmp_path / 'resumed'
  argv = ['--src', str(src), '--dst', str(resumed), *ARGS]
  _killed('save', 'transformer:2', argv)
  assert vap_convert(argv) == 0
  write_example(tmp_path)
  videos = []
  for ckpt_dir in (dst, resumed):
    out = tmp_path / f'{ckpt_dir.name}.mp4'
    assert generate(['--ckpt', str(ckpt_dir), '--image', str(tmp_path / 'image.png'),
                     '--ref-video', str(tmp_path / 'ref.mp4'), '--ref-prompt', 'a square',
                     '--prompt', 'a square', '--frames', '9', '--height', '64', '--width', '96',
                     '--steps', '2', '--dtype', 'float32', '--out', str(out)]) == 0
    videos.append(out.read_bytes())
  assert videos[0] == videos[1]
