"""vap-precompute: records equal direct encoder calls, resumption, skipped videos, read-back.

The first 20 rows of the fixture table (2 of them corrupt) are precomputed with the tiny
CogVideoX and Wan pipeline components on a 2-device mesh (4 samples of two references each per
batch). One `Encoders` per family is shared by the tests, so each family compiles once.
"""
import json
import pickle
import types

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import DATA, assert_close, config_file
from fixtures_vap_data import BUCKETS, FRAMES, make_issue20_table, make_vap_data
from vap_jax.data import video_io
from vap_jax.conditioning import COGVIDEOX_DRAWN, WAN_DRAWN, cogvideox_latents, posterior_draws, \
  wan_latents
from vap_jax.data.latent_source import LatentSource, make_latent_loader
from vap_jax.data.pipeline import DataFailureError, pairing_config
from vap_jax.data.precompute import Encoders, PrecomputeConfig, precompute
from vap_jax.data.records import decode_record, encode_record
from vap_jax.data.vap_data import build_pair_table, read_vap_csv
from vap_jax.parallel import make_mesh, sharding_context
from vap_jax.text import Tokenizer, encode_cogvideox, encode_wan

COMPONENTS = {'cogvideox': DATA / 'cogvideox_pipeline' / 'components',
              'wan': DATA / 'wan_pipeline' / 'components'}
TEXT_LENGTH = 16
SIZE = tuple(BUCKETS[0][1:])


@pytest.fixture(scope='module')
def vap(tmp_path_factory):
  return make_vap_data(tmp_path_factory.mktemp('vap'))


def data_config(root, **kw):
  cfg = config_file('vap_data.py').data
  cfg.update(root=str(root), buckets=BUCKETS, truncate_multiple=1, workers=0, max_samples=20,
             sample_ref_videos_num=2, mask_ref_ratio=0.0, mask_caption_ratio=0.0,
             max_failure_fraction=0.5, min_samples_before_cap=10)
  cfg.update(kw)
  return cfg


def config(family, out, **kw):
  kw = dict(dict(samples_per_shard=8, batch_per_device=2, text_max_length=TEXT_LENGTH,
                 store_dtype='float32', text_dtype='float32'), **kw)
  return PrecomputeConfig(family, str(COMPONENTS[family]), str(out), **kw)


_ENCODERS = {}


def encoders(family):
  if family not in _ENCODERS:
    _ENCODERS[family] = Encoders(config(family, '/unused'),
                                 make_mesh({'data': 2}, devices=jax.devices()[:2]))
  return _ENCODERS[family]


@pytest.fixture(scope='module')
def runs(vap, tmp_path_factory):
  """family -> (output folder, summary) of one uninterrupted run."""
  out = {}
  for family in ('cogvideox', 'wan'):
    folder = tmp_path_factory.mktemp(family)
    out[family] = folder, precompute(config(family, folder), data_config(vap['root']),
                                     encoders=encoders(family), progress=False)
  return out


def _clip(vap, rel):
  return video_io.load_clip(vap['root'] / rel, num_frames=FRAMES, size=SIZE)


@nnx.jit
def _encode(vae, video):  # the plain VAE call, one video, no mesh
  post = vae.encode(video)
  return post.mean, post.logvar


def _text(encode, family, rec):
  """[caption, ref captions, ''] encoded directly (padded to the precompute's text batch of 12,
  under its mesh, so the compilation is shared)."""
  enc = encoders(family)
  captions = [str(rec['caption']), *map(str, rec['ref_captions']), ''] + ['x'] * 8
  with sharding_context(enc.mesh):
    return np.asarray(encode(Tokenizer(COMPONENTS[family]), enc.text_encoder, captions,
                             TEXT_LENGTH))


def _check_metadata(vap, rec, table_rows):
  row = table_rows[int(rec['row'])]
  assert str(rec['path']) == row['video_paths'] and int(rec['csv_line']) == row['_line']
  assert list(rec['shape']) == [FRAMES, *SIZE] and rec['ref_mask'].all()
  frames, fps = video_io.read_video(vap['root'] / str(rec['path']))
  assert float(rec['fps']) == fps
  np.testing.assert_array_equal(rec['frame_indices'],
                                video_io.clip_indices(len(frames), fps, FRAMES))


def test_skipped_videos_counted_and_every_good_row_stored(vap, runs):
  for family, (folder, summary) in runs.items():
    assert summary['num_samples'] == 20 and summary['num_shards'] == 3
    assert summary['written'] == [0, 1, 2] and summary['remaining'] == []
    assert summary['failed'] == 2 and summary['records'] == 18
    source = LatentSource(folder)
    assert len(source) == 18
    failures = source.failures
    assert [f['index'] for f in failures] == [0, 18]  # the two corrupt rows among the first 20
    assert all('/vfx_videos/broken/' in f['path'] and f['reason'] for f in failures)
    indices = [int(source[i]['index']) for i in range(len(source))]
    assert indices == [i for i in range(20) if i not in (0, 18)]
    info = json.loads((folder / 'precompute.json').read_text())
    assert info['settings']['family'] == family and info['rows'] == 20


def test_cut_video_and_bad_rows_skipped_counted_and_listed(vap, tmp_path):
  """Issue 20: the cut mp4 is a skipped sample listed in its shard manifest (not a record
  made from its first 147 frames); the bad table rows are dropped and listed in precompute.json."""
  t = make_issue20_table(vap['root'])
  out = tmp_path / 'issue20'
  summary = precompute(config('cogvideox', out, samples_per_shard=16),
                       data_config(vap['root'], meta_csv=t['csv'], max_samples=None,
                                   max_bad_row_fraction=0.5),
                       encoders=encoders('cogvideox'), progress=False)
  assert summary['records'] == 8 and summary['failed'] == 1 and summary['dropped_rows'] == 3
  source = LatentSource(out)
  assert sorted(str(source[i]['path']) for i in range(len(source))) == sorted(t['good'])
  [failure] = source.failures
  assert failure['path'] == str(vap['root'] / t['cut'])
  assert failure['reason'].startswith('truncated: ')
  info = json.loads((out / 'precompute.json').read_text())
  assert info['rows'] == 9
  assert [(d['line'], d['column']) for d in info['dropped_rows']] == t['dropped']
  assert info['dropped_rows'][2]['video_paths'] == t['good'][0]  # the repeated path


def test_cogvideox_records_equal_direct_encoder_calls(vap, runs):
  folder, _ = runs['cogvideox']
  enc = encoders('cogvideox')
  source = LatentSource(folder)
  rec = source[3]
  table = build_pair_table(read_vap_csv(vap['root'] / 'vap_data.csv'),
                           pairing_config(types.SimpleNamespace(**data_config(vap['root']))))
  _check_metadata(vap, rec, table.rows)
  for name, rel in [('', str(rec['path']))] + [(f'ref{j}', str(p))
                                                for j, p in enumerate(rec['ref_paths'])]:
    video = _clip(vap, rel).transpose(3, 0, 1, 2)[None]  # (1, 3, F, H, W)
    mean, logvar = _encode(enc.vae, video)
    img_mean, img_logvar = _encode(enc.vae, video[:, :, :1])
    pick = (lambda k: rec[k]) if not name else (lambda k: rec['ref_' + k][int(name[3:])])
    assert_close(pick('latents_mean'), mean[0], what=f'{name} mean')
    assert_close(pick('latents_logvar'), logvar[0], what=f'{name} logvar')
    assert_close(pick('image_latents_mean'), img_mean[0], what=f'{name} image mean')
    assert_close(pick('image_latents_logvar'), img_logvar[0], what=f'{name} image logvar')
  text = _text(encode_cogvideox, 'cogvideox', rec)
  assert_close(rec['text'], text[0], what='text')
  assert_close(rec['ref_text'], text[1:3], what='ref text')
  assert_close(source.empty_text, text[3], what='empty text')


def test_wan_records_equal_direct_encoder_calls(vap, runs):
  from vap_jax.models.clip import preprocess
  folder, _ = runs['wan']
  enc = encoders('wan')
  source = LatentSource(folder)
  rec = source[5]
  videos = np.stack([_clip(vap, str(p)) for p in [rec['path'], *rec['ref_paths']]])
  x = videos.transpose(0, 4, 1, 2, 3)  # (3, 3, F, H, W)
  cond_x = x.copy()
  cond_x[:, :, 1:] = 0
  mean, logvar = _encode(enc.vae, x)
  cond = enc.vae.normalize_latents(_encode(enc.vae, cond_x)[0])
  for key, want in (('latents_mean', mean), ('latents_logvar', logvar), ('condition', cond)):
    assert_close(rec[key], want[0], what=key)
    assert_close(rec['ref_' + key], want[1:], what='ref_' + key)
  pixels = preprocess(video_io.from_unit_range(videos[:, 0]), size=32)  # image_processor: 32 px
  clip = nnx.jit(lambda m, p: m.hidden_state(p, -2))(enc.image_encoder, pixels)
  assert_close(rec['clip'], clip[0], what='clip')
  assert_close(rec['ref_clip'], clip[1:], what='ref clip')
  text = _text(encode_wan, 'wan', rec)
  assert rec['text'].shape == (TEXT_LENGTH, text.shape[-1])  # padded back from the stored length
  assert_close(rec['text'], text[0], what='text')
  assert_close(rec['ref_text'], text[1:3], what='ref text')
  raw = decode_record(source._source[5])
  assert raw['text'].shape[0] == int(raw['text_length'])  # stored trimmed to its length
  empty = decode_record((folder / 'empty_text.msgpack').read_bytes())
  assert empty['text'].shape[0] == int(empty['text_length']) == 1  # just </s>
  assert_close(source.empty_text, text[3], what='empty text')


def _files(folder, shard):
  return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino)
          for p in folder.glob(f'shard-{shard:05d}-*')}


def test_resume_skips_finished_shards_and_redoes_partial_ones(vap, runs, tmp_path):
  data = data_config(vap['root'])
  enc = encoders('cogvideox')
  out = tmp_path / 'cog'
  first = precompute(config('cogvideox', out, max_shards=2), data, encoders=enc, progress=False)
  assert first['written'] == [0, 1] and first['remaining'] == [2]
  with pytest.raises(ValueError, match='1 of 3 shards are not finished'):
    LatentSource(out)
  assert len(LatentSource(out, allow_incomplete=True)) == 15  # row 0 is corrupt
  shard0 = _files(out, 0)
  # An interrupted shard 2: records on disk but no manifest, and a stale partial file.
  (out / 'shard-00002-of-00003.array_record').write_bytes(b'interrupted')
  (out / 'shard-00002-of-00003.array_record.partial').write_bytes(b'stale')
  # Shard 1's manifest disagrees with its file: it is redone too.
  manifest = json.loads((out / 'shard-00001-of-00003.json').read_text())
  (out / 'shard-00001-of-00003.json').write_text(json.dumps(dict(manifest, bytes=1)))

  with pytest.raises(ValueError, match='samples_per_shard: 8 in the folder, 4 now'):
    precompute(config('cogvideox', out, samples_per_shard=4), data, encoders=enc, progress=False)
  second = precompute(config('cogvideox', out), data, encoders=enc, progress=False)
  assert second['skipped'] == [0] and second['written'] == [1, 2] and second['failed'] == 2
  assert _files(out, 0) == shard0  # neither file of the finished shard was rewritten
  assert not list(out.glob('*.partial'))
  third = precompute(config('cogvideox', out), data, encoders=enc, progress=False)
  assert third['written'] == [] and third['skipped'] == [0, 1, 2]

  resumed, full = LatentSource(out), LatentSource(runs['cogvideox'][0])
  assert len(resumed) == len(full) == 18
  for i in range(0, 18, 4):
    a, b = resumed[i], full[i]
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_processes_split_the_shards(vap, runs, tmp_path):
  data = data_config(vap['root'], max_samples=12)
  out = tmp_path / 'wan'
  enc = encoders('wan')
  summaries = [precompute(config('wan', out, samples_per_shard=4), data, encoders=enc,
                          process=(i, 2), progress=False) for i in (1, 0)]
  assert summaries[0]['written'] == [1] and summaries[1]['written'] == [0, 2]
  assert summaries[1]['failed'] == 1  # row 0
  source = LatentSource(out)
  assert len(source) == 11 and [f['index'] for f in source.failures] == [0]


def test_grain_loader_round_trip_and_training_inputs(runs):
  folder, _ = runs['wan']
  source = LatentSource(folder)
  assert len(pickle.loads(pickle.dumps(source))) == len(source)
  loader = make_latent_loader(folder, batch_size=2, num_epochs=1, shard=(0, 1))
  batches = list(loader)
  assert len(batches) == 9
  seen = sorted(int(i) for b in batches for i in b['index'])
  assert seen == sorted(int(source[i]['index']) for i in range(len(source)))
  b = batches[0]
  assert b['latents_mean'].shape == (2, 4, 3, 3, 4) and b['ref_clip'].shape == (2, 2, 17, 20)
  assert b['text'].shape == (2, TEXT_LENGTH, 16) and b['path'].dtype.kind == 'U'

  loader = make_latent_loader(folder, batch_size=2, num_epochs=1, shard=(1, 2))
  next(loader)
  state = loader.get_state()
  want = next(loader)
  loader.set_state(state)
  np.testing.assert_array_equal(next(loader)['index'], want['index'])

  dropped = next(make_latent_loader(folder, batch_size=2, caption_dropout=1.0, shard=(0, 1)))
  np.testing.assert_array_equal(dropped['text'][1], source.empty_text)
  np.testing.assert_array_equal(dropped['ref_text'][0, 1], source.empty_text)
  assert dropped['caption_masked'].all()

  # Dropout draws belong to a sample's place in the global stream: two processes reading
  # halves of each batch see exactly what one process sees.
  def dropout_loader(shard, batch_size):
    return make_latent_loader(folder, batch_size=batch_size, caption_dropout=0.5,
                              reference_dropout=0.5, num_epochs=1, shard=shard)
  one, halves = dropout_loader((0, 1), 4), [dropout_loader((i, 2), 2) for i in range(2)]
  for _ in range(3):
    whole, parts = next(one), [next(h) for h in halves]
    for key in ('index', 'caption_masked', 'ref_mask', 'text', 'ref_latents_mean'):
      together = np.stack([p[key] for p in parts], 1).reshape(whole[key].shape)
      np.testing.assert_array_equal(together, whole[key], err_msg=key)

  info = source.info['vae']
  dit = wan_latents(b, posterior_draws(jax.random.key(0), b, WAN_DRAWN), info['latents_mean'],
                    info['latents_std'])
  assert dit['latents'].shape == (2, 4, 3, 3, 4) and dit['ref_condition'].shape == (2, 2, 8, 3, 3, 4)
  assert (dit['condition'][:, :4, 0] == 1).all() and (dit['condition'][:, :4, 1:] == 0).all()
  np.testing.assert_array_equal(dit['condition'][:, 4:], b['condition'])

  cog = LatentSource(runs['cogvideox'][0])
  batch = {k: np.stack([cog[0][k], cog[1][k]]) for k in cog[0] if k.endswith(('mean', 'logvar'))}
  draws = posterior_draws(jax.random.key(0), batch, COGVIDEOX_DRAWN)
  dit = cogvideox_latents(batch, draws, cog.info['vae']['scaling_factor'])
  assert dit['latents'].shape == (2, 3, 4, 3, 4) and dit['ref_image_latents'].shape == (
      2, 2, 3, 4, 3, 4)
  assert (dit['image_latents'][:, 1:] == 0).all() and (dit['image_latents'][:, 0] != 0).all()
  zero = dict(batch, latents_logvar=np.full_like(batch['latents_logvar'], -30.0))
  assert_close(cogvideox_latents(zero, draws, 0.7)['latents'],
               0.7 * np.moveaxis(batch['latents_mean'], 1, 2), atol=1e-5, what='mean x 0.7')


def test_record_codec_round_trip():
  import ml_dtypes
  sample = {'a': np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2],
            'b': np.ones((2,), ml_dtypes.bfloat16), 'i': np.int64(7), 's': np.array(['x', 'yz']),
            'flag': True, 'name': 'clip'}
  out = decode_record(encode_record(sample))
  np.testing.assert_array_equal(out['a'], sample['a'])
  assert out['b'].dtype == ml_dtypes.bfloat16 and out['i'].shape == () and int(out['i']) == 7
  assert out['s'] == ['x', 'yz'] and out['flag'] is True and out['name'] == 'clip'


def test_cli_help_and_errors(vap, tmp_path, capsys):
  from vap_jax.cli.precompute import main
  with pytest.raises(SystemExit) as e:
    main(['--help'])
  assert e.value.code == 0 and 'resum' in capsys.readouterr().out.lower()
  code = main(['wan', '--model', str(COMPONENTS['wan']), '--data', str(tmp_path / 'nowhere'),
               '--out', str(tmp_path / 'o'), '--no-progress'])
  assert code == 2 and 'vap_data.csv: file not found' in capsys.readouterr().err
  code = main(['wan', '--model', str(COMPONENTS['wan']), '--data', str(vap['root']),
               '--out', str(tmp_path / 'o'), '--set', 'no_such_field=1'])
  assert code == 2 and "--set 'no_such_field=1'" in capsys.readouterr().err
  t = make_issue20_table(vap['root'])  # 3 bad rows of 12 (the table is read before any model)
  args = ['cogvideox', '--model', str(COMPONENTS['cogvideox']), '--data', str(vap['root']),
          '--out', str(tmp_path / 'o'), '--set', f'meta_csv={t["csv"]}', '--no-progress']
  assert main(args + ['--strict', '--set', 'max_bad_row_fraction=0.5']) == 2
  assert ("issue20.csv: line 7, column 'reference_alignment_score': expected a number: empty "
          "(strict: 3 of 12 rows are bad)") in capsys.readouterr().err
  assert main(args) == 2
  err = capsys.readouterr().err
  assert ('issue20.csv: 3 of 12 rows are bad, above max_bad_row_fraction 5.0%; the first: '
          'line 7') in err


def test_a_run_that_stores_nothing_or_too_little_fails(vap, runs, tmp_path, capsys):
  """Issue 19: over videos that are all corrupt the command exits 2 (it wrote empty shards and
  exited 0), however few samples it saw; rerunning it does too. A finished folder that skipped
  more than max_failure_fraction fails as a whole when the limit is lowered."""
  import csv
  from fixtures_vap_data import write_csv
  from vap_jax.cli.precompute import main
  with open(vap['root'] / 'vap_data.csv', newline='') as f:
    write_csv(vap['root'] / 'only_broken.csv',
              [r for r in csv.DictReader(f) if r['kind'] == 'broken'])
  args = ['cogvideox', '--model', str(COMPONENTS['cogvideox']), '--data', str(vap['root']),
          '--out', str(tmp_path / 'o'), '--set', 'meta_csv="only_broken.csv"', '--set',
          f'buckets={json.dumps(BUCKETS)}', '--set', 'truncate_multiple=1', '--set', 'workers=0',
          '--samples-per-shard', '2', '--text-max-length', str(TEXT_LENGTH), '--no-progress']
  for _ in range(2):  # the run, then the rerun (every shard already finished)
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith('error: 5 of 5 samples failed to load (100.0%), above '
                              'max_failure_fraction 5.0%. Worst offenders: 1x ')
  folder, _ = runs['cogvideox']  # 2 of its 20 samples were skipped
  with pytest.raises(DataFailureError, match=r'^2 of 20 samples failed to load \(10.0%\), above '
                     r'max_failure_fraction 5.0%'):
    precompute(config('cogvideox', folder), data_config(vap['root'], max_failure_fraction=0.05),
               encoders=encoders('cogvideox'), progress=False)


def test_bad_reference_replaced_and_listed(vap, tmp_path):
  """Issue 19: a record whose drawn reference cannot be decoded holds another video of its kind
  instead (its latents and caption), and the shard manifest lists what was replaced."""
  from fixtures_vap_data import make_bad_reference_table
  t = make_bad_reference_table(vap['root'])
  out = tmp_path / 'bad_ref'
  summary = precompute(config('cogvideox', out, samples_per_shard=16),
                       data_config(vap['root'], meta_csv=t['csv'], max_samples=None),
                       encoders=encoders('cogvideox'), progress=False)
  assert summary['records'] == 8 and summary['failed'] == 1  # only the bad target is skipped
  source = LatentSource(out)
  records = {str(source[i]['path']): source[i] for i in range(len(source))}
  for path in t['only_bad']:
    [ref] = [str(p) for p, m in zip(records[path]['ref_paths'], records[path]['ref_mask']) if m]
    assert ref in t['zoom'] and ref != path
    assert str(records[path]['ref_captions'][0]) == ref  # its own caption is its path
  [manifest] = [json.loads(f.read_text()) for f in out.glob('shard-*.json')]
  bad = str(vap['root'] / t['bad'])
  assert sorted(r['index'] for r in manifest['replaced']) == sorted(
      int(r['index']) for p, r in records.items() if p in t['only_bad'])
  assert {r['path'] for r in manifest['replaced']} == {bad}
