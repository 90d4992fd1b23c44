"""``vap-toy``: the VAP-Toy model -- see it work (``demo``), or build it (``frozen``, ``scale``,
``pack``;
``launch/train_toy.sh`` runs the whole recipe with vap-toy-data, vap-train, vap-export,
vap-precompute and vap-eval).

  vap-toy demo demo                 # the shipped checkpoint on its example -> demo/vap_toy.mp4
  vap-toy frozen --data toy/data --dst toy/frozen
  vap-toy scale --vae toy/vae --data toy/data
  vap-toy pack --transformer toy/vap/transformer --vae toy/vae --frozen toy/frozen \\
      --examples-from toy/data --dst vap_jax/toy/checkpoint --overwrite
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from vap_jax.cli import common

# How the toy checkpoint generates: its clips' size, few steps, a constant guidance that also
# amplifies the reference (CFG's negative half is the base alone: --reference-guidance), only
# at the timesteps the expert was trained on (configs/train_toy.py: t >= 500).
DEMO = dict(frames=17, height=64, width=64, steps=20, guidance=4.0, guidance_min_timestep=500)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='vap-toy', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='command', required=True)
  d = sub.add_parser('demo', help='generate with the shipped toy checkpoint from its example '
                                  'inputs (CPU, no download)')
  d.add_argument('out', nargs='?', default='demo', help='output folder (default demo)')
  d.add_argument('--example', type=int, default=0, help='which shipped example (default 0)')
  d.add_argument('--ckpt', default='toy', help="checkpoint (default 'toy', the shipped one)")
  d.add_argument('--seed', type=int, default=0)
  f = sub.add_parser('frozen', help='write the untrained parts: tokenizer trained on the toy '
                                    'captions, random T5, scheduler')
  f.add_argument('--data', required=True, help='VAP-Toy dataset root (vap-toy-data --out)')
  f.add_argument('--dst', required=True, help='output folder')
  f.add_argument('--seed', type=int, default=0, help='of the random T5 (default 0)')
  c = sub.add_parser('scale', help="set a trained VAE's scaling_factor to 1 / std of its "
                                   'latents on the toy clips (before vap-precompute)')
  c.add_argument('--vae', required=True, help='converted vae folder (vap-export --run ...)')
  c.add_argument('--data', required=True, help='VAP-Toy dataset root')
  c.add_argument('--clips', type=int, default=64, help='training clips to measure (default 64)')
  k = sub.add_parser('pack', help='one converted pipeline folder from the trained components')
  k.add_argument('--transformer', required=True,
                 help='converted transformer folder (vap-export --run ... --converted)')
  k.add_argument('--vae', required=True, help='converted vae folder (vap-export --run ...)')
  k.add_argument('--frozen', required=True, help='the folder vap-toy frozen wrote')
  k.add_argument('--examples-from', default=None, metavar='DATA',
                 help='VAP-Toy dataset root: ship example inputs from its held-out subjects')
  k.add_argument('--examples', type=int, default=4, help='how many (default 4)')
  k.add_argument('--dst', required=True, help='output folder')
  k.add_argument('--overwrite', action='store_true', help='replace --dst')
  for q in (d, f, c, k):
    common.add_verbose(q)
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  common.setup_logging(args.verbose)
  try:
    return {'demo': _demo, 'frozen': _frozen, 'scale': _scale, 'pack': _pack}[args.command](args)
  except (FileExistsError, FileNotFoundError, ValueError) as e:
    return common.error(e)


def _demo(args) -> int:
  from pathlib import Path

  from vap_jax import toy
  from vap_jax.cli import generate
  ckpt = Path(toy.resolve(args.ckpt))
  folder = ckpt / 'examples' / str(args.example)
  if not (folder / 'example.json').is_file():
    raise FileNotFoundError(f'{ckpt} has no example {args.example} ({folder / "example.json"})')
  example = json.loads((folder / 'example.json').read_text())
  out = Path(args.out) / f'vap_toy_{example["kind"]}.mp4'
  argv = ['--ckpt', str(ckpt), '--image', str(folder / 'image.png'),
          '--ref-video', str(folder / 'ref.mp4'), '--ref-prompt', example['ref_prompt'],
          '--prompt', example['prompt'], '--frames', str(DEMO['frames']),
          '--height', str(DEMO['height']), '--width', str(DEMO['width']),
          '--steps', str(DEMO['steps']), '--guidance', str(DEMO['guidance']), '--static-cfg',
          '--reference-guidance', '--guidance-min-timestep', str(DEMO['guidance_min_timestep']),
          '--negative-prompt', '', '--negative-ref-prompt', '',  # what caption dropout taught
          '--dtype', 'float32', '--seed', str(args.seed), '--side-by-side', '--preview', 'gif',
          '--out', str(out)]
  print(f'VAP-Toy example {args.example}: the subject of {folder / "image.png"} '
        f'({example["subject"]}) under the condition of the reference {folder / "ref.mp4"} '
        f'({example["kind"]}, shown by {example["ref_subject"]}); the prompt names only the '
        f'subject:\n  vap-generate ' + ' '.join(_quoted(a) for a in argv))
  return generate.main(argv + (['--verbose'] if args.verbose else []))


def _quoted(arg: str) -> str:
  return f'"{arg}"' if ' ' in arg or not arg else arg


def _frozen(args) -> int:
  from vap_jax.toy.build import write_frozen_components
  start = time.time()
  dst = common.writable_folder(args.dst, '--dst')
  summary = write_frozen_components(args.data, dst, seed=args.seed)
  print(f'wrote the toy tokenizer ({summary["vocab"]} pieces from {summary["captions"]} '
        f'captions, longest {summary["longest_caption_tokens"]} tokens), a random T5 '
        f'({summary["text_encoder_params"]} parameters) and the scheduler to {args.dst} in '
        f'{time.time() - start:.1f} s')
  return 0


def _scale(args) -> int:
  from vap_jax.toy.build import fit_latent_scale
  stats = fit_latent_scale(args.vae, args.data, clips=args.clips)
  print(f'{args.vae}: latent std {stats["latent_std"]:.4f} over {stats["clips"]} clips -> '
        f'scaling_factor {stats["scaling_factor"]} (was {stats["previous"]})')
  return 0


def _pack(args) -> int:
  from vap_jax.toy.build import folder_bytes, pack, write_examples
  import tempfile
  dst = common.writable_folder(args.dst, '--dst')
  with tempfile.TemporaryDirectory(prefix='vap-toy-examples-') as examples:
    if args.examples_from:
      write_examples(args.examples_from, examples, count=args.examples)
    manifest = pack(dst, transformer=args.transformer, vae=args.vae, frozen=args.frozen,
                    examples=examples if args.examples_from else None, overwrite=args.overwrite)
  print(f'packed {", ".join(manifest["components"])} into {args.dst} '
        f'({folder_bytes(dst) / 1e6:.1f} MB)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
