"""Parameterised layers shared by every model.

Each parameter carries ``logical_axes`` metadata (one name or None per dimension); the mesh rules in
`vap_jax.parallel` turn those names into shardings, so model code never mentions a mesh.
Kernels are stored (in, out) like flax; the PyTorch (out, in) layout is transposed by the key maps.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


class Buffer(nnx.Variable):
  """A non-trainable tensor that lives in checkpoints (e.g. CogVideoX's learned pos_embedding)."""


class _Mode(threading.local):
  abstract = False


_mode = _Mode()


@contextlib.contextmanager
def abstract_variables():
  """Build modules with ShapeDtypeStruct values: no random numbers, no memory, no tracing.

  Equivalent to `nnx.eval_shape` for our modules but linear in model size: under eval_shape every
  `rngs.params()` call updates a traced counter whose bookkeeping walks the whole trace so far
  (measured: 150 s for the 11B CogVideoX-VAP model; this takes about a second).
  """
  previous, _mode.abstract = _mode.abstract, True
  try:
    yield
  finally:
    _mode.abstract = previous


def is_abstract() -> bool:
  """True while `abstract_variables` is active."""
  return _mode.abstract


def param(rngs: nnx.Rngs, init, shape, dtype, axes: Axes) -> nnx.Param:
  """A Param with logical axes, ``init(key, shape, dtype)``d (or abstract, see above)."""
  if _mode.abstract:
    return nnx.Param(jax.ShapeDtypeStruct(shape, dtype), logical_axes=axes)
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def buffer(make: Callable[[], jax.Array], shape, dtype, axes: Axes) -> Buffer:
  """A Buffer whose value ``make()`` computes (skipped when building abstract variables)."""
  if _mode.abstract:
    return Buffer(jax.ShapeDtypeStruct(shape, dtype), logical_axes=axes)
  return Buffer(jnp.asarray(make(), dtype).reshape(shape), logical_axes=axes)


class Linear(nnx.Module):
  """y = x @ kernel + bias, computed in ``dtype``; kernel is (in, out). ``lora`` (None, or a
  `vap_jax.nn.lora.LoRA`) adds a low-rank adapter's output."""

  def __init__(self, in_features: int, out_features: int, *, axes: Axes, use_bias: bool = True,
               dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.kernel = param(rngs, nnx.initializers.lecun_normal(), (in_features, out_features),
                         param_dtype, axes)
    self.bias = (param(rngs, nnx.initializers.zeros, (out_features,), param_dtype, (axes[1],))
                 if use_bias else None)
    self.lora = nnx.data(None)  # data, not static: an adapter can be attached later

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora is not None:
      y = y + self.lora(x, self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32 (two-pass variance, like PyTorch)."""

  def __init__(self, dim: int, *, eps: float, affine: bool = True, axis_name: str | None = 'norm',
               param_dtype, rngs: nnx.Rngs, dtype=None):
    self.eps = eps
    self.scale = param(rngs, nnx.initializers.ones, (dim,), param_dtype, (axis_name,)) if affine else None
    self.bias = param(rngs, nnx.initializers.zeros, (dim,), param_dtype, (axis_name,)) if affine else None

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis in float32 with a learned scale."""

  def __init__(self, dim: int, *, eps: float, axis_name: str | None = 'norm',
               param_dtype, rngs: nnx.Rngs, dtype=None):
    self.eps = eps
    self.scale = param(rngs, nnx.initializers.ones, (dim,), param_dtype, (axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class FeedForward(nnx.Module):
  """Linear -> GELU -> Linear (diffusers ``FeedForward``; tanh GELU unless ``approximate=False``)."""

  def __init__(self, dim: int, inner_dim: int, out_dim: int | None = None, *,
               approximate: bool = True, dtype, param_dtype, rngs: nnx.Rngs,
               axes: tuple[str, str, str] = ('embed', 'mlp', 'embed')):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.approximate = approximate
    self.proj_in = Linear(dim, inner_dim, axes=axes[:2], **kw)
    self.proj_out = Linear(inner_dim, out_dim or dim, axes=axes[1:], **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj_out(jax.nn.gelu(self.proj_in(x), approximate=self.approximate))


class TimestepEmbedding(nnx.Module):
  """Linear -> SiLU -> Linear applied to sinusoidal timestep features."""

  def __init__(self, in_dim: int, out_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_1 = Linear(in_dim, out_dim, axes=('embed', 'time_embed'), **kw)
    self.linear_2 = Linear(out_dim, out_dim, axes=('time_embed', None), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class LayerNormZero(nnx.Module):
  """CogVideoX adaptive LayerNorm: temb -> (shift, scale, gate) for video and for text tokens.

  One LayerNorm is shared by both token groups; each gets its own modulation chunk.
  """

  def __init__(self, temb_dim: int, dim: int, *, eps: float, affine: bool = True,
               dtype, param_dtype, rngs: nnx.Rngs):
    self.linear = Linear(temb_dim, 6 * dim, axes=('time_embed', 'embed'), dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    self.norm = LayerNorm(dim, eps=eps, affine=affine, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, video, text, temb):
    shift, scale, gate, t_shift, t_scale, t_gate = jnp.split(self.linear(jax.nn.silu(temb)), 6, -1)
    video = self.norm(video) * (1 + scale[:, None]) + shift[:, None]
    text = self.norm(text) * (1 + t_scale[:, None]) + t_shift[:, None]
    return video, text, gate[:, None], t_gate[:, None]


class AdaLayerNorm(nnx.Module):
  """Final CogVideoX norm: LayerNorm(x) * (1 + scale) + shift with (shift, scale) from temb."""

  def __init__(self, temb_dim: int, dim: int, *, eps: float, affine: bool = True,
               dtype, param_dtype, rngs: nnx.Rngs):
    self.linear = Linear(temb_dim, 2 * dim, axes=('time_embed', 'embed'), dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    self.norm = LayerNorm(dim, eps=eps, affine=affine, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, temb):
    shift, scale = jnp.split(self.linear(jax.nn.silu(temb)), 2, -1)
    return self.norm(x) * (1 + scale[:, None]) + shift[:, None]
