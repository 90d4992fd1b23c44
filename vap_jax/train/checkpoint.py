"""Checkpoints of a run: one Orbax `CheckpointManager` under ``WORKDIR/checkpoints``, async.

Each step folder holds ``state`` (the whole `TrainState`: step, trainable parameters, optimizer
state, random key, flattened to path -> array), ``data_iterator`` (every process's Grain
iterator: position, failure counts) and ``config`` (the run config that made it). Orbax writes a
step into a temporary folder and renames it once complete, so the latest finished step is always
whole: a crash mid-save leaves the one before it to restore.

Restoring reads every array straight into the *current* run's shardings (each process reads only
its shards), so a run saved on one mesh resumes on another (fsdp=8 -> data=2,fsdp=4; 8 devices
-> 4) without gathering the state anywhere. A saved state that does not fit the current run
(another family or task, other expert layout, other optimizer) is refused by name before anything
loads.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from vap_jax.train.objectives import WHOLE_TABLE

log = logging.getLogger(__name__)

# Run settings a resumed run may change (how it runs, not what it trains).
CHANGEABLE = ('mesh', 'rules', 'log', 'steps', 'checkpoint', 'data.workers', 'model.remat',
              'model.attention', 'model.scan_layers', 'model.context_parallel', 'accumulation',
              'data.batch_size')


# What a run trains (its config's ``task``; runs from before tasks have none: 'vap').
TASKS = {'vap': 'the VAP expert', 'base': 'a whole base transformer', 'vae': 'a VAE',
         'lora': 'LoRA adapters (SFT)', 'dpo': 'LoRA adapters by DPO'}


# Settings added after runs were made: the value a run from before one trained with.
ADDED = {'noise_window': list(WHOLE_TABLE)}


def task_of(config) -> str:
  task = config.get('task') or 'vap'
  if task not in TASKS:
    raise ValueError(f'task {task!r}: expected one of {sorted(TASKS)} ({TASKS})')
  return task


class CheckpointError(ValueError):
  """A checkpoint that cannot be used by this run; the message names what and where."""


def _key(path) -> str:
  return '/'.join(str(getattr(p, 'key', getattr(p, 'idx', getattr(p, 'name', p)))) for p in path)


def flatten(tree) -> tuple[dict, object]:
  """A pytree -> ({'a/b/0': leaf}, treedef): the plain dict Orbax stores."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return {_key(path): leaf for path, leaf in leaves}, treedef


def _plain(value):
  if hasattr(value, 'to_dict'):
    return _plain(value.to_dict())
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def _leaf_shardings(shardings, tree) -> dict:
  """``shardings`` is a prefix of ``tree`` (a sharding where the tree has a Variable): one
  sharding per leaf, flattened like ``tree``."""
  return flatten(jax.tree.map(lambda where, sub: jax.tree.map(lambda _: where, sub), shardings,
                              tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)))[0]


def _differences(saved: dict, current: dict, prefix='') -> list[str]:
  out = []
  for key in sorted(set(saved) | set(current)):
    name = f'{prefix}{key}'
    if any(name == c or name.startswith(c + '.') for c in CHANGEABLE):
      continue
    a, b = saved.get(key, '<missing>'), current.get(key, '<missing>')
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, name + '.')
    elif a != b:
      out.append(f'{name}: saved {a!r}, now {b!r}')
  return out


class Checkpointer:
  """Save and restore a run's state, data position and config (see the module docstring)."""

  def __init__(self, workdir: str | Path, config, *, every: int, keep: int | None,
               async_save: bool = True):
    self.directory = Path(workdir).absolute() / 'checkpoints'
    self.config = _plain(config)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(every), 1), max_to_keep=keep,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """JAX's preemption sync point (TPU maintenance, a coordinated SIGTERM): all processes
    agree to save at the same step."""
    return self.manager.reached_preemption(step)

  def save(self, step: int, state, loader, *, force: bool = False) -> bool:
    """Start saving ``state`` and the data position (async); True if a save started."""
    flat, _ = flatten(state)
    args = ocp.args.Composite(state=ocp.args.StandardSave(flat),
                              config=ocp.args.JsonSave(self.config), **loader.save_args())
    started = self.manager.save(step, args=args, force=force)
    if started:
      log.info('checkpoint of step %d started (%s)', step, self.directory)
    return started

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, state, shardings, loader, step: int | None = None):
    """The saved state of ``step`` (default: the latest), restored into ``shardings`` (a
    `TrainState` of shardings like ``state``); ``loader`` is moved to its saved position."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'{self.directory} holds no finished checkpoint')
    where = self.directory / str(step)
    self._check_config(where)
    flat, treedef = flatten(state)
    flat_shardings = _leaf_shardings(shardings, state)
    saved = _stored_state(where)
    if set(saved) != set(flat):
      missing, extra = sorted(set(flat) - set(saved)), sorted(set(saved) - set(flat))
      raise CheckpointError(
          f'checkpoint {where} does not hold this run\'s state (another model, expert layout or '
          f'optimizer?): missing {missing[:8]}{" ..." if len(missing) > 8 else ""}, '
          f'unexpected {extra[:8]}{" ..." if len(extra) > 8 else ""}')
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=flat_shardings[k])
              for k, v in flat.items()}
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), **loader.restore_args()))
    except (ValueError, FileNotFoundError, OSError) as e:
      raise CheckpointError(f'checkpoint {where} cannot be restored: {_first_line(e)}') from e
    values = restored['state']
    return jax.tree_util.tree_unflatten(treedef, [values[k] for k in flat])

  def _check_config(self, where: Path) -> None:
    try:  # the JSON item's file (read directly: restoring one item makes Orbax warn of the rest)
      saved = json.loads((where / 'config' / 'metadata').read_text())
    except (OSError, ValueError) as e:
      raise CheckpointError(f'checkpoint {where} is damaged or partial: its config cannot be '
                            f'read ({_first_line(e)})') from e
    saved = {**ADDED, **saved, 'task': task_of(saved)}
    current = {**ADDED, **self.config, 'task': task_of(self.config)}
    if saved['task'] != current['task']:
      a, b = saved['task'], current['task']
      raise CheckpointError(f'checkpoint {where} is of a run that trains {TASKS[a]} (task={a!r}), '
                            f'this run trains {TASKS[b]} (task={b!r}): start a new workdir')
    if saved.get('family') != self.config.get('family'):
      raise CheckpointError(f'checkpoint {where} is of a {saved.get("family")} run, this run '
                            f'trains {self.config.get("family")}')
    diff = _differences(saved, current)
    if diff:
      raise CheckpointError(f'checkpoint {where} was made with other settings: '
                            + '; '.join(diff[:6]) + ('; ...' if len(diff) > 6 else '')
                            + ' (start a new workdir, or set them back)')

  def close(self) -> None:
    self.manager.close()


def _stored_state(where: Path) -> dict:
  """Key -> array metadata of the state saved in step folder ``where``."""
  from orbax.checkpoint.experimental import v1 as ocp_v1
  try:
    return dict(ocp_v1.metadata(where, checkpointable_name='state').metadata)
  except Exception as e:  # noqa: BLE001 - any Orbax/tensorstore read failure
    raise CheckpointError(f'checkpoint {where} is damaged or partial: its state cannot be read '
                          f'({_first_line(e)})') from e


def saved_run(workdir: str | Path, step: int | None = None) -> tuple[int, dict]:
  """(step, run config) of a finished checkpoint of the run in ``workdir`` (default: the
  latest); a CheckpointError naming the folder when there is none."""
  directory = Path(workdir).absolute() / 'checkpoints'
  steps = sorted(int(p.name) for p in directory.glob('*')
                 if p.name.isdigit() and (p / 'state').is_dir()) if directory.is_dir() else []
  if not steps:
    raise CheckpointError(f'{workdir} holds no finished checkpoint (expected a vap-train '
                          f'workdir with {directory}/STEP/)')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f'{directory} has no checkpoint of step {step} (it has {steps})')
  where = directory / str(step)
  try:
    config = json.loads((where / 'config' / 'metadata').read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f'checkpoint {where} is damaged or partial: its config cannot be '
                          f'read ({_first_line(e)})') from e
  return step, config


def restore_params(workdir: str | Path, step: int, params, shardings):
  """The trained parameters alone of checkpoint ``step`` (no optimizer state), each array read
  straight into its sharding in ``shardings`` (like ``params``, an abstract `nnx.State`)."""
  from orbax.checkpoint.experimental import v1 as ocp_v1
  where = Path(workdir).absolute() / 'checkpoints' / str(step)
  flat, treedef = flatten(params)
  flat_shardings = _leaf_shardings(shardings, params)
  stored = _stored_state(where)
  wanted = {f'params/{k}': k for k in flat}
  missing = sorted(set(wanted) - set(stored))
  if missing:
    raise CheckpointError(f'checkpoint {where} does not hold this model\'s trained parameters: '
                          f'missing {missing[:8]}{" ..." if len(missing) > 8 else ""}')
  target = {k: (jax.ShapeDtypeStruct(flat[wanted[k]].shape, flat[wanted[k]].dtype,
                                     sharding=flat_shardings[wanted[k]])
                if k in wanted else ocp_v1.PLACEHOLDER) for k in stored}
  try:
    loaded = ocp_v1.load(where, target, checkpointable_name='state')
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f'checkpoint {where} cannot be restored: {_first_line(e)}') from e
  return jax.tree_util.tree_unflatten(treedef, [loaded[f'params/{k}'] for k in flat])


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__
