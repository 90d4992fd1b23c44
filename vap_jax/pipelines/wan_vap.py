"""Wan2.1-I2V-14B + VAP expert: (reference videos, image, prompts) -> video (VAP_SPEC §3.2).

The flow of the official ``WanImageToVideoMOTPipeline``: umT5 prompt embeddings (cleaned, masked,
zero past the true length), CLIP ViT-H/14 penultimate tokens of the image and of each reference's
first frame (at their original size), VAE *modes* normalised with the config's mean/std for the
first-frame condition video, each reference video and each reference's first-frame condition,
the 4-channel first-frame mask, the references at timestep 1, guidance ``u + w (c - u)``, the
scheduler step, decode.

Differences from the official code, each deliberate: the conditional and unconditional passes
run as one batch-2 transformer call (same numbers, one pass); the step-independent inputs (text
and CLIP context, the whole reference stream) are embedded once per video; several references
work (the official code asserts one): each has its own caption, CLIP tokens, mask and first-frame
condition, and frames -n*F..-1 in RoPE.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vap_jax import conditioning
from vap_jax.models import clip
from vap_jax.models.clip import CLIPVisionTransformer
from vap_jax.models.t5 import T5Encoder
from vap_jax.models.vae_wan import AutoencoderKLWan
from vap_jax.models.wan import WanTransformer
from vap_jax.pipelines import common
from vap_jax.pipelines.common import DEFAULT_NEGATIVE_PROMPT, VideoOutput
from vap_jax.text import Tokenizer, encode_wan
from vap_jax.weights.checkpoint import clip_preprocess_kwargs

log = logging.getLogger(__name__)

class WanVAPPipeline:
  family = 'wan'

  def __init__(self, transformer: WanTransformer, vae: AutoencoderKLWan, text_encoder: T5Encoder,
               tokenizer: Tokenizer, scheduler, image_encoder: CLIPVisionTransformer,
               image_processor: dict, *, mesh=None, vae_tiling: bool = False):
    self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
    self.tokenizer, self.scheduler, self.mesh, self.vae_tiling = tokenizer, scheduler, mesh, vae_tiling
    self.image_encoder, self.image_processor = image_encoder, image_processor
    self._condition = common.compiled(transformer, _condition, mesh)
    self._latent_sharding = common.replicated(mesh)
    self._step = common.compiled(transformer, _step, mesh, donate_argnums=(1,),
                                 out_shardings=self._latent_sharding)
    self._encode = common.compiled_vae(vae, 'encode_normalized', mesh, tiled=vae_tiling)
    self._decode = common.compiled_vae(vae, 'decode_normalized', mesh, tiled=vae_tiling)
    self._clip = common.compiled(image_encoder, conditioning.clip_tokens, mesh)

  @classmethod
  def from_pretrained(cls, path: str | Path, **kwargs) -> 'WanVAPPipeline':
    """A diffusers VAP folder or a ``vap-convert`` folder; keyword arguments as
    `vap_jax.pipelines.loading.load_components` (dtypes, mesh, attention, vae_tiling)."""
    from vap_jax.pipelines.loading import load_components
    return cls(**load_components(path, cls.family, **kwargs))

  # ------------------------------------------------------------------------------------ stages

  def encode_prompts(self, prompt: str, ref_prompts: Sequence[str], negative_prompt: str,
                     negative_ref_prompt: str, max_length: int = 512):
    """-> text (2, L, D) and ref_text (2, n*L, D), both ordered [negative, positive]."""
    embed = lambda texts: encode_wan(self.tokenizer, self.text_encoder, texts, max_length)
    text = embed([negative_prompt, prompt])
    refs = [embed([negative_ref_prompt, p]) for p in ref_prompts]
    return text, jnp.concatenate(refs, axis=1)

  def encode_images(self, images: Sequence[np.ndarray]) -> jax.Array:
    """uint8 (H, W, 3) images at their own size -> CLIP penultimate tokens, (1, n*257, D)."""
    pixels = clip.preprocess(images, **clip_preprocess_kwargs(self.image_processor))
    tokens = self._clip(jnp.asarray(pixels))
    return tokens.reshape(1, -1, tokens.shape[-1])

  def _first_frame_condition(self, frame: np.ndarray, num_frames: int):
    """[mask ; normalised latents of (frame, then black frames)], (1, 4 + z, F', h, w)."""
    video = conditioning.first_frame_video(common.to_model_range(frame[None])[:, :, 0], num_frames)
    return conditioning.wan_condition(self._encode(video), self.vae.temporal_ratio)

  def encode_latents(self, image: np.ndarray, ref_frames: Sequence[np.ndarray], num_frames: int,
                     key: jax.Array, noise: dict | None = None) -> dict:
    """Initial noise (1, z, F', h, w), the image condition (1, 4 + z, F', h, w), and the
    reference latents (1, z, n*F', h, w) and conditions (1, 4 + z, n*F', h, w). ``noise`` may hold
    ``latents`` (the initial draw)."""
    frames = (num_frames - 1) // self.vae.temporal_ratio + 1
    r = self.vae.spatial_ratio
    h, w = image.shape[0] // r, image.shape[1] // r
    refs = [self._encode(jnp.asarray(common.to_model_range(v))) for v in ref_frames]
    ref_conditions = [self._first_frame_condition(v[0], num_frames) for v in ref_frames]
    shape = (1, self.vae.config.z_dim, frames, h, w)
    initial = (noise or {}).get('latents')
    initial = (jax.random.normal(key, shape, jnp.float32) if initial is None
               else jnp.asarray(initial, jnp.float32))
    if initial.shape != shape:
      raise ValueError(f'initial noise must be {shape}, got {initial.shape}')
    return dict(latents=initial, condition=self._first_frame_condition(image, num_frames),
                ref=jnp.concatenate(refs, 2), ref_condition=jnp.concatenate(ref_conditions, 2))

  def sample(self, lat: dict, text, ref_text, clip_tokens, ref_clip_tokens, *,
             num_inference_steps: int, guidance_scale: float, key: jax.Array,
             progress: bool = True, on_step: Callable | None = None,
             reference_guidance: bool = False, guidance_min_timestep: float = 0) -> jax.Array:
    """The denoising loop (CFG as one batch-2 pass); returns the final latents (1, z, F', h, w)."""
    plan = self.scheduler.set_timesteps(num_inference_steps)
    timesteps = np.asarray(plan.timesteps)
    guidance = common.guidance_interval(np.full(len(timesteps), guidance_scale, np.float64),
                                        timesteps, guidance_min_timestep)
    pair = common.cfg_pair
    target = conditioning.wan_inputs(lat['latents'], lat['condition'])
    ref = conditioning.wan_inputs(lat['ref'], lat['ref_condition'])  # references along frames
    mask = common.cfg_ref_mask(lat['ref'].shape[2] // lat['latents'].shape[2],
                               reference_guidance)
    cond = self._condition(pair(target), text, pair(clip_tokens), pair(ref), ref_text,
                           pair(ref_clip_tokens), mask)
    step = lambda x, state, plan, i, g, key: self._step(x, state, plan, i, g, key,
                                                        lat['condition'], cond)
    return common.denoise(step, lat['latents'], plan, guidance, key,
                          sharding=self._latent_sharding, progress=progress,
                          on_step=on_step)

  def decode(self, latents: jax.Array) -> jax.Array:
    """(1, z, F', h, w) normalised latents -> (1, 3, F, H, W) video in [-1, 1]."""
    return self._decode(latents)

  # -------------------------------------------------------------------------------------- call

  def __call__(self, image, ref_videos: Sequence, prompt: str, ref_prompts: Sequence[str], *,
               negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
               negative_ref_prompt: str = DEFAULT_NEGATIVE_PROMPT, height: int = 480,
               width: int = 832, num_frames: int = 49, num_inference_steps: int = 50,
               guidance_scale: float = 5.0, frames_selection: str = 'evenly',
               max_sequence_length: int = 512, seed: int = 42, noise: dict | None = None,
               progress: bool = True, on_step: Callable | None = None,
               reference_guidance: bool = False,
               guidance_min_timestep: float = 0) -> VideoOutput:
    """``image`` uint8 (H, W, 3); ``ref_videos`` uint8 (F_i, H_i, W_i, 3) each, with one entry of
    ``ref_prompts`` per reference. Defaults are the official demo's (480x832, 49 frames).
    ``reference_guidance``: CFG's negative half without the references (`common.cfg_ref_mask`);
    ``guidance_min_timestep``: no guidance below that timestep (`common.guidance_interval`)."""
    image = common.check_image(image)
    if isinstance(ref_prompts, str):
      ref_prompts = [ref_prompts]
    r = self.vae.spatial_ratio
    common.check_size(height, width, num_frames, self.vae.temporal_ratio,
                      r * self.transformer.config.patch_size[1])
    refs = common.check_references(ref_videos, ref_prompts, num_frames, frames_selection,
                                   np.random.default_rng(seed))
    text, ref_text = self.encode_prompts(prompt, ref_prompts, negative_prompt,
                                         negative_ref_prompt, max_sequence_length)
    clip_tokens = self.encode_images([image])
    ref_clip_tokens = self.encode_images([v[0] for v in refs])
    refs = [common.resize_frames(v, height, width) for v in refs]
    image = common.resize_frames(image[None], height, width)[0]
    sample_key, latent_key = jax.random.split(jax.random.key(seed))
    lat = self.encode_latents(image, refs, num_frames, latent_key, noise)
    latents = self.sample(lat, text, ref_text, clip_tokens, ref_clip_tokens,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          key=sample_key, progress=progress, on_step=on_step,
                          reference_guidance=reference_guidance,
                          guidance_min_timestep=guidance_min_timestep)
    video, frames = common.postprocess(self.decode(latents))
    return VideoOutput(frames, video, np.asarray(latents), np.stack(refs))


def _condition(model: WanTransformer, latents, text, image, ref, ref_text, ref_image, ref_mask):
  return model.condition(latents, text, image=image, ref_latents=ref, ref_text=ref_text,
                         ref_image=ref_image, ref_timestep=1, ref_mask=ref_mask)


def _step(model: WanTransformer, latents, state, plan, i, guidance, key, condition, cond):
  """One CFG step as a single batch-2 pass ([negative, positive]), guidance, scheduler step."""
  t = plan.timesteps[i]
  x = common.cfg_pair(conditioning.wan_inputs(latents, condition))
  flow = common.guided(model.predict(x, t, cond), guidance)
  return common.scheduler_step(plan, state, flow, i, latents, key)
