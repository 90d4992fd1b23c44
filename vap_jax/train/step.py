"""The train state and the one jitted train step, for every task (`TRAINED`).

Only the trainable parameters (task 'vap': `vap_jax.models.common.TRAINABLE`, the expert; tasks
'base' and 'vae': every parameter; 'lora' and 'dpo': the LoRA adapters) are in the state,
differentiated and given optimizer moments; the rest (the frozen base) is an argument the step
reads and never differentiates. The step draws its
random numbers from the state's key (or takes injected ones), accumulates gradients over
micro-batches with a `lax.scan`, applies the optimizer, and returns the next state (the old one
is donated) and its metrics. On a mesh the state is sharded
like the parameters (Adam's moments like their parameters), the batch over the data axes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vap_jax.models.common import TRAINABLE
from vap_jax.parallel import logical_to_spec, param_shardings
from vap_jax.parallel.sharding import Rules
from vap_jax.train.optimizer import global_norm


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  """What a run carries from step to step (and checkpoints): the step count, the trainable
  parameters (float32 master weights), the optimizer state and the random key (as key data)."""
  step: jax.Array
  params: nnx.State
  opt_state: Any
  rng: jax.Array


# What each task trains: the VAP expert of a transformer, a whole base transformer (no expert),
# a whole VAE, or the LoRA adapters of a transformer (SFT or DPO).
TRAINED = {'vap': TRAINABLE, 'base': nnx.Param, 'vae': nnx.Param, 'lora': nnx.LoRAParam,
           'dpo': nnx.LoRAParam}


def split(model: nnx.Module, task: str = 'vap'):
  """(graphdef, trainable state, frozen state) of the model a ``task`` run trains."""
  return nnx.split(model, TRAINED[task], ...)


def init_state(params: nnx.State, optimizer: optax.GradientTransformation, seed: int
               ) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                    jax.random.key_data(jax.random.key(seed)))


def state_shardings(state: TrainState, optimizer, mesh: Mesh, rules: Rules) -> TrainState:
  """Where each part of the state lives: parameters by their logical axes, each optimizer
  moment like its parameter, scalars replicated."""
  params = param_shardings(state.params, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt = optax.tree_map_params(optimizer, lambda _, s: s, state.opt_state, params,
                              transform_non_params=lambda _: replicated,
                              is_leaf=lambda x: isinstance(x, nnx.Variable))
  return TrainState(replicated, params, opt, replicated)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Samples over the data axes (``activation_batch``), the rest of each array replicated."""
  return NamedSharding(mesh, logical_to_spec(('activation_batch',), rules, mesh))


def make_train_step(graphdef, objective, optimizer: optax.GradientTransformation, *,
                    accumulation: int = 1, lr_schedule: optax.Schedule | None = None) -> Callable:
  """``step(state, frozen, batch, draws=None) -> (state, metrics)``, not yet jitted.

  ``objective(model, batch, draws) -> (loss, per-sample losses, aux)`` with ``objective.draws(
  key, batch)``; scalars in ``aux['metrics']`` (e.g. the VAE's recon and kl) join the metrics.
  ``batch`` holds ``accumulation`` micro-batches along its leading axis; ``draws`` (optional,
  the objective's draws for the whole batch) replaces the random draws. ``step.loss_and_grads(
  params, frozen, batch, draws) -> ((loss, per-sample losses), grads)`` is its gradient part.
  """
  def loss_fn(params, frozen, batch, d):
    model = nnx.merge(graphdef, params, frozen)
    loss, per_sample, aux = objective(model, batch, d)
    return loss, (per_sample, aux.get('metrics', {}))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def loss_and_grads(params, frozen, batch, d):
    (loss, (per_sample, _)), grads = grad_fn(params, frozen, batch, d)
    return (loss, per_sample), grads

  def step(state: TrainState, frozen, batch, draws=None):
    key, next_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    if draws is None:
      draws = objective.draws(key, batch)
    if accumulation == 1:
      (loss, (per_sample, extra)), grads = grad_fn(state.params, frozen, batch, draws)
    else:
      micro = lambda x: x.reshape(accumulation, x.shape[0] // accumulation, *x.shape[1:])
      batches, micro_draws = jax.tree.map(micro, (batch, draws))

      def one(total, xs):
        (loss, aux), grads = grad_fn(state.params, frozen, *xs)
        return jax.tree.map(jnp.add, total, grads), (loss, aux)
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      grads, (losses, (per_sample, extra)) = jax.lax.scan(one, zeros, (batches, micro_draws))
      grads = jax.tree.map(lambda g: g / accumulation, grads)
      loss, per_sample = losses.mean(), per_sample.reshape(-1)
      extra = jax.tree.map(jnp.mean, extra)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(extra, loss=loss, per_sample_loss=per_sample, grad_norm=global_norm(grads))
    if lr_schedule is not None:
      metrics['learning_rate'] = lr_schedule(state.step)
    return TrainState(state.step + 1, params, opt_state, jax.random.key_data(next_key)), metrics

  step.loss_and_grads = loss_and_grads
  return step


def jit_train_step(step: Callable, state: TrainState, frozen, optimizer, mesh: Mesh,
                   rules: Rules):
  """``step`` jitted with the state donated and explicit shardings: the state like its
  parameters, the frozen base by its logical axes, batch and draws over the data axes. Call it
  (or ``.lower`` it) under ``sharding_context(mesh, rules)``, which pins the activations. The
  metrics come back replicated, so every process can read all of them."""
  shardings = state_shardings(state, optimizer, mesh, rules)
  data = batch_sharding(mesh, rules)
  return jax.jit(step, donate_argnums=0,
                 in_shardings=(shardings, param_shardings(frozen, mesh, rules), data, data),
                 out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())))
