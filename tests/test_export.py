"""Export to the diffusers (PyTorch) layout: the key maps and configs run backwards to the official
names and fields; an exported float32 transformer *is* the official (golden) checkpoint, tensor
for tensor; bf16 rounds once; a model sharded over 8 devices or two processes exports the same
files; base models load in PyPI diffusers; folders stream to the same files as live models;
exported pipeline folders drive vap-generate; bad inputs are one clear line.
"""
import json
import re

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from conftest import DATA, xla_flags
from tiny_checkpoint import COGVIDEOX_TRANSFORMER, WAN_TRANSFORMER, write_tiny_checkpoint
from vap_jax.cli.convert import main as vap_convert
from vap_jax.cli.export import main as vap_export
from vap_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer
from vap_jax.models.stack import checkpoint_blocks
from vap_jax.models.wan import WanConfig, WanTransformer
from vap_jax.parallel import make_mesh
from vap_jax.weights import checkpoint as ckpt, cogvideox, keymap as km, wan
from vap_jax.weights.export import export, export_folder, export_pipeline, parse_size
from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint

FAMILIES = ('cogvideox', 'wan')
GOLDEN = {'cogvideox': DATA / 'cogvideox_mot' / 'transformer',
          'wan': DATA / 'wan_mot' / 'transformer'}
CONFIG = {'cogvideox': CogVideoXConfig, 'wan': WanConfig}
MODEL = {'cogvideox': CogVideoXTransformer, 'wan': WanTransformer}
LOAD = {'cogvideox': cogvideox.load_cogvideox, 'wan': wan.load_wan}
KEYMAP = {'cogvideox': cogvideox.COGVIDEOX, 'wan': wan.WAN}
KERNEL = {'cogvideox': (2, 2), 'wan': (1, 2, 2)}
SHARD = '60KB'  # several shards for the ~0.3 MB golden transformers


def _golden_config(family) -> dict:
  return json.loads((GOLDEN[family] / 'config.json').read_text())


def _params(model) -> dict:
  return {tuple(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def _tensors(folder) -> dict:
  checkpoint = SafetensorsCheckpoint(folder)
  return {key: checkpoint.read(key) for key in checkpoint.keys()}


def _files(folder) -> dict:
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope='module')
def golden_models():
  return {f: LOAD[f](GOLDEN[f], dtype='float32') for f in FAMILIES}


# ------------------------------------------------------------------- key maps and configs backwards


@pytest.mark.parametrize('family', FAMILIES)
def test_key_maps_run_backwards_to_the_official_names(family):
  config = CONFIG[family].from_source(_golden_config(family))
  _, state = nnx.split(nnx.eval_shape(lambda: MODEL[family](config, rngs=nnx.Rngs(0))))
  block_of = checkpoint_blocks(config.block_idx_with_mot_ref)
  exported = {}
  for (path, layer), (shape, _) in km.slots(state).items():
    key, transform = KEYMAP[family].key_of(path, None if layer is None else block_of(path, layer))
    exported[key] = tuple(transform.inverse_shape(shape, KERNEL[family]))
  golden = SafetensorsCheckpoint(GOLDEN[family])
  assert exported == {k: golden.shape(k) for k in golden.keys()}
  # Expert slot 1 sits on block 1 (CogVideoX) / block 2 (Wan): its key names that block.
  experts = config.block_idx_with_mot_ref
  key, _ = KEYMAP[family].key_of(('expert', 'blocks', 'attn1', 'to_out', 'kernel'), experts[1])
  prefix = 'transformer_blocks' if family == 'cogvideox' else 'blocks'
  assert key == f'{prefix}.{experts[1]}.attn1_mot_ref.to_out.0.weight'


def test_original_wan_names_run_backwards_too():
  assert wan.WAN_ORIGINAL.key_of(('blocks', 'attn2', 'add_k_proj', 'kernel'), 3)[0] == \
      'blocks.3.cross_attn.k_img.weight'
  assert wan.WAN_ORIGINAL.key_of(('scale_shift_table',), None)[0] == 'head.modulation'


def test_rules_that_cannot_run_backwards_are_named():
  optional = km.KeyMap('x', [km.Rule(r'a\.(to_q|to_out)(?:\.0)?\.weight', r'a.\1.kernel')])
  assert optional(r'a.to_out.0.weight') == (('a', 'to_out', 'kernel'), None, km.IDENTITY)
  with pytest.raises(ValueError, match=r'cannot run backwards: .*not a literal'):
    optional.key_of(('a', 'to_q', 'kernel'), None)
  dropped = km.KeyMap('y', [km.Rule(r'(a|b)\.(w)', r'c.\2')])
  with pytest.raises(ValueError, match=r'groups \[1\] do not appear in the target'):
    dropped.key_of(('c', 'w'), None)
  with pytest.raises(CheckpointError, match='no rule names variable c.v'):
    km.KeyMap('z', [km.Rule(r'a\.(w)', r'c.\1')]).key_of(('c', 'v'), None)


def test_transforms_undo_themselves():
  rng = np.random.default_rng(0)
  for kernel in [(2, 2), (1, 2, 2)]:
    conv = rng.standard_normal((5, 3, *kernel)).astype(np.float32)
    dense = km.CONV_TO_DENSE.array(conv)
    np.testing.assert_array_equal(km.CONV_TO_DENSE.inverse(dense, kernel), conv)
    assert km.CONV_TO_DENSE.inverse_shape(dense.shape, kernel) == conv.shape
  with pytest.raises(ValueError, match='needs the conv kernel size'):
    km.CONV_TO_DENSE.inverse(dense, None)
  linear = rng.standard_normal((4, 7)).astype(np.float32)
  np.testing.assert_array_equal(km.TRANSPOSE.inverse(km.TRANSPOSE.array(linear), None), linear)
  assert km.TRANSPOSE.inverse_shape((7, 4), None) == (4, 7)
  assert km.IDENTITY.inverse(linear, None) is linear


@pytest.mark.parametrize('family', FAMILIES)
def test_configs_round_trip(family):
  golden = _golden_config(family)
  golden.pop('_diffusers_version')
  config = CONFIG[family].from_source(golden, dtype='bfloat16', attention='blockwise')
  assert config.to_source() == golden  # every field, the VAP ones included
  assert CONFIG[family].from_source(config.to_source()).to_source() == golden


@pytest.mark.parametrize('family', FAMILIES)
def test_base_config_has_every_diffusers_field(family):
  """A model without an expert writes the PyPI class and exactly the fields diffusers records."""
  import diffusers
  kwargs = COGVIDEOX_TRANSFORMER if family == 'cogvideox' else WAN_TRANSFORMER
  cls = diffusers.CogVideoXTransformer3DModel if family == 'cogvideox' else \
      diffusers.WanTransformer3DModel
  theirs = {k: list(v) if isinstance(v, tuple) else v for k, v in cls(**kwargs).config.items()
            if not k.startswith('_')}
  ours = CONFIG[family].from_source(theirs).to_source()
  assert ours.pop('_class_name') == cls.__name__
  assert ours == theirs


# ----------------------------------------------------------------------------------- export(model)


def _check_layout(folder, n_shards=None):
  """diffusers' sharded layout: numbered shards, an index naming each tensor's shard once."""
  names = sorted(p.name for p in folder.glob('*.safetensors'))
  index = json.loads((folder / 'diffusion_pytorch_model.safetensors.index.json').read_text())
  count = len(names)
  assert count > 1 and (n_shards is None or count == n_shards)
  assert names == [f'diffusion_pytorch_model-{k:05d}-of-{count:05d}.safetensors'
                   for k in range(1, count + 1)]
  checkpoint = SafetensorsCheckpoint(folder)
  assert index['weight_map'] == {k: checkpoint._file_of[k].name for k in checkpoint.keys()}
  assert index['metadata']['total_size'] == sum(checkpoint.nbytes(k) for k in checkpoint.keys())


@pytest.mark.parametrize('family', FAMILIES)
def test_float32_export_is_the_official_checkpoint(golden_models, family, tmp_path):
  model = golden_models[family]
  summary = export(model, tmp_path / 'out', dtype='float32', max_shard_size=SHARD)
  out = tmp_path / 'out'
  _check_layout(out, summary['shards'])
  assert max(p.stat().st_size for p in out.glob('*.safetensors')) < 2 * parse_size(SHARD)
  ours, golden = _tensors(out), _tensors(GOLDEN[family])
  assert ours.keys() == golden.keys()
  for key in golden:  # the official tensors, bit for bit
    assert ours[key].dtype == np.float32, key
    np.testing.assert_array_equal(ours[key], golden[key], err_msg=key)
  assert json.loads((out / 'config.json').read_text()) == _golden_config(family)
  again = _params(LOAD[family](out, dtype='float32'))
  before = _params(model)
  assert again.keys() == before.keys()
  for key in before:
    np.testing.assert_array_equal(again[key], before[key], err_msg=str(key))


@pytest.mark.parametrize('family', FAMILIES)
def test_bfloat16_export_rounds_once(golden_models, family, tmp_path):
  export(golden_models[family], tmp_path / 'bf16', max_shard_size=SHARD)  # default: bfloat16
  checkpoint = SafetensorsCheckpoint(tmp_path / 'bf16')
  golden = _tensors(GOLDEN[family])
  assert {checkpoint.dtype(k) for k in checkpoint.keys()} == {'BF16'}
  for key, value in golden.items():  # round to nearest even, once, as torch's .bfloat16()
    np.testing.assert_array_equal(checkpoint.read(key), value.astype(ml_dtypes.bfloat16), key)
  loaded = _params(LOAD[family](tmp_path / 'bf16', dtype='float32'))
  for key, value in _params(golden_models[family]).items():
    err = np.abs(loaded[key] - value)
    assert (err <= 2.0 ** -8 * np.abs(value)).all(), key  # bf16 unit roundoff: 8-bit significand


@pytest.mark.parametrize('family', FAMILIES)
def test_sharded_model_exports_the_same_files(golden_models, family, tmp_path):
  mesh = make_mesh(dict(fsdp=2, tensor=4))
  sharded = LOAD[family](GOLDEN[family], dtype='float32', mesh=mesh)
  specs = [v[...].sharding.spec for _, v in nnx.to_flat_state(nnx.state(sharded))]
  assert any(any(axis is not None for axis in spec) for spec in specs)  # really sharded
  export(sharded, tmp_path / 'sharded', dtype='float32', max_shard_size=SHARD)
  export(golden_models[family], tmp_path / 'single', dtype='float32', max_shard_size=SHARD)
  assert _files(tmp_path / 'sharded') == _files(tmp_path / 'single')


def _perturbed(model, scale=0.1):
  import torch
  torch.manual_seed(0)
  with torch.no_grad():
    for tensor in [*model.parameters(), *model.buffers()]:
      if tensor.is_floating_point():
        tensor.add_(scale * torch.randn_like(tensor))
  return model


@pytest.mark.parametrize('family', FAMILIES)
def test_base_models_load_in_pypi_diffusers(family, tmp_path):
  """diffusers has no VAP class, but a base model's export is a plain diffusers checkpoint."""
  import diffusers
  import safetensors.torch
  import torch
  cls = diffusers.CogVideoXTransformer3DModel if family == 'cogvideox' else \
      diffusers.WanTransformer3DModel
  kwargs = COGVIDEOX_TRANSFORMER if family == 'cogvideox' else WAN_TRANSFORMER
  theirs = _perturbed(cls(**kwargs).eval())
  theirs.save_pretrained(tmp_path / 'torch')
  model = LOAD[family](tmp_path / 'torch', dtype='float32')
  assert model.expert is None
  export(model, tmp_path / 'out', dtype='float32', max_shard_size='20KB')
  _check_layout(tmp_path / 'out')
  # diffusers' own reading of the folder: its config, and every tensor into its module, strictly.
  # (from_pretrained needs `accelerate` for Wan's fp32 modules; it is not in the test extra.)
  back = cls.from_config(cls.load_config(tmp_path / 'out'))
  state = {}
  for shard in sorted((tmp_path / 'out').glob('*.safetensors')):
    state |= safetensors.torch.load_file(shard)
  back.load_state_dict(state, strict=True)
  if family == 'cogvideox':
    back = cls.from_pretrained(tmp_path / 'out', torch_dtype=torch.float32)
  expected, got = theirs.state_dict(), back.state_dict()
  assert got.keys() == expected.keys()
  for key in expected:  # float32 is what we store (PyPI CogVideoX keeps its table in float64)
    assert torch.equal(got[key].float(), expected[key].float()), key
  public = lambda config: json.loads(json.dumps({k: v for k, v in config.items() if k[0] != '_'}))
  assert public(back.config) == public(theirs.config)


def test_folders_stream_to_the_same_files(golden_models, tmp_path):
  """export_folder (what vap-export runs) reads diffusers and converted folders one tensor at a
  time and writes what export(model) writes."""
  family = 'wan'
  export(golden_models[family], tmp_path / 'live', dtype='float32', max_shard_size=SHARD)
  wan.convert(GOLDEN[family], tmp_path / 'orbax', param_dtype='float32', progress=False)
  for src in (GOLDEN[family], tmp_path / 'orbax'):
    dst = tmp_path / f'from_{src.name}'
    summary = export_folder(src, dst, dtype='float32', max_shard_size=SHARD)
    assert summary['family'] == family and summary['experts'] == [0, 2]
    assert 'components' not in summary  # a transformer folder gives a transformer folder
    assert _files(dst) == _files(tmp_path / 'live'), src


# ------------------------------------------------------------------- pipeline folders and the CLI


@pytest.fixture(scope='module')
def pipelines(tmp_path_factory):
  """family -> (tiny diffusers folder, its float32 vap-convert output, vap-export of that)."""
  root = tmp_path_factory.mktemp('pipelines')
  out = {}
  for family in FAMILIES:
    tiny, converted, exported = (root / f'{family}_{k}' for k in ('tiny', 'converted', 'exported'))
    write_tiny_checkpoint(tiny, family)
    assert vap_convert(['--src', str(tiny), '--dst', str(converted), '--dtype', 'float32',
                        '--group-mb', '64', '--no-progress']) == 0
    assert vap_export(['--src', str(converted), '--dst', str(exported), '--dtype', 'float32',
                       '--max-shard-size', '50KB', '--no-progress']) == 0
    out[family] = tiny, converted, exported
  return out


@pytest.mark.parametrize('family', FAMILIES)
def test_exported_pipeline_is_the_download_again(pipelines, family):
  """Converted, then exported: the same components, model index and transformer tensors as the
  diffusers folder it all came from (float32 all the way)."""
  tiny, _, exported = pipelines[family]
  assert ckpt.check_components(exported) == family
  assert sorted(p.name for p in exported.iterdir()) == sorted(p.name for p in tiny.iterdir())
  assert json.loads((exported / 'model_index.json').read_text()) == \
      json.loads((tiny / 'model_index.json').read_text())
  _check_layout(exported / 'transformer')
  ours, theirs = _tensors(exported / 'transformer'), _tensors(tiny / 'transformer')
  assert ours.keys() == theirs.keys()
  for key in theirs:  # (PyPI CogVideoX saves its position table in float64; we keep float32)
    assert ours[key].dtype == np.float32, key
    np.testing.assert_array_equal(ours[key], theirs[key].astype(np.float32), err_msg=key)
  config = json.loads((exported / 'transformer' / 'config.json').read_text())
  source = json.loads((tiny / 'transformer' / 'config.json').read_text())
  assert {k: v for k, v in config.items() if k != '_diffusers_version'} == \
      {k: v for k, v in source.items() if k != '_diffusers_version'}
  for name in ckpt.COMPONENTS[family]:
    if name != 'transformer':
      assert _files(exported / name) == _files(tiny / name), name


def test_exported_pipeline_drives_vap_generate(pipelines, tmp_path):
  """vap-generate reads the export as the downloaded folder it is (its parameters are those of
  the converted folder, bit for bit: see above)."""
  from example_inputs import write_example
  from vap_jax.cli.generate import main as vap_generate
  from vap_jax.data.video_io import read_video
  write_example(tmp_path)  # ref.mp4, image.png
  out = tmp_path / 'exported.mp4'
  assert vap_generate(['--ckpt', str(pipelines['cogvideox'][2]), '--image',
                       str(tmp_path / 'image.png'), '--ref-video', str(tmp_path / 'ref.mp4'),
                       '--prompt', 'a square moves', '--ref-prompt', 'a square', '--frames', '9',
                       '--height', '64', '--width', '96', '--steps', '2', '--dtype', 'float32',
                       '--out', str(out)]) == 0
  assert read_video(out)[0].shape == (9, 64, 96, 3)
  settings = json.loads(out.with_suffix('.json').read_text())
  assert settings['family'] == 'cogvideox' and settings['frames_written'] == 9


def test_export_pipeline_from_a_live_model(golden_models, pipelines, tmp_path):
  """A model in memory (what the trainer will hand over) with the components of a converted
  folder (taken from its download) or symlinked from a diffusers one."""
  tiny, converted, _ = pipelines['cogvideox']
  model = cogvideox.load_cogvideox(converted, dtype='float32')
  summary = export_pipeline(model, tmp_path / 'copied', converted, dtype='float32')
  assert summary['components'] == ['vae', 'text_encoder', 'tokenizer', 'scheduler']
  assert ckpt.check_components(tmp_path / 'copied') == 'cogvideox'
  assert not (tmp_path / 'copied' / 'vae').is_symlink()
  export_pipeline(model, tmp_path / 'linked', tiny, link=True, max_shard_size='100KB')
  assert (tmp_path / 'linked' / 'vae').resolve() == (tiny / 'vae').resolve()
  assert ckpt.check_components(tmp_path / 'linked') == 'cogvideox'
  with pytest.raises(CheckpointError, match='is a cogvideox pipeline, the model is wan'):
    export_pipeline(golden_models['wan'], tmp_path / 'mixed', tiny)


def _run_cli(capsys, *argv) -> tuple[int, str]:
  code = vap_export(list(map(str, argv)) + ['--no-progress'])
  return code, capsys.readouterr().err


def test_overwrite_replaces_only_an_earlier_export(pipelines, tmp_path, capsys):
  _, converted, _ = pipelines['wan']
  src = converted / 'transformer'
  assert _run_cli(capsys, '--src', src, '--dst', tmp_path / 'out')[0] == 0
  code, err = _run_cli(capsys, '--src', src, '--dst', tmp_path / 'out')
  assert code == 2 and 'exists; pass overwrite=True (--overwrite)' in err
  assert _run_cli(capsys, '--src', src, '--dst', tmp_path / 'out', '--overwrite')[0] == 0
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
  code, err = _run_cli(capsys, '--src', src, '--dst', tmp_path / 'mine', '--overwrite')
  assert code == 2 and 'is not an earlier export' in err
  assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep me'
  assert not list(tmp_path.glob('.*exporting'))  # no temporary folder left behind


def test_vap_export_prints_one_summary_line(pipelines, tmp_path, capsys):
  _, converted, _ = pipelines['cogvideox']
  assert vap_export(['--src', str(converted / 'transformer'), '--dst', str(tmp_path / 't'),
                     '--no-progress']) == 0
  out = capsys.readouterr().out
  assert out.count('\n') == 1
  assert re.match(r'exported the cogvideox VAP transformer \(146 tensors, 1 shards, [0-9.]+ MB '
                  r'bfloat16\) from .* in [0-9.]+ s', out)
  assert sorted(p.name for p in (tmp_path / 't').iterdir()) == [
      'config.json', 'diffusion_pytorch_model.safetensors']  # one shard: no index, as diffusers


@pytest.mark.parametrize('argv,message', [
    (['--src', 'missing'], 'missing does not exist'),
    (['--src', '{converted}/vae'], "holds a converted 'cogvideox_vae' model, not a CogVideoX"),
    (['--src', '{tiny}/vae'], 'is not a CogVideoX or Wan transformer folder'),
    (['--src', '{converted}', '--max-shard-size', '10XB'], "max shard size '10XB'"),
    (['--src', '{converted}/transformer', '--components-from', '{tmp}'],
     'is not a VAP checkpoint folder'),
    (['--src', '{converted}/transformer', '--dst', '{converted}/transformer/out'],
     'overlaps the input'),
    (['--src', '{converted}', '--dst', '/proc/vap_nope/out'], 'cannot write in /proc'),
])
def test_bad_input_is_one_clear_line(pipelines, tmp_path, capsys, argv, message):
  tiny, converted, _ = pipelines['cogvideox']
  argv = [a.format(tiny=tiny, converted=converted, tmp=tmp_path) for a in argv]
  if '--dst' not in argv:
    argv += ['--dst', str(tmp_path / 'out')]
  code, err = _run_cli(capsys, *argv)
  assert code == 2 and err.startswith('error: ') and message in err, err
  assert err.count('\n') == 1
  assert not (tmp_path / 'out').exists()


def test_converted_folder_without_its_download_says_so(pipelines, tmp_path, capsys):
  import shutil
  _, converted, _ = pipelines['cogvideox']
  moved = tmp_path / 'converted'
  shutil.copytree(converted, moved)
  manifest = json.loads((moved / 'manifest.json').read_text())
  manifest['source'] = str(tmp_path / 'deleted_download')
  (moved / 'manifest.json').write_text(json.dumps(manifest))
  code, err = _run_cli(capsys, '--src', moved, '--dst', tmp_path / 'out')
  assert code == 2 and 'pass the original diffusers folder' in err
  # Only the transformer needs nothing else.
  assert _run_cli(capsys, '--src', moved, '--dst', tmp_path / 'out', '--transformer-only')[0] == 0
  assert (tmp_path / 'out' / 'config.json').is_file()


def test_two_processes_export_what_one_does(golden_models, tmp_path):
  """A model sharded over two `jax.distributed` processes: slices are gathered collectively,
  process 0 alone writes, and the files are those of a one-device export."""
  import os
  import socket
  import subprocess
  import sys
  from pathlib import Path
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  here = Path(__file__).parent
  path = os.pathsep.join([str(here.parent), str(here), os.environ.get('PYTHONPATH', '')])
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=path,
             XLA_FLAGS=xla_flags(2))
  procs = [subprocess.Popen([sys.executable, str(here / 'export_worker.py'), str(GOLDEN['wan']),
                             str(tmp_path / 'multi'), str(port), str(i)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  export(golden_models['wan'], tmp_path / 'single', dtype='float32', max_shard_size='60KB')
  assert _files(tmp_path / 'multi') == _files(tmp_path / 'single')
