"""The official DPO objective (VAP_SPEC §5.5): a win and a lose video of the same kind, one
reference, one timestep for the pair; the policy's and the reference model's per-sample losses
of both give ``L = -log sigmoid(-beta/2 ((Lw - Ll) - (Lw_ref - Ll_ref)))`` times the pair's
weight (beta = 500, ``trainer.py:775-816``).

The official trainer keeps a deep copy of the whole model as the reference. The policy there is
that model plus LoRA adapters that start at zero, so the reference *is* the policy with its
adapters off: `vap_jax.nn.lora.adapters_off` gives it from the same arrays, one copy of the
weights in memory, and no gradient flows through it.

A batch is a `vap_jax.data.dpo` batch: B pairs as 2B rows ``[win_0, lose_0, win_1, ...]``, each
row with the pair's reference, ``dpo_weight`` (2B,) the pair's weight on both rows; the rows are
what the SFT objective (`objectives.Objective`) reads, so the per-sample losses are the SFT ones.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vap_jax.nn.lora import adapters_off
from vap_jax.train.objectives import Draws, Objective, per_sample_mean

BETA = 500.0  # the official dpo beta: the logit is -0.5 * 500 * (...)


def pairs(x: jax.Array) -> jax.Array:
  """(2B, ...) rows -> (B, 2, ...) [win, lose] pairs."""
  return x.reshape(-1, 2, *x.shape[1:])


@dataclasses.dataclass(frozen=True)
class DPOObjective:
  """``objective(model, batch, draws) -> (loss, per-pair losses, aux)`` like `Objective`.

  ``reference(model)`` is the reference model (default: the policy with its adapters off).
  """
  inner: Objective
  beta: float = BETA
  reference: Callable[[nnx.Module], nnx.Module] = adapters_off

  def draws(self, key: jax.Array, batch: dict) -> Draws:
    """The SFT draws of every row, with the win's timestep draw shared by its lose row (the
    official trainer samples one sigma per pair)."""
    d = self.inner.draws(key, batch)
    u = jnp.repeat(pairs(d.u)[:, 0], 2)
    return dataclasses.replace(d, u=u)

  def __call__(self, model: nnx.Module, batch: dict, d: Draws):
    _, policy, aux = self.inner(model, batch, d)
    _, reference, ref_aux = self.inner(self.reference(model), batch, d)
    reference = jax.lax.stop_gradient(reference)
    # (Lw - Lw_ref) - (Ll - Ll_ref) from the elementwise errors: mean(w (e - e_ref)(e + e_ref))
    # equals L - L_ref without subtracting two float32 means that agree in their first three
    # digits (the logit multiplies that difference by 250).
    e, e_ref = aux['error'], jax.lax.stop_gradient(ref_aux['error'])
    gap = pairs(per_sample_mean(aux['weights'] * (e - e_ref) * (e + e_ref)))
    logit = -0.5 * self.beta * (gap[:, 0] - gap[:, 1])
    per_pair = -jax.nn.log_sigmoid(logit) * pairs(batch['dpo_weight'])[:, 0]
    (lw, ll), (lw_ref, ll_ref) = pairs(policy).T, pairs(reference).T
    metrics = dict(win_loss=lw.mean(), lose_loss=ll.mean(), win_loss_ref=lw_ref.mean(),
                   lose_loss_ref=ll_ref.mean(), logit=logit.mean(),
                   preference_accuracy=jnp.mean(logit > 0))
    return per_pair.mean(), per_pair, dict(aux, metrics=metrics)
