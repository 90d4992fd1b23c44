"""``vap-train``: train the VAP expert on a frozen base, from `vap-precompute` shards; or (config
``task='base'``) a whole base transformer without an expert, (``task='vae'``) a
CogVideoX-family VAE on the target clips of a VAP-Data table, or LoRA adapters on a frozen
transformer by SFT (``task='lora'``) or the official DPO (``task='dpo'``).

  vap-train --config configs/train_wan.py:d10 --workdir runs/wan \\
      --set model.checkpoint=Wan2.1-I2V-14B-480P-Diffusers --set data.latents=latents/wan
  vap-train --config configs/train_cogvideox.py:tiny --workdir /tmp/run --set steps=50
  vap-train --config configs/train_vae.py:toy_frames --workdir runs/toy_vae  # then vap-export
  vap-train --config configs/dpo_cogvideox.py --workdir runs/dpo --set dpo.table=vap_data.csv ...

The config (a file read by path, ``PATH[:VARIANT]``) holds the model, data, optimizer, schedule,
mesh, logging and checkpoint settings; ``--set dotted.key=VALUE`` (JSON values) changes any of
them. Metrics go to WORKDIR/metrics.jsonl and WORKDIR/tensorboard (process 0), a progress bar to
stderr, checkpoints to WORKDIR/checkpoints. Running the same command again resumes from the
latest checkpoint (exactly: same batches, same draws).

Multi-host: every process runs the same command; TPU pod slices and SLURM jobs are found by
themselves, otherwise --coordinator HOST:PORT --num-processes N --process-id I (launch/).
Exit status: 0 done, 2 bad input, 75 stopped by SIGTERM or a preemption notice after saving a
checkpoint (run the command again to resume).
"""
from __future__ import annotations

import argparse
import json
import sys

from vap_jax.cli import common


def _value(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def apply_overrides(config, items: list[str]) -> None:
  """``a.b=VALUE`` items onto the config (VALUE as JSON, else a string); unknown keys refused."""
  for item in items:
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'--set {item!r}: expected KEY=VALUE, e.g. optimizer.learning_rate=1e-4')
    node, parts = config, key.split('.')
    for part in parts[:-1]:
      if part not in node:
        raise ValueError(f'--set {key}: the config has no {part!r} (it has {sorted(node)})')
      node = node[part]
    if parts[-1] not in node:
      raise ValueError(f'--set {key}: the config has no {parts[-1]!r} (it has {sorted(node)})')
    new = _value(value)
    old = node[parts[-1]]
    if isinstance(old, tuple) and isinstance(new, list):
      new = tuple(new)
    try:
      node[parts[-1]] = new
    except TypeError:
      raise ValueError(f'--set {key}: a {type(new).__name__} cannot replace its '
                       f'{type(old).__name__} value') from None


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='vap-train', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', required=True, metavar='PATH[:VARIANT]',
                 help='run config file, e.g. configs/train_wan.py:d20')
  p.add_argument('--workdir', required=True, help='where metrics (and checkpoints) go')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='override one setting, value as JSON (repeatable), e.g. steps=1000')
  p.add_argument('--steps', type=int, default=None, help='stop after this many steps in all')
  p.add_argument('--no-progress', action='store_true', help='no progress bar')
  g = p.add_argument_group('several processes (see launch/)')
  g.add_argument('--coordinator', default=None, metavar='HOST:PORT',
                 help='jax.distributed coordinator (TPU pods and SLURM need none)')
  g.add_argument('--num-processes', type=int, default=None)
  g.add_argument('--process-id', type=int, default=None)
  common.add_verbose(p)
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  common.setup_logging(args.verbose)
  from vap_jax.config import load_config
  from vap_jax.data.pipeline import DataFailureError
  from vap_jax.weights.safetensors_io import CheckpointError
  from vap_jax.parallel.distributed import initialize
  from vap_jax.train.checkpoint import CheckpointError as TrainCheckpointError
  try:
    initialize(args.coordinator, args.num_processes, args.process_id)
    config = load_config(args.config)
    apply_overrides(config, args.set)
    if args.steps is not None and args.steps < 1:
      raise ValueError(f'--steps {args.steps}: expected a positive number of steps')
    common.writable_folder(args.workdir, '--workdir')
    from vap_jax.train.trainer import Trainer
    trainer = Trainer(config, args.workdir)
    summary = trainer.run(args.steps, progress=not args.no_progress)
  except (CheckpointError, TrainCheckpointError, DataFailureError, FileNotFoundError,
          ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if summary['preempted']:
    print(f'stopped at step {summary["steps"]} (preempted), checkpoint saved: run the same command '
          f'to resume')
    from vap_jax.train.trainer import EXIT_PREEMPTED
    return EXIT_PREEMPTED
  losses = summary['losses']
  print(f'trained {summary["steps"]} steps; loss {losses[0]:.4f} -> {losses[-1]:.4f}'
        if losses else f'nothing to train: already at step {summary["steps"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
