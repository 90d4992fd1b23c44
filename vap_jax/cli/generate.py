"""``vap-generate``: reference video(s) + image + prompts -> mp4, with either VAP checkpoint.

Every input is checked (files readable, one caption per reference, enough reference frames,
checkpoint complete) before any weights are loaded, so a typo costs seconds, not a model load.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from vap_jax.cli import common as cli
from vap_jax.data.video_io import (VideoError, read_video, select_frames, write_gif, write_mp4,
                                   write_png_strip)
from vap_jax.pipelines import common
from vap_jax.weights.safetensors_io import CheckpointError

EXAMPLES = '''examples:
  vap-generate --ckpt ckpt/cogvideox_vap --image subject.jpg \\
      --ref-video balloon.mp4 --ref-prompt "A sneaker inflates like a balloon and floats up." \\
      --prompt "A horse on a hill inflates like a balloon and floats up." --out out/horse.mp4
  vap-generate --ckpt ckpt/wan_vap --image subject.jpg --ref-video a.mp4 --ref-prompt "..." \\
      --prompt "..." --side-by-side --preview gif --out out/wan.mp4
'''


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='vap-generate', description=__doc__.split('\n\n')[0], epilog=EXAMPLES,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--ckpt', required=True,
                 help='VAP checkpoint: a downloaded diffusers folder or a vap-convert folder')
  p.add_argument('--image', required=True, help='image of the subject (first frame)')
  p.add_argument('--ref-video', action='append', required=True, metavar='PATH',
                 help='reference video (mp4/webm/mov/gif or a folder of images); repeat for '
                      'several references')
  p.add_argument('--prompt', required=True, help='caption of the video to make')
  p.add_argument('--ref-prompt', action='append', required=True, metavar='TEXT',
                 help='caption of each reference video, in the order of --ref-video')
  p.add_argument('--negative-prompt', default=common.DEFAULT_NEGATIVE_PROMPT)
  p.add_argument('--negative-ref-prompt', default=common.DEFAULT_NEGATIVE_PROMPT)
  p.add_argument('--frames', type=int, default=49, help='frames to make, 4k+1 (default 49)')
  p.add_argument('--height', type=int, help='default 480')
  p.add_argument('--width', type=int, help='default 720 (CogVideoX) / 832 (Wan)')
  p.add_argument('--steps', type=int, default=50, help='denoising steps (default 50)')
  p.add_argument('--guidance', type=float, help='CFG scale (default 6 CogVideoX, 5 Wan)')
  p.add_argument('--static-cfg', action='store_true',
                 help='CogVideoX: a constant guidance scale instead of the official dynamic one')
  p.add_argument('--frames-selection', default='evenly', choices=['evenly', 'first', 'random'],
                 help='which reference frames the expert sees (default evenly)')
  p.add_argument('--seed', type=int, default=42)
  p.add_argument('--out', default='outputs/vap.mp4', help='output mp4 (default outputs/vap.mp4)')
  p.add_argument('--fps', default='16',
                 help="output frame rate, or 'ref' for the first reference's (default 16)")
  p.add_argument('--side-by-side', action='store_true',
                 help='also write OUT_side_by_side.mp4: [reference(s) | output]')
  p.add_argument('--preview', choices=['gif', 'png', 'none'], default='none',
                 help='also write an animated GIF or a PNG strip next to OUT')
  p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'],
                 help='transformer and text encoder compute dtype (default bfloat16)')
  p.add_argument('--vae-dtype', default='float32', choices=['bfloat16', 'float32'],
                 help='VAE dtype (default float32)')
  p.add_argument('--attention', default='xla', choices=['xla', 'cudnn', 'blockwise'])
  p.add_argument('--vae-tiling', action='store_true',
                 help='tile the VAE spatially (less memory at 480p and above)')
  p.add_argument('--mesh', default=None, metavar='AXIS=N,...',
                 help='shard over a device mesh, e.g. fsdp=8 or fsdp=4,tensor=2 (default: one '
                      'device)')
  p.add_argument('--verify', action='store_true',
                 help='check the sha256 of every file of a converted --ckpt before loading '
                      '(by default only their sizes are checked)')
  cli.add_verbose(p)
  return p


def _read_image(path: str) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'))
  except FileNotFoundError:
    raise ValueError(f'--image {path}: file not found') from None
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f'--image {path}: not a readable image ({e})') from None


def _read_references(paths: list[str], prompts: list[str], frames: int, mode: str, seed: int):
  if len(prompts) != len(paths):
    raise ValueError(f'{len(paths)} --ref-video but {len(prompts)} --ref-prompt: give one caption '
                     f'per reference video, in the same order')
  rng = np.random.default_rng(seed)
  videos, fps = [], []
  for path in paths:
    def pick(count, _fps, _h, _w, path=path):
      if count < frames:
        raise ValueError(f'has {count} frames, {frames} are needed (use a longer clip or fewer '
                         f'--frames)')
      return select_frames(count, frames, mode, rng)
    try:
      video, rate = read_video(path, pick=pick)
    except VideoError as e:
      raise ValueError(f'--ref-video {e}') from None
    videos.append(video)
    fps.append(rate)
  return videos, fps


def _verify(ckpt: str) -> None:
  from vap_jax.weights.checkpoint import is_converted_pipeline, verify
  if not is_converted_pipeline(ckpt) or not verify(ckpt)[0]:
    raise ValueError(f'--verify: {ckpt} has no recorded checksums (only folders written by this '
                     'version of vap-convert have them)')


def _mesh(spec: str | None):
  from vap_jax.parallel import make_mesh, parse_mesh_shape
  return make_mesh(parse_mesh_shape(spec)) if spec else None


def _write_outputs(args, result: common.VideoOutput, fps: float) -> list[Path]:
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)  # checked writable before anything loaded
  write_mp4(out, result.frames, fps=fps)
  written = [out]
  if args.side_by_side:
    side = out.with_name(out.stem + '_side_by_side.mp4')
    write_mp4(side, np.concatenate(list(result.ref_frames) + [result.frames], axis=2), fps=fps)
    written.append(side)
  if args.preview == 'gif':
    write_gif(out.with_suffix('.gif'), result.frames, fps=min(fps, 16))
    written.append(out.with_suffix('.gif'))
  elif args.preview == 'png':
    write_png_strip(out.with_suffix('.png'), result.frames)
    written.append(out.with_suffix('.png'))
  return written


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  cli.setup_logging(args.verbose)
  from vap_jax.pipelines import Pipeline
  from vap_jax.weights.checkpoint import check_components
  try:
    if args.fps != 'ref' and not args.fps.replace('.', '', 1).isdigit():
      raise ValueError(f"--fps {args.fps!r}: expected a number or 'ref'")
    cli.writable_file(args.out, '--out')
    family = check_components(args.ckpt)
    if args.verify:
      _verify(args.ckpt)
    image = _read_image(args.image)
    refs, ref_fps = _read_references(args.ref_video, args.ref_prompt, args.frames,
                                     args.frames_selection, args.seed)
    mesh = _mesh(args.mesh)
    start = time.time()
    pipe = Pipeline.from_pretrained(args.ckpt, dtype=args.dtype, vae_dtype=args.vae_dtype,
                                    mesh=mesh, attention=args.attention,
                                    vae_tiling=args.vae_tiling)
    print(f'loaded the {family} pipeline from {args.ckpt} in {time.time() - start:.1f} s')
    loaded = time.time()
    options = dict(num_frames=args.frames, num_inference_steps=args.steps,
                   frames_selection=args.frames_selection, seed=args.seed,
                   negative_prompt=args.negative_prompt,
                   negative_ref_prompt=args.negative_ref_prompt)
    options.update({k: v for k, v in (('height', args.height), ('width', args.width),
                                      ('guidance_scale', args.guidance)) if v is not None})
    if family == 'cogvideox':
      options['use_dynamic_cfg'] = not args.static_cfg
    result = pipe(image, refs, args.prompt, args.ref_prompt, **options)
  except (ValueError, CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  done = time.time()
  fps = ref_fps[0] if args.fps == 'ref' else float(args.fps)
  written = _write_outputs(args, result, fps)
  settings = {k: v for k, v in vars(args).items()}
  settings.update(family=family, load_seconds=round(loaded - start, 2),
                  generate_seconds=round(done - loaded, 2), frames_written=len(result.frames),
                  size=list(result.frames.shape[1:3]), fps_written=fps)
  Path(args.out).with_suffix('.json').write_text(json.dumps(settings, indent=1))
  for path in written:
    print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
