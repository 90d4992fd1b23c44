"""Convert a whole downloaded VAP checkpoint folder into one vap_jax folder (Orbax + manifest).

  vap-convert --src Video-As-Prompt-CogVideoX-5B --dst ckpt/cogvideox_vap
  vap-convert --src Video-As-Prompt-Wan2.1-14B --dst ckpt/wan_vap --dtype bfloat16

``--src`` is the diffusers folder as downloaded (``model_index.json``, transformer/, vae/,
text_encoder/, tokenizer/, scheduler/, and for Wan image_encoder/ and image_processor/). ``--dst``
gets one Orbax folder per network (transformer and text encoder in ``--dtype``; VAE and image
encoder in float32 unless ``--vae-dtype`` / ``--image-encoder-dtype`` say otherwise), the tokenizer,
scheduler and image-processor files as they are, and ``manifest.json`` (format version, family,
components with their source configs and dtypes, source path). Tensors stream one at a time:
host memory stays a few times the largest tensor. Re-running the same command resumes (finished
components are kept). The pipelines and every loader read either folder.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from vap_jax.weights.checkpoint import convert_pipeline
from vap_jax.weights.safetensors_io import CheckpointError

DTYPES = ['bfloat16', 'float32', 'float16']


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='vap-convert', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--src', required=True, help='downloaded diffusers VAP folder')
  parser.add_argument('--dst', required=True, help='output folder')
  parser.add_argument('--dtype', default='bfloat16', choices=DTYPES,
                      help='transformer and text encoder parameter dtype (default: bfloat16)')
  parser.add_argument('--vae-dtype', default='float32', choices=DTYPES)
  parser.add_argument('--image-encoder-dtype', default='float32', choices=DTYPES,
                      help='Wan CLIP image encoder dtype')
  parser.add_argument('--group-mb', type=float, default=None,
                      help='MB per Orbax write (bounds host memory; default 2x the largest tensor)')
  parser.add_argument('--overwrite', action='store_true',
                      help='rewrite every component (default: keep finished ones, resume)')
  parser.add_argument('--no-progress', action='store_true', help='no progress bars')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  start = time.time()
  try:
    manifest = convert_pipeline(
        args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
        dtypes={'vae': args.vae_dtype, 'image_encoder': args.image_encoder_dtype},
        group_bytes=None if args.group_mb is None else int(args.group_mb * 2**20),
        progress=not args.no_progress)
  except (CheckpointError, FileExistsError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'converted the {manifest["family"]} checkpoint {args.src} to {args.dst} '
        f'({", ".join(manifest["components"])}) in {time.time() - start:.1f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
