"""The model a run starts from: a checkpoint (base or VAP, diffusers or converted) or a random
init of a config, with the expert added as an exact copy of the base blocks it sits on (the
official init, VAP_SPEC §5.2) when the checkpoint has none.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from vap_jax.config import load_config
from vap_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer
from vap_jax.models.mot import MoTTransformer
from vap_jax.models.wan import WanConfig, WanTransformer
from vap_jax.parallel import param_shardings
from vap_jax.parallel.sharding import Rules
from vap_jax.weights import keymap as km
from vap_jax.weights.loading import abstract_model, fill

log = logging.getLogger(__name__)

FAMILIES = {'cogvideox': (CogVideoXConfig, CogVideoXTransformer),
            'wan': (WanConfig, WanTransformer)}


def runtime(model_config) -> dict:
  """The runtime fields of a run's ``model`` block, for the model config."""
  d = model_config.dtypes
  return dict(dtype=d.compute, param_dtype=d.params, trainable_dtype=d.trainable,
              attention=model_config.attention, scan_layers=model_config.scan_layers,
              remat=model_config.remat)


def build_model(family: str, model_config, *, mesh: Mesh | None, rules: Rules,
                seed: int = 0) -> MoTTransformer:
  """``model_config.checkpoint`` loaded (expert added from the base if it has none), or a random
  init of ``model_config.config`` (a config file's ``model`` block, by path)."""
  experts = tuple(model_config.get('block_idx_with_mot_ref') or ())
  config_cls, model_cls = FAMILIES[family]
  if model_config.get('checkpoint'):
    if family == 'cogvideox':
      from vap_jax.weights.cogvideox import load_cogvideox as load
    else:
      from vap_jax.weights.wan import load_wan as load
    model = load(model_config.checkpoint, mesh=mesh, rules=rules, **runtime(model_config))
    have = model.config.block_idx_with_mot_ref
    if not have and experts:
      log.info('adding the expert on blocks %s as copies of the base blocks', list(experts))
      return with_expert(model, experts, mesh=mesh, rules=rules)
    if experts and tuple(have) != experts:
      raise ValueError(f'model.block_idx_with_mot_ref {list(experts)} differs from the '
                       f'checkpoint {model_config.checkpoint}\'s {list(have)}')
    return model
  if not model_config.get('config'):
    raise ValueError('the run config needs model.checkpoint (a folder) or model.config (a '
                     'config file for a random init)')
  fields = dict(load_config(model_config.config).model)
  if experts:
    fields['block_idx_with_mot_ref'] = experts
  d = model_config.dtypes
  fields.update(dtypes=dict(compute=d.compute, params=d.params, trainable=d.trainable),
                attention=model_config.attention, scan_layers=model_config.scan_layers,
                remat=model_config.remat)
  if family == 'wan':
    from vap_jax.models.wan import KEEP_FP32
    fields['dtypes']['keep_fp32'] = KEEP_FP32
  config = config_cls(**fields)
  return _made_on_mesh(lambda: model_cls(config, rngs=nnx.Rngs(seed)), mesh, rules)


def trained_model(workdir, *, step: int | None = None, base: str | None = None,
                  mesh: Mesh | None = None, rules: Rules | None = None) -> MoTTransformer:
  """The model a vap-train run in ``workdir`` has trained by checkpoint ``step`` (default: the
  latest): the frozen base rebuilt as the run built it (``base`` overrides the run's
  ``model.checkpoint`` folder, e.g. when the run was started elsewhere), the trained expert from
  the checkpoint, each array straight into its sharding on ``mesh`` (default: FSDP over every
  device)."""
  import ml_collections

  from vap_jax.parallel import make_mesh
  from vap_jax.train.checkpoint import restore_params, saved_run
  from vap_jax.train.step import split
  step, config = saved_run(workdir, step)
  config = ml_collections.ConfigDict(config)
  if base is not None:
    config.model.update(checkpoint=str(base), config='')
  for field in ('checkpoint', 'config'):
    value = str(config.model.get(field) or '')
    if value and not Path(value.partition(':')[0]).exists():
      raise ValueError(f'the run in {workdir} started from model.{field}={value}, which is not '
                       'here (relative to the folder the run started in?): name the base '
                       'checkpoint explicitly')
  if mesh is None:
    mesh = make_mesh({'fsdp': -1})
  rules = tuple(tuple(r) for r in config.rules) if rules is None else rules
  model = build_model(config.family, config.model, mesh=mesh, rules=rules, seed=config.seed)
  graphdef, trainable, frozen = split(model)
  del model
  params = restore_params(workdir, step, trainable, param_shardings(trainable, mesh, rules))
  log.info('restored the expert of step %d from %s', step, workdir)
  return nnx.merge(graphdef, params, frozen)


def _made_on_mesh(factory, mesh, rules):
  """A random model made directly where its shards live (no host copy of the whole model)."""
  if mesh is None:
    return factory()
  graphdef, state = nnx.split(abstract_model(factory))
  shardings = param_shardings(state, mesh, rules)
  make = jax.jit(lambda: nnx.state(factory()), out_shardings=shardings)
  return nnx.merge(graphdef, make())


def with_expert(base: MoTTransformer, experts: tuple[int, ...], *, mesh: Mesh | None,
                rules: Rules) -> MoTTransformer:
  """``base`` (no expert) with an expert on ``experts``: every expert tensor an exact copy of
  its base counterpart (expert slot j <- base layer experts[j]), in the expert's dtype."""
  config = dataclasses.replace(base.config, block_idx_with_mot_ref=tuple(experts))
  graphdef, state = nnx.split(abstract_model(lambda: type(base)(config, rngs=nnx.Rngs(0))))
  old = km.flat_variables(nnx.state(base))
  where = (param_shardings(state, mesh, rules) if mesh is not None else None)
  where = dict(nnx.to_flat_state(where)) if where is not None else {}
  layers = jnp.asarray(experts)
  values = {}
  for path, var in km.flat_variables(state).items():
    if path[0] != 'expert':
      value = old[path][...]
    elif path[1] == 'blocks':
      value = jnp.take(old[path[1:]][...], layers, axis=0)
    else:
      value = old[path[1:]][...]
    value = value.astype(var.dtype)
    values[path] = jax.device_put(value, where[path]) if path in where else value
  return fill(graphdef, state, values)
