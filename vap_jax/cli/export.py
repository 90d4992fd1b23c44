"""``vap-export``: a VAP checkpoint -> the diffusers (PyTorch) layout the official code reads.

  vap-export --src ckpt/cogvideox_vap --dst out/Video-As-Prompt-CogVideoX-5B
  vap-export --src ckpt/wan_vap/transformer --dst out/transformer --dtype float32
  vap-export --src ckpt/wan_transformer --components-from Video-As-Prompt-Wan2.1-14B --dst out/wan
  vap-export --run runs/cog --components-from CogVideoX-5b-I2V --dst out/my-vap-cogvideox

``--src`` is any folder the loaders take: a converted (vap-convert) or diffusers pipeline folder,
or a transformer folder of either layout. The transformer is written as
``diffusion_pytorch_model-0000k-of-0000n.safetensors`` shards of at most ``--max-shard-size``
plus ``diffusion_pytorch_model.safetensors.index.json`` and ``config.json``
(``CogVideoXTransformer3DMOTModel`` / ``WanTransformer3DMOTModel`` with
``block_idx_with_mot_ref``; the PyPI base class for a model without an expert), official key
names, in ``--dtype``. Tensors stream one at a time: host memory stays a few times the largest
tensor, whatever the model size.

A pipeline ``--src`` gives a whole pipeline folder: the new ``transformer/`` beside copies (or
``--link``: symlinks) of the other components and ``model_index.json``, taken from ``--src`` --
for a converted folder from the download it was converted from (its VAE and encoders are Orbax)
-- or from ``--components-from``. A transformer ``--src`` gives a transformer folder unless
``--components-from`` is given; ``--transformer-only`` always writes only the transformer.

``--run`` exports a vap-train run instead: its latest checkpoint (or ``--step``), the trained
expert read straight into FSDP shards over this host's devices beside the base it started
from (or ``--base``), every tensor then gathered and written one at a time. Run it where the
model fits in device memory (on a CPU host, in host memory); multi-process like vap-train.

``--converted`` writes a run's trained model as a converted component folder instead (config.json
+ Orbax state/, what vap-convert writes, float32 unless ``--dtype``), which every loader reads
(a run's ``model.checkpoint``, ``vap-precompute --vae``, `vap_jax.weights.checkpoint.
seal_pipeline`); a VAE run (``configs/train_vae.py``, task 'vae') is always written so:

  vap-export --run runs/toy_vae --dst toy/vae
  vap-export --run runs/toy_base --converted --dst toy/base/transformer

A LoRA run (task 'lora' or 'dpo') writes its adapters: ``--dst``/pytorch_lora_weights.safetensors,
the file diffusers' ``load_lora_weights`` and ``vap-generate --lora`` read.
"""
from __future__ import annotations

import argparse
import sys
import time

from vap_jax.cli import common


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='vap-export', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--src',
                      help='converted or diffusers folder: pipeline root or transformer folder')
  source.add_argument('--run', help='a vap-train workdir: export its trained model')
  parser.add_argument('--step', type=int, default=None,
                      help='with --run: the checkpoint step (default: the latest)')
  parser.add_argument('--converted', action='store_true',
                      help='with --run: write the trained model as a converted component folder '
                           "(a VAE run's always is)")
  parser.add_argument('--base', default=None,
                      help="with --run: the base checkpoint folder, if not the run's "
                           'model.checkpoint')
  parser.add_argument('--dst', required=True, help='output folder (must not exist, or be empty)')
  parser.add_argument('--dtype', default=None, choices=['bfloat16', 'float32', 'float16'],
                      help='dtype of the written tensors (default: bfloat16, as released; '
                           'with --converted or for a VAE run: float32)')
  parser.add_argument('--max-shard-size', default='10GB',
                      help='largest safetensors shard, bytes or e.g. 5GB, 500MB (default: 10GB)')
  parser.add_argument('--components-from', default=None,
                      help='diffusers pipeline folder whose other components (vae, encoders, '
                           'tokenizer, scheduler, ...) go beside the transformer')
  parser.add_argument('--transformer-only', action='store_true',
                      help='write only the transformer folder, even for a pipeline --src')
  parser.add_argument('--link', action='store_true',
                      help='symlink the other components instead of copying them')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace --dst if it holds an earlier export')
  parser.add_argument('--no-progress', action='store_true', help='no progress bar')
  common.add_verbose(parser)
  args = parser.parse_args(argv)
  common.setup_logging(args.verbose)

  if args.src and (args.step is not None or args.base or args.converted):
    parser.error('--step, --base and --converted go with --run')
  from vap_jax.weights.export import export_folder, parse_size
  from vap_jax.weights.safetensors_io import CheckpointError
  start = time.time()
  options = dict(dtype=args.dtype or 'bfloat16', max_shard_size=args.max_shard_size,
                 overwrite=args.overwrite, progress=not args.no_progress)
  try:
    parse_size(args.max_shard_size)  # a typo fails before any work
    dst = common.writable_folder(args.dst, '--dst')
    task = _run_task(args) if args.run else None
    if task in ('lora', 'dpo'):
      return _export_adapters(args, dst, start)
    if args.run and (args.converted or task == 'vae'):
      return _export_converted(args, dst, start)
    if args.run:
      summary = _export_run(args, dst, options)
    else:
      summary = export_folder(args.src, dst, components_from=args.components_from,
                              transformer_only=args.transformer_only, link=args.link, **options)
  except (CheckpointError, FileExistsError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  kind = 'VAP' if summary['experts'] else 'base'
  extra = ''
  if 'components' in summary:
    extra = (f' with {", ".join(summary["components"])} '
             f'{"linked" if args.link else "copied"}')
  print(f'exported the {summary["family"]} {kind} transformer ({summary["tensors"]} tensors, '
        f'{summary["shards"]} shards, {summary["bytes"] / 1e6:.1f} MB {summary["dtype"]}) from '
        f'{args.src or args.run} to {args.dst}{extra} in {time.time() - start:.1f} s')
  return 0


def _run_task(args) -> str:
  from vap_jax.train.checkpoint import saved_run, task_of
  return task_of(saved_run(args.run, args.step)[1])


def _export_adapters(args, dst, start: float) -> int:
  from vap_jax.parallel.distributed import initialize
  from vap_jax.train.model import trained_model
  from vap_jax.weights import lora as lora_files
  if args.converted or args.components_from or args.transformer_only or args.link:
    raise ValueError(f'{args.run} trained LoRA adapters, written as one adapter file: '
                     '--converted, --components-from, --transformer-only and --link do not apply')
  initialize()
  file = lora_files.save(trained_model(args.run, step=args.step, base=args.base), dst)
  print(f'wrote the LoRA adapters trained by {args.run} to {file} (diffusers/PEFT layout) in '
        f'{time.time() - start:.1f} s')
  return 0


def _export_converted(args, dst, start: float) -> int:
  from vap_jax.parallel.distributed import initialize
  from vap_jax.train.model import write_trained
  if args.components_from or args.transformer_only or args.link:
    why = '--converted writes one component folder' if args.converted else \
        f'{args.run} trained a VAE'
    raise ValueError(f'{why}: --components-from, --transformer-only and --link go with the '
                     'diffusers layout of transformer runs')
  initialize()
  summary = write_trained(args.run, dst, step=args.step, base=args.base,
                          dtype=args.dtype or 'float32', overwrite=args.overwrite)
  print(f'wrote the {summary["family"]} {summary["component"]} trained by {args.run} (task '
        f'{summary["task"]}, step {summary["step"]}, {summary["tensors"]} tensors, '
        f'{summary["dtype"]}) to {args.dst} as a converted component folder in '
        f'{time.time() - start:.1f} s')
  return 0


def _export_run(args, dst, options) -> dict:
  from vap_jax.parallel.distributed import initialize
  from vap_jax.train.model import trained_model
  from vap_jax.weights.export import export, export_pipeline
  initialize()
  model = trained_model(args.run, step=args.step, base=args.base)
  if args.components_from and not args.transformer_only:
    return export_pipeline(model, dst, args.components_from, link=args.link, **options)
  return export(model, dst, **options)


if __name__ == '__main__':
  sys.exit(main())
