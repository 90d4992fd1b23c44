"""Classifier-free guidance, including CogVideoX's dynamic ("cosine") guidance scale.

The official CogVideoX pipeline feeds the *raw* integer timestep (999, 979, ...) into a formula
written for a step count, so ``((N - t) / N) ** 5`` is a large negative number and the scale
jumps around between 1 and 1 + w rather than ramping smoothly (VAP_SPEC §3.1 step 8). We
reproduce that exactly by default, on the host in float64 with python ``math``;
``use_step_index=True`` gives the evidently intended ramp (a documented deviation).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def apply_guidance(uncond, cond, scale):
  """``uncond + scale * (cond - uncond)``; ``scale`` may be a python float or a traced scalar."""
  return uncond + scale * (cond - uncond)


def cogvideox_dynamic_guidance(guidance_scale: float, timesteps: Sequence[int], *,
                               use_step_index: bool = False) -> np.ndarray:
  """Per-step guidance scales ``1 + w * (1 - cos(pi * ((N - t) / N) ** 5)) / 2`` as float64.

  ``N = len(timesteps)``. ``t`` is the raw timestep as the official code uses it, or the step index
  0..N-1 with ``use_step_index=True``.
  """
  n = len(timesteps)
  out = []
  for i, t in enumerate(timesteps):
    t = i if use_step_index else int(t)
    out.append(1 + guidance_scale * ((1 - math.cos(math.pi * ((n - t) / n) ** 5.0)) / 2))
  return np.asarray(out, np.float64)
