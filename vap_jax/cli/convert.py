"""``vap-convert``: a downloaded VAP checkpoint folder -> one vap_jax folder (Orbax + manifest);
``vap-convert-{cogvideox,wan,encoder,vae}``: one network at a time.

  vap-convert --src Video-As-Prompt-CogVideoX-5B --dst ckpt/cogvideox_vap
  vap-convert --src Video-As-Prompt-Wan2.1-14B --dst ckpt/wan_vap --dtype bfloat16

``--src`` is the diffusers folder as downloaded (``model_index.json``, transformer/, vae/,
text_encoder/, tokenizer/, scheduler/, and for Wan image_encoder/ and image_processor/). ``--dst``
gets one Orbax folder per network (transformer and text encoder in ``--dtype``; VAE and image
encoder in float32 unless ``--vae-dtype`` / ``--image-encoder-dtype`` say otherwise), the tokenizer,
scheduler and image-processor files as they are, and ``manifest.json`` (format version, family,
components with their source configs and dtypes, source path). Tensors stream one at a time:
host memory stays a few times the largest tensor. Re-running the same command resumes (finished
components are kept), also after the converter was killed. Every file written is recorded with
its sha256; loading checks their sizes, ``vap-convert --verify DST`` their contents. The
pipelines and every loader read either folder.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Callable

from vap_jax.cli import common

DTYPES = ['bfloat16', 'float32', 'float16']

COMPONENT_DOCS = {
    'vap-convert-cogvideox': '''Convert a diffusers CogVideoX(-VAP) transformer to a vap_jax Orbax folder.

  vap-convert-cogvideox --src Video-As-Prompt-CogVideoX-5B --dst ckpt/cogvideox_transformer

--src is the downloaded folder (its transformer/ is used) or any diffusers CogVideoX transformer
folder (sharded safetensors with index, or one file).''',
    'vap-convert-wan': '''Convert a Wan2.1(-VAP) transformer to a vap_jax Orbax folder.

  vap-convert-wan --src Video-As-Prompt-Wan2.1-14B --dst ckpt/wan_transformer

--src is the downloaded folder (its transformer/ is used), a diffusers Wan transformer folder
(e.g. Wan2.1-I2V-14B-480P-Diffusers/transformer) or an original-format Wan2.1 folder (config.json
with dim/num_heads, tensors named self_attn/cross_attn/modulation).''',
    'vap-convert-encoder': '''Convert a text encoder (T5 / umT5) or image encoder (CLIP vision).

  vap-convert-encoder --kind t5 --src CogVideoX-5b-I2V --dst ckpt/t5_xxl
  vap-convert-encoder --kind clip --src Wan2.1-I2V-14B-480P-Diffusers --dst ckpt/clip_h14

--src is a diffusers pipeline folder (its text_encoder/ or image_encoder/ is used) or the component
folder itself. Tokenizers are not converted: vap_jax.text.Tokenizer reads tokenizer/ as it is.''',
    'vap-convert-vae': '''Convert a diffusers video VAE (Wan2.1 or CogVideoX) to a vap_jax Orbax folder.

  vap-convert-vae --kind wan --src Wan2.1-I2V-14B-480P-Diffusers --dst ckpt/wan_vae
  vap-convert-vae --kind cogvideox --src CogVideoX-5b-I2V --dst ckpt/cogvideox_vae

--src is a diffusers pipeline folder (its vae/ is used) or the vae folder itself; for wan also one
.safetensors file with the original Wan naming. The default writes float32.''',
}


def _group_bytes(args) -> int | None:
  return None if args.group_mb is None else int(args.group_mb * 2**20)


def _run(args, work: Callable[[], str]) -> int:
  """Run ``work`` (returns the summary line) under the commands' error contract."""
  from vap_jax.weights.safetensors_io import CheckpointError
  start = time.time()
  try:
    summary = work()
  except (CheckpointError, OSError, ValueError) as e:
    return common.error(e)
  print(f'{summary} in {time.time() - start:.1f} s')
  return 0


def main(argv=None) -> int:
  """``vap-convert``: a whole downloaded VAP folder."""
  parser = argparse.ArgumentParser(prog='vap-convert', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--src', help='downloaded diffusers VAP folder')
  parser.add_argument('--dst', help='output folder')
  parser.add_argument('--verify', metavar='DST',
                      help='instead of converting: check every file of a converted folder '
                           'against the sha256 recorded when it was written')
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
  common.add_verbose(parser)
  args = parser.parse_args(argv)
  if args.verify is not None and (args.src or args.dst):
    parser.error('--verify DST checks a converted folder: it takes no --src / --dst')
  if args.verify is None and not (args.src and args.dst):
    parser.error('--src and --dst are required (or --verify DST)')
  common.setup_logging(args.verbose)
  if args.verify is not None:
    return _run(args, lambda: _verify(args.verify))

  def work():
    from vap_jax.weights.checkpoint import convert_pipeline
    dst = common.writable_folder(args.dst, '--dst')
    manifest = convert_pipeline(
        args.src, dst, dtype=args.dtype, overwrite=args.overwrite,
        dtypes={'vae': args.vae_dtype, 'image_encoder': args.image_encoder_dtype},
        group_bytes=_group_bytes(args), progress=not args.no_progress)
    return (f'converted the {manifest["family"]} checkpoint {args.src} to {args.dst} '
            f'({", ".join(manifest["components"])})')
  return _run(args, work)


def _verify(path: str) -> str:
  from vap_jax.weights.checkpoint import check_components, is_converted_pipeline, verify
  if is_converted_pipeline(path):
    check_components(path)  # complete, every component present
  files, size = verify(path)
  return f'verified {files} files ({size / 1e6:.1f} MB) of {path}: all match their checksums'


def _component_main(prog: str, converters: dict[str, Callable] | Callable, argv,
                    default_dtype: str = 'bfloat16') -> int:
  parser = argparse.ArgumentParser(prog=prog, description=COMPONENT_DOCS[prog],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  if isinstance(converters, dict):
    parser.add_argument('--kind', required=True, choices=sorted(converters))
  parser.add_argument('--src', required=True, help='downloaded pipeline folder or component folder')
  parser.add_argument('--dst', required=True, help='output folder (config.json + state/)')
  parser.add_argument('--dtype', default=default_dtype, choices=DTYPES,
                      help=f'parameter dtype written (default: {default_dtype})')
  parser.add_argument('--group-mb', type=float, default=None,
                      help='MB per Orbax write (bounds host memory; default 2x the largest tensor)')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing dst/state')
  parser.add_argument('--no-progress', action='store_true', help='no progress bar')
  common.add_verbose(parser)
  args = parser.parse_args(argv)
  common.setup_logging(args.verbose)
  convert = converters[args.kind] if isinstance(converters, dict) else converters

  def work():
    dst = common.writable_folder(args.dst, '--dst')
    count = convert(args.src, dst, param_dtype=args.dtype, overwrite=args.overwrite,
                    group_bytes=_group_bytes(args), progress=not args.no_progress)
    return f'converted {count} tensors from {args.src} to {args.dst}'
  return _run(args, work)


def cogvideox_main(argv=None) -> int:
  from vap_jax.weights.cogvideox import convert
  return _component_main('vap-convert-cogvideox', convert, argv)


def wan_main(argv=None) -> int:
  from vap_jax.weights.wan import convert
  return _component_main('vap-convert-wan', convert, argv)


def encoder_main(argv=None) -> int:
  from vap_jax.weights.encoders import convert
  return _component_main('vap-convert-encoder',
                         {kind: functools.partial(convert, kind) for kind in ('t5', 'clip')}, argv)


def vae_main(argv=None) -> int:
  from vap_jax.weights import vae
  return _component_main('vap-convert-vae', {'wan': vae.convert_wan_vae,
                                             'cogvideox': vae.convert_cogvideox_vae},
                         argv, default_dtype='float32')


if __name__ == '__main__':
  sys.exit(main())
