"""Peak host memory of the streaming converter on a synthetic multi-shard VAP checkpoint.

  python -m benchmarks.convert_memory --width 1024 --layers 6 --dtype bfloat16

Writes a diffusers-layout CogVideoX-VAP transformer folder (sharded safetensors + index, random
weights, every key of the real layout), converts it to Orbax in a child process while sampling
that process's resident memory, and prints one JSON line: checkpoint size, largest tensor,
peak RSS above the post-import baseline, time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np


def diffusers_keys(c: dict) -> dict[str, tuple[int, ...]]:
  """Every tensor of a diffusers CogVideoXTransformer3DMOTModel state dict (VAP_SPEC §4.3)."""
  d, p, t = c['num_attention_heads'] * c['attention_head_dim'], c['patch_size'], c['time_embed_dim']
  frames = (c['sample_frames'] - 1) // 4 + 1
  length = c['max_text_seq_length'] + frames * (c['sample_height'] // p) * (c['sample_width'] // p)
  keys = {}
  for sfx in ('', '_mot_ref'):
    keys |= {f'patch_embed{sfx}.proj.weight': (d, c['in_channels'], p, p),
             f'patch_embed{sfx}.proj.bias': (d,),
             f'patch_embed{sfx}.text_proj.weight': (d, c['text_embed_dim']),
             f'patch_embed{sfx}.text_proj.bias': (d,), f'patch_embed{sfx}.pos_embedding': (1, length, d),
             f'time_embedding{sfx}.linear_1.weight': (t, d), f'time_embedding{sfx}.linear_1.bias': (t,),
             f'time_embedding{sfx}.linear_2.weight': (t, t), f'time_embedding{sfx}.linear_2.bias': (t,)}
  for i in range(c['num_layers']):
    for sfx in ('', '_mot_ref') if i in c['block_idx_with_mot_ref'] else ('',):
      b = f'transformer_blocks.{i}.'
      for n in ('norm1', 'norm2'):
        keys |= {f'{b}{n}{sfx}.linear.weight': (6 * d, t), f'{b}{n}{sfx}.linear.bias': (6 * d,),
                 f'{b}{n}{sfx}.norm.weight': (d,), f'{b}{n}{sfx}.norm.bias': (d,)}
      for n in ('to_q', 'to_k', 'to_v', 'to_out.0'):
        keys |= {f'{b}attn1{sfx}.{n}.weight': (d, d), f'{b}attn1{sfx}.{n}.bias': (d,)}
      for n in ('norm_q', 'norm_k'):
        keys |= {f'{b}attn1{sfx}.{n}.weight': (c['attention_head_dim'],),
                 f'{b}attn1{sfx}.{n}.bias': (c['attention_head_dim'],)}
      keys |= {f'{b}ff{sfx}.net.0.proj.weight': (4 * d, d), f'{b}ff{sfx}.net.0.proj.bias': (4 * d,),
               f'{b}ff{sfx}.net.2.weight': (d, 4 * d), f'{b}ff{sfx}.net.2.bias': (d,)}
  keys |= {'norm_final.weight': (d,), 'norm_final.bias': (d,),
           'norm_out.linear.weight': (2 * d, t), 'norm_out.linear.bias': (2 * d,),
           'norm_out.norm.weight': (d,), 'norm_out.norm.bias': (d,),
           'proj_out.weight': (p * p * c['out_channels'], d), 'proj_out.bias': (p * p * c['out_channels'],)}
  return keys


def write_checkpoint(folder: Path, config: dict, dtype, shard_bytes: int) -> tuple[int, int]:
  """Sharded safetensors + index, written shard by shard. Returns (total bytes, largest tensor)."""
  from safetensors.numpy import save_file
  folder.mkdir(parents=True)
  (folder / 'config.json').write_text(json.dumps(config))
  rng = np.random.default_rng(0)
  shapes = diffusers_keys(config)
  shard, size, shards, weight_map = {}, 0, 0, {}
  itemsize = np.dtype(dtype).itemsize
  total = sum(int(np.prod(s)) for s in shapes.values()) * itemsize

  def flush():
    nonlocal shard, size, shards
    name = f'diffusion_pytorch_model-{shards + 1:05d}.safetensors'
    save_file(shard, folder / name)
    weight_map.update({k: name for k in shard})
    shard, size, shards = {}, 0, shards + 1

  for key, shape in shapes.items():
    nbytes = int(np.prod(shape)) * itemsize
    if shard and size + nbytes > shard_bytes:
      flush()
    shard[key] = (0.02 * rng.standard_normal(shape, np.float32)).astype(dtype)
    size += nbytes
  flush()
  (folder / 'diffusion_pytorch_model.safetensors.index.json').write_text(json.dumps(
      {'metadata': {'total_size': total}, 'weight_map': weight_map}))
  return total, max(int(np.prod(s)) for s in shapes.values()) * itemsize


_CHILD = r'''
import os, sys, json, resource
import jax, orbax.checkpoint, flax  # imports count toward the baseline, not the conversion
from vap_jax.weights.cogvideox import convert
base = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
print(json.dumps({'baseline': base}), flush=True)
group = int(float(sys.argv[4]) * 2**20) if sys.argv[4] != 'default' else None
convert(sys.argv[1], sys.argv[2], param_dtype=sys.argv[3], progress=False, group_bytes=group)
print(json.dumps({'done': True}), flush=True)
'''


def run_sampled(script: str, *args: str) -> dict:
  """Run ``python -c script args`` in a child (JAX on CPU) and sample its resident memory every
  10 ms. The child prints ``{"baseline": bytes}`` when the measured part starts: peaks and
  seconds count from then (what came before, e.g. loading a model, is not measured)."""
  proc = subprocess.Popen([sys.executable, '-c', script, *args], stdout=subprocess.PIPE,
                          text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  peak, baseline, start = {}, None, time.time()

  def sample():
    status = Path(f'/proc/{proc.pid}/status')
    while proc.poll() is None:
      try:
        fields = dict(line.split(':', 1) for line in status.read_text().splitlines())
        for name in ('VmRSS', 'RssAnon', 'RssFile'):
          if baseline is not None:
            peak[name] = max(peak.get(name, 0), int(fields[name].split()[0]) * 1024)
      except (FileNotFoundError, ProcessLookupError, KeyError, ValueError):
        break
      time.sleep(0.01)
  sampler = threading.Thread(target=sample)
  sampler.start()
  for line in proc.stdout:
    msg = json.loads(line)
    if 'baseline' in msg:
      baseline, start = msg['baseline'], time.time()
  proc.wait()
  sampler.join()
  if proc.returncode:
    raise SystemExit(f'the measured child failed with exit code {proc.returncode}')
  return dict(peak_rss=peak['VmRSS'], peak_anon=peak['RssAnon'], peak_file=peak['RssFile'],
              baseline_rss=baseline, seconds=time.time() - start)


def memory_fields(result: dict, largest: int) -> dict:
  """The peak-memory columns of a result row, in MB (and the peak above baseline / largest)."""
  above = result['peak_rss'] - result['baseline_rss']
  mb = lambda b: round(b / 2**20, 1)  # noqa: E731
  return dict(baseline_rss_mb=mb(result['baseline_rss']), peak_rss_mb=mb(result['peak_rss']),
              peak_anon_mb=mb(result['peak_anon']), peak_file_backed_mb=mb(result['peak_file']),
              peak_above_baseline_mb=mb(above),
              peak_above_baseline_over_largest=round(above / largest, 2))


def measure(src: Path, dst: Path, dtype: str, group_mb: str) -> dict:
  """Run the conversion in a child; sample its RSS every 10 ms."""
  result = run_sampled(_CHILD, str(src), str(dst), dtype, group_mb)
  return dict(result, convert_seconds=result['seconds'])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--width', type=int, default=1024, help='model width (heads x 64)')
  parser.add_argument('--layers', type=int, default=6)
  parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  parser.add_argument('--shard-mb', type=float, default=64)
  parser.add_argument('--group-mb', default='default', help="converter write group ('default': 2x largest tensor)")
  args = parser.parse_args(argv)
  config = dict(_class_name='CogVideoXTransformer3DMOTModel', num_attention_heads=args.width // 64,
                attention_head_dim=64, in_channels=32, out_channels=16, time_embed_dim=512,
                text_embed_dim=4096, num_layers=args.layers, sample_width=90, sample_height=60,
                sample_frames=49, patch_size=2, max_text_seq_length=226,
                block_idx_with_mot_ref=list(range(args.layers - 1)))
  dtype = ml_dtypes.bfloat16 if args.dtype == 'bfloat16' else np.float32
  with tempfile.TemporaryDirectory() as tmp:
    src = Path(tmp) / 'transformer'
    total, largest = write_checkpoint(src, config, dtype, int(args.shard_mb * 2**20))
    result = measure(src, Path(tmp) / 'orbax', args.dtype, args.group_mb)
    shards = len(list(src.glob('*.safetensors')))
  row = dict(checkpoint_mb=round(total / 2**20, 1), shards=shards,
             largest_tensor_mb=round(largest / 2**20, 1), dtype=args.dtype, group_mb=args.group_mb,
             **memory_fields(result, largest),
             convert_seconds=round(result['convert_seconds'], 1))
  print(json.dumps(row))
  return row


if __name__ == '__main__':
  main()
