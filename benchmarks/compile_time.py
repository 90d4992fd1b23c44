"""Compile time of one transformer forward vs depth, with the blocks scanned or unrolled.

  python -m benchmarks.compile_time                       # 8, 20, 42 layers, both backbones
  python -m benchmarks.compile_time --layers 8 20 --families wan

Tiny width (the real layer structure at CPU size: 4 heads x 16, one reference), expert
placements of the released recipes scaled to the depth (CogVideoX: every block but the last;
Wan: every fourth). Times `jit(...).lower(...).compile()` of the forward from abstract inputs
on the default backend, once per configuration in a fresh jit (nothing cached between them).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import time
from pathlib import Path

import jax
from flax import nnx

from vap_jax.config import load_config
from vap_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer
from vap_jax.models.wan import WanConfig, WanTransformer
from vap_jax.weights.loading import abstract_model

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'


def _case(family: str, layers: int, scan: bool):
  if family == 'cogvideox':
    cfg = CogVideoXConfig(**load_config(CONFIGS / 'cogvideox_tiny.py').model)
    cfg = dataclasses.replace(cfg, num_layers=layers, scan_layers=scan,
                              block_idx_with_mot_ref=tuple(range(layers - 1)))
    sd = jax.ShapeDtypeStruct
    args = (sd((2, 3, 8, 8, 12), 'float32'), sd((2,), 'int32'), sd((2, 8, 16), 'float32'))
    kw = dict(ref_latents=sd((2, 3, 8, 8, 12), 'float32'), ref_text=sd((2, 8, 16), 'float32'))
    return CogVideoXTransformer, cfg, args, kw
  cfg = WanConfig(**load_config(CONFIGS / 'wan_tiny.py').model)
  cfg = dataclasses.replace(cfg, num_layers=layers, scan_layers=scan,
                            block_idx_with_mot_ref=tuple(range(0, layers, 4)))
  sd = jax.ShapeDtypeStruct
  c = cfg
  args = (sd((2, c.in_channels, 3, 8, 8), 'float32'), sd((2,), 'int32'),
          sd((2, 6, c.text_dim), 'float32'))
  kw = dict(image=sd((2, 5, c.image_dim), 'float32'),
            ref_latents=sd((2, c.in_channels, 3, 8, 8), 'float32'),
            ref_text=sd((2, 6, c.text_dim), 'float32'), ref_image=sd((2, 5, c.image_dim), 'float32'))
  return WanTransformer, cfg, args, kw


def compile_seconds(family: str, layers: int, scan: bool) -> float:
  build, cfg, args, kw = _case(family, layers, scan)
  graphdef, state = nnx.split(abstract_model(lambda: build(cfg, rngs=nnx.Rngs(0))))
  forward = jax.jit(lambda s, a, k: nnx.merge(graphdef, s)(*a, **k))
  start = time.perf_counter()
  forward.lower(state, args, kw).compile()
  return time.perf_counter() - start


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--layers', type=int, nargs='+', default=[8, 20, 42])
  parser.add_argument('--families', nargs='+', default=['cogvideox', 'wan'])
  args = parser.parse_args(argv)
  rows = []
  for family in args.families:
    for layers in args.layers:
      row = dict(family=family, layers=layers)
      for scan in (True, False):
        row['scan_s' if scan else 'unrolled_s'] = round(compile_seconds(family, layers, scan), 2)
      row.update(device=jax.devices()[0].device_kind, jax=jax.__version__,
                 date=datetime.date.today().isoformat(), host=platform.node())
      print(json.dumps(row), flush=True)
      rows.append(row)
  return rows


if __name__ == '__main__':
  main()
