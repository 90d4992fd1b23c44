"""Samplers and guidance for the VAP denoising loop, shaped for one compiled step.

Every scheduler is a frozen config dataclass. ``set_timesteps(n)`` does all schedule arithmetic on
the host with numpy (float64 where diffusers keeps float64) and returns a *plan*: a pytree of small
arrays (timesteps plus per-step coefficients). ``plan.step(state, model_output, step_index, sample)``
is pure and works with a traced ``step_index``, so a whole denoising loop can reuse one ``jax.jit``
step; multistep history lives in the explicit ``state`` pytree from ``plan.init_state(sample)``.
Stochastic samplers (``CogVideoXDPMScheduler``; their plan has ``needs_noise = True``) take the
step's standard-normal noise as an explicit last argument: ``plan.step(state, out, i, x, noise)``.
"""
from vap_jax.diffusion.config import from_config
from vap_jax.diffusion.dpm import CogVideoXDPMScheduler, DPMPlan
from vap_jax.diffusion.schedulers import (CogVideoXDDIMScheduler, CogVideoXSchedule, DDIMPlan,
                                          FlowMatchEulerDiscreteScheduler, FlowMatchPlan)
from vap_jax.diffusion.guidance import apply_guidance, cogvideox_dynamic_guidance
from vap_jax.diffusion.unipc import UniPCMultistepScheduler, UniPCPlan

__all__ = ['CogVideoXDDIMScheduler', 'CogVideoXDPMScheduler', 'CogVideoXSchedule', 'DDIMPlan', 'DPMPlan',
           'FlowMatchEulerDiscreteScheduler', 'FlowMatchPlan', 'UniPCMultistepScheduler', 'UniPCPlan', 'from_config',
           'apply_guidance', 'cogvideox_dynamic_guidance']
