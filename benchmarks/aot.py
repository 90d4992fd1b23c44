"""Ahead-of-time memory check: will a config fit on a target before renting it?

  python -m benchmarks.aot --model cogvideox-vap --target h100-80g-x1
  python -m benchmarks.aot --model wan-vap --target h100-80g-x8 --mesh fsdp=8
  python -m benchmarks.aot --model wan-vap --target h100-80g-x8 --train --remat full
  python -m benchmarks.aot --model wan-vap --target tpu-v5p-8 --train --remat full   # libtpu
  python -m benchmarks.aot --model cogvideox-vap --target h100-80g-x8 --train dpo --remat full
  python -m benchmarks.aot --model wan-vap --target tpu-v5e-4 --devices 1 --offload  # one chip

Lowers and compiles the sharded inference step (one transformer call at the official shapes,
CFG batch 2, one reference, bf16 weights) -- or with ``--train`` a forward and backward w.r.t.
the expert parameters (batch 1 per data replica, float32 expert weights) under a remat policy
(``--train dpo``: the DPO step, LoRA rank 32 on the official target, one win/lose pair per data
replica, the reference pass the same weights with the adapters off) --
for the target's device count, using that many fake host devices, and prints XLA's per-device
memory analysis against the target's memory. The blocks are scanned (``--no-scan`` unrolls).
Attention defaults to ``blockwise`` (bounded score memory, like the fused kernels on the real
target); ``xla`` would count the full score matrix. The compile is for the CPU backend, so the
figures are an estimate of the accelerator's: same shardings and buffers, a different
scheduler and fusion. Measured caveat: XLA:CPU converts bf16 matmul operands to float32, so its
temporaries include float32 copies of the (gathered) bf16 weights -- up to 2x
``bf16_weight_bytes_unsharded`` -- that a GPU/TPU does not make.

TPU targets compile with the TPU compiler itself, no TPU needed: with ``jax[tpu]`` installed
(libtpu; not a dependency of vap_jax), ``jax.experimental.topologies`` describes the slice's
devices and the figures are the TPU compiler's own memory plan, without the CPU caveat.

``--offload``: the weights in pinned host memory, the layer stacks streamed one layer at a time
(`vap_jax.models.stack.offload`; inference only). Only TPU targets: the TPU compiler plans the
copies and reports host and device memory apart; XLA:CPU has one memory for both.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

TARGETS = {  # devices, memory per device in bytes, TPU topology (None: fake CPU devices)
    'h100-80g-x1': (1, 80 * 10**9, None),
    'h100-80g-x8': (8, 80 * 10**9, None),
    'h200-141g-x1': (1, 141 * 10**9, None),
    'tpu-v5p-8': (4, 95 * 10**9, 'v5p:2x2x1'),
    'tpu-v5p-64': (32, 95 * 10**9, 'v5p:4x4x2'),
    'tpu-v5e-4': (4, 16 * 2**30, 'v5e:2x2'),
}


def target_devices(target: str) -> list:
  """The target's devices: a TPU slice's from its topology, else the (fake) host devices."""
  import jax
  count, _, topology = TARGETS[target]
  if topology is None:
    return jax.devices()[:count]
  from jax.experimental import topologies
  return list(topologies.get_topology_desc(platform='tpu', topology_name=topology).devices)


def analyze(model: str, mesh_shape: dict[str, int], *, attention: str = 'blockwise',
            batch: int | None = None, train: bool | str = False, remat: str = 'none',
            scan: bool = True, devices=None, context_parallel: str = 'gspmd',
            rules=None, offload: bool = False) -> dict:
  """Compile the sharded step for ``model`` on ``devices`` (default: the current, fake, ones);
  memory per device. ``rules``: the logical->mesh rules (default `DEFAULT_RULES`; the
  inference step only). ``offload``: the weights in pinned host memory (inference)."""
  import dataclasses

  import jax
  from flax import nnx
  from jax.sharding import NamedSharding

  from benchmarks.step import CASES, inputs
  from vap_jax.models.cogvideox import CogVideoXTransformer
  from vap_jax.models.wan import WanTransformer
  from vap_jax.parallel import (DEFAULT_RULES, logical_to_spec, make_mesh, param_shardings,
                                sharding_context)
  from vap_jax.models import stack
  from vap_jax.weights.loading import abstract_model

  if offload and train:
    raise ValueError('--offload is for inference (the frozen weights), not with --train')
  rules = DEFAULT_RULES if rules is None else rules
  case = CASES[model]()
  cfg = dataclasses.replace(case.config, attention=attention, scan_layers=scan, remat=remat,
                            context_parallel=context_parallel)
  if train is True:  # float32 master weights for what trains (DPO: the frozen expert stays bf16)
    cfg = dataclasses.replace(cfg, dtypes=dataclasses.replace(cfg.dtypes, trainable='float32'))
  build = CogVideoXTransformer if case.family == 'cogvideox' else WanTransformer
  devices = jax.devices() if devices is None else devices
  mesh = make_mesh(mesh_shape, devices=devices[:math.prod(mesh_shape.values())])
  if batch is None:  # CFG pair for inference; one video per data replica for training
    batch = mesh.shape['data'] * mesh.shape['fsdp'] if train else 2
  graphdef, state = nnx.split(abstract_model(lambda: build(cfg, rngs=nnx.Rngs(0))))
  shardings = dict(nnx.to_flat_state(param_shardings(state, mesh, rules)))
  if offload:  # as `stack.offload` places them
    shardings = {path: shardings[path].with_memory_kind('pinned_host') if stack.offloads(var)
                 else shardings[path] for path, var in nnx.to_flat_state(state)}
  abstract_state = nnx.from_flat_state([
      (path, var.replace(value=jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=shardings[path])))
      for path, var in nnx.to_flat_state(state)])
  batch_spec = logical_to_spec(('activation_batch',), rules, mesh)

  def arg(a):  # batch-sharded where the batch divides, else replicated
    spec = batch_spec if batch_spec[0] is None or a.shape[0] % math.prod(
        mesh.shape[x] for x in ((batch_spec[0],) if isinstance(batch_spec[0], str)
                                else batch_spec[0])) == 0 else (None,)
    return jax.ShapeDtypeStruct(a.shape, a.dtype,
                                sharding=NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))
  if train:
    compiled, seconds = _compile_train_step(case, cfg, build, mesh, batch, arg,
                                            task='dpo' if train == 'dpo' else 'vap')
  else:
    args, kw = jax.tree.map(arg, inputs(case, batch))
    step = lambda s, a, k: nnx.merge(graphdef, stack.fetch_unstacked(s))(*a, **k)
    with sharding_context(mesh, rules):
      start = time.perf_counter()
      compiled = jax.jit(step).lower(abstract_state, args, kw).compile()
      seconds = time.perf_counter() - start
  bf16_weights = sum(math.prod(v.shape) * 2 for _, v in nnx.to_flat_state(state)
                     if v.dtype == jax.numpy.bfloat16)
  mem = compiled.memory_analysis()
  sizes = {name: int(getattr(mem, f'{name}_size_in_bytes', 0) or 0)
           for name in ('argument', 'output', 'temp', 'alias', 'generated_code')}
  host = int(getattr(mem, 'host_argument_size_in_bytes', 0) or 0)
  if offload and not host:
    raise ValueError('--offload needs a TPU target: XLA:CPU has one memory for host and device, '
                     'drops the copies and converts the whole offloaded stacks to float32, so its '
                     'plan says nothing about an accelerator with offload')
  total = sizes['argument'] + sizes['output'] + sizes['temp'] - sizes['alias']
  return dict(offload=offload, host_bytes=host,model=model, mesh=mesh_shape, devices=mesh.size, attention=attention, batch=batch,
              context_parallel=context_parallel,
              train=train, remat=remat, scan=scan, compile_seconds=round(seconds, 1),
              per_device_bytes=total, bf16_weight_bytes_unsharded=bf16_weights,
              **{f'{k}_bytes': v for k, v in sizes.items()})


def _records(case, batch: int):
  """A `make_latent_loader` batch of the case's shapes (what the train step takes), numpy."""
  import numpy as np
  cfg, n, dt = case.config, case.refs, np.float32
  z = np.zeros
  if case.family == 'cogvideox':
    c, t, h, w = cfg.in_channels // 2, case.frames, case.height, case.width
    lat, first = (batch, c, t, h, w), (batch, c, 1, h, w)
    out = dict(text=z((batch, case.text_len, cfg.text_embed_dim), dt),
               ref_text=z((batch, n, case.text_len, cfg.text_embed_dim), dt),
               image_latents_mean=z(first, dt), image_latents_logvar=z(first, dt),
               ref_image_latents_mean=z((batch, n) + first[1:], dt),
               ref_image_latents_logvar=z((batch, n) + first[1:], dt))
  else:
    c, t, h, w = cfg.out_channels, case.frames, case.height, case.width
    lat = (batch, c, t, h, w)
    out = dict(text=z((batch, case.text_len, cfg.text_dim), dt),
               ref_text=z((batch, n, case.text_len, cfg.text_dim), dt),
               clip=z((batch, case.image_len, cfg.image_dim), dt),
               ref_clip=z((batch, n, case.image_len, cfg.image_dim), dt),
               condition=z(lat, dt), ref_condition=z((batch, n) + lat[1:], dt))
  out.update(latents_mean=z(lat, dt), latents_logvar=z(lat, dt),
             ref_latents_mean=z((batch, n) + lat[1:], dt),
             ref_latents_logvar=z((batch, n) + lat[1:], dt), ref_mask=np.ones((batch, n), bool),
             index=np.arange(batch, dtype=np.int32))
  return out


def _compile_train_step(case, cfg, build, mesh, batch, arg, task: str = 'vap'):
  """The real train step (objective, clipped AdamW, donated state, explicit shardings) for an
  abstract model: (compiled, seconds). ``task`` 'dpo': the DPO step on ``batch`` pairs."""
  import numpy as np
  import jax
  from flax import nnx

  from vap_jax.diffusion import CogVideoXDDIMScheduler
  from vap_jax.parallel import DEFAULT_RULES, sharding_context
  from vap_jax.train import objectives, optimizer as opt
  from vap_jax.train.step import init_state, jit_train_step, make_train_step, split
  from vap_jax.weights.loading import abstract_model

  model = abstract_model(lambda: build(cfg, rngs=nnx.Rngs(0)))
  unreachable = model.unreachable()
  if task == 'dpo':
    from vap_jax.train.model import unreachable_adapters
    from vap_jax.weights import lora as lora_files
    lora_files.add(model, rank=32, alpha=32)
    unreachable = unreachable_adapters(model)
  graphdef, trainable, frozen = split(model, task)
  if case.family == 'cogvideox':
    objective = objectives.Objective('cogvideox', {'scaling_factor': 0.7}, CogVideoXDDIMScheduler())
  else:
    c = cfg.out_channels
    objective = objectives.Objective('wan', {'latents_mean': [0.0] * c, 'latents_std': [1.0] * c})
  lr = opt.schedule(1e-5, warmup_steps=1000)
  optimizer = opt.adamw(lr, decay=opt.decay_scales(trainable, unreachable))
  records = _records(case, batch)
  if task == 'dpo':
    from vap_jax.train.dpo import DPOObjective
    objective = DPOObjective(objective)
    records = dict(_records(case, 2 * batch), dpo_weight=np.ones(2 * batch, np.float32))
  step = make_train_step(graphdef, objective, optimizer, lr_schedule=lr)
  state = jax.eval_shape(lambda p: init_state(p, optimizer, 0), trainable)
  compiled_step = jit_train_step(step, state, frozen, optimizer, mesh, DEFAULT_RULES)
  records = jax.tree.map(arg, records)
  with sharding_context(mesh, DEFAULT_RULES):
    start = time.perf_counter()
    compiled = compiled_step.lower(state, frozen, records, None).compile()
  return compiled, time.perf_counter() - start


def _parse_mesh(text: str) -> dict[str, int]:
  return {k: int(v) for k, v in (item.split('=') for item in text.split(','))} if text else {}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', required=True, help='a benchmarks/step.py model name')
  parser.add_argument('--target', required=True, choices=sorted(TARGETS))
  parser.add_argument('--mesh', default='', help="e.g. 'fsdp=8' or 'fsdp=2,tensor=4' "
                      "(default: all devices on fsdp)")
  parser.add_argument('--attention', default='blockwise', choices=['blockwise', 'xla'])
  parser.add_argument('--train', nargs='?', const=True, default=False, choices=[True, 'dpo'],
                      help='forward + backward w.r.t. the expert (float32 expert weights); '
                           "'--train dpo': the DPO step with LoRA adapters")
  parser.add_argument('--batch', type=int, default=None,
                      help='videos (DPO: pairs) per step (default: the CFG pair for inference, '
                           'one per data replica for training)')
  parser.add_argument('--remat', default='none', help='remat policy (vap_jax.models.stack)')
  parser.add_argument('--no-scan', action='store_true', help='unrolled blocks instead of scan')
  parser.add_argument('--context-parallel', default='gspmd',
                      choices=['gspmd', 'allgather', 'ulysses'],
                      help='joint attention layout on a context axis (vap_jax.parallel.context)')
  parser.add_argument('--offload', action='store_true',
                      help='weights in pinned host memory, streamed layer by layer (inference)')
  parser.add_argument('--devices', type=int, default=None,
                      help="use this many of the target's devices (e.g. 1: one chip of a slice)")
  args = parser.parse_args(argv)
  count, capacity, topology = TARGETS[args.target]
  mesh = _parse_mesh(args.mesh) or {'fsdp': args.devices or count}
  if 'jax' not in sys.modules:  # fake exactly the target's device count
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={count}')
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  result = analyze(args.model, mesh, attention=args.attention, train=args.train, batch=args.batch,
                   remat=args.remat, scan=not args.no_scan, devices=target_devices(args.target),
                   context_parallel=args.context_parallel, offload=args.offload)
  result['compiler'] = 'tpu' if topology else "cpu"
  result.update(target=args.target, capacity_bytes=capacity,
                fits=result['per_device_bytes'] <= capacity)
  print(json.dumps(result))
  gib = lambda b: f'{b / 2**30:.1f} GiB'
  what = ((f'{"DPO" if args.train == "dpo" else "train"} step, remat {args.remat}')
          if args.train else 'inference step')
  print(f"{args.model} {what} on {args.target} (mesh {mesh}, {args.attention} attention): per device "
        f"{gib(result['per_device_bytes'])} = weights+inputs {gib(result['argument_bytes'])} + "
        f"temporaries {gib(result['temp_bytes'])} + outputs {gib(result['output_bytes'])}"
        f"{'; host ' + gib(result['host_bytes']) if args.offload else ''}; "
        f"capacity {gib(capacity)} -> {'fits' if result['fits'] else 'DOES NOT FIT'} " +
        ('(TPU compiler)' if topology else
         f"(CPU estimate; its temporaries hold float32 copies of up to "
         f"{gib(2 * result['bf16_weight_bytes_unsharded'])} of bf16 weights)"))
  return result


if __name__ == '__main__':
  main()
