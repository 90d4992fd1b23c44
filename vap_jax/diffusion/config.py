"""``from_config``: a sampler from a diffusers ``scheduler_config.json``, by its ``_class_name``."""
from __future__ import annotations

from typing import Any, Mapping

from vap_jax.diffusion.dpm import CogVideoXDPMScheduler
from vap_jax.diffusion.schedulers import CogVideoXDDIMScheduler, FlowMatchEulerDiscreteScheduler
from vap_jax.diffusion.unipc import UniPCMultistepScheduler

SCHEDULERS = {cls.__name__: cls for cls in (CogVideoXDDIMScheduler, CogVideoXDPMScheduler,
                                            FlowMatchEulerDiscreteScheduler,
                                            UniPCMultistepScheduler)}


def from_config(cfg: Mapping[str, Any], class_name: str | None = None):
  """Build a scheduler from a diffusers config dict (``_class_name`` picks the class)."""
  name = class_name or cfg.get('_class_name')
  if name is None:
    raise ValueError('scheduler config has no _class_name; pass class_name=')
  if name not in SCHEDULERS:
    raise ValueError(f'scheduler class {name!r} is not supported (supported: {sorted(SCHEDULERS)})')
  return SCHEDULERS[name].from_config(dict(cfg))
