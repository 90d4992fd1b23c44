"""Building the VAP-Toy checkpoint: the frozen text side, packing trained components into one
converted pipeline folder, and the example inputs that ship beside it.

The trained parts come from `vap-train` runs (VAE, base transformer, expert) exported with
``vap-export --run ... --converted``; ``launch/train_toy.sh`` runs the whole recipe.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vap_jax.data import toy as toy_data
from vap_jax.data.vap_data import read_benchmark_csv, read_vap_csv

# The toy T5 (transformers T5Config field names): random and frozen, as T5 is frozen in VAP; its
# vocabulary is the sentencepiece model trained on the toy captions.
TEXT_ENCODER = dict(
    model_type='t5', architectures=['T5EncoderModel'], vocab_size=512, d_model=64, d_kv=16,
    d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=16,
    relative_attention_max_distance=32, feed_forward_proj='gated-gelu', layer_norm_epsilon=1e-6,
    dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
    pad_token_id=0, eos_token_id=1)
# The official CogVideoX-5B-I2V scheduler: v-prediction on the zero-terminal-SNR schedule.
SCHEDULER = {
    '_class_name': 'CogVideoXDDIMScheduler', 'beta_end': 0.012, 'beta_schedule': 'scaled_linear',
    'beta_start': 0.00085, 'clip_sample': False, 'clip_sample_range': 1.0,
    'num_train_timesteps': 1000, 'prediction_type': 'v_prediction',
    'rescale_betas_zero_snr': True, 'sample_max_value': 1.0, 'set_alpha_to_one': True,
    'snr_shift_scale': 1.0, 'steps_offset': 0, 'timestep_spacing': 'trailing',
    'trained_betas': None}
MODEL_INDEX = {
    '_class_name': 'CogVideoXImageToVideoMOTPipeline', 'scheduler': ['diffusers',
                                                                     'CogVideoXDDIMScheduler'],
    'text_encoder': ['transformers', 'T5EncoderModel'], 'tokenizer': ['transformers',
                                                                      'T5Tokenizer'],
    'transformer': ['diffusers', 'CogVideoXTransformer3DMOTModel'],
    'vae': ['diffusers', 'AutoencoderKLCogVideoX']}
TEXT_LENGTH = 32  # tokens per caption: the longest toy caption is about 25
CATEGORY_ORDER = ('motion', 'concept', 'camera', 'style')  # of the examples


def captions(root) -> list[str]:
  """Every caption of a VAP-Toy dataset: its table's, its benchmark's, and the subject-only
  prompts of its subjects (what the evaluation and the demo type)."""
  root = Path(root)
  texts = [r['tar_video_caption'] for r in read_vap_csv(root / 'vap_data.csv')]
  for r in read_benchmark_csv(root / 'benchmark' / 'benchmark.csv'):
    texts += [r['tar_video_caption'], r['ref_video_caption']]
  summary = json.loads((root / 'toy.json').read_text())
  texts += [toy_data.subject_caption(toy_data.subject_by_name(n)) for n in summary['subjects']]
  return texts


def write_frozen_components(root, dst, *, seed: int = 0) -> dict:
  """The parts of the toy pipeline that are not trained, under ``dst``: ``tokenizer/`` (a BPE
  sentencepiece model trained on the captions of the VAP-Toy dataset at ``root``),
  ``text_encoder/`` (a random `TEXT_ENCODER` T5 from ``seed``, as a converted folder) and
  ``scheduler/``. ``dst`` then serves as ``vap-precompute --model`` with ``--vae``."""
  from vap_jax.text.tokenizer import Tokenizer, train_sentencepiece
  from vap_jax.weights import component
  from vap_jax.weights.encoders import T5_SPEC
  dst = Path(dst)
  texts = captions(root)
  train_sentencepiece(texts, dst / 'tokenizer', TEXT_ENCODER['vocab_size'], 'bpe')
  tokenizer = Tokenizer(dst / 'tokenizer')
  vocab = tokenizer._sp.get_piece_size()
  longest = max(int(tokenizer([t], 4 * TEXT_LENGTH)[1].sum()) for t in texts)
  if longest > TEXT_LENGTH:
    raise ValueError(f'a caption of {root} takes {longest} tokens, more than {TEXT_LENGTH}')
  config = T5_SPEC.make_config(TEXT_ENCODER, dtype='float32', param_dtype='float32')
  encoder = T5_SPEC.factory(config, seed)()
  component.save(T5_SPEC, encoder, TEXT_ENCODER, dst / 'text_encoder', param_dtype='float32',
                 source=f'random init, seed {seed}', overwrite=True)
  (dst / 'scheduler').mkdir(parents=True, exist_ok=True)
  (dst / 'scheduler' / 'scheduler_config.json').write_text(json.dumps(SCHEDULER, indent=2) + '\n')
  params = sum(x.size for x in jax.tree.leaves(nnx.state(encoder, nnx.Param)))
  return dict(captions=len(set(texts)), vocab=vocab, longest_caption_tokens=longest,
              text_encoder_params=params)


def fit_latent_scale(vae_folder, root, *, clips: int = 64, seed: int = 0) -> dict:
  """Set the converted VAE at ``vae_folder``'s ``scaling_factor`` to 1 / std of its posterior
  means over ``clips`` training clips of the VAP-Toy dataset at ``root`` (the latent-diffusion
  recipe's rule: the diffusion model then sees unit-variance latents). Run it before
  vap-precompute, which records the factor. Returns the statistics."""
  from vap_jax.data.video_io import read_video, to_unit_range
  from vap_jax.weights import orbax_io
  from vap_jax.weights.vae import load_cogvideox_vae
  root = Path(root)
  rows = [r for r in read_vap_csv(root / 'vap_data.csv') if r['split'] == 'train']
  pick = np.random.default_rng(seed).choice(len(rows), min(clips, len(rows)), replace=False)
  vae = load_cogvideox_vae(vae_folder, dtype='float32')
  encode = jax.jit(lambda x: vae.encode(x).mean)
  means = []
  for i in pick:
    video = to_unit_range(read_video(root / rows[i]['video_paths'])[0])  # (F, H, W, 3)
    means.append(np.asarray(encode(jnp.asarray(video)[None].transpose(0, 4, 1, 2, 3))))
  std = float(np.std(np.concatenate([m.ravel() for m in means])))
  config = orbax_io.read_config(vae_folder)
  old = config['source_config'].get('scaling_factor')
  config['source_config']['scaling_factor'] = round(1.0 / std, 4)
  orbax_io.write_config(vae_folder, config)
  return dict(clips=len(pick), latent_std=std, scaling_factor=config['source_config'][
      'scaling_factor'], previous=old)


def pack(dst, *, transformer, vae, frozen, examples=None, overwrite: bool = False) -> dict:
  """One converted CogVideoX-VAP pipeline folder ``dst`` from the converted ``transformer`` and
  ``vae`` component folders and the ``frozen`` folder of `write_frozen_components`, plus the
  ``examples`` folder (`write_examples`) when given. Returns the manifest."""
  from vap_jax.weights.checkpoint import seal_pipeline
  dst = Path(dst)
  if dst.exists():
    if not overwrite:
      raise FileExistsError(f'{dst} exists; pass overwrite=True (--overwrite) to replace it')
    shutil.rmtree(dst)
  parts = dict(transformer=Path(transformer), vae=Path(vae),
               text_encoder=Path(frozen) / 'text_encoder', tokenizer=Path(frozen) / 'tokenizer',
               scheduler=Path(frozen) / 'scheduler')
  for name, src in parts.items():
    if not src.is_dir():
      raise FileNotFoundError(f'{name}: {src} is not a folder')
    shutil.copytree(src, dst / name)
  if examples is not None:
    shutil.copytree(examples, dst / 'examples')
  return seal_pipeline(dst, 'cogvideox', source='launch/train_toy.sh (VAP-Toy)',
                       model_index=MODEL_INDEX)


def write_examples(root, dst, *, count: int = 1) -> list[dict]:
  """Example inputs from the benchmark of the VAP-Toy dataset at ``root``: for the first
  ``count`` rows whose subject is held out of training, ``<i>/image.png`` (the subject's first
  frame), ``<i>/ref.mp4`` (the reference: another subject under the row's condition) and
  ``<i>/example.json`` (subject-only prompts, the condition, the subjects); ``split.json``: the
  dataset's summary (which subjects and pairs training never saw)."""
  root, dst = Path(root), Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  shutil.copyfile(root / 'toy.json', dst / 'split.json')
  held = set(json.loads((root / 'toy.json').read_text())['held_out_subjects'])
  rows = [r for r in read_benchmark_csv(root / 'benchmark' / 'benchmark.csv')
          if r['subject'] in held]
  # One per category first, so that several examples show different kinds of condition.
  rows.sort(key=lambda r: (CATEGORY_ORDER.index(r['kind'].split('_')[0]), r['kind']))
  picked, seen = [], set()
  for r in rows:
    if r['kind'].split('_')[0] not in seen and len(picked) < count:
      picked.append(r)
      seen.add(r['kind'].split('_')[0])
  out = []
  for i, r in enumerate(picked):
    folder = dst / str(i)
    folder.mkdir(parents=True, exist_ok=True)
    subject, ref = toy_data.subject_by_name(r['subject']), toy_data.subject_by_name(r['ref_subject'])
    shutil.copyfile(root / r['image_path'], folder / 'image.png')
    shutil.copyfile(root / r['ref_video_path'], folder / 'ref.mp4')
    example = dict(prompt=toy_data.subject_caption(subject), ref_prompt=toy_data.subject_caption(ref),
                   kind=r['kind'], subject=r['subject'], ref_subject=r['ref_subject'])
    (folder / 'example.json').write_text(json.dumps(example, indent=1) + '\n')
    out.append(example)
  return out


def folder_bytes(folder) -> int:
  return sum(p.stat().st_size for p in Path(folder).rglob('*') if p.is_file())
