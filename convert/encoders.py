"""Convert a text encoder (T5 / umT5) or image encoder (CLIP vision) to a vap_jax Orbax folder.

  python -m convert.encoders --kind t5 --src CogVideoX-5b-I2V --dst ckpt/t5_xxl
  python -m convert.encoders --kind t5 --src Wan2.1-I2V-14B-480P-Diffusers --dst ckpt/umt5_xxl
  python -m convert.encoders --kind clip --src Wan2.1-I2V-14B-480P-Diffusers --dst ckpt/clip_h14

``--src`` is a diffusers pipeline folder (its ``text_encoder/`` or ``image_encoder/`` is used) or
the component folder itself. Tensors stream one at a time. Tokenizers are not converted: load them
from the original ``tokenizer/`` folder with `vap_jax.text.Tokenizer`.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from vap_jax.weights.encoders import convert
from vap_jax.weights.safetensors_io import CheckpointError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='vap-convert-encoder', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--kind', required=True, choices=['t5', 'clip'],
                      help='t5: text_encoder/ (T5 or umT5); clip: image_encoder/ (CLIP vision)')
  parser.add_argument('--src', required=True, help='diffusers pipeline folder or component folder')
  parser.add_argument('--dst', required=True, help='output folder (config.json + state/)')
  parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32', 'float16'],
                      help='parameter dtype written (default: bfloat16)')
  parser.add_argument('--group-mb', type=float, default=None,
                      help='MB per Orbax write (bounds host memory; default 2x the largest tensor)')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing dst/state')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  start = time.time()
  try:
    count = convert(args.kind, args.src, args.dst, param_dtype=args.dtype, overwrite=args.overwrite,
                    group_bytes=None if args.group_mb is None else int(args.group_mb * 2**20))
  except (CheckpointError, FileExistsError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'converted {count} tensors from {args.src} to {args.dst} in {time.time() - start:.1f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
