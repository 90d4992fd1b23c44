"""Context-parallel joint attention: each device holds a sequence shard of every stream.

The MoT joint attention runs one softmax over the concatenation of the streams (target, then the
reference expert), each made of token parts (CogVideoX: text, video). Left to GSPMD,
concatenating sequence-sharded parts whose boundaries do not fall on shard boundaries reshards
Q, K and V in every block. Here every part stays sharded on its own, inside one `jax.shard_map`
over the whole mesh:

* ``allgather``: every device keeps its shard of each stream's queries and gathers the keys and
  values of all streams over the ``context`` axis; its queries attend to the whole joint
  sequence, and its outputs are its own tokens' (no communication of Q or of the outputs).
* ``ulysses``: an all-to-all turns each stream's sequence shards into head shards (every token,
  1/c of the heads), the joint attention runs whole per head, and a second all-to-all turns the
  output back into sequence shards. The local head count must divide by the context degree.

A part whose length does not divide the context degree is zero-padded to the next multiple,
its padded keys masked out and its padded outputs dropped. ``gspmd`` (the default) leaves the
layout to the compiler (the path every config had before).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vap_jax.nn.attention import attention
from vap_jax.parallel import sharding

CONTEXT_PARALLEL = ('gspmd', 'allgather', 'ulysses')
HEADS_AXES = ('activation_batch', 'activation_length', 'activation_heads', None)
CONTEXT = 'context'


def active(kind: str) -> bool:
  """Whether ``kind`` runs as a shard_map here: a sharding context whose mesh has a context
  axis of size > 1 that the rules put the sequence on."""
  if kind not in CONTEXT_PARALLEL:
    raise ValueError(f'context parallelism {kind!r} is not one of {CONTEXT_PARALLEL}')
  mesh, rules = sharding.current()
  if kind == 'gspmd' or mesh is None or mesh.shape[CONTEXT] == 1:
    return False
  spec = sharding.logical_to_spec(HEADS_AXES, rules, mesh)
  if spec[1] != CONTEXT:
    raise ValueError(f'{kind} context parallelism needs the rules to put activation_length on '
                     f'the context axis alone; they give {spec[1]!r}')
  return True


def _pad(x: jax.Array, multiple: int) -> jax.Array:
  pad = -x.shape[1] % multiple
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def joint_attention(qkvs: Sequence[tuple[jax.Array, jax.Array, jax.Array]],
                    key_masks: Sequence[jax.Array | None], *, kind: str,
                    implementation: str) -> list[jax.Array]:
  """Each token part's attention output (B, S_i, H, D) over the joint sequence of all parts
  of all streams (see the module docstring); ``qkvs[i]`` = part i's q, k, v (B, S_i, H, D),
  ``key_masks[i]`` (B, S_i) or None (every key kept). Call inside `sharding.sharding_context`."""
  mesh, rules = sharding.current()
  c = mesh.shape[CONTEXT]
  spec = sharding.logical_to_spec(HEADS_AXES, rules, mesh)
  local_heads = qkvs[0][0].shape[2] // _size(mesh, spec[2])
  if kind == 'ulysses' and local_heads % c:
    raise ValueError(f'ulysses context parallelism splits the {local_heads} heads each device '
                     f'holds over the context axis of {c}: they must divide')
  lengths = [q.shape[1] for q, _, _ in qkvs]
  masks = [jnp.ones(q.shape[:2], bool) if m is None else m for (q, _, _), m in zip(qkvs, key_masks)]
  qkvs = [tuple(_pad(t, c) for t in qkv) for qkv in qkvs]
  masks = [_pad(m, c) for m in masks]
  mask_spec = P(*spec[:2])

  def local(qkvs, masks):
    if kind == 'allgather':
      gather = lambda x: jax.lax.all_gather(x, CONTEXT, axis=1, tiled=True)
      q = jnp.concatenate([q for q, _, _ in qkvs], axis=1)
      k = jnp.concatenate([gather(k) for _, k, _ in qkvs], axis=1)
      v = jnp.concatenate([gather(v) for _, _, v in qkvs], axis=1)
      m = jnp.concatenate([gather(m) for m in masks], axis=1)
      o = attention(q, k, v, key_mask=m, implementation=implementation)
      return _split(o, [q.shape[1] for q, _, _ in qkvs])
    # ulysses: sequence shards -> head shards, attention, and back
    to_heads = lambda x: jax.lax.all_to_all(x, CONTEXT, 2, 1, tiled=True)
    q, k, v = (jnp.concatenate([to_heads(t[i]) for t in qkvs], axis=1) for i in range(3))
    m = jnp.concatenate([jax.lax.all_gather(m, CONTEXT, axis=1, tiled=True) for m in masks], 1)
    o = attention(q, k, v, key_mask=m, implementation=implementation)
    parts = _split(o, [t[0].shape[1] * c for t in qkvs])
    return [jax.lax.all_to_all(p, CONTEXT, 1, 2, tiled=True) for p in parts]

  specs = [(spec, spec, spec) for _ in qkvs]
  # check_vma off: the attention ops' loops (blockwise) start from device-invariant zeros that
  # the sequence-sharded body makes varying; every output here is varying by construction.
  outs = jax.shard_map(local, mesh=mesh, in_specs=(specs, [mask_spec] * len(masks)),
                       out_specs=[spec] * len(qkvs), check_vma=False)(qkvs, masks)
  return [o[:, :n] for o, n in zip(outs, lengths)]


def _size(mesh, axes) -> int:
  """Devices along the mesh axes of one PartitionSpec entry."""
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def _split(x: jax.Array, sizes: Sequence[int]) -> list[jax.Array]:
  return jnp.split(x, np.cumsum(sizes)[:-1], axis=1)
