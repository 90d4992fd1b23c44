"""What both VAP pipelines share: input checks and preprocessing, the compiled denoising loop,
postprocessing.

Preprocessing follows diffusers' ``VideoProcessor`` as the official pipelines call it with PIL
inputs: a frame whose size differs from (height, width) is resized with PIL Lanczos (no crop),
then mapped to [-1, 1] as ``(uint8 / 255) * 2 - 1`` in float32.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from vap_jax.data.video_io import select_frames
from vap_jax.diffusion import apply_guidance
from vap_jax.models import stack
from vap_jax.parallel.sharding import DEFAULT_RULES, VAE_RULES, sharding_context

log = logging.getLogger(__name__)

# The official pipelines' default negative prompt (both backbones, both streams).
DEFAULT_NEGATIVE_PROMPT = (
    'Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, '
    'images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, '
    'incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, '
    'misshapen limbs, fused fingers, still picture, messy background, three legs, many people in '
    'the background, walking backwards')


@dataclasses.dataclass
class VideoOutput:
  """``frames`` (F, H, W, 3) uint8; ``video`` the decoded (F, H, W, 3) float in [0, 1] (the
  official ``output_type='np'``); ``latents`` the final latents; ``ref_frames`` the reference
  frames the expert saw, (n, F, H, W, 3) uint8 at the output size."""
  frames: np.ndarray
  video: np.ndarray
  latents: np.ndarray
  ref_frames: np.ndarray


# ------------------------------------------------------------------------------------ inputs


def check_image(image, what: str = 'image') -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f'{what} must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}')
  return image


def check_references(ref_videos: Sequence, ref_prompts: Sequence[str], num_frames: int,
                     frames_selection: str, rng: np.random.Generator | None = None
                     ) -> list[np.ndarray]:
  """Validated reference videos reduced to ``num_frames`` frames each (the official selection:
  ``evenly`` = ``linspace(0, len - 1, num_frames)`` truncated, ``first``, or a ``random``
  contiguous window).

  Deviation: the official ``evenly`` uses the first reference's length for every reference (an
  index error for a shorter one); here each reference uses its own length. A reference with
  fewer than ``num_frames`` frames is an error rather than silently repeated frames.
  """
  if not ref_videos:
    raise ValueError('at least one reference video is required')
  if len(ref_prompts) != len(ref_videos):
    raise ValueError(f'{len(ref_videos)} reference video(s) but {len(ref_prompts)} reference '
                     f'prompt(s): give one prompt per reference')
  selected = []
  for i, video in enumerate(ref_videos):
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
      raise ValueError(f'reference video {i} must be uint8 (F, H, W, 3), got {video.dtype} '
                       f'{video.shape}')
    if len(video) < num_frames:
      raise ValueError(f'reference video {i} has {len(video)} frames; {num_frames} are needed')
    selected.append(video[select_frames(len(video), num_frames, frames_selection, rng)])
  return selected


def check_size(height: int, width: int, num_frames: int, temporal: int, multiple: int) -> None:
  """Sizes the VAE and the patchifier can take: H, W multiples of ``multiple`` pixels, 4k+1
  frames."""
  if height % multiple or width % multiple or height <= 0 or width <= 0:
    raise ValueError(f'height and width must be positive multiples of {multiple}, got '
                     f'{height}x{width}')
  if num_frames < 1 or (num_frames - 1) % temporal:
    raise ValueError(f'num_frames must be {temporal}k+1 (e.g. 49), got {num_frames}')


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 (F, H, W, 3) -> (F, height, width, 3) with PIL Lanczos, as ``VideoProcessor`` does."""
  if frames.shape[1:3] == (height, width):
    return frames
  from PIL import Image
  return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.LANCZOS))
                   for f in frames])


def to_model_range(frames: np.ndarray) -> np.ndarray:
  """uint8 (F, H, W, 3) -> float32 (1, 3, F, H, W) in [-1, 1], bit-exact with diffusers."""
  x = frames.astype(np.float32) / np.float32(255)
  return (np.float32(2) * x - np.float32(1)).transpose(3, 0, 1, 2)[None]


def postprocess(decoded) -> tuple[np.ndarray, np.ndarray]:
  """VAE output (1, 3, F, H, W) in [-1, 1] -> (float (F, H, W, 3) in [0, 1], uint8 frames)."""
  video = np.clip(np.asarray(decoded, np.float32)[0] / 2 + 0.5, 0, 1).transpose(1, 2, 3, 0)
  return video, np.round(video * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- compiled calls


def method(name: str, **kwargs) -> Callable:
  """``module.<name>(*args, **kwargs)`` as a function of ``(module, *args)`` for `compiled`
  (its jit is named after the method)."""
  def call(module, *args):
    return getattr(module, name)(*args, **kwargs)
  call.__name__ = call.__qualname__ = name
  return call


def compiled(module: nnx.Module, fn: Callable, mesh=None, rules=DEFAULT_RULES,
             **jit_kwargs) -> Callable:
  """``fn(module, *args)`` compiled once: the module is split a single time so each call passes
  only its state (no per-call graph traversal), and runs under the mesh's sharding ``rules``.
  Weights offloaded to host memory (`stack.offload`) are copied in by the call: layer stacks one
  layer at a time, the rest when it starts."""
  graphdef, state = nnx.split(module)

  @functools.wraps(fn)  # compiles as jit(<fn's name>)
  def with_state(state, *args):
    return fn(nnx.merge(graphdef, stack.fetch_unstacked(state)), *args)
  run = jax.jit(with_state, **jit_kwargs)

  def context():
    return sharding_context(mesh, rules) if mesh is not None else contextlib.nullcontext()

  def call(*args):
    with context():
      return run(state, *args)

  def lower(*args):  # for inspection: the lowered program of a call with these arguments
    with context():
      return run.lower(state, *args)
  call.lower = lower
  return call


def compiled_vae(vae: nnx.Module, name: str, mesh=None, **kwargs) -> Callable:
  """The VAE's method ``name`` compiled, one video's width strips over every device of the mesh
  (`VAE_RULES`)."""
  return compiled(vae, method(name, **kwargs), mesh, VAE_RULES)


def replicated(mesh=None) -> jax.sharding.Sharding:
  """Where the (small) latents live between steps: replicated over the mesh, or on one device."""
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def denoise(step: Callable, latents: jax.Array, plan, guidance: np.ndarray, key: jax.Array, *,
            sharding: jax.sharding.Sharding, progress: bool = True,
            on_step: Callable | None = None) -> jax.Array:
  """Run ``latents, state = step(latents, state, plan, i, g_i, key)`` for every step of ``plan``.

  ``step`` is one compiled function with a traced step index, so all steps share one executable
  (its outputs must be placed with ``sharding``, where the loop puts its inputs, or the second
  step would compile again); the Python loop only drives a progress bar and the optional
  ``on_step(i, latents)`` hook.
  """
  latents = jax.device_put(latents, sharding)
  state = jax.device_put(plan.init_state(latents), sharding)
  n = int(plan.timesteps.shape[0])
  for i in tqdm(range(n), desc='denoising', unit='step', disable=not progress):
    latents, state = step(latents, state, plan, jnp.int32(i), jnp.float32(guidance[i]), key)
    if on_step is not None:
      on_step(i, latents)
  return latents


def cfg_pair(x: jax.Array) -> jax.Array:
  """``x`` for both halves of the CFG batch; every pipeline orders it [negative, positive]."""
  return jnp.concatenate([x, x])


def cfg_ref_mask(num_refs: int, reference_guidance: bool):
  """The references' mask for the [negative, positive] CFG batch: None (both halves read them,
  the official pipelines) or, with ``reference_guidance``, the negative half without any -- the
  base model alone -- so that guidance amplifies what the references add, not only the prompt."""
  if not reference_guidance or not num_refs:
    return None
  return jnp.array([[False] * num_refs, [True] * num_refs])


def guidance_interval(scales: np.ndarray, timesteps, min_timestep: float) -> np.ndarray:
  """Per-step CFG ``scales`` with guidance off (scale 1: the positive half alone) at timesteps
  below ``min_timestep`` -- guidance limited to the noisier steps (Kynkaanniemi et al. 2024,
  "Applying guidance in a limited interval"), e.g. those an expert was trained on."""
  return np.where(np.asarray(timesteps) >= min_timestep, scales, 1.0)


def guided(output: jax.Array, scale) -> jax.Array:
  """Guidance from a model output on the [negative, positive] CFG batch, in float32."""
  output = output.astype(jnp.float32)
  return apply_guidance(output[:1], output[1:], scale)


def scheduler_step(plan, state, model_output, i, sample, key):
  """One scheduler step; samplers that add noise (CogVideoX DPM) get a fresh draw per step."""
  if getattr(plan, 'needs_noise', False):
    noise = jax.random.normal(jax.random.fold_in(key, i), sample.shape, jnp.float32)
    return plan.step(state, model_output, i, sample, noise.astype(sample.dtype))
  return plan.step(state, model_output, i, sample)
