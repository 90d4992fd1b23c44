"""A small procedurally drawn reference clip and subject image, for demos and CLI tests.

    python tests/example_inputs.py --out demo/inputs [--height 64 --width 96 --frames 13]

writes ``ref.mp4`` (a bright square gliding over a colour gradient, 16 fps) and ``image.png``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def procedural_clip(frames: int = 13, height: int = 64, width: int = 96, seed: int = 0
                    ) -> np.ndarray:
  """uint8 (frames, height, width, 3): a 16-pixel square moving over a gradient."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:height, :width]
  base = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 96)], -1)
  out = np.repeat(base[None], frames, 0).astype(np.uint8)
  for i in range(frames):
    top, left = (3 * i) % (height - 16), (5 * i) % (width - 16)
    out[i, top:top + 16, left:left + 16] = rng.integers(180, 255, 3)
  return out


def write_example(out: str | Path, *, frames: int = 13, height: int = 64, width: int = 96,
                  fps: float = 16) -> tuple[Path, Path]:
  from PIL import Image
  from vap_jax.data.video_io import write_mp4
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  write_mp4(out / 'ref.mp4', procedural_clip(frames, height, width), fps=fps)
  Image.fromarray(procedural_clip(1, height, width, seed=1)[0]).save(out / 'image.png')
  return out / 'ref.mp4', out / 'image.png'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--frames', type=int, default=13)
  parser.add_argument('--height', type=int, default=64)
  parser.add_argument('--width', type=int, default=96)
  args = parser.parse_args(argv)
  for path in write_example(args.out, frames=args.frames, height=args.height, width=args.width):
    print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
