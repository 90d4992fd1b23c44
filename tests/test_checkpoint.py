"""Whole-checkpoint folders: the tiny generator writes what the official code writes; vap-convert
turns tiny generated and official (golden) diffusers folders into converted folders whose every
component restores to exactly the parameters loaded from the source; every loader takes all four
layouts; missing components and wrong folders are clear errors; conversion resumes.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from conftest import DATA
from vap_jax.cli.convert import main as vap_convert
from tiny_checkpoint import main as tiny_main, write_tiny_checkpoint
from vap_jax.weights import checkpoint as ckpt, component
from vap_jax.weights.cogvideox import load_cogvideox
from vap_jax.weights.encoders import load_image_encoder, load_text_encoder
from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint
from vap_jax.weights.vae import load_cogvideox_vae, load_wan_vae
from vap_jax.weights.wan import load_wan

FAMILIES = ('cogvideox', 'wan')
GOLDEN = {f: DATA / f'{f}_pipeline' / 'components' for f in FAMILIES}
LOADERS = {
    'cogvideox': {'transformer': load_cogvideox, 'vae': load_cogvideox_vae,
                  'text_encoder': load_text_encoder},
    'wan': {'transformer': load_wan, 'vae': load_wan_vae, 'text_encoder': load_text_encoder,
            'image_encoder': load_image_encoder},
}
FAST = ['--group-mb', '64', '--no-progress']  # one Orbax write per tiny component


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp('tiny')
  assert tiny_main(['--family', 'cogvideox', '--out', str(root / 'cogvideox')]) == 0
  write_tiny_checkpoint(root / 'wan', 'wan', seed=1, shard_size='20KB')  # shards + index
  return {f: root / f for f in FAMILIES}


@pytest.fixture(scope='module')
def converted(tiny, tmp_path_factory):
  """(source kind, family) -> (source folder, converted folder). Tiny: default dtypes (bf16
  transformer and text encoder, fp32 VAE and CLIP); golden: all float32."""
  root = tmp_path_factory.mktemp('converted')
  out = {}
  for kind, family, src, extra in [('tiny', f, tiny[f], []) for f in FAMILIES] + [
      ('golden', f, GOLDEN[f], ['--dtype', 'float32']) for f in FAMILIES]:
    dst = root / f'{kind}_{family}'
    assert vap_convert(['--src', str(src), '--dst', str(dst), *FAST, *extra]) == 0
    out[kind, family] = src, dst
  return out


def _params(model) -> dict:
  return {tuple(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same(a: dict, b: dict, what: str):
  assert a.keys() == b.keys(), what
  for key in a:
    assert a[key].dtype == b[key].dtype, (what, key)
    np.testing.assert_array_equal(a[key], b[key], err_msg=f'{what} {key}')


def _tensor_shapes(folder):
  ck = SafetensorsCheckpoint(folder)
  return {k.removeprefix('vision_model.'): ck.shape(k) for k in ck.keys()}


@pytest.mark.parametrize('family', FAMILIES)
def test_tiny_checkpoint_has_the_official_layout(tiny, family):
  """Same folders, configs and tensor names/shapes as the components the official code wrote
  (CLIP names differ only by transformers 5 dropping ``vision_model.``); experts = base + noise."""
  src, golden = tiny[family], GOLDEN[family]
  assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in golden.iterdir())
  assert ckpt.check_components(src) == family
  for name in ckpt.model_specs(family):
    assert _tensor_shapes(src / name) == _tensor_shapes(golden / name), name
  config = json.loads((src / 'transformer' / 'config.json').read_text())
  expected = json.loads((golden / 'transformer' / 'config.json').read_text())
  config.pop('_diffusers_version'), expected.pop('_diffusers_version')
  assert config == expected
  for name in ('tokenizer', 'image_processor'):
    if (golden / name).is_dir():
      assert sorted(p.name for p in (src / name).iterdir()) == sorted(
          p.name for p in (golden / name).iterdir())
  scheduler = ckpt.scheduler_config(src)
  assert {k: v for k, v in ckpt.scheduler_config(golden).items()
          if k != '_diffusers_version'}.items() <= scheduler.items()
  transformer = SafetensorsCheckpoint(src / 'transformer')
  experts = [k for k in transformer.keys() if '_mot_ref' in k]
  assert experts
  for key in experts:
    base, expert = transformer.read(key.replace('_mot_ref', '')), transformer.read(key)
    assert 0 < np.abs(expert - base).max() < 0.2, key


def test_tiny_tokenizer_loads_in_transformers_and_ours(tiny):
  from transformers import T5Tokenizer
  from vap_jax.text import Tokenizer
  folder = ckpt.tokenizer_dir(tiny['cogvideox'])
  prompts = ['a cat walks on the grass, the camera follows it slowly', 'zoom into golden fire']
  ours, mask = Tokenizer(folder)(prompts, 16)
  theirs = T5Tokenizer.from_pretrained(folder)(prompts, padding='max_length', max_length=16,
                                               truncation=True, return_tensors='np')
  np.testing.assert_array_equal(ours, theirs['input_ids'])
  np.testing.assert_array_equal(mask, theirs['attention_mask'])
  assert (ours < 128).all() and (mask.sum(1) > 3).all()


@pytest.mark.parametrize('kind,family', [(k, f) for k in ('tiny', 'golden') for f in FAMILIES])
def test_vap_convert_restores_every_component_exactly(converted, kind, family):
  src, dst = converted[kind, family]
  manifest = json.loads((dst / 'manifest.json').read_text())
  assert manifest['format_version'] == ckpt.FORMAT_VERSION and manifest['complete']
  assert manifest['family'] == family and manifest['source'] == str(src.resolve())
  assert list(manifest['components']) == list(ckpt.COMPONENTS[family])
  assert manifest['model_index'] == json.loads((src / 'model_index.json').read_text())
  assert ckpt.is_converted_pipeline(dst) and not ckpt.is_converted_pipeline(src)
  assert ckpt.check_components(dst) == ckpt.detect_family(src) == family
  for name, entry in manifest['components'].items():
    if name in ckpt.FILE_COMPONENTS:
      assert entry == {'kind': 'files', 'files': sorted(p.name for p in (src / name).iterdir())}
      for f in entry['files']:
        assert (dst / name / f).read_bytes() == (src / name / f).read_bytes()
      continue
    assert entry['config'] == json.loads((src / name / 'config.json').read_text())
    spec = ckpt.model_specs(family)[name]
    assert component.source_config(spec, dst) == component.source_config(spec, src) == entry['config']
    dtype = entry['param_dtype']
    if kind == 'golden':
      assert dtype == 'float32'
    else:
      assert dtype == ('bfloat16' if name in ('transformer', 'text_encoder') else 'float32')
    load = LOADERS[family][name]
    expected = _params(load(src, dtype='float32', param_dtype=dtype))
    _assert_same(_params(load(dst, dtype='float32', param_dtype=dtype)), expected,
                 f'{kind} {family} {name}: converted root')
    if kind == 'tiny':  # the component folders of both layouts too
      for folder in (src / name, dst / name):
        _assert_same(_params(load(folder, dtype='float32', param_dtype=dtype)), expected,
                     f'{kind} {family} {name}: {folder}')
  assert ckpt.scheduler_config(dst) == ckpt.scheduler_config(src)
  assert ckpt.tokenizer_dir(dst) == dst / 'tokenizer'
  if family == 'wan':
    config = ckpt.image_processor_config(dst)
    assert ckpt.clip_preprocess_kwargs(config) == dict(
        size=32, crop_size=32, resample=3, mean=tuple(config['image_mean']),
        std=tuple(config['image_std']))


def test_golden_transformer_buffers_survive(converted):
  """The learned position tables of both CogVideoX streams (buffers, not params) convert."""
  src, dst = converted['golden', 'cogvideox']
  state = _params(load_cogvideox(dst, dtype='float32'))
  tensors = SafetensorsCheckpoint(src / 'transformer')
  for prefix, key in ((('patch_embed',), 'patch_embed.pos_embedding'),
                      (('expert', 'patch_embed'), 'patch_embed_mot_ref.pos_embedding')):
    np.testing.assert_array_equal(state[prefix + ('pos_embedding',)], tensors.read(key))


def test_pipelines_run_from_converted_folders(converted):
  """The pipelines built from vap-convert output of the official components reproduce the
  official text and CLIP embeddings; a folder of the other family is refused."""
  from safetensors.numpy import load_file
  from conftest import assert_close
  from vap_jax.pipelines import CogVideoXVAPPipeline, WanVAPPipeline
  golden = DATA / 'wan_pipeline'
  pipe = WanVAPPipeline.from_pretrained(converted['golden', 'wan'][1], dtype='float32')
  kw = json.loads((golden / 'call.json').read_text())['kwargs']
  args = load_file(golden / 'transformer_text_args.safetensors')
  text, _ = pipe.encode_prompts(kw['prompt'], kw['prompt_mot_ref'], kw['negative_prompt'],
                                kw['negative_prompt_mot_ref'])
  assert_close(text[1], args['prompt_embeds'][0], what='prompt embeds')  # [negative, positive]
  image = load_file(golden / 'inputs.safetensors')['image']
  assert_close(pipe.encode_images([image]),
               load_file(golden / 'clip.safetensors')['image.image_embeds'], what='CLIP tokens')
  with pytest.raises(CheckpointError, match='is a wan checkpoint, not cogvideox'):
    CogVideoXVAPPipeline.from_pretrained(converted['golden', 'wan'][1])


def test_folders_converted_before_source_config_still_load(converted, tmp_path):
  """Converted folders written before the unified key stored ``diffusers_config``/``hf_config``."""
  _, dst = converted['tiny', 'wan']
  for name, old_key, load in (('transformer', 'diffusers_config', load_wan),
                              ('image_encoder', 'hf_config', load_image_encoder)):
    old = tmp_path / name
    shutil.copytree(dst / name, old)
    meta = json.loads((old / 'config.json').read_text())
    meta[old_key] = meta.pop('source_config')
    (old / 'config.json').write_text(json.dumps(meta))
    _assert_same(_params(load(old, dtype='float32')), _params(load(dst, dtype='float32')), name)


def _partial_copy(src, dst, drop=(), strip=()):
  """A copy of ``src`` made of symlinks, without the ``drop`` components and with the files
  ``strip`` (component/file) left out."""
  dst.mkdir()
  for item in src.iterdir():
    if item.name in drop:
      continue
    if item.is_dir():
      (dst / item.name).mkdir()
      for f in item.iterdir():
        if f'{item.name}/{f.name}' not in strip:
          (dst / item.name / f.name).symlink_to(f)
    else:
      (dst / item.name).symlink_to(item)
  return dst


def test_missing_component_is_a_clear_error(tiny, converted, tmp_path, capsys):
  src = _partial_copy(tiny['wan'], tmp_path / 'no_clip', drop=['image_encoder'],
                      strip=['tokenizer/spiece.model'])
  with pytest.raises(CheckpointError) as err:
    ckpt.check_components(src)
  assert str(src) in str(err.value)
  assert 'image_encoder/ (folder missing)' in str(err.value)
  assert 'tokenizer/ (no spiece.model or tokenizer.json)' in str(err.value)
  assert 'transformer' not in str(err.value)
  with pytest.raises(CheckpointError, match=r'missing its image_encoder/ component'):
    load_image_encoder(src)
  assert vap_convert(['--src', str(src), '--dst', str(tmp_path / 'out'), *FAST]) == 2
  assert 'image_encoder/ (folder missing)' in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()
  # A converted folder with an unfinished component.
  _, dst = converted['tiny', 'cogvideox']
  broken = _partial_copy(dst, tmp_path / 'broken', strip=['vae/config.json'])
  with pytest.raises(CheckpointError, match=r'vae/ \(no config.json \(incomplete conversion'):
    ckpt.check_components(broken)
  with pytest.raises(CheckpointError, match=r'missing its vae/ component.*re-run vap-convert'):
    load_cogvideox_vae(broken)


def test_wrong_folder_is_a_clear_error(tiny, converted, tmp_path, capsys):
  with pytest.raises(CheckpointError, match='looks like one component folder'):
    ckpt.detect_family(tiny['wan'] / 'transformer')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(CheckpointError, match='neither model_index.json .* nor manifest.json'):
    ckpt.check_components(tmp_path / 'empty')
  with pytest.raises(CheckpointError, match='does not exist'):
    ckpt.detect_family(tmp_path / 'nowhere')
  other = _partial_copy(tiny['cogvideox'], tmp_path / 'sdxl', drop=['model_index.json'])
  (other / 'model_index.json').write_text(json.dumps({'_class_name': 'StableDiffusionPipeline'}))
  with pytest.raises(CheckpointError, match="'StableDiffusionPipeline' is not a VAP pipeline"):
    ckpt.detect_family(other)
  with pytest.raises(CheckpointError, match='is not a CogVideoX transformer'):
    load_cogvideox(tiny['wan'])
  _, dst = converted['tiny', 'wan']
  with pytest.raises(CheckpointError, match="converted 'wan_vae' model, not 'wan'"):
    load_wan(dst / 'vae')
  for src, out, message in [
      (tiny['wan'] / 'vae', tmp_path / 'a', 'looks like one component folder'),
      (dst, tmp_path / 'b', 'already a converted folder'),
      (tiny['wan'], tiny['cogvideox'], 'is not a vap-convert output'),
      (tiny['wan'], converted['tiny', 'cogvideox'][1], 'holds a conversion of')]:
    assert vap_convert(['--src', str(src), '--dst', str(out), *FAST]) == 2
    assert message in capsys.readouterr().err


def test_vap_convert_resumes(converted, tmp_path, capsys, caplog):
  src, done = converted['tiny', 'cogvideox']
  dst = tmp_path / 'resume'
  shutil.copytree(done, dst, symlinks=True)
  (dst / 'vae' / 'config.json').unlink()   # as if interrupted while writing the VAE
  kept = (dst / 'transformer' / 'state').stat().st_mtime_ns
  with caplog.at_level('INFO', logger='vap_jax.weights.checkpoint'):
    assert vap_convert(['--src', str(src), '--dst', str(dst), *FAST]) == 0
  assert 'transformer: already converted' in caplog.text and 'vae: converting' in caplog.text
  assert (dst / 'transformer' / 'state').stat().st_mtime_ns == kept
  assert ckpt.check_components(dst) == 'cogvideox'
  _assert_same(_params(load_cogvideox_vae(dst)), _params(load_cogvideox_vae(src)), 'resumed vae')
  # Another dtype for a finished component needs --overwrite.
  assert vap_convert(['--src', str(src), '--dst', str(dst), '--dtype', 'float32', *FAST]) == 2
  assert 'pass overwrite=True (--overwrite)' in capsys.readouterr().err
  assert vap_convert(['--src', str(src), '--dst', str(dst), '--dtype', 'float32', '--overwrite',
                      *FAST]) == 0
  manifest = ckpt.read_manifest(dst)
  assert manifest['components']['transformer']['param_dtype'] == 'float32'
  assert load_cogvideox(dst, dtype='float32').layers(0)[1] is not None


def test_vap_convert_takes_relative_paths_and_is_quiet(tiny, tmp_path):
  """The installed command as a user runs it: relative paths (Orbax refuses them, so the
  converter makes them absolute), and one summary line unless -v asks for the library logs."""
  shutil.copytree(tiny['cogvideox'], tmp_path / 'src')
  def run(*extra):
    return subprocess.run([sys.executable, '-m', 'vap_jax.cli.convert', '--src', 'src', '--dst',
                           'out/ckpt', '--dtype', 'float32', *FAST, *extra], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  quiet = run()
  assert quiet.returncode == 0, quiet.stderr
  assert quiet.stdout.startswith('converted the cogvideox checkpoint src to out/ckpt')
  assert quiet.stdout.count('\n') == 1 and quiet.stderr == ''
  _assert_same(_params(load_cogvideox(tmp_path / 'out' / 'ckpt', dtype='float32')),
               _params(load_cogvideox(tmp_path / 'src', dtype='float32')), 'transformer')
  verbose = run('-v')  # a resume: every component is kept
  assert verbose.returncode == 0
  assert 'INFO vap_jax.weights.checkpoint: transformer: already converted' in verbose.stderr


def test_unwritable_destination_is_a_clear_error(tiny, tmp_path, capsys):
  (tmp_path / 'file').write_text('x')
  for dst, message in [(tmp_path / 'file' / 'out', 'is a file, not a folder'),
                       ('/proc/vap_nope/out', 'cannot write in /proc')]:
    assert vap_convert(['--src', str(tiny['cogvideox']), '--dst', str(dst), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: --dst {dst}') and message in err and err.count('\n') == 1


def test_folders_of_the_old_layout_say_to_convert_again(converted, tmp_path):
  """Format 1 stored per-block paths; loading one must say what to do, not fail on a key."""
  _, dst = converted['tiny', 'cogvideox']
  old = _partial_copy(dst, tmp_path / 'old')
  config = json.loads((old / 'transformer' / 'config.json').read_text())
  del config['format_version']
  (old / 'transformer' / 'config.json').unlink()  # a symlink into the shared fixture
  (old / 'transformer' / 'config.json').write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r'older vap_jax \(folder format 1.*vap-convert'):
    load_cogvideox(old / 'transformer')
  manifest = json.loads((old / 'manifest.json').read_text())
  (old / 'manifest.json').unlink()
  (old / 'manifest.json').write_text(json.dumps(dict(manifest, format_version=1)))
  with pytest.raises(CheckpointError, match='format_version 1, this vap_jax reads 2: convert'):
    ckpt.check_components(old)
