"""XLA's compiled memory for real-size VAE encode/decode, chunked vs unchunked, on 1 or more
devices (no weights, no run).

  python benchmarks/vae_memory.py [--dtype bfloat16]
  python benchmarks/vae_memory.py --devices 1,2,4,8 --frames 49 --chunked-only   # width-sharded

Compiles encode/decode of the released Wan2.1 (480x832) and CogVideoX-5b (480x720) VAE configs
for several frame counts and prints `memory_analysis()` of each executable: temp (activations)
and output bytes, per device. The chunked path's temp memory should not grow with the number of
frames. With n > 1 devices (fake host devices) the video's width is split over all of them as the
pipelines do (`vap_jax.parallel.VAE_RULES`), and the figures are one device's.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def compiled_memory(model, method: str, shape, dtype, chunked: bool, devices: int = 1):
  import jax
  from flax import nnx

  from vap_jax.parallel import VAE_RULES, make_mesh, sharding_context
  graphdef, state = nnx.split(model)

  def run(state, x):
    out = getattr(nnx.merge(graphdef, state), method)(x, chunked=chunked)
    return out.mean if method == 'encode' else out

  mesh = make_mesh({'fsdp': devices}, devices=jax.devices()[:devices])
  start = time.time()
  with sharding_context(mesh, VAE_RULES):
    compiled = jax.jit(run).lower(state, jax.ShapeDtypeStruct(shape, dtype)).compile()
  m = compiled.memory_analysis()
  return m.temp_size_in_bytes, m.output_size_in_bytes, time.time() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--devices', default='1', help='comma-separated device counts (default 1)')
  parser.add_argument('--frames', default='17,49', help='comma-separated (default 17,49)')
  parser.add_argument('--chunked-only', action='store_true')
  args = parser.parse_args(argv)
  counts = [int(n) for n in args.devices.split(',')]
  if 'jax' not in sys.modules:  # fake host devices for the mesh
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={max(counts)}')
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from vap_jax.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig
  from vap_jax.models.vae_wan import AutoencoderKLWan, WanVAEConfig
  from vap_jax.weights.loading import abstract_model
  dtype = jnp.dtype(args.dtype)
  cases = [
      ('wan2.1', abstract_model(
          lambda: AutoencoderKLWan(WanVAEConfig(dtype=args.dtype, param_dtype=args.dtype),
                                   rngs=nnx.Rngs(0))), 480, 832),
      ('cogvideox-5b', abstract_model(
          lambda: AutoencoderKLCogVideoX(CogVideoXVAEConfig(dtype=args.dtype,
                                                            param_dtype=args.dtype),
                                         rngs=nnx.Rngs(0))), 480, 720),
  ]
  print(f'backend {jax.default_backend()}, dtype {args.dtype}')
  print('| VAE | op | frames (latent) | path | devices | temp GiB | output GiB | compile s |')
  print('|---|---|---|---|---|---|---|---|')
  for name, model, h, w in cases:
    for frames in (int(f) for f in args.frames.split(',')):
      latent = (frames - 1) // 4 + 1
      for chunked in (True,) if args.chunked_only else (True, False):
        for method, shape in (('encode', (1, 3, frames, h, w)),
                              ('decode', (1, 16, latent, h // 8, w // 8))):
          for n in counts:
            temp, out, secs = compiled_memory(model, method, shape, dtype, chunked, n)
            path = 'chunked' if chunked else 'unchunked'
            print(f'| {name} | {method} | {frames} ({latent}) | {path} | {n} | '
                  f'{temp / 2**30:.2f} | {out / 2**30:.3f} | {secs:.1f} |', flush=True)


if __name__ == '__main__':
  main()
