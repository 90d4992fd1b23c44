"""Scaling of the sharded denoising step: seconds and per-device memory at 1, 2, 4, 8 devices for
each layout, and the speedup over one device.

  python -m benchmarks.scaling --model cogvideox-vap                # measured, on this host's GPUs
  python -m benchmarks.scaling --model wan-vap --aot h100-80g-x8    # memory only, compiled ahead
  python -m benchmarks.scaling --model cogvideox-tiny --devices 1,2,4,8 --repeats 2   # CPU smoke
  python -m benchmarks.scaling --video ckpt/cogvideox_vap --devices 1,8   # whole videos, 50 steps

Layouts (`LAYOUTS`), for n devices: ``fsdp`` (weights sharded n ways, batch over fsdp),
``cfg_allgather`` (the CFG halves over data=2, the sequence over context=n/2, all-gather K/V
joint attention), ``ulysses`` (sequence over context=n, Ulysses joint attention), ``cfg_ulysses``
(data=2 x Ulysses context=n/2), ``fsdp_tensor`` (fsdp=n/2 x tensor=2); in every layout the
weights are sharded over all devices but the tensor axis (`rules`). One device runs the model
unsharded. The step is the pipelines' transformer call: CFG batch 2, one reference, bf16,
the official shapes (`benchmarks.step.CASES`). Measured mode times the compiled step
(``--repeats``, after a warm-up) and reads each device's peak memory where the backend reports it;
``--aot TARGET`` compiles for the target's device count on fake host devices (TPU targets with
the TPU compiler, as `benchmarks.aot`) and reports XLA's per-device memory plan instead.
``--video CKPT`` times whole videos of a checkpoint's pipeline per layout instead of the step
(`benchmarks.generate`: warm run, random inputs; the weights shard as the pipeline loads them),
with ``--offload`` as one more one-device row. Each row prints as JSON; ``--out`` appends them
to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

LAYOUTS = {  # name -> (mesh for n devices, joint attention layout)
    'fsdp': (lambda n: {'fsdp': n}, 'gspmd'),
    'cfg_allgather': (lambda n: {'data': 2, 'context': n // 2}, 'allgather'),
    'ulysses': (lambda n: {'context': n}, 'ulysses'),
    'cfg_ulysses': (lambda n: {'data': 2, 'context': n // 2}, 'ulysses'),
    'fsdp_tensor': (lambda n: {'fsdp': n // 2, 'tensor': 2}, 'gspmd'),
}


def rules():
  """The weights sharded over every mesh axis but tensor (FSDP across the data and context
  shards too: inference holds no optimizer state, so nothing is gained by replicating them)."""
  from vap_jax.parallel import DEFAULT_RULES, with_rules
  everywhere = ('fsdp', 'context', 'data')
  return with_rules(DEFAULT_RULES, embed=everywhere, text_embed=everywhere)


def _applies(layout: str, n: int, heads: int) -> bool:
  mesh, kind = LAYOUTS[layout]
  shape = mesh(n)
  if any(v < 1 for v in shape.values()):
    return False
  if kind == 'ulysses':
    return heads % (shape['context'] * shape.get('tensor', 1)) == 0
  return True


def measure(case_name: str, layout: str, devices: list, *, repeats: int = 5,
            attention: str = 'cudnn') -> dict:
  """Seconds per step and per-device peak bytes of the sharded transformer call on ``devices``."""
  import dataclasses

  from flax import nnx

  from benchmarks.step import CASES, inputs
  from vap_jax.models.cogvideox import CogVideoXTransformer
  from vap_jax.models.wan import WanTransformer
  from vap_jax.parallel import make_mesh, sharding_context
  from vap_jax.weights.loading import shard_model

  case = CASES[case_name]()
  mesh_shape, kind = LAYOUTS[layout]
  n = len(devices)
  cfg = dataclasses.replace(case.config, attention=attention,
                            context_parallel=kind if n > 1 else 'gspmd')
  build = CogVideoXTransformer if case.family == 'cogvideox' else WanTransformer
  mesh = make_mesh(mesh_shape(n) if n > 1 else {}, devices=devices)
  model = shard_model(build(cfg, rngs=nnx.Rngs(0)), mesh, rules())
  args, kw = inputs(case, batch=2)
  step = nnx.jit(lambda m, *a, **k: m(*a, **k))
  with sharding_context(mesh, rules()):
    start = time.perf_counter()
    step(model, *args, **kw).block_until_ready()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      step(model, *args, **kw).block_until_ready()
      times.append(time.perf_counter() - start)
  peaks = [(d.memory_stats() or {}).get('peak_bytes_in_use', 0) for d in devices]
  return dict(seconds=statistics.median(times), first_call_seconds=round(compile_s, 2),
              peak_bytes_per_device=max(peaks) or None)


def video(ckpt: str, layout: str, devices: list, *, steps: int, frames: int, height, width,
          attention: str, offload: bool = False) -> dict:
  """Seconds of a whole video (and per step) of the pipeline at ``ckpt`` on ``devices``."""
  from benchmarks import generate
  from vap_jax.parallel import make_mesh
  mesh_shape, kind = LAYOUTS[layout]
  n = len(devices)
  mesh = make_mesh(mesh_shape(n), devices=devices) if n > 1 else None
  r = generate.run(ckpt, steps=steps, frames=frames, height=height, width=width,
                   attention=attention, mesh=mesh, context_parallel=kind if n > 1 else 'gspmd',
                   offload=offload)
  peaks = [(d.memory_stats() or {}).get('peak_bytes_in_use', 0) for d in devices]
  return dict(seconds=r['video_seconds'], step_seconds=r['step_seconds'],
              peak_bytes_per_device=max(peaks) or None)


def aot(case_name: str, layout: str, target: str, n: int) -> dict:
  """XLA's per-device memory plan of the same step compiled for ``n`` of ``target``'s devices."""
  from benchmarks import aot as ahead
  mesh_shape, kind = LAYOUTS[layout]
  devices = ahead.target_devices(target)[:n]
  result = ahead.analyze(case_name, mesh_shape(n) if n > 1 else {'fsdp': 1}, devices=devices,
                         attention='blockwise', context_parallel=kind if n > 1 else 'gspmd',
                         rules=rules())
  return dict(peak_bytes_per_device=result['per_device_bytes'],
              compile_seconds=result['compile_seconds'])


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', help='a benchmarks/step.py model name (the step)')
  parser.add_argument('--video', metavar='CKPT', help='time whole videos of this checkpoint')
  parser.add_argument('--offload', action='store_true',
                      help='with --video: add a one-device row with the weights offloaded')
  parser.add_argument('--steps', type=int, default=50, help='--video: denoising steps')
  parser.add_argument('--frames', type=int, default=49, help='--video: frames')
  parser.add_argument('--height', type=int, help='--video: height (default the official)')
  parser.add_argument('--width', type=int, help='--video: width (default the official)')
  parser.add_argument('--layouts', default=','.join(LAYOUTS))
  parser.add_argument('--devices', default='1,2,4,8', help='device counts (default 1,2,4,8)')
  parser.add_argument('--aot', default=None, metavar='TARGET',
                      help='memory only, compiled ahead of time for a benchmarks.aot target')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--attention', default='cudnn', choices=['xla', 'cudnn', 'blockwise'])
  parser.add_argument('--out', default=None, help='append the JSON rows to this file')
  args = parser.parse_args(argv)
  if bool(args.model) == bool(args.video) or (args.video and args.aot):
    parser.error('give --model (the step, measured or --aot) or --video CKPT (measured)')
  counts = [int(c) for c in args.devices.split(',')]
  if args.aot and 'jax' not in sys.modules:  # fake the target's devices on this host
    from benchmarks.aot import TARGETS
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={TARGETS[args.aot][0]}')
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax

  if args.video:
    config = os.path.join(args.video, 'transformer', 'config.json')
    with open(config) as f:
      heads = json.load(f)['num_attention_heads']
  else:
    from benchmarks.step import CASES
    heads = CASES[args.model]().config.num_attention_heads
  # (devices, layout, offload): one device first (the speedup's baseline), once
  runs = [(n, layout, False) for n in counts if n > 1 for layout in args.layouts.split(',')
          if _applies(layout, n, heads)]
  if 1 in counts:
    runs = [(1, 'fsdp', False)] + ([(1, 'fsdp', True)] if args.video and args.offload else []) + runs
  rows, baseline = [], None
  for n, layout, offload in runs:
    if args.aot:
      row = aot(args.model, layout, args.aot, n)
    else:
      if n > len(jax.devices()):
        continue
      if args.video:
        row = video(args.video, layout, jax.devices()[:n], steps=args.steps, frames=args.frames,
                    height=args.height, width=args.width, attention=args.attention,
                    offload=offload)
      else:
        row = measure(args.model, layout, jax.devices()[:n], repeats=args.repeats,
                      attention=args.attention)
    name = 'one device, offload' if offload else layout if n > 1 else 'one device'
    row = dict(model=args.model or args.video, devices=n, layout=name,
               mesh=LAYOUTS[layout][0](n) if n > 1 else {}, target=args.aot or
               jax.devices()[0].device_kind, **row)
    if not args.aot:
      baseline = row['seconds'] if n == 1 and not offload else baseline
      row['speedup'] = round(baseline / row['seconds'], 2) if baseline else None
    rows.append(row)
    print(json.dumps(row))
    if args.out:
      with open(args.out, 'a') as f:
        f.write(json.dumps(row) + '\n')
  gib = lambda b: f'{b / 2**30:.1f}' if b else '-'
  unit = 's/video' if args.video else 's/step'
  print(f'\n| devices | layout | mesh | {unit + " | speedup | " if not args.aot else ""}'
        'GiB per device |')
  for r in rows:
    timing = '' if args.aot else f'{r["seconds"]:.3f} | {r["speedup"]} | '
    print(f'| {r["devices"]} | {r["layout"]} | {r["mesh"]} | {timing}'
          f'{gib(r["peak_bytes_per_device"])} |')
  return rows


if __name__ == '__main__':
  main()
