"""The analytic FLOP counts equal a hand count and the dot products of the traced forward."""
import dataclasses

import jax
import jax.extend
import numpy as np
from flax import nnx

from conftest import config_file
from vap_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer
from vap_jax.models.flops import cogvideox_flops, wan_flops
from vap_jax.models.wan import WanConfig, WanTransformer


def traced_matmul_flops(fn, *args, **kwargs) -> int:
  """2 * (batch * M * N * K) summed over every dot_general in the program, nested ones included
  (a scan's body once per iteration)."""
  def count(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        (lhs_contract, _), (lhs_batch, _) = eqn.params['dimension_numbers']
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        out = eqn.outvars[0].aval.shape
        total += 2 * int(np.prod(out)) * int(np.prod([lhs[i] for i in lhs_contract]))
      repeats = eqn.params['length'] if eqn.primitive.name == 'scan' else 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        total += repeats * count(sub)
    return total
  return count(jax.make_jaxpr(lambda a, k: fn(*a, **k))(args, kwargs).jaxpr)


def test_cogvideox_hand_count():
  """1 layer with an expert, width 32 (2x16), temb 8, text 16->32, 1 frame of 4x4 latents, 2x2
  patches (4 video tokens), 3 text tokens, 1 reference, batch 1."""
  cfg = CogVideoXConfig(num_layers=1, num_attention_heads=2, attention_head_dim=16, in_channels=8,
                        out_channels=4, time_embed_dim=8, text_embed_dim=16, sample_height=4,
                        sample_width=4, sample_frames=1, max_text_seq_length=3,
                        block_idx_with_mot_ref=(0,))
  n = 3 + 4  # tokens per stream
  embed = 2 * (2 * 4 * 32 * 32 + 2 * 3 * 16 * 32) + 2 * 2 * (32 * 8 + 8 * 8)
  per_stream = 2 * 2 * 8 * 192 + 8 * n * 32 * 32 + 16 * n * 32 * 32
  attention = 4 * (2 * n) * (2 * n) * 32
  head = 2 * 8 * 64 + 2 * 4 * 32 * 16
  counted = cogvideox_flops(cfg, batch=1, frames=1, height=4, width=4, text_len=3, num_refs=1)
  assert counted['total'] == embed + 2 * per_stream + attention + head


def _check_against_trace(model, flops, *args, **kwargs):
  traced = traced_matmul_flops(model, *args, **kwargs)
  assert flops['total'] == traced, (flops, traced)


def test_cogvideox_counts_equal_traced_dots():
  cfg = CogVideoXConfig(**config_file('cogvideox_tiny.py').model)
  model = CogVideoXTransformer(cfg, rngs=nnx.Rngs(0))
  sd = jax.ShapeDtypeStruct
  for n in (0, 2):
    args = [sd((2, 3, 8, 8, 12), 'float32'), sd((2,), 'int32'), sd((2, 8, 16), 'float32')]
    refs = dict(ref_latents=sd((2, 3 * n, 8, 8, 12), 'float32'),
                ref_text=sd((2, 8 * n, 16), 'float32')) if n else {}
    flops = cogvideox_flops(cfg, batch=2, frames=3, height=8, width=12, text_len=8, num_refs=n)
    _check_against_trace(model, flops, *args, **refs)


def test_wan_counts_equal_traced_dots():
  cfg = WanConfig(**config_file('wan_tiny.py').model)
  model = WanTransformer(cfg, rngs=nnx.Rngs(0))
  sd = jax.ShapeDtypeStruct
  for n in (0, 2):
    args = [sd((2, 12, 3, 8, 8), 'float32'), sd((2,), 'int32'), sd((2, 6, 16), 'float32')]
    kw = dict(image=sd((2, 5, 20), 'float32'))
    if n:
      kw.update(ref_latents=sd((2, 12, 3 * n, 8, 8), 'float32'),
                ref_text=sd((2, 6 * n, 16), 'float32'), ref_image=sd((2, 5 * n, 20), 'float32'))
    flops = wan_flops(cfg, batch=2, frames=3, height=8, width=8, text_len=6, image_len=5, num_refs=n)
    _check_against_trace(model, flops, *args, **kw)
  t2v = dataclasses.replace(cfg, image_dim=None, added_kv_proj_dim=None, block_idx_with_mot_ref=())
  _check_against_trace(WanTransformer(t2v, rngs=nnx.Rngs(0)),
                       wan_flops(t2v, batch=1, frames=3, height=8, width=8, text_len=6),
                       sd((1, 12, 3, 8, 8), 'float32'), sd((1,), 'int32'), sd((1, 6, 16), 'float32'))
