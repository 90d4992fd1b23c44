"""Low-rank adapters (LoRA) on `Linear` layers: ``y = x W + b + s (x A) B`` with ``s = alpha / r``
(times an optional user scale), as PEFT computes it.

An adapter hangs off its layer as ``linear.lora``; its ``a`` (in, r) and ``b`` (r, out) are
`nnx.LoRAParam`s, a Param subclass, so ``nnx.split(model, nnx.LoRAParam, ...)`` separates them
from the weights they adapt. On a stacked layer (`vap_jax.models.stack`) they carry the same
leading layer axis and are scanned with it, and their logical axes follow the kernel's (``a``
shards its input dimension like the kernel, ``b`` its output), so the mesh rules place them
next to their kernel. PEFT's init: ``a`` uniform in +-1/sqrt(in) (kaiming-uniform, a=sqrt(5)),
``b`` zero, so an adapted model starts equal to its base.

Which layers get adapters, and under what names, is `vap_jax.weights.lora`'s business.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class LoRA(nnx.Module):
  """One adapter: ``a`` (..., in, r), ``b`` (..., r, out) and the static ``scale``."""

  def __init__(self, a: jax.Array, b: jax.Array, scale: float, *, kernel_axes):
    lead, (fan_in, fan_out) = tuple(kernel_axes[:-2]), kernel_axes[-2:]
    self.a = nnx.LoRAParam(a, logical_axes=lead + (fan_in, None))
    self.b = nnx.LoRAParam(b, logical_axes=lead + (None, fan_out))
    self.scale = float(scale)

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  def __call__(self, x: jax.Array, dtype) -> jax.Array:
    h = jnp.dot(x.astype(dtype), self.a[...].astype(dtype))
    return jnp.dot(h, self.b[...].astype(dtype)) * jnp.asarray(self.scale, dtype)

  def delta(self) -> jax.Array:
    """The kernel change ``s A B`` (..., in, out), in float32."""
    return jnp.matmul(self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)) * self.scale


def init(key: jax.Array, kernel: nnx.Variable, rank: int, alpha: float,
         dtype=jnp.float32) -> LoRA:
  """A fresh adapter for ``kernel`` (..., in, out): PEFT's init (see the module docstring)."""
  *lead, fan_in, fan_out = kernel.shape
  bound = 1.0 / fan_in ** 0.5
  a = jax.random.uniform(key, (*lead, fan_in, rank), dtype, -bound, bound)
  b = jnp.zeros((*lead, rank, fan_out), dtype)
  return LoRA(a, b, alpha / rank, kernel_axes=kernel_axes(kernel))


def kernel_axes(kernel: nnx.Variable) -> tuple:
  """The logical axes of a kernel (None per dimension when it has none)."""
  return tuple(kernel.get_metadata().get('logical_axes') or (None,) * kernel.ndim)


def adapted(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
  """(path, layer) of every layer of ``model`` that has an adapter."""
  return [(tuple(path), m) for path, m in nnx.iter_graph(model)
          if isinstance(m, nnx.Module) and getattr(m, 'lora', None) is not None]


def set_scale(model: nnx.Module, scale: float) -> None:
  """Every adapter's output times ``scale`` relative to alpha/r (a user's LoRA strength)."""
  for _, layer in adapted(model):
    layer.lora.scale = layer.lora.scale * float(scale)


def merge(model: nnx.Module) -> int:
  """Folds every adapter into its kernel (``W += s A B``, in float32, cast back) and removes it:
  the merged model runs at the base model's cost. Returns how many were merged."""
  layers = adapted(model)
  for _, layer in layers:
    kernel = layer.kernel
    kernel[...] = (kernel[...].astype(jnp.float32) + layer.lora.delta()).astype(kernel.dtype)
    layer.lora = None
  return len(layers)


def adapters_off(model: nnx.Module) -> nnx.Module:
  """The same model with every adapter's output zero (its ``b`` zeroed): the base model the
  adapters started from, sharing every other array with ``model`` (no copy). Inside a traced
  function the zeros cut the adapters out of the gradient."""
  graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
  return nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, adapters), rest)
