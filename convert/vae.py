"""Convert a diffusers video-VAE folder (Wan2.1 or CogVideoX) to a vap_jax Orbax folder.

  python -m convert.vae wan --src Wan2.1-I2V-14B-480P-Diffusers --dst ckpt/wan_vae
  python -m convert.vae cogvideox --src CogVideoX-5b-I2V --dst ckpt/cogvideox_vae

``--src`` is a diffusers pipeline folder (its ``vae/`` is used) or the ``vae`` folder itself;
for ``wan`` also one ``.safetensors`` file with the original Wan naming (Wan2.1 config).
Tensors stream one at a time. The VAEs run in float32 in the official pipelines (Wan) or bf16
(CogVideoX); the default writes float32.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from vap_jax.weights import vae
from vap_jax.weights.safetensors_io import CheckpointError

CONVERTERS = {'wan': 'convert_wan_vae', 'cogvideox': 'convert_cogvideox_vae'}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='vap-convert-vae', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('model', choices=sorted(CONVERTERS))
  parser.add_argument('--src', required=True, help='diffusers pipeline folder or its vae folder')
  parser.add_argument('--dst', required=True, help='output folder (config.json + state/)')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
  parser.add_argument('--overwrite', action='store_true', help='replace an existing dst/state')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  start = time.time()
  try:
    count = getattr(vae, CONVERTERS[args.model])(args.src, args.dst, param_dtype=args.dtype,
                                                 overwrite=args.overwrite)
  except (CheckpointError, FileExistsError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'converted {count} tensors from {args.src} to {args.dst} in {time.time() - start:.1f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
