"""Grain pipeline: exact epochs, skipped/counted failures, the cap, and exact resumption.

Multiprocess cases are few (a grain worker starts in ~2.5 s): one save/restore with 2 worker
processes and one two-process `jax.distributed` run (`data_shard_worker.py`).
"""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import config_file
from fixtures_vap_data import (BUCKETS, make_bad_reference_table, make_issue20_table,
                               make_vap_data, write_csv)
from vap_jax.data import DataFailureError, SchemaError, make_loader, video_io


@pytest.fixture(scope='module')
def vap(tmp_path_factory):
  return make_vap_data(tmp_path_factory.mktemp('vap'))


def config(root, **kw):
  cfg = config_file('vap_data.py').data
  cfg.update(root=str(root), buckets=BUCKETS, truncate_multiple=1, workers=0, batch_size=2,
             num_epochs=1, sample_ref_videos_num=2, mask_ref_ratio=0.5, mask_caption_ratio=0.3,
             max_failure_fraction=0.5, min_samples_before_cap=10)
  cfg.update(kw)
  return cfg


def test_epoch_exact_and_corrupt_files_skipped_and_counted(vap):
  loader = make_loader(config(vap['root']), shard=(0, 1))
  batches = list(loader)
  b = batches[0]
  assert b['video'].shape == (2, 9, 24, 32, 3) and b['video'].dtype == np.float32
  assert b['ref_videos'].shape == (2, 2, 9, 24, 32, 3) and b['ref_mask'].shape == (2, 2)
  assert np.all(b['ref_mask'][:, 0])
  assert np.all(b['ref_videos'][~b['ref_mask']] == 0)
  want = video_io.load_clip(vap['root'] / str(b['path'][0]), num_frames=9, size=(24, 32))
  np.testing.assert_array_equal(b['video'][0], want)  # the recipe checked in test_data_video_io
  paths = [p for b in batches for p in b['path']]
  good = [r['video_paths'] for r in loader.table.rows if 'broken' not in r['video_paths']]
  assert sorted(paths) == sorted(good)  # every decodable row exactly once
  failures = loader.failures
  assert failures.seen == len(loader.table.rows) == 33 and failures.failed == 5
  assert sorted(Path(p).name for p in failures.by_path) == sorted(
      Path(p).name for p in vap['corrupt'])
  assert 'too short: 5 frames' in failures.reasons[str(vap['root'] / vap['corrupt'][-1])]
  indices = sorted(int(i) for b in batches for i in b['index'])
  assert len(set(indices)) == len(indices) and max(indices) < 33


def test_failure_cap_raises_with_worst_offenders(vap):
  loader = make_loader(config(vap['root'], max_failure_fraction=0.05, min_samples_before_cap=3,
                              batch_size=1), shard=(0, 1))
  with pytest.raises(DataFailureError) as e:
    for _ in loader:
      pass
  msg = str(e.value)
  assert 'samples failed to load' in msg and 'max_failure_fraction 5.0%' in msg
  assert 'Worst offenders' in msg and 'vfx_videos/broken/' in msg


def test_a_short_run_that_loads_nothing_fails(vap):
  """Issue 19: one epoch over data whose videos are all corrupt ends with an error, not with
  zero batches, though it is far shorter than min_samples_before_cap; so does one that skipped
  more than max_failure_fraction by its end."""
  with open(vap['root'] / 'vap_data.csv', newline='') as f:
    rows = [r for r in csv.DictReader(f) if r['kind'] == 'broken']
  write_csv(vap['root'] / 'all_broken.csv', rows)
  loader = make_loader(config(vap['root'], meta_csv='all_broken.csv', batch_size=1,
                              min_samples_before_cap=100), shard=(0, 1))
  with pytest.raises(DataFailureError, match=r'^5 of 5 samples failed to load \(100.0%\), above '
                     r'max_failure_fraction 50.0%\. Worst offenders: 1x .*broken/') as e:
    next(loader)
  assert '\n' not in str(e.value)
  loader = make_loader(config(vap['root'], max_failure_fraction=0.1, min_samples_before_cap=100),
                       shard=(0, 1))
  with pytest.raises(DataFailureError, match=r'^5 of 33 samples failed to load \(15.2%\), above '
                     r'max_failure_fraction 10.0%'):
    list(loader)


def test_bad_reference_is_replaced_by_another_of_its_kind(vap, caplog):
  """Issue 19: a reference that fails to decode is replaced by another training video of its
  kind (its caption with it), counted, and the sample kept; only its own row (a bad target) is
  skipped. The draws are seeded by the sample, so a second pass replaces identically."""
  t = make_bad_reference_table(vap['root'])
  cfg = config(vap['root'], meta_csv=t['csv'], batch_size=1, sample_ref_videos_num=1,
               mask_ref_ratio=0.0, mask_caption_ratio=0.0)
  passes = []
  for _ in range(2):
    with caplog.at_level('WARNING'):
      loader = make_loader(cfg, shard=(0, 1))
      batches = list(loader)
    passes.append({str(b['path'][0]): str(b['ref_captions'][0][0]) for b in batches})
  samples = passes[0]
  assert passes[1] == samples
  assert sorted(samples) == sorted(t['zoom'])  # 8 of 9 rows: only the bad target is skipped
  bad = str(vap['root'] / t['bad'])
  assert loader.failures.failed == 1 and list(loader.failures.by_path) == [bad]
  assert dict(loader.failures.replaced) == {bad: len(t['only_bad'])}
  for path in t['only_bad']:  # the replacement's own caption (each video is captioned by its path)
    assert samples[path] in t['zoom'] and samples[path] != path
  assert f'replaced reference {bad}' in caplog.text
  assert loader.failures.state()['replaced'] == {bad: 4}


def test_cut_video_skipped_and_bad_rows_dropped(vap, caplog):
  """Issue 20 through the loader: the cut mp4 (which decodes 147 of 200 frames quietly) is a
  skipped and counted sample; the three bad rows are dropped and listed; strict refuses."""
  t = make_issue20_table(vap['root'])
  cfg = config(vap['root'], meta_csv=t['csv'], batch_size=1, sample_ref_videos_num=1,
               max_bad_row_fraction=0.5)
  with caplog.at_level('WARNING'):
    loader = make_loader(cfg, shard=(0, 1))
    paths = [str(b['path'][0]) for b in loader]
  assert sorted(paths) == sorted(t['good'])
  cut = str(vap['root'] / t['cut'])
  assert loader.failures.seen == 9 and loader.failures.failed == 1
  assert list(loader.failures.by_path) == [cut]
  assert loader.failures.reasons[cut].startswith('truncated: ')
  assert [(d['line'], d['column']) for d in loader.dropped_rows] == t['dropped']
  assert 'issue20.csv: dropped 3 of 12 rows' in caplog.text
  assert 'skipping sample' in caplog.text and 'cut.mp4: truncated' in caplog.text
  with pytest.raises(SchemaError, match=r"issue20.csv: line 7, column "
                     r"'reference_alignment_score': expected a number: empty \(strict"):
    make_loader(config(vap['root'], meta_csv=t['csv'], strict_table=True), shard=(0, 1))
  with pytest.raises(SchemaError, match=r'issue20.csv: 3 of 12 rows are bad, above '
                     r'max_bad_row_fraction 5.0%'):
    make_loader(config(vap['root'], meta_csv=t['csv']), shard=(0, 1))


def test_config_errors(vap):
  with pytest.raises(ValueError, match='2 buckets need batch_size 1'):
    make_loader(config(vap['root'], buckets=[[9, 24, 32], [9, 32, 32]]), shard=(0, 1))
  with pytest.raises(ValueError, match="no 'train' rows left"):
    make_loader(config(vap['root'], alignment_score_threshold=1000), shard=(0, 1))


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_save_restore_continues_exactly_with_two_workers(vap, tmp_path):
  cfg = config(vap['root'], workers=2, num_epochs=None)
  loader = make_loader(cfg, shard=(0, 1))
  for _ in range(4):
    next(loader)
  model = {'w': np.arange(6.0).reshape(2, 3), 'step': np.array(4, np.int32)}
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.save(4, args=ocp.args.Composite(model=ocp.args.StandardSave(model),
                                         **loader.save_args()))
    mngr.wait_until_finished()
  expected = [next(loader) for _ in range(20)]  # crosses the epoch boundary (16 per epoch)
  seen, failed = loader.failures.seen, loader.failures.failed

  fresh = make_loader(cfg, shard=(0, 1))
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        model=ocp.args.StandardRestore(model), **fresh.restore_args()))
  np.testing.assert_array_equal(restored['model']['w'], model['w'])
  for want in expected:
    _same(next(fresh), want)
  loader.close()
  fresh.close()
  assert (fresh.failures.seen, fresh.failures.failed) == (seen, failed) and failed >= 5
  epoch2 = [p for b in expected[12:] for p in b['path']]
  assert len(set(epoch2)) == len(epoch2)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_jax_processes_cover_each_epoch_once_and_resume(vap, tmp_path):
  port = _free_port()
  script = Path(__file__).parent / 'data_shard_worker.py'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  env['PYTHONPATH'] = os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent),
                                       env.get('PYTHONPATH', '')])
  procs = [subprocess.Popen([sys.executable, str(script), str(vap['root']), str(tmp_path),
                             str(port), str(i)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  results = [json.loads((tmp_path / f'out_{i}.json').read_text()) for i in range(2)]
  rows = results[0]['rows']
  assert rows == 32  # 33 rows cut to a multiple of 2 processes
  for epoch in ('epoch0', 'epoch1'):
    a, b = results[0][epoch], results[1][epoch]
    assert len(a['positions']) == len(b['positions']) == rows // 2
    assert set(a['positions']).isdisjoint(b['positions'])
    assert sorted(a['positions'] + b['positions']) == list(range(rows))
    assert set(a['paths']).isdisjoint(b['paths'])
  for r in results:
    assert r['resumed_equal'], r
