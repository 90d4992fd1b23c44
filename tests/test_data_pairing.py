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
  strict = dict(strict=True)
  rows = [good, dict(good, video_paths='b.mp4', ref_video_paths='["a.mp4"')]
  with pytest.raises(vap_data.SchemaError, match=r"vap_data.csv: line 3, column "
                     r"'ref_video_paths': not JSON"):
    vap_data.read_vap_csv(_write(tmp_path, rows), **strict)
  rows = [good, dict(good, video_paths='b.mp4', ref_video_paths='{"a": 1}')]
  with pytest.raises(vap_data.SchemaError, match='line 3.*JSON list of paths'):
    vap_data.read_vap_csv(_write(tmp_path, rows), **strict)
  rows = [good, dict(good, video_paths='b.mp4', reference_alignment_score='high')]
  with pytest.raises(vap_data.SchemaError, match="line 3, column 'reference_alignment_score': "
                     "expected a number: 'high'"):
    vap_data.read_vap_csv(_write(tmp_path, rows), **strict)
  with pytest.raises(vap_data.SchemaError, match="line 3, column 'video_paths': duplicate of "
                     "line 2"):
    vap_data.read_vap_csv(_write(tmp_path, [good, good]), **strict)
  with pytest.raises(vap_data.SchemaError, match=r"missing column\(s\) \['kind'\]"):
    vap_data.read_vap_csv(_write(tmp_path, [{k: v for k, v in good.items() if k != 'kind'}]))
  with pytest.raises(vap_data.SchemaError, match='file not found'):
    vap_data.read_vap_csv(tmp_path / 'nope.csv')
  bench = [dict(video_paths='a.mp4', ref_video_path='', tar_video_caption='t',
                ref_video_caption='r')]
  with pytest.raises(vap_data.SchemaError, match="benchmark.csv: line 2, column "
                     "'ref_video_path': empty"):
    vap_data.read_benchmark_csv(_write(tmp_path, bench, 'benchmark.csv'), **strict)
  (tmp_path / 'latin1.csv').write_bytes(','.join(vap_data.VAP_COLUMNS).encode() +
                                        b'\na.mp4,[],caf\xe9,k,train,5\n')
  with pytest.raises(vap_data.SchemaError, match=r'latin1.csv: line 2: not UTF-8 text'):
    vap_data.read_vap_csv(tmp_path / 'latin1.csv')
  ok = vap_data.read_vap_csv(_write(tmp_path, [good]))
  assert ok[0]['ref_video_paths'] == ['b.mp4'] and ok[0]['reference_alignment_score'] == 5.0
  assert json.loads(good['ref_video_paths']) == ok[0]['ref_video_paths']


def test_excel_csv_utf8_byte_order_mark_is_read(tmp_path):
  """Excel's "CSV UTF-8" starts with EF BB BF (the table of issue 20)."""
  (tmp_path / 'b.csv').write_bytes(
      b'\xef\xbb\xbfvideo_paths,ref_video_paths,tar_video_caption,kind,split,'
      b'reference_alignment_score\na.mp4,[],x,k,train,50\n')
  rows = vap_data.read_vap_csv(tmp_path / 'b.csv')
  assert [(r['video_paths'], r['reference_alignment_score'], r['_line']) for r in rows] == [
      ('a.mp4', 50.0, 2)]
  (tmp_path / 'bench.csv').write_bytes(
      b'\xef\xbb\xbfvideo_paths,ref_video_path,tar_video_caption,ref_video_caption\n'
      b'a.mp4,b.mp4,t,r\n')
  assert vap_data.read_benchmark_csv(tmp_path / 'bench.csv')[0]['video_paths'] == 'a.mp4'


BAD_TABLE = ','.join(vap_data.VAP_COLUMNS + ('_valid',)) + """
a.mp4,"[""b.mp4""]",fine,k,train,50,1
b.mp4,"[""a.mp4""]","a caption
over two lines",k,train,,1
c.mp4,"[""a.mp4""]",no valid flag,k,train,40,

a.mp4,"[""c.mp4""]",a again,k,train,60,1
d.mp4,"[""a.mp4""]",NaN score,k,train,nan,1
e.mp4,"[""a.mp4""]",fine,k,train,30,1
f.mp4,[],one cell too many,k,train,3,1,extra
"""


def test_bad_rows_are_dropped_counted_and_listed(tmp_path, caplog):
  """Blank score or _valid, NaN, a repeated path, a wrong cell count: each row is dropped and
  listed with its first line (the multi-line row starts on line 3); strict refuses."""
  path = tmp_path / 'vap_data.csv'
  path.write_text(BAD_TABLE)
  with caplog.at_level('WARNING', logger='vap_jax.data.vap_data'):
    rows, dropped = vap_data.read_vap_table(path, max_bad_row_fraction=1.0)
  assert [(r['video_paths'], r['_line']) for r in rows] == [('a.mp4', 2), ('e.mp4', 9)]
  assert rows[0]['tar_video_caption'] == 'fine'  # the first a.mp4 is kept, the repeat dropped
  assert [(d['line'], d['column'], d['video_paths']) for d in dropped] == [
      (3, 'reference_alignment_score', 'b.mp4'), (5, '_valid', 'c.mp4'),
      (7, 'video_paths', 'a.mp4'), (8, 'reference_alignment_score', 'd.mp4'),
      (10, None, 'f.mp4')]
  assert dropped[2]['reason'] == "duplicate of line 2: 'a.mp4'"
  assert dropped[4]['reason'] == '8 cells, the header has 7'
  log = caplog.text
  assert 'vap_data.csv: dropped 5 of 7 rows' in log
  assert "line 3, column 'reference_alignment_score': expected a number: empty" in log
  assert "line 8, column 'reference_alignment_score': expected a number: NaN" in log
  with pytest.raises(vap_data.SchemaError, match=r"vap_data.csv: line 3, column "
                     r"'reference_alignment_score': expected a number: empty \(strict: 5 of 7 "):
    vap_data.read_vap_csv(path, strict=True)
  with pytest.raises(vap_data.SchemaError, match=r'vap_data.csv: 5 of 7 rows are bad, above '
                     r'max_bad_row_fraction 50.0%; the first: line 3'):
    vap_data.read_vap_csv(path, max_bad_row_fraction=0.5)
  # Dropped rows are gone for pairing too: refs to them are pruned like low-score rows.
  table = build_pair_table(rows, PairingConfig(truncate_multiple=1, alignment_score_threshold=0))
  assert {r['video_paths']: r['ref_video_paths'] for r in table.rows} == {
      'a.mp4': ['e.mp4'], 'e.mp4': ['a.mp4']}
