"""``vap-eval``: the semantic-following score of a VAP checkpoint on the held-out pairs of a
VAP-Toy dataset, with the shuffled-reference and no-expert baselines and the base model told the
condition in words (`vap_jax.toy.evaluate`).

  vap-eval --ckpt toy --data toy/data --out toy/eval.json
  vap-eval --ckpt toy --data toy/data --limit 16 --settings vap     # a quick look
"""
from __future__ import annotations

import argparse
import json
import sys

from vap_jax.cli import common


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='vap-eval', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--ckpt', required=True, help="checkpoint folder, or 'toy' (the shipped one)")
  p.add_argument('--data', required=True, help='VAP-Toy dataset root (vap-toy-data --out)')
  p.add_argument('--out', default=None, help='write the report (JSON, every item) here')
  p.add_argument('--steps', type=int, default=20, help='denoising steps (default 20)')
  p.add_argument('--guidance', type=float, default=2.0, help='constant CFG scale (default 2)')
  p.add_argument('--reference-guidance', action='store_true',
                 help="CFG's negative half without the reference (vap-generate's option)")
  p.add_argument('--guidance-min-timestep', type=float, default=0, metavar='T',
                 help='no guidance below timestep T (vap-generate\'s option; default 0)')
  p.add_argument('--limit', type=int, default=None,
                 help='score this many rows, spread over the conditions (default: all)')
  p.add_argument('--settings', default='vap,shuffled,no_expert,caption',
                 help='comma-separated, of vap, shuffled, no_expert, caption (default all)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--no-progress', action='store_true')
  common.add_verbose(p)
  args = p.parse_args(argv)
  common.setup_logging(args.verbose)
  from vap_jax import toy
  from vap_jax.toy.evaluate import SETTINGS, evaluate
  from vap_jax.weights.safetensors_io import CheckpointError
  try:
    settings = tuple(s for s in args.settings.split(',') if s)
    if not settings or set(settings) - set(SETTINGS):
      raise ValueError(f'--settings {args.settings!r}: expected some of {",".join(SETTINGS)}')
    if not 0 <= args.guidance_min_timestep <= 1000:
      raise ValueError(f'--guidance-min-timestep {args.guidance_min_timestep}: expected a '
                       'timestep in [0, 1000]')
    if args.out:
      common.writable_file(args.out, '--out')
    report = evaluate(toy.resolve(args.ckpt), args.data, settings=settings, steps=args.steps,
                      guidance=args.guidance, limit=args.limit, seed=args.seed,
                      reference_guidance=args.reference_guidance,
                      guidance_min_timestep=args.guidance_min_timestep,
                      progress=not args.no_progress)
  except (CheckpointError, FileNotFoundError, ValueError) as e:
    return common.error(e)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(report, f, indent=1)
  guidance = f'guidance {args.guidance}'
  if args.reference_guidance:
    guidance += ' (reference guidance)'
  if args.guidance_min_timestep:
    guidance += f' at t >= {args.guidance_min_timestep:g}'
  print(f'{report["rows"]} held-out pairs, {args.steps} steps, {guidance}; '
        f'chance {report["chance"]:.3f}; {report["seconds"]:.0f} s')
  for s in settings:
    r = report[s]
    cats = ' '.join(f'{c} {a:.2f}' for c, a in r['category_accuracy'].items())
    print(f'  {s:9s} accuracy {r["accuracy"]:.3f}  follows its reference '
          f'{r["follows_reference"]:.3f}  subject fidelity {r["subject_fidelity"]:.3f}  ({cats})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
