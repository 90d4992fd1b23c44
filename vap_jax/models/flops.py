"""Analytic forward FLOPs of one transformer (or video VAE) call (2 FLOPs per multiply-add,
matmuls and convolutions only).

Written out term by term so a reader can check it against the architecture; tests check it
against the dot products in the traced program. Joint attention is counted over the concatenated
length of all streams (that is where VAP's extra cost comes from: ~4x attention per expert block).
"""
from __future__ import annotations

import math

from vap_jax.models.cogvideox import CogVideoXConfig
from vap_jax.models.vae_cogvideox import CogVideoXVAEConfig
from vap_jax.models.wan import WanConfig


def _attention(n_q: int, n_k: int, d: int) -> int:
  return 4 * n_q * n_k * d  # QK^T and PV, summed over heads (heads * head_dim = d)


def cogvideox_flops(cfg: CogVideoXConfig, *, batch: int, frames: int, height: int, width: int,
                    text_len: int, num_refs: int = 0) -> dict[str, int]:
  """Latent frames/height/width; ``num_refs`` references (0 = base model)."""
  d, te, p = cfg.inner_dim, cfg.time_embed_dim, cfg.patch_size
  video = frames * (height // p) * (width // p)
  streams = 2 if num_refs and cfg.block_idx_with_mot_ref else 1
  tokens = [text_len + video] + ([num_refs * (text_len + video)] if streams == 2 else [])
  embed_chunk = 2 * video * cfg.in_channels * p * p * d + 2 * text_len * cfg.text_embed_dim * d
  embed = (1 + (num_refs if streams == 2 else 0)) * embed_chunk
  time = streams * 2 * (d * te + te * te)
  layer = lambda n: 2 * 2 * te * 6 * d + 8 * n * d * d + 16 * n * d * d
  linear = attn = expert_blocks = 0
  for i in range(cfg.num_layers):
    active = tokens if (i in cfg.block_idx_with_mot_ref) else tokens[:1]
    linear += sum(layer(n) for n in active)
    expert_blocks += sum(layer(n) for n in active[1:])
    attn += _attention(sum(active), sum(active), d)
  head = 2 * te * 2 * d + 2 * video * d * p * p * cfg.out_channels
  expert = (num_refs * embed_chunk + 2 * (d * te + te * te) if streams == 2 else 0) + expert_blocks
  return _parts(batch, dict(embed=embed + time, blocks_linear=linear, attention=attn, head=head),
                expert)


def wan_flops(cfg: WanConfig, *, batch: int, frames: int, height: int, width: int, text_len: int,
              image_len: int = 0, num_refs: int = 0) -> dict[str, int]:
  """Latent frames/height/width; ``image_len`` CLIP tokens per stream (0 for T2V)."""
  d, f = cfg.inner_dim, cfg.ffn_dim
  video = (frames // cfg.patch_size[0]) * (height // cfg.patch_size[1]) * (width // cfg.patch_size[2])
  image_len = image_len if cfg.image_dim else 0
  refs = num_refs if cfg.block_idx_with_mot_ref else 0
  chunks = [1] + ([refs] if refs else [])  # references per stream
  per_chunk_context = (2 * text_len * (cfg.text_dim * d + d * d) +
                       2 * image_len * ((cfg.image_dim or 0) ** 2 + (cfg.image_dim or 0) * d))
  time = 2 * (cfg.freq_dim * d + d * d) + 2 * d * 6 * d
  patch = 2 * video * cfg.in_channels * math.prod(cfg.patch_size) * d
  embed = sum(n * (per_chunk_context + time + patch) for n in chunks)

  def weights(n):  # one stream holding n references (n = 1: the target): weight matmuls
    tokens, context = n * video, n * (text_len + image_len)
    return (8 * tokens * d * d                      # self-attention q, k, v, out
            + 4 * tokens * d * d + 4 * context * d * d  # cross-attention q, out; k, v (text, image)
            + 4 * tokens * d * f)                   # feed-forward

  def layer(n):  # ... and the cross-attention scores
    return weights(n) + n * (_attention(video, text_len, d) + _attention(video, image_len, d))
  linear = attn = expert_blocks = 0
  for i in range(cfg.num_layers):
    active = chunks if i in cfg.block_idx_with_mot_ref else chunks[:1]
    linear += sum(layer(n) for n in active)
    expert_blocks += sum(weights(n) for n in active[1:])
    total = sum(n * video for n in active)
    attn += _attention(total, total, d)
  head = 2 * video * d * math.prod(cfg.patch_size) * cfg.out_channels
  expert = sum(n * (per_chunk_context + time + patch) for n in chunks[1:]) + expert_blocks
  return _parts(batch, dict(embed=embed, blocks_linear=linear, attention=attn, head=head), expert)


def cogvideox_vae_flops(cfg: CogVideoXVAEConfig, *, batch: int, frames: int, height: int,
                        width: int) -> dict[str, int]:
  """encode + decode of (frames, height, width) clips. Counted on the whole clip: diffusers'
  frame batches (first 1 + 8k frames, then 8s; 2-latent batches) add up to the same sizes at
  every level, so the batching changes no count. Every weight trains: ``expert`` = ``total``."""
  ch, z, lpb = cfg.block_out_channels, cfg.latent_channels, cfg.layers_per_block
  levels = int(math.log2(cfg.temporal_compression_ratio))
  conv = lambda k, cin, cout, n: 2 * k * cin * cout * n  # k taps at n output positions

  def resnet(cin, cout, n, spatial=False):
    norms = 2 * conv(1, z, cin, n) + 2 * conv(1, z, cout, n) if spatial else 0  # conv_y, conv_b
    return conv(27, cin, cout, n) + conv(27, cout, cout, n) + norms + \
        (conv(1, cin, cout, n) if cin != cout else 0)

  t, h, w = frames, height, width
  enc = conv(27, cfg.in_channels, ch[0], t * h * w)
  for i, cout in enumerate(ch):
    cin = ch[max(i - 1, 0)]
    enc += sum(resnet(cin if j == 0 else cout, cout, t * h * w) for j in range(lpb))
    if i < len(ch) - 1:
      t = (1 + (t - 1) // 2 if t % 2 else t // 2) if i < levels else t
      h, w = h // 2, w // 2
      enc += conv(9, cout, cout, t * h * w)
  enc += 2 * resnet(ch[-1], ch[-1], t * h * w) + conv(27, ch[-1], 2 * z, t * h * w)
  up = ch[::-1]
  dec = conv(27, z, up[0], t * h * w) + 2 * resnet(up[0], up[0], t * h * w, spatial=True)
  for i, cout in enumerate(up):
    cin = up[max(i - 1, 0)]
    dec += sum(resnet(cin if j == 0 else cout, cout, t * h * w, spatial=True)
               for j in range(lpb + 1))
    if i < len(up) - 1:
      if i < levels and t > 1:
        t = 1 + 2 * (t - 1) if t % 2 else 2 * t
      h, w = 2 * h, 2 * w
      dec += conv(9, cout, cout, t * h * w)
  dec += 2 * conv(1, z, up[-1], t * h * w) + conv(27, up[-1], cfg.out_channels, t * h * w)
  return _parts(batch, dict(encoder=enc, decoder=dec, attention=0), enc + dec)


def _parts(batch: int, parts: dict, expert: int) -> dict[str, int]:
  """Scaled by the batch, with their ``total`` and ``expert``: the matmul work done with expert
  weights (its embedders and expert-block projections), whose weight gradients training adds."""
  parts = {k: batch * v for k, v in parts.items()}
  parts['total'] = sum(parts.values())
  parts['expert'] = batch * expert
  return parts


# What a backward pass recomputes of the blocks' forward under each remat policy
# (`vap_jax.models.stack.REMAT_POLICIES`).
RECOMPUTED = {'none': (), 'full': ('blocks_linear', 'attention'),
              'offload_hidden': ('blocks_linear', 'attention'), 'save_dots': ('attention',),
              'save_attention': ('blocks_linear',)}


def training_flops(forward: dict[str, int], remat: str = 'none') -> int:
  """FLOPs of one training step given a forward's parts: the forward, the backward through
  every layer for the input gradients (as many matmul FLOPs as the forward; attention's backward
  is twice its forward), the weight gradients of the expert only (as many as its forward share),
  and the forward work the remat policy recomputes."""
  backward_inputs = forward['total'] + forward['attention']
  recompute = sum(forward[k] for k in RECOMPUTED[remat])
  return forward['total'] + backward_inputs + forward['expert'] + recompute
