"""vap-convert then vap-generate end to end on CPU (tiny random checkpoints of both families),
the outputs decoded back with PyAV, the Python API, and a clear error for each bad input."""
import json
import shutil

import numpy as np
import pytest

from convert.pipeline import main as vap_convert
from example_inputs import procedural_clip as _clip, write_example
from tiny_checkpoint import write_tiny_checkpoint
from vap_jax.data.video_io import read_video, write_mp4
from vap_jax.pipelines import Pipeline
from vap_jax.pipelines.generate import main

SIZES = {'cogvideox': (64, 96), 'wan': (48, 64)}  # what the tiny transformers take


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """Tiny diffusers folders of both families, converted with vap-convert (float32)."""
  root = tmp_path_factory.mktemp('ckpt')
  out = {}
  for family in SIZES:
    write_tiny_checkpoint(root / f'{family}_diffusers', family)
    assert vap_convert(['--src', str(root / f'{family}_diffusers'), '--dst', str(root / family),
                        '--dtype', 'float32', '--group-mb', '64', '--no-progress']) == 0
    out[family] = root / family
  return out


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp('inputs')
  write_example(root)  # ref.mp4, image.png
  write_mp4(root / 'ref_wan.mp4', _clip(height=48, width=64), fps=12)
  write_mp4(root / 'short.mp4', _clip(frames=5), fps=16)
  (root / 'broken.mp4').write_bytes(b'\x00\x00\x00\x18ftypmp42' + bytes(200))
  return root


def _argv(inputs, out, ckpt, **overrides):
  args = dict(ckpt=ckpt, image=inputs / 'image.png', ref_video=inputs / 'ref.mp4',
              prompt='a square moves', ref_prompt='a square moves too', frames=9, height=64,
              width=96, steps=2, dtype='float32', out=out)
  args.update(overrides)
  argv = []
  for key, value in args.items():
    for v in value if isinstance(value, list) else [value]:
      argv += [f'--{key.replace("_", "-")}', str(v)]
  return argv


def test_generate_writes_playable_video(converted, inputs, tmp_path):
  out = tmp_path / 'out' / 'video.mp4'
  assert main(_argv(inputs, out, converted['cogvideox']) +
              ['--side-by-side', '--preview', 'gif']) == 0
  frames, fps = read_video(out)
  assert frames.shape == (9, 64, 96, 3) and fps == pytest.approx(16)
  side, _ = read_video(out.with_name('video_side_by_side.mp4'))
  assert side.shape == (9, 64, 2 * 96, 3)
  assert read_video(out.with_suffix('.gif'))[0].shape[0] == 9
  settings = json.loads(out.with_suffix('.json').read_text())
  assert settings['family'] == 'cogvideox' and settings['frames_written'] == 9

  # The Python API gives the same frames: encoded the same way they decode to the same pixels.
  pipe = Pipeline.from_pretrained(converted['cogvideox'], dtype='float32')
  ref, _ = read_video(inputs / 'ref.mp4')
  from PIL import Image
  image = np.asarray(Image.open(inputs / 'image.png').convert('RGB'))
  result = pipe(image, [ref], 'a square moves', ['a square moves too'], num_frames=9, height=64,
                width=96, num_inference_steps=2, progress=False)
  write_mp4(tmp_path / 'api.mp4', result.frames, fps=16)
  np.testing.assert_array_equal(read_video(tmp_path / 'api.mp4')[0], frames)


def test_generate_wan_at_the_reference_fps(converted, inputs, tmp_path):
  out = tmp_path / 'wan.mp4'
  assert main(_argv(inputs, out, converted['wan'], ref_video=inputs / 'ref_wan.mp4', height=48,
                    width=64, fps='ref') + ['--preview', 'png']) == 0
  frames, fps = read_video(out)
  assert frames.shape == (9, 48, 64, 3) and fps == pytest.approx(12)
  assert read_video(out.with_suffix('.png'))[0].shape == (1, 48, 8 * 64, 3)


@pytest.mark.parametrize('overrides,message', [
    (dict(image='missing.png'), 'missing.png: file not found'),
    (dict(ref_video='missing.mp4'), 'missing.mp4: file not found'),
    (dict(ref_video='broken.mp4'), 'broken.mp4'),
    (dict(ref_video='short.mp4'), 'has 5 frames, 9 are needed'),
    (dict(ref_prompt=['one', 'two']), '1 --ref-video but 2 --ref-prompt'),
    (dict(frames=10), 'num_frames must be 4k+1'),
])
def test_bad_input_is_a_clear_error(converted, inputs, tmp_path, capsys, overrides, message):
  for key in ('image', 'ref_video'):
    if key in overrides:
      overrides[key] = inputs / overrides[key]
  assert main(_argv(inputs, tmp_path / 'o.mp4', converted['cogvideox'], **overrides)) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / 'o.mp4').exists()


def test_checkpoint_missing_a_component(converted, inputs, tmp_path, capsys):
  ckpt = tmp_path / 'ckpt'
  shutil.copytree(converted['cogvideox'], ckpt)
  shutil.rmtree(ckpt / 'vae')
  assert main(_argv(inputs, tmp_path / 'o.mp4', ckpt)) == 2
  err = capsys.readouterr().err
  assert 'missing components: vae/' in err and str(ckpt) in err
