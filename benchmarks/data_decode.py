"""Decoded clips per second per worker: PyAV decode + official frame recipe (not a test).

  python benchmarks/data_decode.py [--clips 6] [--workers 1,2] [--repeat 1] [--out /tmp/vap_bench]
  python benchmarks/data_decode.py --repeat 8 --against /tmp/old_video_io.py

Writes synthetic H.264 clips in the VAP-Data layout (moving gradients over static noise, x264
crf 23, preset medium: a few Mbit/s like ordinary web video), then times, in this process: the
decode alone (all frames to RGB), and the full clip (decode, 16 fps resampling, 49 frames evenly,
bicubic resize to 480x720, float32); then the Grain pipeline with N worker processes (1 reference
per sample = 2 clips per sample). On a busy host, `--repeat N` times each in-process pass N times
and reports the fastest (and the median).
`--against FILE` instead compares this tree's `video_io` with another version of that file (e.g.
`git show REV:vap_jax/data/video_io.py > /tmp/old_video_io.py`; it imports only av, numpy and
scipy), alternating the two pass by pass on the same clips so that a busy host slows both alike.
"""
import argparse
import functools
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))

from fixtures_vap_data import encode, write_csv  # noqa: E402
from vap_jax.data import video_io  # noqa: E402
from vap_jax.data.pipeline import default_data_config, make_loader  # noqa: E402

CASES = {  # name: (height, width, fps, seconds)
    '480x720@16fps,4s': (480, 720, 16, 4),
    '720x1280@30fps,5s': (720, 1280, 30, 5),
}


def synth(h, w, n, seed):
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:h, :w].astype(np.float32)
  noise = rng.integers(0, 24, (h, w, 3), dtype=np.uint8)
  for i in range(n):
    r = 127 + 100 * np.sin((x + 8 * i) / 40)
    g = 127 + 100 * np.cos((y - 5 * i) / 30)
    b = 127 + 100 * np.sin((x + y + 3 * i) / 50)
    yield np.clip(np.stack([r, g, b], -1), 0, 231).astype(np.uint8) + noise


def make_dataset(root: Path, clips: int):
  rows = []
  for name, (h, w, fps, sec) in CASES.items():
    kind = name.split('@')[0]
    paths = [f'vfx_videos/{kind}/{i}.mp4' for i in range(clips)]
    for i, rel in enumerate(paths):
      if not (root / rel).exists():
        encode(root / rel, np.stack(list(synth(h, w, fps * sec, i))), fps, crf=23)
      rows.append(dict(video_paths=rel, kind=kind,
                       ref_video_paths=json.dumps([p for p in paths if p != rel]),
                       tar_video_caption='a clip', split='train', reference_alignment_score=50))
  write_csv(root / 'vap_data.csv', rows)


def _per_clip(fn, paths, repeat):
  """Seconds per clip of `fn` over `paths`: (fastest, median) of `repeat` passes."""
  times = []
  for _ in range(repeat):
    t = time.perf_counter()
    for p in paths:
      fn(p)
    times.append((time.perf_counter() - t) / len(paths))
  return min(times), float(np.median(times))


def time_in_process(root: Path, clips: int, repeat: int = 1):
  out = {}
  for name, (h, w, fps, sec) in CASES.items():
    paths = [root / f'vfx_videos/{name.split("@")[0]}/{i}.mp4' for i in range(clips)]
    video_io.read_video(paths[0])  # warm caches
    decode, decode_med = _per_clip(video_io.read_video, paths, repeat)
    recipe = lambda p: video_io.load_clip(p, num_frames=49, size=(480, 720))  # noqa: E731
    assert recipe(paths[0]).shape == (49, 480, 720, 3)
    full, full_med = _per_clip(recipe, paths, repeat)
    out[name] = dict(frames=fps * sec, decode_all_s=decode, recipe_s=full)
    median = (f' (median of {repeat}: {decode_med * 1e3:.0f} ms, {full_med * 1e3:.0f} ms)'
              if repeat > 1 else '')
    print(f'{name}: decode all {fps * sec} frames {decode * 1e3:.0f} ms, recipe clip '
          f'{full * 1e3:.0f} ms -> {1 / full:.2f} clips/s (1 process){median}', flush=True)
  return out


def compare_video_io(root: Path, clips: int, repeat: int, other_file: str):
  spec = importlib.util.spec_from_file_location('other_video_io', other_file)
  other = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(other)
  for name in CASES:
    paths = [root / f'vfx_videos/{name.split("@")[0]}/{i}.mp4' for i in range(clips)]
    for what in ('read_video', 'load_clip'):
      times = {video_io: [], other: []}
      for r in range(repeat):
        for module in (video_io, other) if r % 2 else (other, video_io):
          fn = getattr(module, what)
          if what == 'load_clip':
            fn = functools.partial(fn, num_frames=49, size=(480, 720))
          times[module].append(_per_clip(fn, paths, 1)[0])
      a, b = np.array(times[video_io]), np.array(times[other])
      print(f'{name} {what}: this tree {a.min() * 1e3:.0f} ms (median {np.median(a) * 1e3:.0f}), '
            f'{other_file} {b.min() * 1e3:.0f} ms (median {np.median(b) * 1e3:.0f}); this/other '
            f'fastest {a.min() / b.min():.3f}, median {np.median(a) / np.median(b):.3f}',
            flush=True)


def time_pipeline(root: Path, workers: int, samples: int):
  cfg = default_data_config()
  cfg.update(root=str(root), truncate_multiple=1, workers=workers, batch_size=1,
             num_epochs=None, mask_caption_ratio=0.0, worker_buffer=2)
  loader = make_loader(cfg, shard=(0, 1))
  next(loader)  # worker start-up
  t = time.perf_counter()
  for _ in range(samples):
    next(loader)
  dt = time.perf_counter() - t
  loader.close()
  clips_s = 2 * samples / dt
  print(f'pipeline, {workers} worker(s): {samples / dt:.2f} samples/s = {clips_s:.2f} clips/s '
        f'= {clips_s / max(workers, 1):.2f} clips/s per worker', flush=True)
  return dict(workers=workers, samples_s=samples / dt, clips_s_per_worker=clips_s / workers)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--clips', type=int, default=6)
  parser.add_argument('--samples', type=int, default=12)
  parser.add_argument('--workers', default='1,2')
  parser.add_argument('--repeat', type=int, default=1, help='in-process passes; the fastest counts')
  parser.add_argument('--against', default=None, help='another video_io.py to compare with')
  parser.add_argument('--out', default=os.path.join(tempfile.gettempdir(), 'vap_data_bench'))
  args = parser.parse_args()
  root = Path(args.out)
  t = time.perf_counter()
  make_dataset(root, args.clips)
  print(f'dataset ready in {time.perf_counter() - t:.0f} s at {root}; cpus {os.cpu_count()}, '
        f'python {platform.python_version()}, av {av.__version__}, numpy {np.__version__}',
        flush=True)
  if args.against:
    return compare_video_io(root, args.clips, args.repeat, args.against)
  time_in_process(root, args.clips, args.repeat)
  for w in [int(x) for x in args.workers.split(',')]:
    time_pipeline(root, w, args.samples)


if __name__ == '__main__':
  main()
