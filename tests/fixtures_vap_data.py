"""Writes a tiny VAP-Data tree at test time (nothing binary is committed).

  root/vfx_videos/<kind>/<kind>_<i>.mp4   (plus one .webm, one .mov, one .gif)
  root/vap_data.csv                        (all schema columns, _valid included)
  root/benchmark/benchmark.csv

Videos are 4 kinds x 8 clips, 12-40 frames at 8/16/24/30 fps, 24x32 to 40x56 pixels; every
frame has a distinct flat colour ramp so frame indices are visible in the pixels. Corrupt rows,
all on kind 'broken': random bytes, an empty file, a missing file, a truncated mp4 and a clip too
short for `FRAMES` at 16 fps.

`make_issue20_table` adds a second table (`issue20.csv`) over the same tree for the data
integrity cases: an mp4 cut at 75% of its bytes that still decodes 147 of its 200 frames (index
at the front, as `+faststart` writes it), and bad rows (blank score, blank `_valid`, a repeated
path) among good ones.
"""
import json
import os
from pathlib import Path

import av
import numpy as np

KINDS = ('zoom', 'style_ink', 'melt', 'orbit')
PER_KIND = 8
FRAMES = 9            # the bucket the tests use: [[FRAMES, 24, 32]]
BUCKETS = [[FRAMES, 24, 32]]
CORRUPT = ('broken/garbage.mp4', 'broken/empty.mp4', 'broken/missing.mp4',
           'broken/truncated.mp4', 'broken/short.mp4')


def frame_content(i: int, h: int, w: int, seed: int) -> np.ndarray:
  """Frame i: a smooth ramp whose level encodes i (survives H.264 well)."""
  y, x = np.mgrid[:h, :w]
  base = (i * 9 + seed * 17) % 200
  img = np.stack([base + 40 * x / w, base + 40 * y / h, np.full((h, w), 255 - base)], -1)
  return np.clip(img, 0, 255).astype(np.uint8)


def encode(path: Path, frames: np.ndarray, fps: int, codec='libx264', pix_fmt='yuv420p',
           crf: int = 10, options: dict | None = None):
  path.parent.mkdir(parents=True, exist_ok=True)
  with av.open(str(path), 'w', options=options or {}) as out:
    s = out.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
    if codec == 'libx264':  # without mbtree x264 writes the same bytes on every run and machine
      s.options = {'crf': str(crf), 'x264-params': 'no-mbtree=1'}
    for f in frames:
      out.mux(s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')))
    out.mux(s.encode())


def make_vap_data(root, seed: int = 0) -> dict:
  """Writes the tree; returns {'root', 'good': [rel paths], 'corrupt': [rel paths]}."""
  root = Path(root)
  rng = np.random.default_rng(seed)
  rows, good = [], []
  sizes = [(24, 32), (32, 48), (40, 56), (36, 36)]
  fpss = [16, 24, 30, 8]
  for k, kind in enumerate(KINDS):
    paths = []
    for i in range(PER_KIND):
      ext, codec, pix = '.mp4', 'libx264', 'yuv420p'
      if kind == 'orbit' and i == 1:
        ext, codec = '.webm', 'libvpx-vp9'
      elif kind == 'orbit' and i == 2:
        ext = '.mov'
      elif kind == 'orbit' and i == 3:
        ext, codec, pix = '.gif', 'gif', 'rgb8'
      rel = f'vfx_videos/{kind}/{kind}_{i}{ext}'
      fps = fpss[(i + k) % 4]
      h, w = sizes[(i + 2 * k) % 4]
      n = int(rng.integers(12, 41))
      if fps == 8:
        n = max(n, 20)  # 8 fps is upsampled to 16: n*2 frames
      elif fps != 16:
        n = max(n, int(np.ceil(FRAMES * fps / 16)) + 2)
      encode(root / rel, np.stack([frame_content(j, h, w, i + k) for j in range(n)]), fps,
             codec, pix)
      paths.append(rel)
    for i, rel in enumerate(paths):
      rows.append(dict(video_paths=rel, kind=kind,
                       ref_video_paths=json.dumps([p for p in paths if p != rel][:4]),
                       tar_video_caption=('The video shows ' if i % 3 == 0 else '')
                       + f'a {kind} effect number {i}. ',
                       split='test' if i == PER_KIND - 1 else 'train',
                       reference_alignment_score=float(rng.uniform(0, 100)) if i else 3.0,
                       _valid=1))
    good += [r['video_paths'] for r in rows[-PER_KIND:] if r['split'] == 'train']
  broken = root / 'vfx_videos' / 'broken'
  broken.mkdir(parents=True, exist_ok=True)
  (broken / 'garbage.mp4').write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
  (broken / 'empty.mp4').write_bytes(b'')
  encode(broken / 'full.mp4', np.stack([frame_content(j, 32, 48, 5) for j in range(30)]), 16)
  data = (broken / 'full.mp4').read_bytes()
  (broken / 'truncated.mp4').write_bytes(data[:len(data) // 3])
  os.remove(broken / 'full.mp4')
  encode(broken / 'short.mp4', np.stack([frame_content(j, 32, 48, 6) for j in range(5)]), 16)
  for rel in CORRUPT:
    rows.append(dict(video_paths=f'vfx_videos/{rel}', kind='broken',
                     ref_video_paths=json.dumps([f'vfx_videos/{r}' for r in CORRUPT
                                                 if r != rel]),
                     tar_video_caption='broken', split='train',
                     reference_alignment_score=50.0, _valid=1))
  write_csv(root / 'vap_data.csv', rows)
  bench = [dict(video_paths=r['video_paths'], ref_video_path=json.loads(r['ref_video_paths'])[0],
                tar_video_caption=r['tar_video_caption'], ref_video_caption='ref caption')
           for r in rows if r['split'] == 'test']
  write_csv(root / 'benchmark' / 'benchmark.csv', bench)
  return {'root': root, 'good': good, 'corrupt': [f'vfx_videos/{r}' for r in CORRUPT]}


def write_csv(path: Path, rows):
  import csv
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def write_cut_mp4(path: Path, frames: int = 200, fraction: float = 0.75, seed: int = 0) -> Path:
  """The file of issue 20: H.264 noise, 64x48 at 24 fps, index first, cut at `fraction` of its
  bytes (frame-threaded FFmpeg decodes 147 frames of it without an error)."""
  rng = np.random.default_rng(seed)
  encode(path, rng.integers(0, 255, (frames, 48, 64, 3), np.uint8), 24,
         options={'movflags': '+faststart'})
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * fraction)])
  return path


def write_trimmed_mp4(path: Path, frames: int = 30, skip: int = 5) -> Path:
  """An intact mp4 whose header over-reports its frames: stream-copied with the first `skip`
  frames before time zero (what `ffmpeg -ss` with `-c copy` makes), so its edit list hides them.
  Frame i is a flat grey of level 8 * i; the file decodes frames skip..frames-1."""
  src = path.with_name(path.stem + '_src.mp4')
  encode(src, np.stack([np.full((48, 64, 3), 8 * i, np.uint8) for i in range(frames)]), 24)
  with av.open(str(src)) as inp, av.open(str(path), 'w') as out:
    stream = out.add_stream_from_template(inp.streams.video[0])
    for packet in inp.demux(inp.streams.video[0]):
      if packet.dts is None:
        continue  # the flush packet
      packet.pts -= skip * packet.duration
      packet.dts -= skip * packet.duration
      packet.stream = stream
      out.mux(packet)
  os.remove(src)
  return path


def make_issue20_table(root) -> dict:
  """`issue20.csv` next to `vap_data.csv` (which `make_vap_data` wrote first): the 8 `zoom`
  clips as good train rows, the cut mp4 as a ninth, and three bad rows (one spans two lines).
  Returns {'csv', 'cut', 'good', 'dropped': [(first line, column)]}."""
  root = Path(root)
  cut = 'vfx_videos/broken/cut.mp4'
  write_cut_mp4(root / cut)
  zoom = [f'vfx_videos/zoom/zoom_{i}.mp4' for i in range(PER_KIND)]

  def row(path, refs=zoom[:1], **kw):
    return dict(dict(video_paths=path, ref_video_paths=json.dumps(refs), tar_video_caption='a zoom',
                     kind='zoom', split='train', reference_alignment_score=50, _valid=1), **kw)

  rows = [row(p, [q for q in zoom if q != p][:4]) for p in zoom]
  rows.insert(3, row(cut))
  rows.insert(5, row('vfx_videos/zoom/blank_score.mp4', tar_video_caption='two\nlines',
                     reference_alignment_score=''))
  rows.insert(7, row('vfx_videos/zoom/blank_valid.mp4', _valid=''))
  rows.append(dict(rows[0], tar_video_caption='the same path again'))
  write_csv(root / 'issue20.csv', rows)
  # header = line 1, rows from line 2; the blank-score row spans lines 7-8
  return {'csv': 'issue20.csv', 'cut': cut, 'good': zoom,
          'dropped': [(7, 'reference_alignment_score'), (10, '_valid'), (14, 'video_paths')]}


def make_bad_reference_table(root) -> dict:
  """`bad_ref.csv` (issue 19): the 8 `zoom` clips as train rows, each captioned with its own
  path, plus the random-bytes file as a ninth `zoom` row. The first four rows name only that
  file as their reference, the others their neighbours. Returns {'csv', 'bad', 'zoom',
  'only_bad': the four rows whose only reference is bad}."""
  root = Path(root)
  bad = 'vfx_videos/broken/garbage.mp4'
  zoom = [f'vfx_videos/zoom/zoom_{i}.mp4' for i in range(PER_KIND)]

  def row(path, refs):
    return dict(video_paths=path, ref_video_paths=json.dumps(refs), tar_video_caption=path,
                kind='zoom', split='train', reference_alignment_score=50, _valid=1)

  rows = [row(p, [bad] if i < 4 else [q for q in zoom if q != p][:2]) for i, p in enumerate(zoom)]
  rows.append(row(bad, zoom[:1]))
  write_csv(root / 'bad_ref.csv', rows)
  return {'csv': 'bad_ref.csv', 'bad': bad, 'zoom': zoom, 'only_bad': zoom[:4]}
