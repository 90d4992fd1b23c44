"""Chunked decode keeps XLA's activation memory flat in the number of frames (compile only:
abstract weights, nothing runs). The released layouts with one resnet per block (compile time);
real-size figures for the released configs: benchmarks/RESULTS.md."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from vap_jax.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig
from vap_jax.models.vae_wan import AutoencoderKLWan, WanVAEConfig
from vap_jax.weights.loading import abstract_model


def _decode_temp_bytes(model, latents_shape, chunked=True):
  graphdef, state = nnx.split(model)
  run = lambda state, z: nnx.merge(graphdef, state).decode(z, chunked=chunked)
  compiled = jax.jit(run).lower(state, jax.ShapeDtypeStruct(latents_shape, jnp.float32)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('make', [
    lambda: AutoencoderKLWan(WanVAEConfig(num_res_blocks=1), rngs=nnx.Rngs(0)),
    lambda: AutoencoderKLCogVideoX(CogVideoXVAEConfig(layers_per_block=1), rngs=nnx.Rngs(0)),
], ids=['wan', 'cogvideox'])
def test_chunked_decode_memory_does_not_grow_with_frames(make):
  model = abstract_model(make)
  short = _decode_temp_bytes(model, (1, 16, 7, 8, 8))    # 25 frames (Cog: 3 + 2 x 2 latents)
  long = _decode_temp_bytes(model, (1, 16, 13, 8, 8))    # 49 frames
  assert long < 1.1 * short, (short, long)
