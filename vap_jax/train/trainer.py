"""A training run: config -> mesh, model, data, optimizer, the jitted step, and the loop with its
metrics (what ``vap-train`` runs).

The run config is a big_vision-style file (``configs/train_<family>.py``): ``family``, ``task``,
``model`` (checkpoint or config, expert placement, dtypes, attention, remat, scan), ``data`` (the
`vap-precompute` folder, global batch, dropouts, workers), ``optimizer``, ``schedule``,
``noise_window`` (the part of the timestep table the draw maps into; (0, 1), the official draw,
when absent), ``steps``, ``accumulation``, ``mesh``, ``rules``, ``log``, ``seed``.

``task`` says what trains: 'vap' (default) the VAP expert on a frozen transformer, from
precomputed latents; 'base' every parameter of a transformer without an expert (an image-to-video
base model, the stage before VAP: same latents, the references unread); 'vae'
(``configs/train_vae.py``) every parameter of a CogVideoX-family VAE, from the target clips of a
VAP-Data table (``data`` is a `vap_jax.data.make_loader` block, its ``batch_size`` global, its
seed the run's), objective `vae_objective.VAEObjective` (``vae.kl_weight``); 'lora' LoRA
adapters (``lora``: target regex, rank, alpha, or ``init`` an adapter file) on a frozen
transformer, SFT on the same latents; 'dpo' the same adapters by the official DPO
(``configs/dpo_cogvideox.py``: `vap_jax.train.dpo`, pairs from `vap_jax.data.dpo` with the
scores of ``dpo.table``, ``data.batch_size`` pairs a step). All run the same step, loop,
checkpoints and metrics.
"""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from vap_jax.data.dpo import make_dpo_loader
from vap_jax.data.latent_source import LatentSource, make_latent_loader
from vap_jax.data.pipeline import make_loader
from vap_jax.diffusion import CogVideoXDDIMScheduler
from vap_jax.models.flops import cogvideox_flops, cogvideox_vae_flops, training_flops, wan_flops
from vap_jax.parallel import make_mesh, sharding_context
from vap_jax.train import objectives
from vap_jax.train import optimizer as opt
from vap_jax.train.checkpoint import Checkpointer, task_of
from vap_jax.train.metrics import MetricWriter, StepMetrics, peak_tflops
from vap_jax.train.dpo import DPOObjective
from vap_jax.train.model import add_adapters, build_model, build_vae, unreachable_adapters
from vap_jax.train.step import (batch_sharding, init_state, jit_train_step, make_train_step, split,
                                state_shardings)
from vap_jax.train.vae_objective import VAEObjective

log = logging.getLogger(__name__)


def objective_for(family: str, data_folder, *, references: bool = True,
                  mask_references: bool = False,
                  noise_window=objectives.WHOLE_TABLE) -> objectives.Objective:
  """The family's objective with the VAE statistics `vap-precompute` recorded; without
  ``references``, the base model's (the references of the data are not read); timesteps drawn
  in ``noise_window`` of the table (`objectives.Objective`)."""
  low, high = (float(x) for x in noise_window)
  if not 0.0 <= low < high <= 1.0:
    raise ValueError(f'noise_window {tuple(noise_window)}: expected 0 <= low < high <= 1')
  info = LatentSource(data_folder, allow_incomplete=True).info
  if info['settings']['family'] != family:
    raise ValueError(f'data {data_folder} was precomputed for {info["settings"]["family"]}, '
                     f'the run trains {family}')
  schedule = CogVideoXDDIMScheduler() if family == 'cogvideox' else None
  return objectives.Objective(family, info['vae'], schedule, mask_references, references,
                              (low, high))


def optimizer_for(config, trainable, unreachable):
  o, s = config.optimizer, config.schedule
  lr = opt.schedule(o.learning_rate, warmup_steps=s.warmup_steps, kind=s.kind,
                    total_steps=config.steps, end_value=s.get('end_value', 0.0))
  return opt.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                   max_grad_norm=o.max_grad_norm,
                   decay=opt.decay_scales(trainable, unreachable)), lr


def _forward_flops(family, model_config, batch: dict) -> dict:
  if 'video' in batch:  # a VAE run
    b, f, h, w, _ = np.shape(batch['video'])
    return cogvideox_vae_flops(model_config, batch=b, frames=f, height=h, width=w)
  b, _, t, h, w = np.shape(batch['latents_mean'])
  refs, text = np.shape(batch['ref_latents_mean'])[1], np.shape(batch['text'])[1]
  if family == 'cogvideox':
    return cogvideox_flops(model_config, batch=b, frames=t, height=h, width=w, text_len=text,
                           num_refs=refs)
  return wan_flops(model_config, batch=b, frames=t, height=h, width=w, text_len=text,
                   image_len=np.shape(batch['clip'])[1], num_refs=refs)


# The exit status of a run stopped by a preemption notice after its checkpoint: "try again"
# (EX_TEMPFAIL); the launch scripts restart the same command, which resumes.
EXIT_PREEMPTED = 75


class Trainer:
  """Everything one run needs, built from its config; `run` trains ``config.steps`` steps,
  resuming from the workdir's latest checkpoint if there is one."""

  def __init__(self, config, workdir: str | Path, *, devices=None):
    self.config, self.workdir = config, Path(workdir).absolute()
    self.family, self.task = config.family, task_of(config)
    self.mesh = make_mesh(dict(config.mesh), devices=devices)
    self.rules = tuple(tuple(r) for r in config.rules)
    data = config.data
    count = jax.process_count()
    if data.batch_size % (count * config.accumulation):
      raise ValueError(f'data.batch_size {data.batch_size} must divide over {count} processes '
                       f'and {config.accumulation} accumulation steps')
    if self.task == 'vae':
      if self.family != 'cogvideox':
        raise ValueError(f"task 'vae' trains the CogVideoX-family VAE: family must be "
                         f"'cogvideox', not {self.family!r}")
      model = build_vae(config.model, mesh=self.mesh, rules=self.rules, seed=config.seed,
                        init_logvar=config.vae.get('init_logvar'))
      self.objective = VAEObjective.of(model, config.vae.kl_weight)
      self.unreachable = ()
    else:
      base = self.task == 'base'
      if base and config.model.get('block_idx_with_mot_ref'):
        raise ValueError("task 'base' trains a transformer without an expert: "
                         'model.block_idx_with_mot_ref must be empty')
      model = build_model(self.family, config.model, mesh=self.mesh, rules=self.rules,
                          seed=config.seed)
      if base and model.expert is not None:
        raise ValueError(f"task 'base' trains a transformer without an expert, but "
                         f'{config.model.checkpoint} has one')
      # The references are read by a model with an expert (LoRA on a base model: none).
      references = not base and model.expert is not None
      window = config.get('noise_window', objectives.WHOLE_TABLE)
      self.objective = objective_for(self.family, data.latents, references=references,
                                     mask_references=data.reference_dropout > 0 and references,
                                     noise_window=window)
      self.unreachable = model.unreachable()
      if self.task in ('lora', 'dpo'):
        names = add_adapters(model, config)
        log.info('LoRA adapters on %d linear layers (%s, ...)', len(names), names[0])
        self.unreachable = unreachable_adapters(model)
      if self.task == 'dpo':
        self.objective = DPOObjective(self.objective, beta=config.dpo.beta)
    self.model_config = model.config
    self.graphdef, trainable, self.frozen = split(model, self.task)
    del model
    self.optimizer, self.lr = optimizer_for(config, trainable, self.unreachable)
    shardings = state_shardings(jax.eval_shape(lambda p: init_state(p, self.optimizer,
                                                                    config.seed), trainable),
                                self.optimizer, self.mesh, self.rules)
    self.state = jax.jit(lambda p: init_state(p, self.optimizer, config.seed),
                         out_shardings=shardings)(trainable)
    step = make_train_step(self.graphdef, self.objective, self.optimizer,
                           accumulation=config.accumulation, lr_schedule=self.lr)
    self._step = jit_train_step(step, self.state, self.frozen, self.optimizer, self.mesh,
                                self.rules)
    self.batch_sharding = batch_sharding(self.mesh, self.rules)
    if self.task == 'vae':  # the target clips alone (no references decoded), this process's part
      clips = ml_collections.ConfigDict(data.to_dict())
      clips.update(batch_size=data.batch_size // count, seed=config.seed, sample_ref_videos_num=0)
      self.loader = make_loader(clips, keys=('video', 'index'))
    elif self.task == 'dpo':
      d = config.dpo
      self.loader = make_dpo_loader(
          data.latents, d.table, batch_size=data.batch_size // count, seed=config.seed,
          workers=data.workers, max_failure_fraction=data.max_failure_fraction,
          min_samples_before_cap=data.min_samples_before_cap, stages=d.stages,
          caption_dropout=data.caption_dropout, reweight=d.reweight)
    else:
      self.loader = make_latent_loader(
          data.latents, batch_size=data.batch_size // count, seed=config.seed, keys='train',
          caption_dropout=data.caption_dropout, reference_dropout=data.reference_dropout,
          workers=data.workers, max_failure_fraction=data.max_failure_fraction,
          min_samples_before_cap=data.min_samples_before_cap)
    c = config.checkpoint
    self.checkpoints = Checkpointer(self.workdir, config, every=c.every, keep=c.keep,
                                    async_save=c.get('async_save', True))
    self.resumed_from = self.checkpoints.latest_step()
    if self.resumed_from is not None:
      self.state = self.checkpoints.restore(self.state, shardings, self.loader)
      log.info('resumed from step %d of %s', self.resumed_from, self.checkpoints.directory)
    self._preempted = False

  def step(self, state, frozen, batch, draws=None):
    """One training step (jitted; the state is donated) under the mesh's activation rules."""
    with sharding_context(self.mesh, self.rules):
      return self._step(state, frozen, batch, draws)

  def model(self) -> nnx.Module:
    """The current model: the trained expert merged back with the frozen base."""
    return nnx.merge(self.graphdef, self.state.params, self.frozen)

  def put(self, batch: dict) -> dict:
    """This process's batch as global arrays, sharded over the data axes."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in batch.items()}

  def _on_sigterm(self, signum, frame):
    log.warning('SIGTERM: saving at the next step boundary, then stopping')
    self._preempted = True

  def run(self, steps: int | None = None, *, progress: bool = True) -> dict:
    """Train until ``steps`` (default ``config.steps``) steps are done, checkpointing at the
    configured cadence, at the end, and at the next step boundary after SIGTERM or JAX's
    preemption notice (then ``summary['preempted']``); returns a summary."""
    total = int(steps if steps is not None else self.config.steps)
    start_step = int(jax.device_get(self.state.step))
    previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    writer = MetricWriter(self.workdir, tensorboard=self.config.log.tensorboard)
    meter = None
    bar = None
    if progress and jax.process_index() == 0:
      from tqdm import tqdm
      bar = tqdm(total=total, initial=start_step, desc='vap-train', unit='step')
    losses = []
    try:
      for step in range(start_step, total):
        waited = time.perf_counter()
        batch = next(self.loader)
        waited = time.perf_counter() - waited
        if meter is None:
          forward = _forward_flops(self.family, self.model_config, batch)
          per_step = training_flops(forward, getattr(self.model_config, 'remat', 'none'))
          if self.task in ('lora', 'dpo'):  # no expert weight gradients (adapters': ~0)
            per_step -= forward['expert']
          if self.task == 'dpo':  # + the reference model's forward
            per_step += forward['total']
          meter = StepMetrics(flops_per_step=per_step * jax.process_count(),
                              samples_per_step=self.config.data.batch_size,
                              peak_tflops_per_device=self.config.log.get('peak_tflops') or
                              peak_tflops(), devices=jax.device_count())
        self.state, metrics = self.step(self.state, self.frozen, self.put(batch))
        # The samples of the step (this process's part), to check the data order across resumes.
        order = dict(data_first_index=int(batch['index'][0]),
                     data_index_sum=int(np.sum(batch['index'])))
        done = meter.push(step + 1, metrics, waited, order)
        if done is not None:
          self._report(writer, bar, *done, losses)
        preempted = self._preempted or self.checkpoints.reached_preemption(step + 1)
        if preempted or step + 1 == total:
          self.checkpoints.save(step + 1, self.state, self.loader, force=True)
          if preempted:
            self._preempted = True
            break
        elif self.checkpoints.should_save(step + 1):
          self.checkpoints.save(step + 1, self.state, self.loader)
      done = meter.flush() if meter is not None else None
      if done is not None:
        self._report(writer, bar, *done, losses)
    finally:
      signal.signal(signal.SIGTERM, previous)
      self.checkpoints.wait()
      writer.close()
      if bar is not None:
        bar.close()
    return dict(steps=int(jax.device_get(self.state.step)), losses=losses,
                failures=self.loader.failures.state(), preempted=self._preempted)

  def _report(self, writer, bar, step: int, scalars: dict, losses: list) -> None:
    losses.append(scalars['loss'])
    if step % self.config.log.every == 0 or step == self.config.steps:
      writer.write(step, scalars)
    if bar is not None:
      bar.update(step - bar.n)
      bar.set_postfix(loss=f'{scalars["loss"]:.4f}', lr=f'{scalars.get("learning_rate", 0):.2e}',
                      refresh=False)
