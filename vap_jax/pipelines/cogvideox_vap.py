"""CogVideoX-5B-I2V + VAP expert: (reference videos, image, prompts) -> video (VAP_SPEC §3.1).

The flow of the official ``CogVideoXImageToVideoMOTPipeline``: T5 prompt embeddings without a
mask (target and one per reference, CFG batch ``[negative, positive]``), reference frame
selection, VAE posterior *samples* times the scaling factor for the image, each reference video
and each reference's first frame (zero-padded in time), one transformer call per step on the CFG
batch, dynamic CFG from the raw timestep, the scheduler step, decode.

Differences from the official code, each deliberate: the step-independent inputs (text
projections, the reference stream's tokens) are embedded once per video, not once per step; the
random draws come from ``jax.random`` (inject the official draws with ``noise=`` for parity).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vap_jax import conditioning
from vap_jax.diffusion import cogvideox_dynamic_guidance
from vap_jax.models.cogvideox import CogVideoXTransformer
from vap_jax.models.t5 import T5Encoder
from vap_jax.models.vae_cogvideox import AutoencoderKLCogVideoX
from vap_jax.pipelines import common
from vap_jax.pipelines.common import DEFAULT_NEGATIVE_PROMPT, VideoOutput
from vap_jax.text import Tokenizer, encode_cogvideox

log = logging.getLogger(__name__)


class CogVideoXVAPPipeline:
  family = 'cogvideox'

  def __init__(self, transformer: CogVideoXTransformer, vae: AutoencoderKLCogVideoX,
               text_encoder: T5Encoder, tokenizer: Tokenizer, scheduler, *, mesh=None,
               vae_tiling: bool = False):
    self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
    self.tokenizer, self.scheduler, self.mesh, self.vae_tiling = tokenizer, scheduler, mesh, vae_tiling
    self._condition = common.compiled(transformer, _condition, mesh)
    self._latent_sharding = common.replicated(mesh)
    self._step = common.compiled(transformer, _step, mesh, donate_argnums=(1,),
                                 out_shardings=self._latent_sharding)
    self._encode = common.compiled_vae(vae, 'encode', mesh, tiled=vae_tiling)
    self._decode = common.compiled_vae(vae, 'decode', mesh, tiled=vae_tiling)

  @classmethod
  def from_pretrained(cls, path: str | Path, **kwargs) -> 'CogVideoXVAPPipeline':
    """A diffusers VAP folder or a ``vap-convert`` folder; keyword arguments as
    `vap_jax.pipelines.loading.load_components` (dtypes, mesh, attention, vae_tiling)."""
    from vap_jax.pipelines.loading import load_components
    return cls(**load_components(path, cls.family, **kwargs))

  @property
  def latent_channels(self) -> int:
    return self.transformer.config.in_channels // 2

  # ------------------------------------------------------------------------------------ stages

  def encode_prompts(self, prompt: str, ref_prompts: Sequence[str], negative_prompt: str,
                     negative_ref_prompt: str, max_length: int):
    """-> text (2, L, D) and ref_text (2, n*L, D), both ordered [negative, positive]."""
    embed = lambda texts: encode_cogvideox(self.tokenizer, self.text_encoder, texts, max_length)
    text = embed([negative_prompt, prompt])
    refs = [embed([negative_ref_prompt, p]) for p in ref_prompts]
    return text, jnp.concatenate(refs, axis=1) if refs else None

  def _latent_sample(self, frames: np.ndarray, key, noise=None) -> jax.Array:
    """uint8 frames -> scaling_factor * posterior sample, (1, F', C, h, w)."""
    posterior = self._encode(jnp.asarray(common.to_model_range(frames)))
    if noise is None:
      noise = jax.random.normal(key, posterior.mean.shape, jnp.float32)
    z = posterior.mean + posterior.std * jnp.asarray(noise, posterior.mean.dtype)
    return z.transpose(0, 2, 1, 3, 4)

  def encode_latents(self, image: np.ndarray, ref_frames: Sequence[np.ndarray], num_frames: int,
                     key: jax.Array, noise: dict | None = None) -> dict:
    """Initial noise and the clean conditioning latents, all (1, F', C, h, w) ((1, n*F', ...) for
    the references; None without any). ``noise`` may hold the draws to use: ``latents``, ``image``, ``ref_video``
    (one per reference) and ``ref_image`` (one per reference), in the VAE's posterior layout."""
    noise = noise or {}
    scale = self.vae.config.scaling_factor
    keys = jax.random.split(key, 2 + 2 * len(ref_frames))
    frames = (num_frames - 1) // self.vae.temporal_ratio + 1

    pad = lambda z: conditioning.pad_first_frame(z, frames)

    image_latents = pad(scale * self._latent_sample(image[None], keys[0], noise.get('image')))
    refs, ref_images = [], []
    for i, video in enumerate(ref_frames):
      refs.append(scale * self._latent_sample(video, keys[2 + 2 * i],
                                              _nth(noise.get('ref_video'), i)))
      ref_images.append(pad(scale * self._latent_sample(
          video[:1], keys[3 + 2 * i], _nth(noise.get('ref_image'), i))))
    h, w = image.shape[0] // self.vae.spatial_ratio, image.shape[1] // self.vae.spatial_ratio
    shape = (1, frames, self.latent_channels, h, w)
    initial = noise.get('latents')  # x_T: init_noise_sigma is 1 for both CogVideoX samplers
    initial = (jax.random.normal(keys[1], shape, jnp.float32) if initial is None
               else jnp.asarray(initial, jnp.float32))
    if initial.shape != shape:
      raise ValueError(f'initial noise must be {shape}, got {initial.shape}')
    if not refs:
      return dict(latents=initial, image=image_latents, ref=None, ref_image=None)
    return dict(latents=initial, image=image_latents, ref=jnp.concatenate(refs, 1),
                ref_image=jnp.concatenate(ref_images, 1))

  def sample(self, lat: dict, text, ref_text, *, num_inference_steps: int,
             guidance_scale: float, use_dynamic_cfg: bool, key: jax.Array, progress: bool = True,
             on_step: Callable | None = None, reference_guidance: bool = False,
             guidance_min_timestep: float = 0) -> jax.Array:
    """The denoising loop; returns the final latents (1, F', C, h, w)."""
    plan = self.scheduler.set_timesteps(num_inference_steps)
    timesteps = np.asarray(plan.timesteps)
    if use_dynamic_cfg:
      guidance = cogvideox_dynamic_guidance(guidance_scale, timesteps)
    else:
      guidance = np.full(len(timesteps), guidance_scale, np.float64)
    guidance = common.guidance_interval(guidance, timesteps, guidance_min_timestep)
    pair = common.cfg_pair
    image = pair(lat['image'])
    refs = None if lat['ref'] is None else pair(  # references along frames
        conditioning.cogvideox_inputs(lat['ref'], lat['ref_image']))
    num_refs = 0 if refs is None else lat['ref'].shape[1] // lat['latents'].shape[1]
    cond = self._condition(conditioning.cogvideox_inputs(pair(lat['latents']), image), text,
                           refs, ref_text, common.cfg_ref_mask(num_refs, reference_guidance))
    step = lambda x, state, plan, i, g, key: self._step(x, state, plan, i, g, key, image, cond)
    return common.denoise(step, lat['latents'], plan, guidance, key,
                          sharding=self._latent_sharding, progress=progress,
                          on_step=on_step)

  def decode(self, latents: jax.Array) -> jax.Array:
    """(1, F', C, h, w) latents -> (1, 3, F, H, W) video in about [-1, 1]."""
    z = latents.transpose(0, 2, 1, 3, 4) * np.float32(1 / self.vae.config.scaling_factor)
    return self._decode(z)

  # -------------------------------------------------------------------------------------- call

  def __call__(self, image, ref_videos: Sequence, prompt: str, ref_prompts: Sequence[str], *,
               negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
               negative_ref_prompt: str = DEFAULT_NEGATIVE_PROMPT, height: int = 480,
               width: int = 720, num_frames: int = 49, num_inference_steps: int = 50,
               guidance_scale: float = 6.0, use_dynamic_cfg: bool = True,
               frames_selection: str = 'evenly', max_sequence_length: int | None = None,
               seed: int = 42, noise: dict | None = None, progress: bool = True,
               on_step: Callable | None = None,
               reference_guidance: bool = False,
               guidance_min_timestep: float = 0) -> VideoOutput:
    """``image`` uint8 (H, W, 3); ``ref_videos`` uint8 (F_i, H_i, W_i, 3) each, with one entry of
    ``ref_prompts`` per reference; no references (``[]``, ``[]``) runs the base model alone, the
    expert off. Defaults are the official demo's (dynamic CFG on); the text length defaults to
    the transformer's ``max_text_seq_length`` (226). ``reference_guidance``: CFG's negative half
    without the references (`common.cfg_ref_mask`); ``guidance_min_timestep``: no guidance below
    that timestep (`common.guidance_interval`)."""
    image = common.check_image(image)
    if isinstance(ref_prompts, str):
      ref_prompts = [ref_prompts]
    common.check_size(height, width, num_frames, self.vae.temporal_ratio,
                      self.vae.spatial_ratio * self.transformer.config.patch_size)
    key = jax.random.key(seed)
    refs = []
    if len(ref_videos) or len(ref_prompts):
      refs = common.check_references(ref_videos, ref_prompts, num_frames, frames_selection,
                                     np.random.default_rng(seed))
    refs = [common.resize_frames(r, height, width) for r in refs]
    image = common.resize_frames(image[None], height, width)[0]
    text, ref_text = self.encode_prompts(
        prompt, ref_prompts, negative_prompt, negative_ref_prompt,
        max_sequence_length or self.transformer.config.max_text_seq_length)
    sample_key, latent_key = jax.random.split(key)
    lat = self.encode_latents(image, refs, num_frames, latent_key, noise)
    latents = self.sample(lat, text, ref_text, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, use_dynamic_cfg=use_dynamic_cfg,
                          key=sample_key, progress=progress, on_step=on_step,
                          reference_guidance=reference_guidance,
                          guidance_min_timestep=guidance_min_timestep)
    video, frames = common.postprocess(self.decode(latents))
    return VideoOutput(frames, video, np.asarray(latents), np.stack(refs) if refs else None)


def _nth(items, i):
  return None if items is None else items[i]


def _condition(model: CogVideoXTransformer, latents, text, ref, ref_text, ref_mask):
  return model.condition(latents, text, ref_latents=ref, ref_text=ref_text, ref_mask=ref_mask)


def _step(model: CogVideoXTransformer, latents, state, plan, i, guidance, key, image_latents,
          cond):
  """One CFG step: the [negative, positive] batch through the transformer, guidance, scheduler
  step. ``image_latents`` is already the batch-2 pair."""
  t = plan.timesteps[i]
  x = conditioning.cogvideox_inputs(common.cfg_pair(latents), image_latents)
  v = common.guided(model.predict(x, t, cond), guidance)
  new, state = common.scheduler_step(plan, state, v, i, latents.astype(jnp.float32), key)
  return new.astype(latents.dtype), state
