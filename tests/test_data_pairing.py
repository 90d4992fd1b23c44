"""Schema validation and the official pairing rules (VAP_SPEC §5.4) on the fixture tables."""
import json
from dataclasses import replace

import numpy as np
import pytest

from fixtures_vap_data import make_vap_data, write_csv
from vap_jax.data import vap_data
from vap_jax.data.vap_data import PairingConfig, build_pair_table, sample_pair


@pytest.fixture(scope='module')
def vap_root(tmp_path_factory):
  return make_vap_data(tmp_path_factory.mktemp('vap'))['root']


def synthetic_rows(n_kinds=5, per_kind=40, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for k in range(n_kinds):
    paths = [f'v/{k}/{i}.mp4' for i in range(per_kind)]
    for i, p in enumerate(paths):
      refs = [q for q in paths if q != p][:int(rng.integers(1, 6))]
      out.append(dict(video_paths=p, ref_video_paths=refs, kind=f'k{k}',
                      tar_video_caption=f'  cap {p}  ', split='train' if i % 10 else 'test',
                      reference_alignment_score=float(rng.uniform(0, 100)),
                      _valid=0.0 if i == 7 else 1.0))
  return out


def test_threshold_same_kind_and_substitution():
  rows = synthetic_rows()
  cfg = PairingConfig(alignment_score_threshold=40, truncate_multiple=1)
  table = build_pair_table(rows, cfg)
  by_path = {r['video_paths']: r for r in rows}
  alive = {r['video_paths'] for r in table.rows}
  expected = {r['video_paths'] for r in rows if r['split'] == 'train' and r['_valid'] > 0
              and r['reference_alignment_score'] > 40}
  assert alive <= expected and len(expected - alive) == 0  # every kind has survivors
  substituted = 0
  for r in table.rows:
    assert r['reference_alignment_score'] > 40 and r['_valid'] > 0 and r['split'] == 'train'
    assert r['ref_video_paths'] and r['video_paths'] not in r['ref_video_paths']
    assert all(p in alive and by_path[p]['kind'] == r['kind'] for p in r['ref_video_paths'])
    original = [p for p in by_path[r['video_paths']]['ref_video_paths'] if p in alive]
    if original:
      assert r['ref_video_paths'] == original  # pruned, order kept
    else:
      substituted += 1
      assert len(r['ref_video_paths']) == 1
  assert substituted > 10
  again = build_pair_table(rows, cfg)
  assert again.rows == table.rows  # substitution is seeded
  assert build_pair_table(rows, replace(cfg, seed=1)).rows != table.rows
  # the official row order: pandas df.sample(frac=1, random_state=42) == RandomState(42).perm
  train = [r for r in rows if r['split'] == 'train']
  order = [train[i]['video_paths'] for i in np.random.RandomState(42).permutation(len(train))]
  assert [r['video_paths'] for r in table.rows] == [p for p in order if p in alive]
  assert len(build_pair_table(rows, replace(cfg, truncate_multiple=48)).rows) % 48 == 0


def test_no_survivor_in_kind_drops_row():
  rows = synthetic_rows(n_kinds=1, per_kind=3)
  for r in rows:
    r.update(split='train', _valid=1.0, reference_alignment_score=0.0)
  rows[0]['reference_alignment_score'] = 50
  with pytest.raises(ValueError, match='no .train. rows left'):
    build_pair_table(rows, PairingConfig(alignment_score_threshold=10, truncate_multiple=1))


def test_sample_statistics_and_determinism():
  rows = synthetic_rows()
  cfg = PairingConfig(alignment_score_threshold=0, truncate_multiple=1, sample_ref_videos_num=3,
                      mask_ref_ratio=0.3, mask_caption_ratio=0.2)
  table = build_pair_table(rows, cfg)
  captions = {r['video_paths']: r['tar_video_caption'] for r in rows}
  n, masked, extra, extra_kept = 4000, 0, 0, 0
  for i in range(n):
    row = table.rows[i % len(table.rows)]
    s = sample_pair(table, row, cfg, i)
    assert s == sample_pair(table, row, cfg, i)
    assert 1 <= len(s['refs']) <= min(3, len(row['ref_video_paths']))
    assert len(set(s['refs'])) == len(s['refs']) and set(s['refs']) <= set(row['ref_video_paths'])
    assert all(k == row['kind'] for k in s['kinds'])
    if s['caption_masked']:
      masked += 1
      assert s['caption'] == '' and s['ref_captions'] == [''] * len(s['refs'])
    else:
      assert s['ref_captions'] == [captions[r].strip() for r in s['refs']]
      assert s['caption'] == row['tar_video_caption']
    possible = min(3, len(row['ref_video_paths'])) - 1
    extra += possible
    extra_kept += len(s['refs']) - 1
  sigma = np.sqrt(0.2 * 0.8 / n)
  assert abs(masked / n - 0.2) < 4 * sigma, masked / n
  sigma = np.sqrt(0.3 * 0.7 / extra)
  assert abs(1 - extra_kept / extra - 0.3) < 4 * sigma, 1 - extra_kept / extra
  different = sum(sample_pair(table, table.rows[0], cfg, i)['refs']
                  != sample_pair(table, table.rows[0], cfg, i + 1)['refs'] for i in range(50))
  assert different > 5
  other_seed = replace(cfg, seed=7)
  assert any(sample_pair(table, table.rows[0], cfg, i) != sample_pair(table, table.rows[0],
                                                                       other_seed, i)
             for i in range(20))


def test_llm_prefixes():
  assert vap_data.remove_llm_prefix('The video shows a cat.') == 'a cat.'
  assert vap_data.remove_llm_prefix('In this video, a dog runs') == 'a dog runs'
  assert vap_data.remove_llm_prefix('Caption: x') == 'x'
  assert vap_data.remove_llm_prefix('A video shows') == 'A video shows'
  assert len(vap_data.LLM_CAPTION_PREFIXES) == 5 + 9 * 7
  table = build_pair_table(synthetic_rows(), PairingConfig(truncate_multiple=1))
  row = dict(table.rows[0], tar_video_caption='This clip depicts  snow')
  assert sample_pair(table, row, PairingConfig(mask_caption_ratio=0), 0)['caption'] == 'snow'


def test_fixture_tables(vap_root):
  rows = vap_data.read_vap_csv(vap_root / 'vap_data.csv')
  assert len(rows) == 37 and {r['kind'] for r in rows} >= {'zoom', 'melt', 'broken'}
  assert all(isinstance(r['ref_video_paths'], list) for r in rows)
  bench = vap_data.read_benchmark_csv(vap_root / 'benchmark' / 'benchmark.csv')
  assert len(bench) == 4 and all((vap_root / b['ref_video_path']).exists() for b in bench)
  table = build_pair_table(rows, PairingConfig(alignment_score_threshold=0, truncate_multiple=1))
  assert len(table.rows) == 33  # 4 kinds x 7 train rows + 5 broken rows


def _write(tmp_path, rows, name='vap_data.csv'):
  write_csv(tmp_path / name, rows)
  return tmp_path / name


def test_schema_errors_name_file_line_column(tmp_path):
  good = dict(video_paths='a.mp4', ref_video_paths='["b.mp4"]', tar_video_caption='c',
              kind='k', split='train', reference_alignment_score='5')
  rows = [good, dict(good, video_paths='b.mp4', ref_video_paths='["a.mp4"')]
  with pytest.raises(vap_data.SchemaError, match=r"vap_data.csv: line 3, column "
                     r"'ref_video_paths': not JSON"):
    vap_data.read_vap_csv(_write(tmp_path, rows))
  rows = [good, dict(good, video_paths='b.mp4', ref_video_paths='{"a": 1}')]
  with pytest.raises(vap_data.SchemaError, match='line 3.*JSON list of paths'):
    vap_data.read_vap_csv(_write(tmp_path, rows))
  rows = [good, dict(good, video_paths='b.mp4', reference_alignment_score='high')]
  with pytest.raises(vap_data.SchemaError, match="line 3, column 'reference_alignment_score': "
                     "not a number: 'high'"):
    vap_data.read_vap_csv(_write(tmp_path, rows))
  with pytest.raises(vap_data.SchemaError, match="line 3, column 'video_paths': duplicate of "
                     "line 2"):
    vap_data.read_vap_csv(_write(tmp_path, [good, good]))
  with pytest.raises(vap_data.SchemaError, match=r"missing column\(s\) \['kind'\]"):
    vap_data.read_vap_csv(_write(tmp_path, [{k: v for k, v in good.items() if k != 'kind'}]))
  with pytest.raises(vap_data.SchemaError, match='file not found'):
    vap_data.read_vap_csv(tmp_path / 'nope.csv')
  bench = [dict(video_paths='a.mp4', ref_video_path='', tar_video_caption='t',
                ref_video_caption='r')]
  with pytest.raises(vap_data.SchemaError, match="benchmark.csv: line 2, column "
                     "'ref_video_path': empty"):
    vap_data.read_benchmark_csv(_write(tmp_path, bench, 'benchmark.csv'))
  ok = vap_data.read_vap_csv(_write(tmp_path, [good]))
  assert ok[0]['ref_video_paths'] == ['b.mp4'] and ok[0]['reference_alignment_score'] == 5.0
  assert json.loads(good['ref_video_paths']) == ok[0]['ref_video_paths']
