"""The argument parsing and error handling every converter shares."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Callable

from vap_jax.weights.safetensors_io import CheckpointError

Convert = Callable[..., int]  # convert(src, dst, *, param_dtype, overwrite, group_bytes) -> count


def run(prog: str, doc: str, convert: Convert | dict[str, Convert], argv=None, *,
        kind_arg: str = '--kind', kind_help: str = '', default_dtype: str = 'bfloat16') -> int:
  """Parse ``argv`` and run ``convert``; a dict of converters adds a ``kind_arg`` choosing one."""
  parser = argparse.ArgumentParser(prog=prog, description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  if isinstance(convert, dict):
    parser.add_argument(kind_arg, choices=sorted(convert), help=kind_help,
                        **({'required': True} if kind_arg.startswith('-') else {}))
  parser.add_argument('--src', required=True, help='downloaded pipeline folder or component folder')
  parser.add_argument('--dst', required=True, help='output folder (config.json + state/)')
  parser.add_argument('--dtype', default=default_dtype, choices=['bfloat16', 'float32', 'float16'],
                      help=f'parameter dtype written (default: {default_dtype})')
  parser.add_argument('--group-mb', type=float, default=None,
                      help='MB per Orbax write (bounds host memory; default 2x the largest tensor)')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing dst/state')
  args = parser.parse_args(argv)
  if isinstance(convert, dict):
    convert = convert[getattr(args, kind_arg.lstrip('-'))]
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
