"""Whole-video benchmark: seconds per denoising step and seconds per video of a VAP pipeline.

  python -m benchmarks.generate --ckpt ckpt/cogvideox_vap                 # 49x480x720, 50 steps
  python -m benchmarks.generate --ckpt ckpt/wan_vap --mesh fsdp=8 --attention cudnn
  python -m benchmarks.generate --ckpt demo/ckpt_cogvideox --height 64 --width 96 --frames 9 \\
      --steps 4 --dtype float32                                          # tiny CPU smoke run

The inputs are random (image, reference clip, fixed prompts); the weights are whatever the
checkpoint holds (speed does not depend on their values). The video is made twice: the first
(cold) run includes compilation, the second (warm) run is the steady state. Per-step time is the
median over the warm run's steps, measured with a device sync after each step. Prints one JSON
line and a readable row; ``--out`` appends the JSON line to a file.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import jax
import numpy as np


def _timed_video(pipe, image, refs, kwargs) -> tuple[float, list[float]]:
  """(seconds for the whole video, seconds of each denoising step)."""
  steps, last = [], [0.0]

  def on_step(i, latents):
    latents.block_until_ready()
    now = time.perf_counter()
    steps.append(now - last[0])
    last[0] = now

  start = last[0] = time.perf_counter()
  pipe(image, refs, 'A red fox walks through the snowy forest.',
       ['A man walks along the beach.'] * len(refs), progress=False, on_step=on_step, **kwargs)
  return time.perf_counter() - start, steps


def run(ckpt: str, *, steps: int = 50, frames: int = 49, height: int | None = None,
        width: int | None = None, refs: int = 1, dtype: str = 'bfloat16',
        attention: str = 'xla', mesh=None, context_parallel: str = 'gspmd',
        offload: bool = False) -> dict:
  """``mesh``: a `make_mesh` mesh or its ``AXIS=N,...`` text (None: one device)."""
  from vap_jax.pipelines import Pipeline
  from vap_jax.cli.generate import _mesh
  from vap_jax.weights.checkpoint import check_components
  family = check_components(ckpt)
  height = height or 480
  width = width or (720 if family == 'cogvideox' else 832)
  start = time.perf_counter()
  mesh_text = mesh if mesh is None or isinstance(mesh, str) else ','.join(
      f'{k}={v}' for k, v in mesh.shape.items() if v > 1)
  pipe = Pipeline.from_pretrained(ckpt, dtype=dtype, attention=attention,
                                  mesh=_mesh(mesh) if isinstance(mesh, str) else mesh,
                                  context_parallel=context_parallel, offload=offload)
  load = time.perf_counter() - start
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  clips = [rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8) for _ in range(refs)]
  kwargs = dict(num_frames=frames, height=height, width=width, num_inference_steps=steps)
  cold, _ = _timed_video(pipe, image, clips, kwargs)
  warm, step_times = _timed_video(pipe, image, clips, kwargs)
  device = jax.devices()[0]
  return dict(ckpt=ckpt, family=family, frames=frames, height=height, width=width, refs=refs,
              steps=steps, dtype=dtype, attention=attention, mesh=mesh_text,
              context_parallel=context_parallel, offload=offload,
              devices=len(jax.devices()), device=device.device_kind, platform=device.platform,
              jax_version=jax.__version__, date=datetime.date.today().isoformat(),
              host=platform.node(), load_seconds=load, video_seconds_cold=cold,
              video_seconds=warm, step_seconds=statistics.median(step_times),
              denoise_seconds=sum(step_times), other_seconds=warm - sum(step_times))


def format_row(r: dict) -> str:
  return (f"{r['family']:<9} {r['frames']}x{r['height']}x{r['width']} {r['steps']} steps "
          f"{r['dtype']} {r['attention']}: {r['step_seconds']:.3f} s/step, "
          f"{r['video_seconds']:.1f} s/video warm ({r['other_seconds']:.1f} s outside the loop), "
          f"{r['video_seconds_cold']:.1f} s cold, load {r['load_seconds']:.1f} s")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--ckpt', required=True, help='VAP checkpoint folder (either layout)')
  parser.add_argument('--steps', type=int, default=50)
  parser.add_argument('--frames', type=int, default=49)
  parser.add_argument('--height', type=int)
  parser.add_argument('--width', type=int)
  parser.add_argument('--refs', type=int, default=1)
  parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  parser.add_argument('--attention', default='xla', choices=['xla', 'cudnn', 'blockwise'])
  parser.add_argument('--mesh', help='e.g. fsdp=8')
  parser.add_argument('--context-parallel', default='gspmd',
                      choices=['gspmd', 'allgather', 'ulysses'])
  parser.add_argument('--offload', action='store_true', help='weights in pinned host memory')
  parser.add_argument('--out', help='append the JSON line to this file')
  args = parser.parse_args(argv)
  row = run(args.ckpt, steps=args.steps, frames=args.frames, height=args.height,
            width=args.width, refs=args.refs, dtype=args.dtype, attention=args.attention,
            mesh=args.mesh, context_parallel=args.context_parallel, offload=args.offload)
  print(json.dumps(row))
  print(format_row(row))
  if args.out:
    with open(args.out, 'a') as f:
      f.write(json.dumps(row) + '\n')
  return row


if __name__ == '__main__':
  main()
