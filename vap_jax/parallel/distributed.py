"""Multi-process (multi-host) start-up: `jax.distributed` from the environment or from flags.

* TPU pod slices and SLURM jobs: JAX finds the coordinator itself (every TPU VM worker runs the
  same command; SLURM starts one task per host).
* Anything else: an explicit coordinator ``HOST:PORT``, the number of processes and this
  process's id (``VAP_COORDINATOR``, ``VAP_NUM_PROCESSES``, ``VAP_PROCESS_ID``, or flags).

On the CPU backend the collectives go through gloo (several processes on one machine: the tests,
a laptop).
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def detected() -> str | None:
  """'tpu' or 'slurm' when this process is one of several JAX can find by itself, else None."""
  if os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('CLOUD_TPU_TASK_ID'):
    return 'tpu'
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1 and os.environ.get('SLURM_JOB_ID'):
    return 'slurm'
  return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Start `jax.distributed` if this run has several processes; True if it did.

  Arguments (or the VAP_* environment variables) name the coordinator explicitly; without them
  a TPU pod slice or a SLURM job is detected. A single process starts nothing.
  """
  coordinator = coordinator or os.environ.get('VAP_COORDINATOR')
  if num_processes is None and os.environ.get('VAP_NUM_PROCESSES'):
    num_processes = int(os.environ['VAP_NUM_PROCESSES'])
  if process_id is None and os.environ.get('VAP_PROCESS_ID'):
    process_id = int(os.environ['VAP_PROCESS_ID'])
  if coordinator is None and detected() is None:
    return False
  if coordinator is not None and (num_processes is None or process_id is None):
    raise ValueError('an explicit coordinator needs the number of processes and this process\'s '
                     'id (--num-processes / --process-id or VAP_NUM_PROCESSES / VAP_PROCESS_ID)')
  if os.environ.get('JAX_PLATFORMS', '').startswith('cpu'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator, num_processes, process_id)
  log.info('process %d of %d, %d local of %d devices', jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
