"""Convert a diffusers CogVideoX(-VAP) transformer to a vap_jax Orbax folder.

  python -m convert.cogvideox --src Video-As-Prompt-CogVideoX-5B --dst ckpt/cogvideox_vap

``--src`` is the downloaded ``ByteDance/Video-As-Prompt-CogVideoX-5B`` folder (its
``transformer/`` is used) or any diffusers CogVideoX transformer folder (sharded safetensors with
index, or one file). Tensors stream one at a time: host memory stays a few times the largest
tensor, not the model size.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from vap_jax.weights.cogvideox import convert
from vap_jax.weights.safetensors_io import CheckpointError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='vap-convert-cogvideox', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--src', required=True, help='diffusers VAP folder or transformer folder')
  parser.add_argument('--dst', required=True, help='output folder (config.json + state/)')
  parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32', 'float16'],
                      help='parameter dtype written (default: bfloat16, as released)')
  parser.add_argument('--group-mb', type=float, default=None,
                      help='MB per Orbax write (bounds host memory; default 2x the largest tensor)')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing dst/state')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  start = time.time()
  try:
    count = convert(args.src, args.dst, param_dtype=args.dtype, overwrite=args.overwrite,
                    group_bytes=None if args.group_mb is None else int(args.group_mb * 2**20))
  except (CheckpointError, FileExistsError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'converted {count} tensors from {args.src} to {args.dst} in {time.time() - start:.1f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
