"""Convolutions, norms and the causal feature cache shared by the video VAEs.

Activations are channels-last, (B, T, H, W, C). Kernels are stored (kt, kh, kw, in, out); the
PyTorch (out, in, kt, kh, kw) layout is permuted by `CONV_KERNEL` in the key maps.

Causal 3D convolutions look back ``kt - 1`` frames. Instead of padding the whole video, every
causal conv reads those frames from a `Caches` object (zeros on the first chunk, which *is* the
causal zero padding) and writes its last ``kt - 1`` input frames back. Running a video chunk by
chunk with the cache therefore gives exactly the unchunked result, and the cache has one fixed
shape after the first chunk, so the remaining chunks run under one `lax.scan` (bounded memory).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vap_jax.nn.layers import param

_DN3 = ('NDHWC', 'DHWIO', 'NDHWC')


class Caches:
  """The feature caches of one chunk, consumed and produced in call order.

  ``old`` is None on the first chunk (every layer then starts from zeros / its first-frame rule);
  ``new`` collects what the next chunk needs. Both are flat lists, a valid `lax.scan` carry.
  """

  def __init__(self, old: list | None = None):
    self.old, self.new = old, []

  @property
  def first(self) -> bool:
    return self.old is None

  def take(self):
    return None if self.old is None else self.old[len(self.new)]

  def put(self, value) -> None:
    self.new.append(value)


class Conv3d(nnx.Module):
  """A 3D convolution over (B, T, H, W, C) with explicit temporal and spatial padding."""

  def __init__(self, in_ch: int, out_ch: int, kernel, *, stride=1, use_bias: bool = True,
               dtype, param_dtype, rngs: nnx.Rngs):
    kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
    self.kernel_size = kernel
    self.stride = (stride, 1, 1) if isinstance(stride, int) else tuple(stride)
    self.dtype = dtype
    self.kernel = param(rngs, nnx.initializers.lecun_normal(), (*kernel, in_ch, out_ch),
                        param_dtype, (None, None, None, 'conv_in', 'conv_out'))
    self.bias = (param(rngs, nnx.initializers.zeros, (out_ch,), param_dtype, ('conv_out',))
                 if use_bias else None)

  def __call__(self, x: jax.Array, *, spatial_pad=None) -> jax.Array:
    """Valid in time; ``spatial_pad`` ((top, bottom), (left, right)) zeros, default 'same'."""
    kt, kh, kw = self.kernel_size
    if spatial_pad is None:
      spatial_pad = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
    if kt > 1 and jax.default_backend() == 'cpu':
      y = _as_2d_convs(x, kernel, self.stride, spatial_pad)
    else:
      y = jax.lax.conv_general_dilated(x, kernel, self.stride, ((0, 0), *spatial_pad),
                                       dimension_numbers=_DN3)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def _as_2d_convs(x, kernel, stride, spatial_pad):
  """The 3D convolution (valid in time) as ``kt`` 2D convolutions of time-shifted frames,
  summed: XLA:CPU runs 3D convolutions several times slower than the same work as 2D ones
  (a 3x3x3 conv of (2, 11, 64, 64, 16): forward 5.5x, forward + backward 2.8x). Same sums,
  in another order (float32 rounding apart, the same result)."""
  kt, st = kernel.shape[0], stride[0]
  b, t, h, w, c = x.shape
  frames = (t - kt) // st + 1
  y = None
  for k in range(kt):
    shifted = x[:, k:k + st * (frames - 1) + 1:st].reshape(b * frames, h, w, c)
    part = jax.lax.conv_general_dilated(shifted, kernel[k], stride[1:], spatial_pad,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = part if y is None else y + part
  return y.reshape(b, frames, *y.shape[1:])


class CausalConv3d(Conv3d):
  """Conv3d whose ``kt - 1`` frames of temporal context come from the chunk cache.

  The first chunk starts from zeros (Wan), or from copies of its first frame when
  ``replicate_first`` (CogVideoX's ``pad_mode='first'``).
  """

  def __init__(self, *args, replicate_first: bool = False, **kwargs):
    super().__init__(*args, **kwargs)
    self.replicate_first = replicate_first

  def __call__(self, x: jax.Array, caches: Caches | None = None, *, spatial_pad=None,
               history=None) -> jax.Array:
    """``history`` (B, kt-1, H, W, C) overrides the cache (and the zero start) when given."""
    context = self.kernel_size[0] - 1
    if context == 0:
      return super().__call__(x, spatial_pad=spatial_pad)
    if history is None:
      history = caches.take() if caches is not None else None
      if history is None and self.replicate_first:
        history = jnp.repeat(x[:, :1], context, axis=1)
      elif history is None:
        history = jnp.zeros(x.shape[:1] + (context,) + x.shape[2:], x.dtype)
      full = jnp.concatenate([history.astype(x.dtype), x], axis=1)
      if caches is not None:
        caches.put(full[:, -context:])
    else:
      full = jnp.concatenate([history.astype(x.dtype), x], axis=1)
    return super().__call__(full, spatial_pad=spatial_pad)


class Conv2d(nnx.Module):
  """A 2D convolution applied frame by frame to (B, T, H, W, C), or to (N, H, W, C)."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, *, stride: int = 1,
               padding=None, dtype, param_dtype, rngs: nnx.Rngs):
    self.stride, self.dtype = (stride, stride), dtype
    p = kernel // 2 if padding is None else padding
    self.padding = ((p, p), (p, p)) if isinstance(p, int) else p
    self.kernel = param(rngs, nnx.initializers.lecun_normal(), (kernel, kernel, in_ch, out_ch),
                        param_dtype, (None, None, 'conv_in', 'conv_out'))
    self.bias = param(rngs, nnx.initializers.zeros, (out_ch,), param_dtype, ('conv_out',))

  def __call__(self, x: jax.Array) -> jax.Array:
    lead = x.shape[:-3]
    y = jax.lax.conv_general_dilated(
        x.reshape((-1,) + x.shape[-3:]).astype(self.dtype), self.kernel[...].astype(self.dtype),
        self.stride, self.padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = y + self.bias[...].astype(self.dtype)
    return y.reshape(lead + y.shape[1:])


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm on channels-last input: statistics per (batch, group) in float32."""

  def __init__(self, channels: int, groups: int, *, eps: float = 1e-6, param_dtype,
               rngs: nnx.Rngs):
    self.groups, self.eps = groups, eps
    self.scale = param(rngs, nnx.initializers.ones, (channels,), param_dtype, ('norm',))
    self.bias = param(rngs, nnx.initializers.zeros, (channels,), param_dtype, ('norm',))

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    # Only the channels are split into groups: merging the spatial axes would undo a sharding
    # of the width (GSPMD gathers a sharded axis that a reshape folds into another).
    xf = x.astype(jnp.float32).reshape(shape[:-1] + (self.groups, shape[-1] // self.groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = xf.mean(axes, keepdims=True)
    var = jnp.square(xf - mean).mean(axes, keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def to_channels_last(x: jax.Array) -> jax.Array:
  """(B, C, T, H, W) -> (B, T, H, W, C)."""
  return jnp.moveaxis(x, 1, -1)


def to_channels_first(x: jax.Array) -> jax.Array:
  """(B, T, H, W, C) -> (B, C, T, H, W)."""
  return jnp.moveaxis(x, -1, 1)


def run_chunked(step, x: jax.Array, first: int, size: int):
  """``step(chunk, caches) -> out`` over frames [:first], then groups of ``size`` under a scan.

  Returns the outputs concatenated on the frame axis (axis 1). ``x.shape[1] - first`` must be a
  multiple of ``size``. The first chunk builds the cache; every later chunk has the same shapes.
  """
  caches = Caches()
  out = step(x[:, :first], caches)
  rest = x.shape[1] - first
  if rest == 0:
    return out
  n = rest // size
  chunks = jnp.moveaxis(x[:, first:].reshape((x.shape[0], n, size) + x.shape[2:]), 1, 0)

  def body(carry, chunk):
    c = Caches(carry)
    y = step(chunk, c)
    return c.new, y

  _, ys = jax.lax.scan(body, caches.new, chunks)
  ys = jnp.moveaxis(ys, 0, 1)
  ys = ys.reshape((ys.shape[0], -1) + ys.shape[3:])
  return jnp.concatenate([out, ys], axis=1)

