"""What the checksums of converted folders cost: recording them at conversion, the size check on
every load, and the full sha256 check of ``vap-convert --verify``, beside the restore itself.

  python -m benchmarks.checksums --width 1024 --layers 6

Writes a synthetic CogVideoX-VAP transformer (`benchmarks.convert_memory`), converts it, then
times each step on the converted folder (fastest of ``--repeat`` passes; the page cache is warm,
so the hash figures are CPU-bound, not disk-bound). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ml_dtypes


def _fastest(fn, repeat: int) -> float:
  best = float('inf')
  for _ in range(repeat):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def run(width: int = 1024, layers: int = 6, repeat: int = 3) -> dict:
  from benchmarks.convert_memory import write_checkpoint
  from vap_jax.weights import integrity, orbax_io
  from vap_jax.weights.cogvideox import convert, load_cogvideox
  config = dict(_class_name='CogVideoXTransformer3DMOTModel', num_attention_heads=width // 64,
                attention_head_dim=64, in_channels=32, out_channels=16, time_embed_dim=512,
                text_embed_dim=4096, num_layers=layers, sample_width=90, sample_height=60,
                sample_frames=49, patch_size=2, max_text_seq_length=226,
                block_idx_with_mot_ref=list(range(layers - 1)))
  with tempfile.TemporaryDirectory() as tmp:
    src, dst = Path(tmp) / 'transformer', Path(tmp) / 'orbax'
    total, _ = write_checkpoint(src, config, ml_dtypes.bfloat16, 64 * 2**20)
    start = time.perf_counter()
    convert(src, dst, param_dtype='bfloat16', progress=False)
    convert_seconds = time.perf_counter() - start
    files = orbax_io.read_config(dst)['files']
    row = dict(
        checkpoint_mb=round(total / 2**20, 1), files=len(files),
        state_mb=round(sum(f['bytes'] for f in files.values()) / 2**20, 1),
        convert_seconds=round(convert_seconds, 2),
        record_seconds=round(_fastest(lambda: integrity.record(dst, dst / 'state'), repeat), 3),
        size_check_seconds=round(_fastest(lambda: integrity.check(dst, files), repeat), 4),
        full_check_seconds=round(_fastest(lambda: integrity.check(dst, files, full=True),
                                          repeat), 3),
        restore_seconds=round(_fastest(lambda: load_cogvideox(dst, dtype='bfloat16'), repeat), 2))
  row['full_check_mb_per_s'] = round(row['state_mb'] / row['full_check_seconds'])
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--width', type=int, default=1024, help='model width (heads x 64)')
  parser.add_argument('--layers', type=int, default=6)
  parser.add_argument('--repeat', type=int, default=3, help='passes per timing (fastest kept)')
  args = parser.parse_args(argv)
  row = run(args.width, args.layers, args.repeat)
  print(json.dumps(row))
  return row


if __name__ == '__main__':
  main()
