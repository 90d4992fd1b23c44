"""Layer stacks: a transformer's blocks as one module with a leading layer axis, run by scan.

Both VAP backbones have L base blocks and, on the blocks listed in ``block_idx_with_mot_ref``, an
expert block for the reference stream. The base blocks are one stacked module (L, ...), the expert
blocks another (E, ...). `plan_runs` cuts the layer sequence into *runs*: a run repeats one group
-- an expert block followed by ``gap`` base-only blocks -- or is a stretch of base-only blocks.
The released Wan layout [0, 4, ..., 36] is one run of 10 groups with gap 3; CogVideoX's 0..40 is
one run of 41 groups with gap 0 and a base-only tail; irregular placements give more, shorter runs.

`run_blocks` executes the runs: one `jax.lax.scan` per run (``scan=False``: a Python loop over
the same step functions, for debugging and equality tests), each block under `jax.checkpoint`
with the chosen remat policy. The frozen base stack is indexed inside the loop (no copy of the
weights per run, gathered layer by layer under FSDP); the expert stack of a run is scanned over
(its gradient is stacked per step, not accumulated into a full-size buffer per step).
A stack whose weights live in host memory (`offload`) is streamed: each layer is indexed there
and copied to the device inside the loop, so the device holds one layer group at a time.
Loop-invariant inputs (RoPE tables, the reference timestep embedding, cross-attention context)
are read from the streams' non-carried fields; only the fields a stream names in ``carried`` flow
through the loop.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vap_jax.nn.layers import is_abstract

LAYER_AXIS = 'layers'

# Remat policies by name (see `remat_policy`). Activations tagged with `jax.ad_checkpoint.
# checkpoint_name` in the blocks: 'query', 'key', 'value', 'attention', 'ffn', 'block_input'.
REMAT_POLICIES = ('none', 'full', 'save_dots', 'save_attention', 'offload_hidden')


def stacked(make: Callable[[], nnx.Module], count: int) -> nnx.Module | None:
  """``count`` modules built by ``make()`` as one module whose variables have a leading axis of
  size ``count`` (logical name 'layers'); None when ``count`` is 0."""
  if count == 0:
    return None
  if is_abstract():
    graphdef, state = nnx.split(make())
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct((count,) + s.shape, s.dtype), state)
  else:
    modules = [make() for _ in range(count)]
    graphdef = nnx.graphdef(modules[0])
    state = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(m) for m in modules])
  flat = []
  for path, var in nnx.to_flat_state(state):
    axes = var.get_metadata().get('logical_axes') or (None,) * (len(var.shape) - 1)
    flat.append((path, var.replace(logical_axes=(LAYER_AXIS,) + tuple(axes))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


@dataclasses.dataclass(frozen=True)
class Run:
  """``count`` groups, each [an expert block on base layer b and expert slot j, then ``gap``
  base-only blocks]; a base-only run (``expert_start`` None) is ``count`` base blocks."""
  base_start: int
  expert_start: int | None
  count: int
  gap: int = 0

  @property
  def base_layers(self) -> int:
    return self.count * (1 + self.gap) if self.expert_start is not None else self.count


def plan_runs(num_layers: int, expert_blocks: Sequence[int]) -> tuple[Run, ...]:
  """The runs covering layers 0..num_layers-1 in order, with as few runs as the placement allows.

  Base-only blocks after the last expert join its group only as far as the groups before it
  reach (so the expert stack stays one run when the placement is regular); the rest form a tail.
  """
  experts = sorted(expert_blocks)
  if not experts:
    return (Run(0, None, num_layers),) if num_layers else ()
  runs = [Run(0, None, experts[0])] if experts[0] else []
  gaps = [b - a - 1 for a, b in zip(experts, experts[1:])]
  trailing = num_layers - 1 - experts[-1]
  gaps.append(gaps[-1] if gaps and trailing >= gaps[-1] else trailing)
  j = 0
  while j < len(experts):
    k = j
    while k + 1 < len(experts) and gaps[k + 1] == gaps[j]:
      k += 1
    runs.append(Run(experts[j], j, k - j + 1, gaps[j]))
    j = k + 1
  tail = trailing - gaps[-1]
  if tail:
    runs.append(Run(num_layers - tail, None, tail))
  return tuple(runs)


def checkpoint_slots(expert_blocks: Sequence[int]) -> Callable:
  """``slot_of(path, block)`` for the key maps: checkpoint block i fills base slot i, and expert
  slot j when it is the j-th expert block (None: the model has no expert on that block)."""
  experts = list(expert_blocks)

  def slot_of(path, block: int) -> int | None:
    if path[:1] == ('expert',):
      return experts.index(block) if block in experts else None
    return block
  return slot_of


def checkpoint_blocks(expert_blocks: Sequence[int]) -> Callable:
  """The inverse of `checkpoint_slots`: ``block_of(path, slot)`` is the checkpoint block number
  of stack slot ``slot`` (expert slot j sits on the j-th expert block)."""
  experts = list(expert_blocks)

  def block_of(path, slot: int) -> int:
    return experts[slot] if path[:1] == ('expert',) else slot
  return block_of


def remat_policy(name: str):
  """The `jax.checkpoint` policy called ``name`` (None for 'none': no rematerialisation)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f'remat policy {name!r} is not one of {REMAT_POLICIES}')
  policies = jax.checkpoint_policies
  if name == 'offload_hidden':
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    if 'pinned_host' not in kinds:
      raise ValueError(f"remat policy 'offload_hidden' needs pinned host memory, which the "
                       f"{jax.devices()[0].platform} backend does not offer (it has {sorted(kinds)})")
    return policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=['block_input'],
        offload_src='device', offload_dst='pinned_host')
  return {'none': None, 'full': policies.nothing_saveable,
          'save_dots': policies.dots_with_no_batch_dims_saveable,
          'save_attention': policies.save_only_these_names('attention')}[name]


# ---------------------------------------------------------------------------------------- running


def _carry(stream):
  return None if stream is None else tuple(getattr(stream, f) for f in stream.carried)


def _with(stream, carry):
  return None if stream is None else stream._replace(**dict(zip(stream.carried, carry)))


def _layer(graphdef, state, index) -> nnx.Module:
  """Layer ``index`` (static int or traced) of a stacked state, as a module on the device."""
  if isinstance(index, int):
    def take(a):
      if isinstance(a, jax.ShapeDtypeStruct):  # an abstract model (`abstract_variables`)
        return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
      return a[index]
    return nnx.merge(graphdef, fetch(jax.tree.map(take, state)))
  return nnx.merge(graphdef, fetch(jax.tree.map(
      lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), state)))


def on_host(a) -> bool:
  """Whether the array (or tracer) ``a`` lives in host memory."""
  return getattr(jax.typeof(a), 'memory_space', None) == jax.memory.Space.Host


def fetch(tree):
  """``tree`` with its host-memory arrays copied to the device (the rest as they are)."""
  return jax.tree.map(lambda a: jax.device_put(a, jax.memory.Space.Device) if on_host(a) else a,
                      tree)


def offload(module: nnx.Module) -> nnx.Module:
  """``module`` with its weights moved to pinned host memory, keeping their sharding: stacked
  layers are then streamed to the device one at a time by `run_blocks`, other weights are copied
  in when a compiled call starts (`fetch_unstacked`). Stacked vectors (biases, norm scales: a
  fraction of a percent of the bytes) stay on the device, since a TPU cannot copy one row of a
  host array whose rows are its tiled minor dimension. Needs a backend with pinned host memory."""
  kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
  if 'pinned_host' not in kinds:
    raise ValueError(f'offload needs pinned host memory, which the {jax.devices()[0].platform} '
                     f'backend does not offer (it has {sorted(kinds)})')

  def place(path, var):
    if not offloads(var):
      return var
    a = var.get_value()
    return var.replace(value=jax.device_put(a, a.sharding.with_memory_kind('pinned_host')))
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, nnx.map_state(place, state))


def _is_stacked(var: nnx.Variable) -> bool:
  return (var.get_metadata().get('logical_axes') or ())[:1] == (LAYER_AXIS,)


def offloads(var: nnx.Variable) -> bool:
  """Whether `offload` moves ``var`` (concrete or abstract) to host memory."""
  return not (_is_stacked(var) and len(var.shape) <= 2)


def fetch_unstacked(state: nnx.State) -> nnx.State:
  """Inside a compiled call: the host-memory weights of ``state`` that are not in a layer stack,
  copied to the device (the stacks stream layer by layer in `run_blocks`)."""
  def one(path, var):
    return var if _is_stacked(var) else var.replace(value=fetch(var.get_value()))
  return nnx.map_state(one, state)


def unstack(stack: nnx.Module, index: int) -> nnx.Module:
  """Layer ``index`` of a stacked module as a module of its own (for inspection and tests)."""
  return _layer(*nnx.split(stack), index)


def run_blocks(runs: Sequence[Run], base: nnx.Module, expert: nnx.Module | None, block: Callable,
               target, ref, *, scan: bool = True, remat: str = 'none'):
  """Apply every block to (target, ref) streams; returns them after the last block.

  ``block(base_layer, expert_layer or None, target, ref) -> (target, ref)`` is one block; with
  no expert layer (or no reference stream) the reference passes through untouched.
  """
  policy = remat_policy(remat)
  base_graphdef, base_state = nnx.split(base)
  expert_graphdef, expert_state = nnx.split(expert) if expert is not None else (None, None)

  # Offloaded (frozen) experts are indexed in host memory inside the loop like the base stack:
  # slicing a run out of the stack first would copy the whole run to the device. Experts on the
  # device are scanned over (their gradient is then stacked per step).
  experts_on_host = any(on_host(a) for a in jax.tree.leaves(expert_state))

  def expert_layer(slot):  # a slot number (offloaded) or the slot's weights
    if experts_on_host:
      return _layer(expert_graphdef, expert_state, slot)
    return nnx.merge(expert_graphdef, slot)

  def checkpointed(fn):
    if remat == 'none':
      return fn
    return jax.checkpoint(fn, policy=policy, prevent_cse=not scan)

  def tagged(carry):
    return jax.tree.map(lambda x: jax.ad_checkpoint.checkpoint_name(x, 'block_input'), carry)

  @checkpointed
  def base_step(index, t):
    t = _with(target, tagged(t))
    return _carry(block(_layer(base_graphdef, base_state, index), None, t, None)[0])

  @checkpointed
  def expert_step(index, slot, t, r):
    t, r = _with(target, tagged(t)), _with(ref, tagged(r))
    t, r = block(_layer(base_graphdef, base_state, index), expert_layer(slot), t, r)
    return _carry(t), _carry(r)

  def base_run(t, start, count, unrolled=not scan):
    if unrolled:
      for i in range(count):
        t = base_step(start + i, t)
      return t
    if count == 0:
      return t
    return jax.lax.scan(lambda c, i: (base_step(i, c), None), t,
                        start + jnp.arange(count, dtype=jnp.int32))[0]

  t, r = _carry(target), _carry(ref)
  for run in runs:
    if run.expert_start is None or ref is None:
      t = base_run(t, run.base_start, run.base_layers)
      continue
    size = 1 + run.gap
    if experts_on_host:  # the run's slot numbers
      slots = jnp.arange(run.expert_start, run.expert_start + run.count, dtype=jnp.int32)
    else:
      slots = jax.tree.map(lambda a: a[run.expert_start:run.expert_start + run.count],
                           expert_state)
    if not scan:
      for g in range(run.count):
        b = run.base_start + g * size
        t, r = expert_step(b, jax.tree.map(lambda a: a[g], slots), t, r)
        t = base_run(t, b + 1, run.gap)
      continue

    def group(carry, xs, run=run, size=size):
      g, slot_state = xs
      b = run.base_start + g * size
      t, r = expert_step(b, slot_state, *carry)
      # A scan inside the group would stack the offloaded inputs over two loop axes, which TPU's
      # host offload cannot stream (it slices one dimension): offloading, the group is unrolled.
      return (base_run(t, b + 1, run.gap, unrolled=remat == 'offload_hidden'), r), None
    t, r = jax.lax.scan(group, (t, r), (jnp.arange(run.count, dtype=jnp.int32), slots))[0]
  return _with(target, t), _with(ref, r)
