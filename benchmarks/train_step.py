"""Seconds, TFLOP/s and MFU of the real train step, per remat policy.

  python -m benchmarks.train_step --model cogvideox-small --remat none full save_dots
  python -m benchmarks.train_step --model wan-vap --attention cudnn --remat full   # a GPU

Random weights made on the device (float32 expert master weights, the case's dtypes for the
base), a random `make_latent_loader`-shaped batch, the objective, clipped AdamW, the donated
state: exactly what `vap-train` runs per step. The FLOPs are `training_flops` (forward, backward
for input gradients through every layer, expert weight gradients, the policy's recompute); MFU
is against the device's known bf16 peak, or on CPU a float32 matmul measured in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import numpy as np


def run(model: str, remat: str, *, attention: str = 'xla', batch: int = 1, repeats: int = 3,
        warmup: int = 1) -> dict:
  from flax import nnx

  from benchmarks.aot import _records
  from benchmarks.step import CASES, measure_peak_flops
  from vap_jax.models.cogvideox import CogVideoXTransformer
  from vap_jax.models.flops import cogvideox_flops, training_flops, wan_flops
  from vap_jax.models.wan import WanTransformer
  from vap_jax.diffusion import CogVideoXDDIMScheduler
  from vap_jax.train import objectives, optimizer as opt
  from vap_jax.train.metrics import peak_tflops
  from vap_jax.train.step import init_state, make_train_step, split

  case = CASES[model]()
  cfg = dataclasses.replace(case.config, attention=attention, remat=remat,
                            dtypes=dataclasses.replace(case.config.dtypes, trainable='float32'))
  build = CogVideoXTransformer if case.family == 'cogvideox' else WanTransformer
  model_ = nnx.jit(lambda: build(cfg, rngs=nnx.Rngs(0)))()
  graphdef, trainable, frozen = split(model_)
  if case.family == 'cogvideox':
    objective = objectives.Objective('cogvideox', {'scaling_factor': 0.7}, CogVideoXDDIMScheduler())
    flops = cogvideox_flops(cfg, batch=batch, frames=case.frames, height=case.height,
                            width=case.width, text_len=case.text_len, num_refs=case.refs)
  else:
    c = cfg.out_channels
    objective = objectives.Objective('wan', {'latents_mean': [0.0] * c, 'latents_std': [1.0] * c})
    flops = wan_flops(cfg, batch=batch, frames=case.frames, height=case.height, width=case.width,
                      text_len=case.text_len, image_len=case.image_len, num_refs=case.refs)
  optimizer = opt.adamw(opt.schedule(1e-5), decay=opt.decay_scales(trainable, model_.unreachable()))
  step = jax.jit(make_train_step(graphdef, objective, optimizer), donate_argnums=0)
  rng = np.random.default_rng(0)
  records = {k: (rng.standard_normal(v.shape).astype(v.dtype) if v.dtype != bool else v)
             for k, v in _records(case, batch).items()}
  records = jax.device_put(records)
  state = init_state(trainable, optimizer, 0)
  start = time.perf_counter()
  compiled = step.lower(state, frozen, records).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, metrics = compiled(state, frozen, records)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, frozen, records)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  total = training_flops(flops, remat)
  device = jax.devices()[0]
  peak = peak_tflops(device)
  peak_source = 'bf16 dense peak'
  if peak is None:
    peak = measure_peak_flops(1024, 'float32') / 1e12
    peak_source = 'measured float32 1024^3 matmul'
  achieved = total / seconds / 1e12
  return dict(model=model, remat=remat, attention=attention, batch=batch, seconds=seconds,
              compile_seconds=compile_s, train_tflops_per_step=total / 1e12,
              achieved_tflops=achieved, peak_tflops=peak, peak_source=peak_source,
              mfu=achieved / peak, loss=float(metrics['loss']), device=device.device_kind,
              jax=jax.__version__)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', required=True, help='a benchmarks/step.py model name')
  parser.add_argument('--remat', nargs='+', default=['none', 'full', 'save_dots',
                                                     'save_attention', 'offload_hidden'])
  parser.add_argument('--attention', default='xla', choices=['xla', 'cudnn', 'blockwise'])
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args(argv)
  rows = []
  for remat in args.remat:
    row = run(args.model, remat, attention=args.attention, batch=args.batch, repeats=args.repeats)
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


if __name__ == '__main__':
  main()
