"""Training metrics: written one step late (the host never waits on the step in flight), as JSON
lines and TensorBoard event files, with throughput from an analytic FLOP count.

Only process 0 writes. TFLOP/s per device and MFU count the work actually done
(`vap_jax.models.flops.training_flops`: forward, backward for input gradients through every
layer, expert weight gradients, remat recomputation) against a stated peak per device.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import numpy as np

log = logging.getLogger(__name__)

# Dense bf16 peaks per device (TFLOP/s), by ``device_kind`` prefix; override with peak_tflops.
PEAK_TFLOPS = {'NVIDIA H100': 989.0, 'NVIDIA H200': 989.0, 'NVIDIA A100': 312.0,
               'TPU v5p': 459.0, 'TPU v5 lite': 197.0, 'TPU v6 lite': 918.0, 'TPU v6e': 918.0,
               'TPU v4': 275.0}


def peak_tflops(device=None) -> float | None:
  """The bf16 dense peak of ``device`` (default: the first), or None if unknown (e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for prefix, peak in PEAK_TFLOPS.items():
    if kind.startswith(prefix):
      return peak
  return None


class MetricWriter:
  """JSON lines (``metrics.jsonl``) and TensorBoard scalars under ``workdir``; process 0 only."""

  def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.file = self.tb = None
    if not self.enabled:
      return
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self.file = open(workdir / 'metrics.jsonl', 'a')
    if tensorboard:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(workdir / 'tensorboard'))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    self.file.write(json.dumps(dict(step=step, **scalars)) + '\n')
    self.file.flush()
    if self.tb is not None:
      for name, value in scalars.items():
        if isinstance(value, (int, float)) and np.isfinite(value):
          self.tb.add_scalar(name, value, step)
      self.tb.flush()

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
    if self.tb is not None:
      self.tb.close()


class StepMetrics:
  """Turns each step's device metrics into logged scalars one step late: `push` the metrics of
  the step just dispatched, get back the finished previous step's scalars (or None)."""

  def __init__(self, *, flops_per_step: int, samples_per_step: int,
               peak_tflops_per_device: float | None, devices: int):
    self.flops, self.samples = flops_per_step, samples_per_step
    self.peak, self.devices = peak_tflops_per_device, devices
    self._pending = None
    self._last = None

  def push(self, step: int, metrics, data_wait: float, host: dict | None = None):
    """``metrics``: device arrays of the step ``step`` just dispatched; ``data_wait``: seconds
    the host waited for its batch; ``host``: scalars known on the host (logged with the step).
    Returns (step, scalars) of the step before, which this
    waits for; its seconds run from the previous step's end (the first: from its dispatch, so
    they include the compilation)."""
    done, self._pending = self._pending, (step, metrics, data_wait, host or {})
    if done is None:
      self._last = time.perf_counter()
      return None
    step_done, values, wait, host_done = done
    values = jax.device_get(values)
    now = time.perf_counter()
    seconds, self._last = now - self._last, now
    scalars = {k: float(np.mean(v)) for k, v in values.items() if np.ndim(v) == 0 or k == 'loss'}
    scalars.update(host_done, step_seconds=seconds, data_wait_seconds=wait,
                   samples_per_second=self.samples / seconds)
    tflops = self.flops / seconds / 1e12 / self.devices
    scalars['tflops_per_device'] = tflops
    if self.peak:
      scalars['mfu'] = tflops / self.peak
    return step_done, scalars

  def flush(self):
    """The last step's scalars (at the end of the run)."""
    if self._pending is None:
      return None
    result = self.push(-1, {}, 0.0)
    self._pending = None
    return result
