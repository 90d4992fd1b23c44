"""The argument parsing and error handling every transformer converter shares."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Callable

from vap_jax.weights.safetensors_io import CheckpointError


def run(prog: str, doc: str, convert: Callable[..., int], argv=None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--src', required=True, help='downloaded VAP folder or transformer folder')
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
