"""The model a run starts from: a checkpoint (base or VAP, diffusers or converted) or a random
init of a config, with the expert added as an exact copy of the base blocks it sits on (the
official init, VAP_SPEC §5.2) when the checkpoint has none; for task 'vae', the CogVideoX-family
VAE (a checkpoint's ``vae/`` or a random init of a vae ``config.json``). And what a finished run
trained: `trained_model`, `write_trained`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from vap_jax.config import load_config
from vap_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer
from vap_jax.models.mot import MoTTransformer
from vap_jax.models.vae_cogvideox import AutoencoderKLCogVideoX
from vap_jax.models.wan import WanConfig, WanTransformer
from vap_jax.parallel import param_shardings
from vap_jax.parallel.sharding import Rules
from vap_jax.weights import component, keymap as km
from vap_jax.weights.loading import abstract_model, fill
from vap_jax.weights.vae import COGVIDEOX_SPEC as VAE_SPEC, load_cogvideox_vae

log = logging.getLogger(__name__)

FAMILIES = {'cogvideox': (CogVideoXConfig, CogVideoXTransformer),
            'wan': (WanConfig, WanTransformer)}


def runtime(model_config) -> dict:
  """The runtime fields of a run's ``model`` block, for the model config."""
  d = model_config.dtypes
  return dict(dtype=d.compute, param_dtype=d.params, trainable_dtype=d.trainable,
              attention=model_config.attention, scan_layers=model_config.scan_layers,
              remat=model_config.remat,
              context_parallel=model_config.get('context_parallel', 'gspmd'))


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
      init = model_config.get('expert_init', 'copy')
      log.info('adding the expert on blocks %s as copies of the base blocks (%s)',
               list(experts), init)
      return with_expert(model, experts, mesh=mesh, rules=rules, init=init)
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
                remat=model_config.remat,
                context_parallel=model_config.get('context_parallel', 'gspmd'))
  if family == 'wan':
    from vap_jax.models.wan import KEEP_FP32
    fields['dtypes']['keep_fp32'] = KEEP_FP32
  config = config_cls(**fields)
  return _made_on_mesh(lambda: model_cls(config, rngs=nnx.Rngs(seed)), mesh, rules)


def add_adapters(model: MoTTransformer, config) -> list[str]:
  """A 'lora' or 'dpo' run's adapters on ``model``: new ones on the layers ``config.lora.target``
  names (rank, alpha; seeded by the run), or those of the adapter file ``config.lora.init``."""
  from vap_jax.weights import lora as lora_files
  settings = config.lora
  if settings.get('init'):
    return lora_files.load(model, settings.init)
  return lora_files.add(model, settings.target, rank=settings.rank, alpha=settings.alpha,
                        seed=config.seed)


def unreachable_adapters(model: MoTTransformer) -> list[tuple[tuple, int]]:
  """(path, slot) of the adapters no loss reaches: those on the layers `MoTTransformer.
  unreachable` lists (PyTorch gives them no gradient, so AdamW neither moves nor decays them)."""
  from vap_jax.nn.lora import adapted
  layers = {path for path, _ in adapted(model)}
  return [(path[:-1] + ('lora', n), slot) for path, slot in model.unreachable()
          if path[-1] == 'kernel' and path[:-1] in layers for n in ('a', 'b')]


def vae_source_config(model_config) -> dict:
  """The diffusers ``config.json`` dict of a VAE run's model: ``model.checkpoint``'s (a pipeline
  or ``vae/`` folder, diffusers or converted) or ``model.config`` (a config.json path, or a
  dict of its fields)."""
  if model_config.get('checkpoint'):
    return component.source_config(VAE_SPEC, model_config.get('checkpoint'))
  config = model_config.get('config')
  if not config:
    raise ValueError('the run config needs model.checkpoint (a folder with a vae/) or '
                     'model.config (a vae config.json, or its fields, for a random init)')
  if isinstance(config, (str, Path)):
    try:
      config = json.loads(Path(config).read_text())
    except (OSError, ValueError) as e:
      raise ValueError(f'model.config {config}: not a readable vae config.json ({e})') from None
  elif hasattr(config, 'to_dict'):
    config = config.to_dict()
  return {'_class_name': 'AutoencoderKLCogVideoX', **dict(config)}


def build_vae(model_config, *, mesh: Mesh | None, rules: Rules, seed: int = 0,
              abstract: bool = False, init_logvar: float | None = None) -> AutoencoderKLCogVideoX:
  """The CogVideoX VAE of ``model_config.checkpoint`` (float32 master weights whatever the
  folder stores), or a random init (``seed``) of ``model_config.config``; ``abstract``: shapes
  only (nothing loaded or computed). ``init_logvar`` (random init only): the posterior's
  log-variance starts there (the encoder's output bias) instead of at 0, where std-1 samples
  drown the encoder's means and a from-scratch VAE is slow to learn anything but luminance."""
  runtime = dict(dtype=model_config.get('dtype', 'float32'), param_dtype='float32')
  checkpoint = model_config.get('checkpoint')
  raw = vae_source_config(model_config)
  if checkpoint:
    config = component.model_config(VAE_SPEC, raw, VAE_SPEC.folder(checkpoint), **runtime)
  else:
    try:
      config = VAE_SPEC.make_config(raw, **runtime)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f'model.config: {e}') from None
  factory = VAE_SPEC.factory(config, seed)
  if abstract:
    return abstract_model(factory)
  if checkpoint:
    return load_cogvideox_vae(checkpoint, mesh=mesh, rules=rules, **runtime)
  vae = _made_on_mesh(factory, mesh, rules)
  if init_logvar is not None:
    bias = vae.encoder.conv_out.bias  # [means, log-variances]
    bias[...] = bias[...].at[config.latent_channels:].set(init_logvar)
  return vae


def trained_model(workdir, *, step: int | None = None, base: str | None = None,
                  mesh: Mesh | None = None, rules: Rules | None = None) -> nnx.Module:
  """The model a vap-train run in ``workdir`` has trained by checkpoint ``step`` (default: the
  latest): the frozen base rebuilt as the run built it (``base`` overrides the run's
  ``model.checkpoint`` folder, e.g. when the run was started elsewhere), the trained expert from
  the checkpoint, each array straight into its sharding on ``mesh`` (default: FSDP over every
  device). A VAE run's VAE is all trained: only its shape is rebuilt, every array restored."""
  import ml_collections

  from vap_jax.parallel import make_mesh
  from vap_jax.train.checkpoint import restore_params, saved_run
  from vap_jax.train.step import split
  step, config = saved_run(workdir, step)
  config = ml_collections.ConfigDict(config)
  if base is not None:
    config.model.checkpoint = str(base)
  for field in ('checkpoint', 'config'):
    value = config.model.get(field) or ''
    if field == 'config' and config.model.get('checkpoint'):
      continue  # a checkpoint is what gets built
    if isinstance(value, str) and value and not Path(value.partition(':')[0]).exists():
      raise ValueError(f'the run in {workdir} started from model.{field}={value}, which is not '
                       'here (relative to the folder the run started in?): name the base '
                       'checkpoint explicitly')
  if mesh is None:
    mesh = make_mesh({'fsdp': -1})
  rules = tuple(tuple(r) for r in config.rules) if rules is None else rules
  task = config.get('task', 'vap')
  if task == 'vae':
    model = build_vae(config.model, mesh=mesh, rules=rules, abstract=True)
  else:
    model = build_model(config.family, config.model, mesh=mesh, rules=rules, seed=config.seed)
    if task in ('lora', 'dpo'):
      add_adapters(model, config)
  graphdef, trainable, frozen = split(model, task)
  del model
  params = restore_params(workdir, step, trainable, param_shardings(trainable, mesh, rules))
  log.info('restored the trained parameters of step %d from %s', step, workdir)
  return nnx.merge(graphdef, params, frozen)


def write_trained(workdir, dst, *, step: int | None = None, base: str | None = None,
                  dtype: str = 'float32', overwrite: bool = False) -> dict:
  """The model a run in ``workdir`` trained by checkpoint ``step`` (default: the latest) written
  as a converted component folder ``dst`` (config.json + Orbax state/, what vap-convert writes;
  parameters in ``dtype``): a VAE run's ``vae``, a transformer run's ``transformer`` (the base
  with the trained expert, or the trained base). Every loader reads it (``load_cogvideox_vae(dst)``,
  ``vap-precompute --vae dst``, a run's ``model.checkpoint``). Returns a summary."""
  from vap_jax.train.checkpoint import saved_run, task_of
  from vap_jax.weights.checkpoint import model_specs
  from vap_jax.weights.export import diffusers_config
  step, config = saved_run(workdir, step)
  model = trained_model(workdir, step=step, base=base)
  if task_of(config) == 'vae':
    spec = VAE_SPEC
    model_config = dict(config['model'], **({} if base is None else {'checkpoint': str(base)}))
    raw = vae_source_config(model_config)
  else:
    spec, raw = model_specs(config['family'])['transformer'], diffusers_config(model.config)
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dtype), state))
  source = str(Path(workdir).absolute() / 'checkpoints' / str(step))
  tensors = component.save(spec, model, raw, dst, param_dtype=dtype, source=source,
                           overwrite=overwrite)
  return dict(family=config['family'], task=task_of(config), component=spec.subfolder,
              step=step, tensors=tensors, dtype=dtype)


def _made_on_mesh(factory, mesh, rules):
  """A random model made directly where its shards live (no host copy of the whole model)."""
  if mesh is None:
    return factory()
  graphdef, state = nnx.split(abstract_model(factory))
  shardings = param_shardings(state, mesh, rules)
  make = jax.jit(lambda: nnx.state(factory()), out_shardings=shardings)
  return nnx.merge(graphdef, make())


EXPERT_INITS = ('copy', 'copy_zero_values')


def with_expert(base: MoTTransformer, experts: tuple[int, ...], *, mesh: Mesh | None,
                rules: Rules, init: str = 'copy') -> MoTTransformer:
  """``base`` (no expert) with an expert on ``experts``: every expert tensor an exact copy of
  its base counterpart (expert slot j <- base layer experts[j]), in the expert's dtype -- the
  official init. ``init='copy_zero_values'`` zeroes the expert's joint-attention value
  projections too: the references then add no content to what the target reads at step 0, only
  take some of its attention weight (with a copy, the target reads the reference's subject as
  its own: its loss starts several times the base's, and the first thing a small expert learns
  is to shut the reference out)."""
  if init not in EXPERT_INITS:
    raise ValueError(f'model.expert_init {init!r}: expected one of {EXPERT_INITS}')
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
    if init == 'copy_zero_values' and path[1:4] == ('blocks', 'attn1', 'to_v'):
      value = jnp.zeros_like(value)
    value = value.astype(var.dtype)
    values[path] = jax.device_put(value, where[path]) if path in where else value
  return fill(graphdef, state, values)
