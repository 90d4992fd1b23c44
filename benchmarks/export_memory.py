"""Peak host memory of exporting to the diffusers layout, on a synthetic multi-shard checkpoint.

  python -m benchmarks.export_memory --width 1024 --layers 6

Writes the synthetic diffusers-layout CogVideoX-VAP transformer of `benchmarks.convert_memory`
(every key of the real layout, random bf16 weights), converts it to Orbax (bf16), then exports
in child processes whose RSS is sampled every 10 ms:

- ``orbax``: `export_folder` from the converted folder (what ``vap-export`` runs),
- ``diffusers``: `export_folder` from the diffusers folder,
- ``model``: `load_cogvideox` onto the CPU, then `export(model)`; on a CPU host the model itself
  is host memory, so the figure above the post-load baseline is what the export adds.

Every export is checked against the source tensor by tensor, then one JSON line per case is
printed: checkpoint size, largest tensor, peak RSS above the baseline, time.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

from benchmarks.convert_memory import memory_fields, run_sampled, write_checkpoint

_CHILD = r'''
import ctypes, gc, json, os, sys
import jax, orbax.checkpoint, flax, tqdm  # imports count toward the baseline, not the export
from flax import nnx
from vap_jax.weights.cogvideox import load_cogvideox
from vap_jax.weights.export import export, export_folder
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
mode, src, dst, shard = sys.argv[1:5]
if mode == 'model':
  model = load_cogvideox(src, dtype='bfloat16')
  jax.block_until_ready(nnx.state(model))
  gc.collect()
  ctypes.CDLL('libc.so.6').malloc_trim(0)
  print(json.dumps({'baseline': rss()}), flush=True)
  export(model, dst, max_shard_size=int(shard))
else:
  print(json.dumps({'baseline': rss()}), flush=True)
  export_folder(src, dst, transformer_only=True, max_shard_size=int(shard))
'''


def check_same(src: Path, dst: Path) -> int:
  """Every tensor of ``dst`` equals the one of ``src`` with its name; returns the count."""
  from vap_jax.weights.safetensors_io import SafetensorsCheckpoint
  a, b = SafetensorsCheckpoint(src), SafetensorsCheckpoint(dst)
  differ = sorted(set(a.keys()) ^ set(b.keys()))
  if differ:
    raise SystemExit(f'{dst}: keys differ from the source: {differ[:5]}')
  for key in a.keys():
    if not np.array_equal(a.read(key), b.read(key)):
      raise SystemExit(f'{dst}: {key} differs from the source')
  return len(a.keys())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--width', type=int, default=1024, help='model width (heads x 64)')
  parser.add_argument('--layers', type=int, default=6)
  parser.add_argument('--shard-mb', type=float, default=256, help='exported shard size')
  parser.add_argument('--cases', default='orbax,diffusers,model')
  args = parser.parse_args(argv)
  config = dict(_class_name='CogVideoXTransformer3DMOTModel', num_attention_heads=args.width // 64,
                attention_head_dim=64, in_channels=32, out_channels=16, time_embed_dim=512,
                text_embed_dim=4096, num_layers=args.layers, sample_width=90, sample_height=60,
                sample_frames=49, patch_size=2, max_text_seq_length=226,
                block_idx_with_mot_ref=list(range(args.layers - 1)))
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    src = Path(tmp) / 'transformer'
    total, largest = write_checkpoint(src, config, ml_dtypes.bfloat16, 64 * 2**20)
    from vap_jax.weights.cogvideox import convert
    convert(src, Path(tmp) / 'orbax', param_dtype='bfloat16', progress=False)
    shard = int(args.shard_mb * 2**20)
    for case in args.cases.split(','):
      source = {'orbax': Path(tmp) / 'orbax', 'diffusers': src, 'model': Path(tmp) / 'orbax'}[case]
      dst = Path(tmp) / f'export_{case}'
      result = run_sampled(_CHILD, case, str(source), str(dst), str(shard))
      tensors = check_same(src, dst)
      row = dict(case=case, checkpoint_mb=round(total / 2**20, 1), tensors=tensors,
                 shards=len(list(dst.glob('*.safetensors'))),
                 largest_tensor_mb=round(largest / 2**20, 1), **memory_fields(result, largest),
                 export_seconds=round(result['seconds'], 1))
      print(json.dumps(row), flush=True)
      rows.append(row)
  return rows


if __name__ == '__main__':
  main()
