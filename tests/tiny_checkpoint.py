"""Write a complete tiny diffusers-layout VAP checkpoint folder (random weights) for tests.

  python tests/tiny_checkpoint.py --family cogvideox --out /tmp/tiny_cog
  python tests/tiny_checkpoint.py --family wan --out /tmp/tiny_wan --shard-size 20KB

The folder has the layout of ``ByteDance/Video-As-Prompt-CogVideoX-5B`` / ``-Wan2.1-14B``:
``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` and for Wan ``image_encoder/`` and ``image_processor/``. Every network is a genuine
``save_pretrained`` output of the PyPI PyTorch class (diffusers / transformers, the ``test``
extra), at the sizes of the official tiny components in ``tests/data/*_pipeline/components``:

- transformer: the PyPI base I2V transformer with its weights perturbed, plus the VAP expert made
  the way the official code initialises it (VAP_SPEC §4.3): every module that has a ``_mot_ref``
  twin in the official state dict (`EXPERT_MODULES`) is deep-copied under the twin name (on the
  blocks in ``block_idx_with_mot_ref``) and perturbed by small noise. It is saved as a subclass
  named ``CogVideoXTransformer3DMOTModel`` / ``WanTransformer3DMOTModel`` with the VAP config
  fields, so ``config.json`` reads like the official one.
- vae, text_encoder (T5 / umT5), image_encoder (CLIP vision) + ``preprocessor_config.json``.
- tokenizer: a unigram sentencepiece model trained here (~1 s), in the layout the official
  ``tokenizer/`` folders have (``spiece.model``, ``tokenizer_config.json``,
  ``special_tokens_map.json``).
- scheduler: ``CogVideoXDDIMScheduler`` (v-prediction, zero-SNR, trailing) or
  ``UniPCMultistepScheduler`` (flow prediction, shift 3), as in the official components.

Sizes: a 9-frame 64x96 (CogVideoX) / 48x64 (Wan) generation is 3 latent frames of 4x6 / 3x4
tokens. The weights are random: outputs are noise, only shapes and plumbing are meaningful.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np

FAMILIES = ('cogvideox', 'wan')

# Modules that get an expert twin named ``<module>_mot_ref``: (top-level, per expert block).
# Derived from the official tiny components' key names (tests/data/*_pipeline/components).
EXPERT_MODULES = {
    'cogvideox': (('patch_embed', 'time_embedding'), ('norm1', 'norm2', 'attn1', 'ff')),
    'wan': (('patch_embedding', 'condition_embedder'),
            ('attn1', 'attn2', 'ffn', 'norm2', 'scale_shift_table')),
}
BLOCKS = {'cogvideox': 'transformer_blocks', 'wan': 'blocks'}

COGVIDEOX_TRANSFORMER = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=8,
    text_embed_dim=16, num_layers=3, sample_width=12, sample_height=8, sample_frames=9,
    patch_size=2, max_text_seq_length=8, attention_bias=True, use_rotary_positional_embeddings=True,
    use_learned_positional_embeddings=True)
COGVIDEOX_VAP = dict(block_idx_with_mot_ref=[0, 1], attention_head_dim_mot_ref=None,
                     supported_effect_types=None, num_ref_embeddings=None, reference_train_mode=None,
                     ablation_single_encoder=False, ablation_residual_addition=False)
WAN_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12,
    out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=4, image_dim=20,
    added_kv_proj_dim=24, rope_max_seq_len=32, cross_attn_norm=True,
    qk_norm='rms_norm_across_heads')
WAN_VAP = dict(block_idx_with_mot_ref=[0, 2], attention_head_dim_mot_ref=None,
               supported_effect_types=None, num_ref_embeddings=None, reference_train_mode=None)

COGVIDEOX_VAE = dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                     norm_num_groups=2, sample_height=64, sample_width=96, scaling_factor=0.7,
                     temporal_compression_ratio=4)
WAN_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
               temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.05, 0.3],
               latents_std=[0.9, 1.1, 1.3, 0.7])
TEXT_ENCODER = dict(vocab_size=160, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                    relative_attention_num_buckets=8, relative_attention_max_distance=20,
                    feed_forward_proj='gated-gelu', dropout_rate=0.0, use_cache=False,
                    tie_word_embeddings=False)
IMAGE_ENCODER = dict(hidden_size=20, intermediate_size=40, num_hidden_layers=3,
                     num_attention_heads=2, image_size=32, patch_size=8, projection_dim=20,
                     hidden_act='gelu')

COGVIDEOX_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                           clip_sample=False, prediction_type='v_prediction',
                           rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=1.0,
                           steps_offset=0, timestep_spacing='trailing')
WAN_SCHEDULER = dict(prediction_type='flow_prediction', use_flow_sigmas=True, flow_shift=3.0,
                     solver_order=2, solver_type='bh2')

TOKENIZER_VOCAB = 128
_WORDS = ('a the cat dog walks runs on in through grass park night moon rises over hills sea '
          'camera follows it slowly and while at scene video style motion people dancing forest '
          'river mountain city street light shadow reflection painting water fire smoke explosion '
          'transforms into golden silver purple yellow orange zoom pan tilt cinematic portrait '
          'landscape wide angle closeup background foreground quickly blurry worst quality').split()


def _perturb(module, scale: float = 0.1) -> None:
  """Add noise to every parameter and floating buffer (norm weights, zero biases, the learned
  position table), so a wrong mapping cannot hide behind a constant."""
  import torch
  with torch.no_grad():
    for tensor in [*module.parameters(), *module.buffers()]:
      if tensor.is_floating_point():
        tensor.add_(scale * torch.randn_like(tensor))


def _add_expert(model, family: str, block_idx, scale: float = 0.02) -> None:
  """Give ``model`` the VAP expert twins: copies of the base modules plus small noise."""
  import torch
  top, per_block = EXPERT_MODULES[family]
  for name in top:
    twin = copy.deepcopy(getattr(model, name))
    _perturb(twin, scale)
    setattr(model, f'{name}_mot_ref', twin)
  for i in block_idx:
    block = getattr(model, BLOCKS[family])[i]
    for name in per_block:
      base = getattr(block, name)
      if isinstance(base, torch.nn.Parameter):
        twin = torch.nn.Parameter(base.detach().clone() + scale * torch.randn_like(base))
      else:
        twin = copy.deepcopy(base)
        _perturb(twin, scale)
      setattr(block, f'{name}_mot_ref', twin)


def _mot_class(base):
  """A subclass of the PyPI transformer under the VAP class name (what config.json records)."""
  name = base.__name__.replace('Transformer3DModel', 'Transformer3DMOTModel')
  return type(name, (base,), {})


def _write_transformer(folder: Path, family: str, shard_size) -> None:
  import diffusers
  if family == 'cogvideox':
    base, config, vap = diffusers.CogVideoXTransformer3DModel, COGVIDEOX_TRANSFORMER, COGVIDEOX_VAP
  else:
    base, config, vap = diffusers.WanTransformer3DModel, WAN_TRANSFORMER, WAN_VAP
  model = _mot_class(base)(**config).eval()
  _perturb(model)
  _add_expert(model, family, vap['block_idx_with_mot_ref'])
  model.register_to_config(**vap)
  model.save_pretrained(folder, max_shard_size=shard_size, safe_serialization=True)


def _write_tokenizer(folder: Path) -> None:
  """A unigram sentencepiece model trained on random sentences of `_WORDS` (plus every character
  a prompt may use), in the official ``tokenizer/`` layout."""
  from vap_jax.text.tokenizer import train_sentencepiece
  rng = np.random.default_rng(0)
  texts = [' '.join(rng.choice(_WORDS, 8)) for _ in range(300)]
  texts.append('ABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;!?&<>\'"-()0123456789')
  train_sentencepiece(texts, folder, TOKENIZER_VOCAB)


def _write_json(path: Path, data: dict) -> None:
  path.write_text(json.dumps(data, indent=2, sort_keys=True) + '\n')


def write_tiny_checkpoint(dst: str | Path, family: str, seed: int = 0,
                          shard_size: str | int = '10GB') -> Path:
  """Write a tiny ``family`` ('cogvideox' or 'wan') VAP folder at ``dst`` (must not exist).

  ``shard_size`` (diffusers/transformers ``max_shard_size``) below a component's size writes
  that component as shards + index, as the released checkpoints are. Returns ``dst``.
  """
  if family not in FAMILIES:
    raise ValueError(f'family {family!r} is not one of {FAMILIES}')
  dst = Path(dst)
  if dst.exists():
    raise FileExistsError(f'{dst} exists')
  import diffusers
  import torch
  import transformers
  torch.manual_seed(seed)
  save = dict(max_shard_size=shard_size, safe_serialization=True)
  _write_transformer(dst / 'transformer', family, shard_size)
  if family == 'cogvideox':
    vae = diffusers.AutoencoderKLCogVideoX(**COGVIDEOX_VAE)
    text = transformers.T5EncoderModel(transformers.T5Config(**TEXT_ENCODER))
    scheduler = diffusers.CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER)
  else:
    vae = diffusers.AutoencoderKLWan(**WAN_VAE)
    text = transformers.UMT5EncoderModel(transformers.UMT5Config(**TEXT_ENCODER))
    scheduler = diffusers.UniPCMultistepScheduler(**WAN_SCHEDULER)
    image = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**IMAGE_ENCODER))
    _perturb(image)
    image.save_pretrained(dst / 'image_encoder', **save)
    size = IMAGE_ENCODER['image_size']
    transformers.CLIPImageProcessor(
        size={'shortest_edge': size}, crop_size={'height': size, 'width': size}).save_pretrained(
            dst / 'image_processor')
  _perturb(vae)
  vae.save_pretrained(dst / 'vae', **save)
  _perturb(text)
  text.save_pretrained(dst / 'text_encoder', **save)
  scheduler.save_pretrained(dst / 'scheduler')
  _write_tokenizer(dst / 'tokenizer')
  _write_json(dst / 'model_index.json', _model_index(family, type(vae), type(text),
                                                     type(scheduler), diffusers.__version__))
  return dst


def _model_index(family, vae, text, scheduler, version) -> dict:
  prefix = 'CogVideoX' if family == 'cogvideox' else 'Wan'
  index = {
      '_class_name': f'{prefix}ImageToVideoMOTPipeline', '_diffusers_version': version,
      'scheduler': ['diffusers', scheduler.__name__], 'text_encoder': ['transformers', text.__name__],
      'tokenizer': ['transformers', 'T5Tokenizer'],
      'transformer': ['diffusers', f'{prefix}Transformer3DMOTModel'],
      'vae': ['diffusers', vae.__name__]}
  if family == 'wan':
    index.update(image_encoder=['transformers', 'CLIPVisionModel'],
                 image_processor=['transformers', 'CLIPImageProcessor'])
  return index


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--family', choices=FAMILIES, required=True)
  parser.add_argument('--out', required=True, help='folder to create')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--shard-size', default='10GB',
                      help="max_shard_size per component, e.g. 20KB to write shards + index")
  args = parser.parse_args(argv)
  write_tiny_checkpoint(args.out, args.family, seed=args.seed, shard_size=args.shard_size)
  print(f'wrote a tiny {args.family} VAP checkpoint to {args.out}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
