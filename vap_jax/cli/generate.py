"""``vap-generate``: reference video(s) + image + prompts -> mp4, with either VAP checkpoint.

Every input is checked (files readable, one caption per reference, enough reference frames,
checkpoint complete) before any weights are loaded, so a typo costs seconds, not a model load.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from vap_jax import toy
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
                 help="VAP checkpoint: a downloaded diffusers folder, a vap-convert folder, or "
                      "'toy' (the tiny VAP-Toy model that ships with vap_jax; vap-toy demo)")
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
  p.add_argument('--reference-guidance', action='store_true',
                 help="CFG's negative half without the references, so guidance amplifies what "
                      'they add too (the official pipelines give both halves the references)')
  p.add_argument('--guidance-min-timestep', type=float, default=0, metavar='T',
                 help='no guidance below timestep T (0-1000): guidance only on the noisier '
                      'steps, e.g. those an expert was trained on (default 0: every step)')
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
  p.add_argument('--context-parallel', default='gspmd',
                 choices=['gspmd', 'allgather', 'ulysses'],
                 help='joint attention on a mesh with a context axis: each device keeps its '
                      'sequence shard of every stream and gathers keys/values (allgather) or '
                      'swaps to head shards (ulysses); gspmd leaves it to the compiler')
  p.add_argument('--offload', action='store_true',
                 help='keep every weight in pinned host memory and stream the transformer to '
                      'the device one layer at a time (one small GPU: CogVideoX-VAP in 24 GB, '
                      'Wan-VAP in 80 GB; add --vae-tiling for the 480p decode); slower, same '
                      'numbers')
  p.add_argument('--lora', default=None, metavar='PATH',
                 help='LoRA adapters for the transformer: a diffusers pytorch_lora_weights.'
                      'safetensors or PEFT adapter folder/file (vap-export of a lora/dpo run)')
  p.add_argument('--lora-scale', type=float, default=1.0,
                 help='strength of the --lora adapters (default 1.0)')
  p.add_argument('--lora-unmerged', action='store_true',
                 help='run the adapters beside the weights instead of merging them in')
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


def _mesh(spec: str | None):
  from vap_jax.parallel import make_mesh, parse_mesh_shape
  return make_mesh(parse_mesh_shape(spec)) if spec else None


def _outputs(args) -> dict[str, Path]:
  """Every file this run writes (checked writable before anything is read or loaded)."""
  out = Path(args.out)
  paths = {'--out': out, 'settings': out.with_suffix('.json')}
  if args.side_by_side:
    paths['side by side'] = out.with_name(out.stem + '_side_by_side.mp4')
  if args.preview != 'none':
    paths['preview'] = out.with_suffix('.' + args.preview)
  return paths


def _write_outputs(args, result: common.VideoOutput, fps: float) -> list[Path]:
  paths = _outputs(args)
  paths['--out'].parent.mkdir(parents=True, exist_ok=True)
  write_mp4(paths['--out'], result.frames, fps=fps)
  if args.side_by_side:
    write_mp4(paths['side by side'],
              np.concatenate(list(result.ref_frames) + [result.frames], axis=2), fps=fps)
  if args.preview == 'gif':
    write_gif(paths['preview'], result.frames, fps=min(fps, 16))
  elif args.preview == 'png':
    write_png_strip(paths['preview'], result.frames)
  return [path for name, path in paths.items() if name != 'settings']


def _check_numbers(args) -> None:
  """Every numeric option, before anything is read or loaded. Both families' VAEs compress time
  4x and space 8x and both DiTs patchify 2x2, hence 4k+1 frames and sizes in multiples of 16
  (the pipeline checks again against the loaded models)."""
  if args.steps < 1:
    raise ValueError(f'--steps {args.steps}: expected at least 1 denoising step')
  if args.frames < 1 or (args.frames - 1) % 4:
    raise ValueError(f'--frames {args.frames}: expected 4k+1 frames (1, 5, 9, ..., 49)')
  for flag, value in (('--height', args.height), ('--width', args.width)):
    if value is not None and (value <= 0 or value % 16):
      raise ValueError(f'{flag} {value}: expected a positive multiple of 16')
  if args.guidance is not None and not 0 <= args.guidance < math.inf:
    raise ValueError(f'--guidance {args.guidance}: expected a finite scale >= 0')
  if not 0 <= args.guidance_min_timestep <= 1000:
    raise ValueError(f'--guidance-min-timestep {args.guidance_min_timestep}: expected a '
                     'timestep in [0, 1000]')
  if not 0 <= args.seed < 2**32:
    raise ValueError(f'--seed {args.seed}: expected an integer in [0, 2**32)')
  if args.fps != 'ref':
    try:
      fps = float(args.fps)
    except ValueError:
      fps = math.nan
    if not 0 < fps < math.inf:
      raise ValueError(f"--fps {args.fps!r}: expected a positive number or 'ref'")


def _warn_cut_prompts(args, family: str) -> None:
  """Say which words of a caption the text encoder will not see (the pipelines cut each caption
  to the text length, as the official ones do, where diffusers warns)."""
  from vap_jax.text import WAN_MAX_LENGTH, Tokenizer, prompt_clean
  from vap_jax.weights import cogvideox, component
  from vap_jax.weights.checkpoint import tokenizer_dir
  if family == 'cogvideox':
    spec = cogvideox.SPEC
    length = spec.make_config(component.source_config(spec, args.ckpt)).max_text_seq_length
  else:
    length = WAN_MAX_LENGTH
  texts = [('--prompt', args.prompt)] + [('--ref-prompt', p) for p in args.ref_prompt]
  texts += [(f'--{name.replace("_", "-")}', getattr(args, name))
            for name in ('negative_prompt', 'negative_ref_prompt')
            if getattr(args, name) != common.DEFAULT_NEGATIVE_PROMPT]  # the default fits
  tokenizer = Tokenizer(tokenizer_dir(args.ckpt))
  for flag, text in texts:
    cut = tokenizer.cut(prompt_clean(text) if family == 'wan' else text, length)
    if cut:
      print(f'warning: {flag} is longer than the {length} tokens the text encoder reads; '
            f'left out: {cut!r}', file=sys.stderr)


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  cli.setup_logging(args.verbose)
  from vap_jax.pipelines import Pipeline
  from vap_jax.weights.checkpoint import check_components, verify
  try:
    args.ckpt = toy.resolve(args.ckpt)
    _check_numbers(args)
    for name, path in _outputs(args).items():
      cli.writable_file(path, name)
    family = check_components(args.ckpt)
    if args.verify:
      verify(args.ckpt)  # every byte against the checksums recorded at conversion
    if args.lora is not None:
      from vap_jax.weights import lora as lora_files
      lora_files.read(args.lora)  # a bad file fails before the model loads
    image = _read_image(args.image)
    refs, ref_fps = _read_references(args.ref_video, args.ref_prompt, args.frames,
                                     args.frames_selection, args.seed)
    _warn_cut_prompts(args, family)
    mesh = _mesh(args.mesh)
    start = time.time()
    pipe = Pipeline.from_pretrained(args.ckpt, dtype=args.dtype, vae_dtype=args.vae_dtype,
                                    mesh=mesh, attention=args.attention,
                                    vae_tiling=args.vae_tiling,
                                    context_parallel=args.context_parallel, lora=args.lora,
                                    lora_scale=args.lora_scale,
                                    lora_merge=not args.lora_unmerged, offload=args.offload)
    print(f'loaded the {family} pipeline from {args.ckpt} in {time.time() - start:.1f} s')
    loaded = time.time()
    options = dict(num_frames=args.frames, num_inference_steps=args.steps,
                   frames_selection=args.frames_selection, seed=args.seed,
                   negative_prompt=args.negative_prompt,
                   negative_ref_prompt=args.negative_ref_prompt,
                   reference_guidance=args.reference_guidance,
                   guidance_min_timestep=args.guidance_min_timestep)
    options.update({k: v for k, v in (('height', args.height), ('width', args.width),
                                      ('guidance_scale', args.guidance)) if v is not None})
    if family == 'cogvideox':
      options['use_dynamic_cfg'] = not args.static_cfg
    result = pipe(image, refs, args.prompt, args.ref_prompt, **options)
    done = time.time()
    fps = ref_fps[0] if args.fps == 'ref' else float(args.fps)
    written = _write_outputs(args, result, fps)
    settings = {k: v for k, v in vars(args).items()}
    settings.update(family=family, load_seconds=round(loaded - start, 2),
                    generate_seconds=round(done - loaded, 2), frames_written=len(result.frames),
                    size=list(result.frames.shape[1:3]), fps_written=fps)
    _outputs(args)['settings'].write_text(json.dumps(settings, indent=1))
  except (ValueError, CheckpointError, OSError) as e:
    return cli.error(e)
  for path in written:
    print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
