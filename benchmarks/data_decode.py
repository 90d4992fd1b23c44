"""Decoded clips per second per worker: PyAV decode + official frame recipe (not a test).

  python benchmarks/data_decode.py [--clips 6] [--workers 1,2] [--out /tmp/vap_bench]

Writes synthetic H.264 clips in the VAP-Data layout (moving gradients over static noise, x264
crf 23, preset medium: a few Mbit/s like ordinary web video), then times, in this process: the decode alone (all frames to RGB), and the full
clip (decode, 16 fps resampling, 49 frames evenly, bicubic resize to 480x720, float32); then the
Grain pipeline with N worker processes (1 reference per sample = 2 clips per sample).
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))

from vap_jax.data.pipeline import default_data_config  # noqa: E402
from fixtures_vap_data import encode, write_csv  # noqa: E402
from vap_jax.data import video_io  # noqa: E402
from vap_jax.data.pipeline import make_loader  # noqa: E402

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


def time_in_process(root: Path, clips: int):
  out = {}
  for name, (h, w, fps, sec) in CASES.items():
    paths = [root / f'vfx_videos/{name.split("@")[0]}/{i}.mp4' for i in range(clips)]
    video_io.read_video(paths[0])  # warm caches
    t = time.perf_counter()
    for p in paths:
      video_io.read_video(p)
    decode = (time.perf_counter() - t) / clips
    t = time.perf_counter()
    for p in paths:
      clip = video_io.load_clip(p, num_frames=49, size=(480, 720))
    full = (time.perf_counter() - t) / clips
    assert clip.shape == (49, 480, 720, 3)
    out[name] = dict(frames=fps * sec, decode_all_s=decode, recipe_s=full)
    print(f'{name}: decode all {fps * sec} frames {decode * 1e3:.0f} ms, recipe clip '
          f'{full * 1e3:.0f} ms -> {1 / full:.2f} clips/s (1 process)', flush=True)
  return out


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
  parser.add_argument('--out', default=os.path.join(tempfile.gettempdir(), 'vap_data_bench'))
  args = parser.parse_args()
  root = Path(args.out)
  t = time.perf_counter()
  make_dataset(root, args.clips)
  print(f'dataset ready in {time.perf_counter() - t:.0f} s at {root}; cpus {os.cpu_count()}, '
        f'python {platform.python_version()}, av {av.__version__}, numpy {np.__version__}',
        flush=True)
  time_in_process(root, args.clips)
  for w in [int(x) for x in args.workers.split(',')]:
    time_pipeline(root, w, args.samples)


if __name__ == '__main__':
  main()
