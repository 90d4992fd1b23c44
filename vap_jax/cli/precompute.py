"""Precompute VAE latents and text/image-encoder outputs of a VAP-Data table into ArrayRecord
shards that `vap_jax.data.latent_source` reads back for training.

  vap-precompute cogvideox --model CogVideoX-5b-I2V --data data/VAP-Data --out latents/cog
  vap-precompute wan --model Wan2.1-I2V-14B-480P-Diffusers --data data/VAP-Data \\
      --out latents/wan --set sample_ref_videos_num=3

--model is a diffusers pipeline folder (vae/, text_encoder/, tokenizer/; Wan also image_encoder/,
image_processor/); --vae/--text-encoder/--image-encoder/--tokenizer point elsewhere (e.g. at
folders converted by vap-convert-*). Data settings start from the official recipe of the family
(`vap_jax.data.default_data_config`, documented in configs/vap_data.py) or from --config, with
caption/reference dropout off (apply it at train time); --set changes any of them.

Bad table rows (blank score, repeated video path, ...) are dropped and listed in the log and in
precompute.json (refused above max_bad_row_fraction, or at the first one with --strict);
undecodable videos (missing, cut short, corrupt) are skipped and listed in the shard manifests.

Resumable: run the same command again and finished shards are skipped, unfinished ones redone.
Multi-host: run it on every host with --distributed (jax.distributed.initialize()) or with
--process-index/--process-count; shard s goes to process s % count, each process computes on its
own local devices. Exit status 2 on bad input (data, checkpoint, settings that differ from the
ones the output folder was started with, too many undecodable videos).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from vap_jax.cli import common


def _value(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def _mesh(text: str) -> dict:
  from vap_jax.parallel import parse_mesh_shape
  try:
    return parse_mesh_shape(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='vap-precompute', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('family', choices=['cogvideox', 'wan'], help='which base model\'s encoders')
  p.add_argument('--model', required=True,
                 help="diffusers pipeline folder (or a converted one; 'toy': the shipped VAP-Toy)")
  p.add_argument('--data', required=True, help='VAP-Data root (holds vap_data.csv)')
  p.add_argument('--out', required=True, help='output folder (created; a rerun resumes it)')
  g = p.add_argument_group('what is stored')
  g.add_argument('--config', default=None, metavar='PATH[:ARG]',
                 help='data settings from a config file\'s `data` block, e.g. '
                      'configs/vap_data.py:wan (default: the family\'s official recipe)')
  g.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='one data setting, value as JSON (repeatable), e.g. '
                      'max_samples=1000, buckets=[[49,480,720]], meta_csv=other.csv')
  g.add_argument('--draws', type=int, default=1,
                 help='reference draws per table row, each its own record (default 1)')
  g.add_argument('--text-max-length', type=int, default=None,
                 help='tokens per caption (default 226 CogVideoX, 512 Wan)')
  g.add_argument('--store-dtype', default='bfloat16', choices=['bfloat16', 'float32', 'float16'])
  g.add_argument('--samples-per-shard', type=int, default=256)
  g.add_argument('--strict', action='store_true',
                 help='refuse a table with any bad row (default: drop and list them)')
  g = p.add_argument_group('how it runs')
  g.add_argument('--vae-dtype', default='float32', choices=['bfloat16', 'float32'])
  g.add_argument('--text-dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  g.add_argument('--image-dtype', default='float32', choices=['bfloat16', 'float32'])
  g.add_argument('--tiled', action='store_true', help='spatially tiled VAE encode (less memory)')
  g.add_argument('--batch-per-device', type=int, default=1)
  g.add_argument('--mesh', type=_mesh, default={'data': -1},
                 help='mesh over this process\'s local devices (default data=-1); the batch '
                      'splits over data x fsdp')
  g.add_argument('--workers', type=int, default=None, help='video decode processes (default 4)')
  g.add_argument('--max-shards', type=int, default=None,
                 help='stop after this many shards (per process); rerun to continue')
  g.add_argument('--distributed', action='store_true', help='call jax.distributed.initialize()')
  g.add_argument('--process-index', type=int, default=None)
  g.add_argument('--process-count', type=int, default=None)
  g.add_argument('--no-progress', action='store_true', help='no progress bar')
  common.add_verbose(g)
  for name in ('vae', 'text-encoder', 'tokenizer', 'image-encoder'):
    g.add_argument(f'--{name}', default=None, help=f'{name} folder (default: --model)')
  args = p.parse_args(argv)
  if (args.process_index is None) != (args.process_count is None):
    p.error('--process-index and --process-count go together')
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  common.setup_logging(args.verbose)
  import jax

  from vap_jax.config import load_config
  from vap_jax.data.pipeline import DataFailureError, default_data_config
  from vap_jax.data.precompute import PrecomputeConfig, precompute
  from vap_jax.weights.safetensors_io import CheckpointError

  if args.distributed:
    jax.distributed.initialize()
  start = time.time()
  try:
    if args.config:
      data = load_config(args.config).data
    else:
      data = default_data_config('wan' if args.family == 'wan' else 'cog')
    data.update(root=args.data, mask_caption_ratio=0.0, mask_ref_ratio=0.0)
    if args.workers is not None:
      data.workers = args.workers
    if args.strict:
      data.strict_table = True
    common.writable_folder(args.out, '--out')
    for item in args.set:
      key, sep, value = item.partition('=')
      if not sep or key not in data:
        raise ValueError(f'--set {item!r}: expected KEY=VALUE with KEY one of {sorted(data)}')
      data[key] = _value(value)
    from vap_jax import toy
    cfg = PrecomputeConfig(
        args.family, toy.resolve(args.model), args.out, samples_per_shard=args.samples_per_shard,
        batch_per_device=args.batch_per_device, draws=args.draws,
        text_max_length=args.text_max_length, store_dtype=args.store_dtype,
        vae_dtype=args.vae_dtype, text_dtype=args.text_dtype, image_dtype=args.image_dtype,
        vae_tiled=args.tiled, mesh=args.mesh, max_shards=args.max_shards, vae=args.vae,
        text_encoder=args.text_encoder, tokenizer=args.tokenizer,
        image_encoder=args.image_encoder)
    process = None
    if args.process_index is not None:
      process = (args.process_index, args.process_count)
    summary = precompute(cfg, data, process=process, progress=not args.no_progress)
  except (CheckpointError, DataFailureError, OSError, ValueError) as e:
    return common.error(e)
  print(f'process {summary["process"][0]}: wrote shards {summary["written"]} '
        f'({summary["records"]} records, {summary["failed"]} samples skipped so far, '
        f'{summary["dropped_rows"]} bad table rows dropped), '
        f'{len(summary["skipped"])} were already done, {len(summary.get("remaining", []))} '
        f'remain; {time.time() - start:.1f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
