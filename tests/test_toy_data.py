"""VAP-Toy (vap_jax.data.toy): deterministic renderings, conditions that start alike and end far
apart (also after mp4), and a dataset that the VAP-Data readers and pairing take unchanged."""
import json

import numpy as np
import pytest

from vap_jax.data import toy, video_io
from vap_jax.data.vap_data import PairingConfig, build_pair_table, read_benchmark_csv, \
  read_vap_csv, remove_llm_prefix, sample_pair

# The six subjects whose conditions are closest to each other (measured over all 24).
SOME = [toy.SUBJECTS[i] for i in (14, 1, 20, 2, 7, 3)]


def test_render_is_pure_and_shaped():
  s, c = toy.SUBJECTS[3], toy.condition_by_kind('concept_melt')
  a = toy.render(s, c)
  assert a.dtype == np.uint8 and a.shape == (17, 64, 64, 3)
  assert np.array_equal(a, toy.render(s, c))
  assert toy.render(s, c, frames=5, size=32).shape == (5, 32, 32, 3)
  assert len(toy.CONDITIONS) >= 12 and len(set(toy.KINDS)) == len(toy.KINDS)
  assert {c.category for c in toy.CONDITIONS} == {'motion', 'camera', 'style', 'concept'}
  assert len({s.name for s in toy.SUBJECTS}) == len(toy.SUBJECTS)
  for s in toy.SUBJECTS:
    assert toy.subject_by_name(s.name) == s
  with pytest.raises(ValueError, match='not a toy subject'):
    toy.subject_by_name('red_flat_blob_on_navy')


def test_conditions_start_alike_and_end_apart():
  for s in SOME:
    clips = toy.renders(s).astype(np.float32)
    assert all(np.array_equal(clip[0], toy.first_frame(s)) for clip in clips)
    whole = np.abs(clips[:, None] - clips[None]).mean(axis=(2, 3, 4, 5))
    last = np.abs(clips[:, None, -1] - clips[None, :, -1]).mean(axis=(2, 3, 4))
    np.fill_diagonal(whole, np.inf)
    np.fill_diagonal(last, np.inf)
    # measured over all 24 subjects: whole clips >= 9.7 levels apart, last frames >= 9.2
    assert whole.min() > 8 and last.min() > 7.5, s.name


def test_nearest_rendering_survives_mp4(tmp_path):
  for s in SOME[:2]:
    for c in toy.CONDITIONS:
      video_io.write_mp4(tmp_path / 'v.mp4', toy.render(s, c), fps=toy.FPS)
      decoded, fps = video_io.read_video(tmp_path / 'v.mp4')
      best, dist = toy.nearest_condition(decoded, s)
      own = dist[toy.KINDS.index(c.kind)]
      assert best == c and fps == 16
      assert np.delete(dist, toy.KINDS.index(c.kind)).min() > 2 * own, (s.name, c.kind)
    # [-1, 1] floats, as load_clip gives them, classify the same way
    assert toy.nearest_condition(video_io.to_unit_range(decoded), s)[0] == c


def test_captions_are_stable_and_strip_to_the_description():
  s, c = toy.SUBJECTS[0], toy.CONDITIONS[0]
  assert toy.caption(s, c) == toy.caption(s, c)
  texts = [toy.caption(s, c) for s in toy.SUBJECTS for c in toy.CONDITIONS]
  starts = [t.startswith('The video shows') + 2 * t.startswith('In this video') for t in texts]
  assert set(starts) == {0, 1, 2}  # every template in use
  named = 0
  for s in toy.SUBJECTS[:4]:
    for c in toy.CONDITIONS:
      text = remove_llm_prefix(toy.caption(s, c)).lower()
      assert text.endswith((f'{s.description} {c.phrase}.', f'{s.description}.'))
      named += c.phrase in text
  assert 0.3 < named / (4 * len(toy.CONDITIONS)) < 0.7  # about half name the condition
  assert toy.subject_caption(s).lower() == f'{s.description}.'


def test_default_split_keeps_every_part_and_a_multiple_of_48():
  held, pairs = toy.split_plan()
  train = [s for s in toy.SUBJECTS if s not in held]
  assert len(held) == 4 and len(pairs) == 32
  for attr in ('shape', 'colour', 'texture', 'background'):
    assert {getattr(s, attr) for s in train} == {getattr(s, attr) for s in toy.SUBJECTS}
  assert len(train) * len(toy.CONDITIONS) - len(pairs) == 6 * 48
  assert {k for _, k in pairs} == set(toy.KINDS)  # two per condition
  assert toy.split_plan() == (held, pairs) and toy.split_plan(seed=1) != (held, pairs)


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  """A 12-subject VAP-Toy (2 subjects and 8 pairs held out) at the default 17 x 64 x 64."""
  root = tmp_path_factory.mktemp('toy')
  summary = toy.write_toy_dataset(root, subjects=toy.SUBJECTS[:12], held_out_subjects=2,
                                  held_out_pairs=8)
  return root, summary


def test_dataset_passes_the_readers(small):
  root, summary = small
  rows = read_vap_csv(root / 'vap_data.csv', strict=True)
  bench = read_benchmark_csv(root / 'benchmark' / 'benchmark.csv', strict=True)
  assert len(rows) == summary['videos'] == 12 * len(toy.CONDITIONS)
  assert json.loads((root / 'toy.json').read_text())['held_out_pairs'] == summary[
      'held_out_pairs']
  train = {r['video_paths'] for r in rows if r['split'] == 'train'}
  assert len(train) == summary['train_rows'] == 10 * len(toy.CONDITIONS) - 8
  held = set(summary['held_out_subjects'])
  assert len(held) == 2 and not any(r['subject'] in held for r in rows if r['split'] == 'train')
  for r in rows:
    assert (root / r['video_paths']).is_file() and r['_valid'] == 1
    assert r['video_paths'] == f'videos/{r["kind"]}/{r["subject"]}.mp4'
    assert r['ref_video_paths'] and all(p in train for p in r['ref_video_paths'])
    assert all(p.startswith(f'videos/{r["kind"]}/') and not p.endswith(f'/{r["subject"]}.mp4')
               for p in r['ref_video_paths'])
  test = {r['video_paths'] for r in rows if r['split'] == 'test'}
  assert {b['video_paths'] for b in bench} == test
  for b in bench:
    assert b['ref_video_path'] in train and b['subject'] != b['ref_subject']
    assert b['ref_video_path'].startswith(f'videos/{b["kind"]}/')
    assert (root / b['image_path']).is_file()
  image, _ = video_io.read_video(root / bench[0]['image_path'])
  assert np.array_equal(image[0], toy.first_frame(toy.subject_by_name(bench[0]['subject'])))


def test_pairs_are_same_condition_other_subject(small):
  root, summary = small
  rows = read_vap_csv(root / 'vap_data.csv', strict=True)
  by_path = {r['video_paths']: r for r in rows}
  cfg = PairingConfig(truncate_multiple=1, sample_ref_videos_num=3)
  table = build_pair_table(rows, cfg)
  assert len(table.rows) == summary['train_rows']
  for i, row in enumerate(table.rows):
    pair = sample_pair(table, row, cfg, i)
    assert len(pair['refs']) == 3 and set(pair['kinds']) == {row['kind']}
    assert all(by_path[p]['subject'] != row['subject'] and by_path[p]['split'] == 'train'
               for p in pair['refs'])
    assert not pair['caption'].startswith(('The video shows', 'In this video'))


def test_load_clip_gives_the_frames_in_order(small):
  root, _ = small
  s, c = toy.SUBJECTS[0], toy.condition_by_kind('motion_right')
  clip = video_io.load_clip(root / toy.video_path(s, c), num_frames=17, size=(64, 64))
  truth = toy.render(s, c).astype(np.float32)
  got = video_io.from_unit_range(clip).astype(np.float32)
  assert clip.shape == (17, 64, 64, 3)
  dist = np.abs(got[:, None] - truth[None]).mean(axis=(2, 3, 4))
  assert np.array_equal(dist.argmin(axis=1), np.arange(17)) and dist.diagonal().max() < 6


def test_cli_writes_and_reports(tmp_path, capsys):
  toy.main(['--out', str(tmp_path), '--frames', '5', '--size', '16'])
  line = capsys.readouterr().out.strip()
  assert '384 videos of 5x16x16' in line and '288 train rows' in line and '\n' not in line
  assert len(read_vap_csv(tmp_path / 'vap_data.csv', strict=True)) == 384
  with pytest.raises(ValueError, match='even size'):
    toy.write_toy_dataset(tmp_path, size=33)
