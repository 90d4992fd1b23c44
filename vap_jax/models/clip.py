"""CLIP vision transformer (Wan's image encoder: open-clip ViT-H/14 as transformers ``CLIPVisionModel``).

Pre-norm ViT: patchify (a dense layer over 14x14x3 patches), prepend the class token, add learned
positions, ``pre_layrnorm``, then N blocks. Wan reads the hidden state *before the last block*
(``hidden_states[-2]``), so the model returns every layer's hidden state, in transformers' order:
index 0 is the embedding output (after ``pre_layrnorm``), index i the output of block i.
`CLIPVisionTransformer.hidden_state` runs only the blocks one index needs.

`preprocess` reproduces ``CLIPImageProcessor``: shortest side -> 224 with PIL bicubic, center
crop 224, /255, normalise with the OpenAI CLIP mean/std. It runs on the host (PIL + numpy):
resampling is defined by PIL's filter, which is what the reference uses.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vap_jax.models.common import source_fields
from vap_jax.nn.attention import attention
from vap_jax.nn.layers import LayerNorm, Linear, param
from vap_jax.parallel import TOKEN_AXES, constrain


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
}


_RUNTIME = {'dtype', 'param_dtype', 'attention'}  # ours, not the checkpoint's


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Architecture (transformers ``CLIPVisionConfig`` field names) plus runtime choices.

  Defaults are ViT-H/14 at 224 px as shipped in Wan2.1-I2V's ``image_encoder/``.
  """
  hidden_size: int = 1280
  intermediate_size: int = 5120
  num_hidden_layers: int = 32
  num_attention_heads: int = 16
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 14
  hidden_act: str = 'gelu'
  layer_norm_eps: float = 1e-5
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention: str = 'xla'

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f'hidden_act {self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}')
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by '
                       f'{self.num_attention_heads} heads')

  @classmethod
  def from_source(cls, config: dict, **runtime) -> 'CLIPVisionConfig':
    """From a ``CLIPVisionModel`` config.json dict (or a full CLIP config's ``vision_config``)."""
    if config.get('model_type') == 'clip':
      config = config['vision_config']
    return cls(**source_fields(cls, config, ('hidden_size', 'intermediate_size',
                                             'num_hidden_layers', 'num_attention_heads',
                                             'image_size', 'patch_size'), skip=_RUNTIME),
               **runtime)


class CLIPOutput(NamedTuple):
  last_hidden_state: jax.Array     # (B, T, hidden), output of the last block
  pooler_output: jax.Array         # (B, hidden), post_layernorm of the class token
  hidden_states: tuple[jax.Array, ...]  # num_hidden_layers + 1 entries


class CLIPAttention(nnx.Module):
  def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
    self.q_proj = Linear(c.hidden_size, c.hidden_size, axes=('embed', 'heads'), **kw)
    self.k_proj = Linear(c.hidden_size, c.hidden_size, axes=('embed', 'heads'), **kw)
    self.v_proj = Linear(c.hidden_size, c.hidden_size, axes=('embed', 'heads'), **kw)
    self.out_proj = Linear(c.hidden_size, c.hidden_size, axes=('heads', 'embed'), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    b, s, d = x.shape
    h = c.num_attention_heads
    heads = lambda t: constrain(t.reshape(b, s, h, d // h),
                                ('activation_batch', 'activation_length', 'activation_heads', None))
    out = attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                    implementation=c.attention)
    return self.out_proj(out.reshape(b, s, d))


class CLIPBlock(nnx.Module):
  def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
    c = config
    norm = dict(eps=c.layer_norm_eps, param_dtype=c.param_dtype, rngs=rngs)
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
    self.layer_norm1 = LayerNorm(c.hidden_size, **norm)
    self.self_attn = CLIPAttention(c, rngs=rngs)
    self.layer_norm2 = LayerNorm(c.hidden_size, **norm)
    self.fc1 = Linear(c.hidden_size, c.intermediate_size, axes=('embed', 'mlp'), **kw)
    self.fc2 = Linear(c.intermediate_size, c.hidden_size, axes=('mlp', 'embed'), **kw)
    self.act = _ACTIVATIONS[c.hidden_act]

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x))
    h = constrain(self.act(self.fc1(self.layer_norm2(x))),
                  ('activation_batch', 'activation_length', 'activation_mlp'))
    return constrain(x + self.fc2(h), TOKEN_AXES)


class CLIPVisionTransformer(nnx.Module):
  """Pixels (B, 3, H, W), normalised as `preprocess` does -> `CLIPOutput`."""

  def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
    norm = dict(eps=c.layer_norm_eps, param_dtype=c.param_dtype, rngs=rngs)
    self.patch_embedding = Linear(c.num_channels * c.patch_size ** 2, c.hidden_size,
                                  axes=('patch', 'embed'), use_bias=False, **kw)
    self.class_embedding = param(rngs, nnx.initializers.normal(1.0), (c.hidden_size,),
                                 c.param_dtype, ('embed',))
    self.position_embedding = param(rngs, nnx.initializers.normal(0.02),
                                    (c.num_positions, c.hidden_size), c.param_dtype,
                                    ('length', 'embed'))
    self.pre_layrnorm = LayerNorm(c.hidden_size, **norm)
    self.layers = nnx.List([CLIPBlock(c, rngs=rngs) for _ in range(c.num_hidden_layers)])
    self.post_layernorm = LayerNorm(c.hidden_size, **norm)

  def embed(self, pixels: jax.Array) -> jax.Array:
    c = self.config
    b, ch, hh, ww = pixels.shape
    p = c.patch_size
    if (hh, ww) != (c.image_size, c.image_size) or ch != c.num_channels:
      raise ValueError(f'pixels {pixels.shape} do not match the model: expected '
                       f'(B, {c.num_channels}, {c.image_size}, {c.image_size})')
    # (B, C, H, W) -> (B, H/p * W/p, C*p*p), rows ordered (c, kh, kw) like the conv kernel.
    patches = pixels.reshape(b, ch, hh // p, p, ww // p, p).transpose(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(b, (hh // p) * (ww // p), ch * p * p)
    x = self.patch_embedding(patches)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, c.hidden_size))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(x.dtype)
    return constrain(self.pre_layrnorm(x), TOKEN_AXES)

  def __call__(self, pixels: jax.Array) -> CLIPOutput:
    x = self.embed(jnp.asarray(pixels, self.config.dtype))
    hidden = [x]
    for layer in self.layers:
      x = layer(x)
      hidden.append(x)
    return CLIPOutput(x, self.post_layernorm(x[:, 0]), tuple(hidden))

  def hidden_state(self, pixels: jax.Array, index: int = -2) -> jax.Array:
    """``self(pixels).hidden_states[index]`` running only the blocks it needs (Wan: index -2)."""
    count = len(self.layers) + 1
    if not -count <= index < count:
      raise IndexError(f'hidden state {index} out of range for {count} hidden states')
    x = self.embed(jnp.asarray(pixels, self.config.dtype))
    for layer in self.layers[:index % count]:
      x = layer(x)
    return x


def preprocess(images: Sequence, *, size: int = 224, crop_size: int | None = None,
               mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
               resample: int = 3) -> np.ndarray:
  """PIL images (or HWC uint8 arrays) -> (N, 3, crop, crop) float32, as ``CLIPImageProcessor``.

  Shortest side to ``size`` (the long side ``int(size * long / short)``), PIL ``resample``
  (3 = bicubic), center crop, scale by 1/255, normalise per channel.
  """
  from PIL import Image
  crop = crop_size or size
  out = []
  for image in images:
    if not isinstance(image, Image.Image):
      image = Image.fromarray(np.asarray(image, np.uint8))
    image = image.convert('RGB')
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
      image = image.resize((new_w, new_h), resample=resample)
    array = np.asarray(image)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    if top < 0 or left < 0:
      raise ValueError(f'resized image {new_w}x{new_h} is smaller than the crop {crop}')
    array = (array[top:top + crop, left:left + crop].astype(np.float64) * (1 / 255)).astype(np.float32)
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    out.append(array.transpose(2, 0, 1))
  return np.stack(out).astype(np.float32)
