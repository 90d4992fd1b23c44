"""Denoising-step benchmark: latency, compile time, TFLOP/s, MFU and peak memory of one jitted
transformer forward, for JAX and (base models) the PyTorch diffusers reference side by side.

  python -m benchmarks.step --model cogvideox-vap --attention cudnn
  python -m benchmarks.step --model wan-base --torch        # adds diffusers+SDPA on the same device
  python -m benchmarks.step --model cogvideox-tiny --repeats 3   # CPU smoke run

Models are built at real size with random weights (no checkpoint), bf16, at the official shapes:
CogVideoX 49x480x720 (latents 13x60x90), Wan 49x480x832 (latents 13x60x104), one reference,
CFG batch 2. Peak FLOP/s is measured in the same run with a large matmul in the model's dtype.
Each run prints one JSON line and a readable row; ``--out`` appends the JSON lines to a file.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vap_jax.config import load_config
from vap_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer, rope_table
from vap_jax.models.flops import cogvideox_flops, wan_flops
from vap_jax.models.wan import KEEP_FP32, WanConfig, WanTransformer
from vap_jax.nn.dtypes import DTypePolicy


@dataclasses.dataclass(frozen=True)
class Case:
  family: str         # 'cogvideox' | 'wan'
  config: object
  frames: int         # latent frames
  height: int         # latent height
  width: int
  text_len: int
  image_len: int = 0  # CLIP tokens (Wan)
  refs: int = 1


CONFIGS = Path(__file__).resolve().parents[1] / 'configs'


def _model_config(name: str, arg: str | None):
  return load_config(CONFIGS / f'{name}.py{":" + arg if arg else ""}').model


def _cog(name, arg=None, **shape):
  cfg = CogVideoXConfig(**_model_config(name, arg))
  return Case('cogvideox', cfg, **shape, refs=1 if cfg.block_idx_with_mot_ref else 0)


def _wan(name, arg=None, **shape):
  cfg = WanConfig(**_model_config(name, arg))
  return Case('wan', cfg, **shape, refs=1 if cfg.block_idx_with_mot_ref else 0)


def _small(case: Case, **changes) -> Case:
  """The real architecture narrowed and shortened, for CPU comparisons."""
  return dataclasses.replace(case, config=dataclasses.replace(case.config, **changes))


COG_SMALL = dict(num_layers=4, num_attention_heads=8, sample_height=30, sample_width=44,
                 sample_frames=17, dtypes=DTypePolicy())
WAN_SMALL = dict(num_layers=4, num_attention_heads=8, attention_head_dim=64, ffn_dim=1536,
                 added_kv_proj_dim=512, dtypes=DTypePolicy(keep_fp32=KEEP_FP32))
COG_SHAPE = dict(frames=13, height=60, width=90, text_len=226)
WAN_SHAPE = dict(frames=13, height=60, width=104, text_len=512, image_len=257)
CASES = {
    'cogvideox-vap': lambda: _cog('cogvideox_5b_vap', **COG_SHAPE),
    'cogvideox-base': lambda: _cog('cogvideox_5b_vap', 'base', **COG_SHAPE),
    'wan-vap': lambda: _wan('wan_i2v_14b_vap', **WAN_SHAPE),
    'wan-base': lambda: _wan('wan_i2v_14b_vap', 'base', **WAN_SHAPE),
    # CPU-sized: 4 layers, width 512, 17 frames at 240x352 (Cog) / 240x416 (Wan), float32.
    'cogvideox-small-base': lambda: _small(_cog('cogvideox_5b_vap', 'base', frames=5, height=30,
                                                width=44, text_len=226), **COG_SMALL),
    'cogvideox-small': lambda: _small(_cog('cogvideox_5b_vap', frames=5, height=30, width=44,
                                           text_len=226), block_idx_with_mot_ref=(0, 1, 2),
                                      **COG_SMALL),
    'wan-small-base': lambda: _small(_wan('wan_i2v_14b_vap', 'base', frames=5, height=30, width=52,
                                          text_len=512, image_len=257), **WAN_SMALL),
    'wan-small': lambda: _small(_wan('wan_i2v_14b_vap', frames=5, height=30, width=52, text_len=512,
                                     image_len=257), block_idx_with_mot_ref=(0, 2), **WAN_SMALL),
    'cogvideox-tiny': lambda: _cog('cogvideox_tiny', frames=3, height=8, width=12, text_len=8),
    'cogvideox-tiny-base': lambda: _cog('cogvideox_tiny', 'base', frames=3, height=8, width=12,
                                        text_len=8),
    'wan-tiny': lambda: _wan('wan_tiny', frames=3, height=8, width=8, text_len=512, image_len=257),
    'wan-tiny-base': lambda: _wan('wan_tiny', 'base', frames=3, height=8, width=8, text_len=512,
                                  image_len=257),
}


def inputs(case: Case, batch: int, seed: int = 0) -> tuple[tuple, dict]:
  """Random model inputs, (latents, timestep, text) and the keyword inputs (numpy, float32 /
  int32), as either transformer takes them."""
  rng = np.random.default_rng(seed)
  cfg, n = case.config, case.refs
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  t = np.full((batch,), 500, np.int32)
  if case.family == 'cogvideox':
    lat = lambda f: normal(batch, f, cfg.in_channels, case.height, case.width)
    args = (lat(case.frames), t, normal(batch, case.text_len, cfg.text_embed_dim))
    refs = dict(ref_latents=lat(n * case.frames),
                ref_text=normal(batch, n * case.text_len, cfg.text_embed_dim)) if n else {}
    return args, refs
  lat = lambda f: normal(batch, cfg.in_channels, f, case.height, case.width)
  args = (lat(case.frames), t, normal(batch, case.text_len, cfg.text_dim))
  kw = dict(image=normal(batch, case.image_len, cfg.image_dim))
  if n:
    kw.update(ref_latents=lat(n * case.frames),
              ref_text=normal(batch, n * case.text_len, cfg.text_dim),
              ref_image=normal(batch, n * case.image_len, cfg.image_dim))
  return args, kw


def model_flops(case: Case, batch: int) -> int:
  shape = dict(batch=batch, frames=case.frames, height=case.height, width=case.width,
               text_len=case.text_len, num_refs=case.refs)
  if case.family == 'cogvideox':
    return cogvideox_flops(case.config, **shape)['total']
  return wan_flops(case.config, image_len=case.image_len, **shape)['total']


def measure_peak_flops(size: int, dtype='bfloat16', repeats: int = 5) -> float:
  """Achieved matmul FLOP/s in the model's compute dtype on the default device (MFU reference)."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size ** 3 / min(times)


def _peak_memory() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def time_jax(case: Case, batch: int, attention: str, repeats: int, warmup: int) -> dict:
  cfg = dataclasses.replace(case.config, attention=attention)
  build = CogVideoXTransformer if case.family == 'cogvideox' else WanTransformer
  model = nnx.jit(lambda: build(cfg, rngs=nnx.Rngs(0)))()  # random weights, made on the device
  graphdef, state = nnx.split(model)
  args, kw = jax.tree.map(jnp.asarray, inputs(case, batch))
  step = jax.jit(lambda s, a, k: nnx.merge(graphdef, s)(*a, **k))
  start = time.perf_counter()
  compiled = step.lower(state, args, kw).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    compiled(state, args, kw).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    compiled(state, args, kw).block_until_ready()
    times.append(time.perf_counter() - start)
  return dict(seconds=statistics.median(times), compile_seconds=compile_s,
              peak_memory_bytes=_peak_memory())


def torch_model(case: Case, device: str):
  """The diffusers base model for ``case`` (expert off), random weights, bf16, SDPA attention."""
  import torch
  from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel
  cfg = case.config
  with torch.device(device):
    if case.family == 'cogvideox':
      model = CogVideoXTransformer3DModel(
          num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
          in_channels=cfg.in_channels, out_channels=cfg.out_channels,
          time_embed_dim=cfg.time_embed_dim, text_embed_dim=cfg.text_embed_dim,
          num_layers=cfg.num_layers, sample_width=cfg.sample_width,
          sample_height=cfg.sample_height, sample_frames=cfg.sample_frames,
          patch_size=cfg.patch_size, max_text_seq_length=cfg.max_text_seq_length,
          use_rotary_positional_embeddings=cfg.use_rotary_positional_embeddings,
          use_learned_positional_embeddings=cfg.use_learned_positional_embeddings)
    else:
      model = WanTransformer3DModel(
          patch_size=cfg.patch_size, num_attention_heads=cfg.num_attention_heads,
          attention_head_dim=cfg.attention_head_dim, in_channels=cfg.in_channels,
          out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
          ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, image_dim=cfg.image_dim,
          added_kv_proj_dim=cfg.added_kv_proj_dim, rope_max_seq_len=cfg.rope_max_seq_len)
  return model.to(torch.bfloat16).eval()


def time_torch(case: Case, batch: int, repeats: int, warmup: int) -> dict:
  import torch
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = torch_model(case, device)
  (latents, t, text), kw = inputs(case, batch)
  to = lambda a: (torch.from_numpy(a).to(device).to(torch.bfloat16) if a.dtype == np.float32
                  else torch.from_numpy(a).to(device))
  latents, t, text = to(latents), to(t), to(text)
  if case.family == 'cogvideox':
    rope = rope_table(case.config, case.frames, case.height, case.width)
    rope = tuple(torch.from_numpy(np.array(r)).to(device) for r in rope)
    call = lambda: model(latents, text, t, image_rotary_emb=rope, return_dict=False)[0]
  else:
    image = to(kw['image'])
    call = lambda: model(latents, t, text, encoder_hidden_states_image=image,
                         return_dict=False)[0]
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  with torch.no_grad():
    for _ in range(warmup):
      call()
    sync()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      call()
      sync()
      times.append(time.perf_counter() - start)
  peak = torch.cuda.max_memory_allocated() if device == 'cuda' else None
  return dict(seconds=statistics.median(times), compile_seconds=0.0, peak_memory_bytes=peak,
              torch_version=torch.__version__)


def run(model: str, *, attention: str = 'xla', batch: int = 2, repeats: int = 5, warmup: int = 2,
        with_torch: bool = False, peak_size: int | None = None) -> list[dict]:
  case = CASES[model]()
  device = jax.devices()[0]
  peak = measure_peak_flops(peak_size or (8192 if device.platform != 'cpu' else 1024),
                            case.config.dtypes.compute)
  flops = model_flops(case, batch)
  common = dict(model=model, batch=batch, refs=case.refs, device=device.device_kind,
                platform=device.platform, jax_version=jax.__version__,
                date=datetime.date.today().isoformat(), host=platform.node(),
                model_tflops_per_step=flops / 1e12, peak_tflops_measured=peak / 1e12)
  rows = []
  timed = [('jax', attention, lambda: time_jax(case, batch, attention, repeats, warmup))]
  if with_torch:
    if case.refs:
      raise ValueError(f'{model}: the PyTorch comparison runs the base models (diffusers has no '
                       'VAP expert); use a *-base model')
    timed.append(('torch', 'sdpa', lambda: time_torch(case, batch, repeats, warmup)))
  for framework, attn, fn in timed:
    result = fn()
    achieved = flops / result['seconds']
    rows.append(dict(common, framework=framework, attention=attn, **result,
                     achieved_tflops=achieved / 1e12, mfu=achieved / peak))
  return rows


def format_row(r: dict) -> str:
  mem = 'n/a' if r['peak_memory_bytes'] is None else f"{r['peak_memory_bytes'] / 2**30:.1f} GiB"
  return (f"{r['model']:<20} {r['framework']:<6} {r['attention']:<9} {r['seconds']:.4f} s/step  "
          f"compile {r['compile_seconds']:.1f} s  {r['model_tflops_per_step']:.4g} TFLOP  "
          f"{r['achieved_tflops']:.4g} TFLOP/s  MFU {100 * r['mfu']:.1f}%  peak mem {mem}")


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', required=True, choices=sorted(CASES))
  parser.add_argument('--attention', default='xla', choices=['xla', 'cudnn', 'blockwise'])
  parser.add_argument('--batch', type=int, default=2, help='2 = the CFG batch')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--torch', action='store_true', help='also time the diffusers base model')
  parser.add_argument('--out', help='append JSON lines to this file')
  args = parser.parse_args(argv)
  rows = run(args.model, attention=args.attention, batch=args.batch, repeats=args.repeats,
             warmup=args.warmup, with_torch=args.torch)
  for r in rows:
    print(json.dumps(r))
  for r in rows:
    print(format_row(r))
  if args.out:
    with open(args.out, 'a') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
  return rows


if __name__ == '__main__':
  main()
