"""vap-convert then vap-generate end to end on CPU (tiny random checkpoints of both families),
the outputs decoded back with PyAV, the Python API, and a clear error for each bad input."""
import json
import shutil

import numpy as np
import pytest

from vap_jax.cli.convert import main as vap_convert
from example_inputs import procedural_clip as _clip, write_example
from tiny_checkpoint import write_tiny_checkpoint
from vap_jax.data.video_io import read_video, write_mp4
from vap_jax.pipelines import Pipeline
from vap_jax.pipelines.common import check_references
from vap_jax.cli.generate import _read_references, main

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


def _argv(inputs, ckpt, **overrides):
  args = dict(ckpt=ckpt, image=inputs / 'image.png', ref_video=inputs / 'ref.mp4',
              prompt='a square moves', ref_prompt='a square moves too', frames=9, height=64,
              width=96, steps=2, dtype='float32')
  args.update(overrides)
  argv = []
  for key, value in args.items():
    for v in value if isinstance(value, list) else [value]:
      argv += [f'--{key.replace("_", "-")}', str(v)]
  return argv


def test_generate_writes_playable_video(converted, inputs, tmp_path):
  out = tmp_path / 'out' / 'video.mp4'
  assert main(_argv(inputs, converted['cogvideox'], out=out) +
              ['--side-by-side', '--preview', 'png']) == 0
  frames, fps = read_video(out)
  assert frames.shape == (9, 64, 96, 3) and fps == pytest.approx(16)
  side, _ = read_video(out.with_name('video_side_by_side.mp4'))
  assert side.shape == (9, 64, 2 * 96, 3)
  strip = read_video(out.with_suffix('.png'))[0][0]
  assert strip.shape == (64, 8 * 96, 3)
  settings = json.loads(out.with_suffix('.json').read_text())
  assert settings['family'] == 'cogvideox' and settings['frames_written'] == 9

  # The Python API gives the same video. The inputs are the same bytes: the CLI picks the
  # reference frames while decoding, the API after decoding the whole clip.
  ref, _ = read_video(inputs / 'ref.mp4')
  cli_refs, _ = _read_references([str(inputs / 'ref.mp4')], ['a square moves too'], 9, 'evenly',
                                 seed=42)
  np.testing.assert_array_equal(cli_refs[0], check_references([ref], ['x'], 9, 'evenly')[0])
  pipe = Pipeline.from_pretrained(converted['cogvideox'], dtype='float32')
  from PIL import Image
  image = np.asarray(Image.open(inputs / 'image.png').convert('RGB'))
  result = pipe(image, [ref], 'a square moves', ['a square moves too'], num_frames=9, height=64,
                width=96, num_inference_steps=2, progress=False)
  # The frames, compared losslessly (the PNG strip holds frames 0, 1, 2, 3, 4, 5, 6, 8): both
  # are the same float32 program (compiled twice), so a pixel may at most round the other way.
  api_strip = np.concatenate(list(result.frames[[0, 1, 2, 3, 4, 5, 6, 8]]), axis=1)
  assert np.abs(api_strip.astype(int) - strip).max() <= 1


def test_generate_wan_at_the_reference_fps(converted, inputs, tmp_path):
  out = tmp_path / 'wan.mp4'
  assert main(_argv(inputs, converted['wan'], out=out, ref_video=inputs / 'ref_wan.mp4', height=48,
                    width=64, fps='ref') + ['--preview', 'gif']) == 0
  frames, fps = read_video(out)
  assert frames.shape == (9, 48, 64, 3) and fps == pytest.approx(12)
  assert read_video(out.with_suffix('.gif'))[0].shape == (9, 48, 64, 3)


@pytest.mark.parametrize('overrides,message', [
    (dict(image='missing.png'), 'missing.png: file not found'),
    (dict(ref_video='missing.mp4'), 'missing.mp4: file not found'),
    (dict(ref_video='broken.mp4'), 'broken.mp4'),
    (dict(ref_video='short.mp4'), 'has 5 frames, 9 are needed'),
    (dict(ref_prompt=['one', 'two']), '1 --ref-video but 2 --ref-prompt'),
    (dict(frames=10), '--frames 10: expected 4k+1 frames'),
    (dict(frames=0), '--frames 0: expected 4k+1 frames'),
    (dict(frames=-3), '--frames -3: expected 4k+1 frames'),
    (dict(steps=0), '--steps 0: expected at least 1 denoising step'),
    (dict(steps=-1), '--steps -1: expected at least 1 denoising step'),
    (dict(height=60), '--height 60: expected a positive multiple of 16'),
    (dict(width=-96), '--width -96: expected a positive multiple of 16'),
    (dict(guidance='nan'), '--guidance nan: expected a finite scale >= 0'),
    (dict(guidance_min_timestep=1500), '--guidance-min-timestep 1500.0: expected a timestep'),
    (dict(seed=-1), '--seed -1: expected an integer in [0, 2**32)'),
    (dict(fps='0'), "--fps '0': expected a positive number or 'ref'"),
    (dict(fps='fast'), "--fps 'fast': expected a positive number or 'ref'"),
    (dict(out='image.png/o.mp4'), 'image.png is a file, not a folder'),
    (dict(out='/proc/vap_nope/o.mp4'), 'cannot write in /proc'),
])
def test_bad_input_is_a_clear_error(converted, inputs, tmp_path, capsys, overrides, message):
  for key in ('image', 'ref_video', 'out'):
    if key in overrides:
      overrides[key] = inputs / overrides[key]
  overrides.setdefault('out', tmp_path / 'o.mp4')
  assert main(_argv(inputs, converted['cogvideox'], **overrides)) == 2
  err = capsys.readouterr().err
  assert message in err and err.count('\n') == 1
  assert not (tmp_path / 'o.mp4').exists()


def test_checkpoint_missing_a_component(converted, inputs, tmp_path, capsys):
  ckpt = tmp_path / 'ckpt'
  shutil.copytree(converted['cogvideox'], ckpt)
  shutil.rmtree(ckpt / 'vae')
  assert main(_argv(inputs, ckpt, out=tmp_path / 'o.mp4')) == 2
  err = capsys.readouterr().err
  assert 'missing components: vae/' in err and str(ckpt) in err


def test_long_prompt_is_cut_with_a_warning(converted, inputs, tmp_path, capsys):
  """The tiny CogVideoX transformer reads 8 tokens: a longer caption is cut (as the official
  pipeline does) and the words left out are shown, one warning line per caption."""
  prompt = 'a cat walks on the grass while the camera follows it slowly'
  assert main(_argv(inputs, converted['cogvideox'], out=tmp_path / 'o.mp4', prompt=prompt,
                    ref_prompt='a cat', steps=1)) == 0
  err = [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning')]
  assert len(err) == 1, err
  assert err[0].startswith('warning: --prompt is longer than the 8 tokens the text encoder '
                           "reads; left out: '")
  left_out = err[0].split("left out: '")[1].rstrip("'")
  assert prompt.endswith(left_out) and len(left_out) > 10


def test_outputs_are_checked_before_loading(converted, inputs, tmp_path, capsys):
  """Every file a run writes (settings JSON, side-by-side video, preview) is checked first."""
  for name, flags in (('o.json', []), ('o_side_by_side.mp4', ['--side-by-side']),
                      ('o.gif', ['--preview', 'gif'])):
    (tmp_path / name).mkdir()
    assert main(_argv(inputs, converted['cogvideox'], out=tmp_path / 'o.mp4') + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.endswith(
        f'{tmp_path / name}: is a folder, expected a file name\n') and err.count('\n') == 1
    (tmp_path / name).rmdir()
  assert not (tmp_path / 'o.mp4').exists()


def test_generate_with_lora_merged_or_not(converted, inputs, tmp_path, capsys):
  """--lora: adapters change the video; merged into the weights or run beside them, the same
  video; a bad adapter file fails before the model loads."""
  import jax

  from vap_jax.nn.lora import adapted
  from vap_jax.weights import lora as lora_files
  from vap_jax.weights.cogvideox import load_cogvideox
  transformer = load_cogvideox(converted['cogvideox'], dtype='float32')
  lora_files.add(transformer, rank=2, alpha=2)
  for i, (_, layer) in enumerate(adapted(transformer)):
    layer.lora.b[...] = 0.5 * jax.random.normal(jax.random.key(i), layer.lora.b.shape)
  file = lora_files.save(transformer, tmp_path / 'lora')
  plain, lora = (tmp_path / f'{name}.mp4' for name in ('plain', 'lora'))
  assert main(_argv(inputs, converted['cogvideox'], out=plain)) == 0
  assert main(_argv(inputs, converted['cogvideox'], out=lora) + ['--lora', str(file)]) == 0
  assert np.abs(read_video(lora)[0].astype(int) - read_video(plain)[0]).mean() > 1.0
  # merged into the weights or beside them: the same frames, up to a pixel rounding the other way
  from PIL import Image
  image = np.asarray(Image.open(inputs / 'image.png').convert('RGB'))
  ref = read_video(inputs / 'ref.mp4')[0][:9]
  frames = [Pipeline.from_pretrained(converted['cogvideox'], dtype='float32', lora=file,
                                     lora_merge=merge)(
      image, [ref], 'a square moves', ['a square moves too'], num_frames=9, height=64, width=96,
      num_inference_steps=2, progress=False).frames.astype(int) for merge in (True, False)]
  assert np.abs(frames[0] - frames[1]).max() <= 1
  (tmp_path / 'bad.safetensors').write_bytes(b'not a safetensors file')
  capsys.readouterr()
  assert main(_argv(inputs, converted['cogvideox'], out=tmp_path / 'x.mp4') +
              ['--lora', str(tmp_path / 'bad.safetensors')]) != 0
  assert 'bad.safetensors' in capsys.readouterr().err
