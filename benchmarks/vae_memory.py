"""XLA's compiled memory for real-size VAE encode/decode, chunked vs unchunked (no weights, no run).

  python benchmarks/vae_memory.py [--dtype bfloat16] [--backend cpu]

Compiles encode/decode of the released Wan2.1 (480x832) and CogVideoX-5b (480x720) VAE configs
for several frame counts and prints `memory_analysis()` of each executable: temp (activations)
and output bytes. The chunked path's temp memory should not grow with the number of frames.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from vap_jax.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig
from vap_jax.models.vae_wan import AutoencoderKLWan, WanVAEConfig
from vap_jax.weights.loading import abstract_model


def compiled_memory(model, method: str, shape, dtype, chunked: bool):
  graphdef, state = nnx.split(model)

  def run(state, x):
    out = getattr(nnx.merge(graphdef, state), method)(x, chunked=chunked)
    return out.mean if method == 'encode' else out

  start = time.time()
  compiled = jax.jit(run).lower(state, jax.ShapeDtypeStruct(shape, dtype)).compile()
  m = compiled.memory_analysis()
  return m.temp_size_in_bytes, m.output_size_in_bytes, time.time() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--dtype', default='float32')
  args = parser.parse_args(argv)
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
  print('| VAE | op | frames (latent) | path | temp GiB | output GiB | compile s |')
  print('|---|---|---|---|---|---|---|')
  for name, model, h, w in cases:
    for frames in (17, 49):
      latent = (frames - 1) // 4 + 1
      for chunked in (True, False):
        for method, shape in (('encode', (1, 3, frames, h, w)),
                              ('decode', (1, 16, latent, h // 8, w // 8))):
          temp, out, secs = compiled_memory(model, method, shape, dtype, chunked)
          path = 'chunked' if chunked else 'unchunked'
          print(f'| {name} | {method} | {frames} ({latent}) | {path} | {temp / 2**30:.2f} | '
                f'{out / 2**30:.3f} | {secs:.1f} |', flush=True)


if __name__ == '__main__':
  main()
