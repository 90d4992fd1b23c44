"""The two VAP pipelines: (reference videos, image, prompts) -> video.

``Pipeline.from_pretrained(path)`` picks the backbone from the checkpoint folder ('toy': the
VAP-Toy model that ships with the package).
"""
from pathlib import Path

from vap_jax.pipelines.cogvideox_vap import CogVideoXVAPPipeline
from vap_jax.pipelines.common import DEFAULT_NEGATIVE_PROMPT, VideoOutput
from vap_jax.pipelines.wan_vap import WanVAPPipeline
from vap_jax.weights.checkpoint import check_components

PIPELINES = {'cogvideox': CogVideoXVAPPipeline, 'wan': WanVAPPipeline}


class Pipeline:
  """Entry point for either backbone: ``Pipeline.from_pretrained(path)(image, refs, ...)``."""

  @staticmethod
  def from_pretrained(path: str | Path, **kwargs) -> CogVideoXVAPPipeline | WanVAPPipeline:
    """``path``: a diffusers or converted folder, or 'toy' (the shipped VAP-Toy model)."""
    from vap_jax import toy
    path = toy.resolve(str(path))
    return PIPELINES[check_components(path)].from_pretrained(path, **kwargs)


__all__ = ['CogVideoXVAPPipeline', 'DEFAULT_NEGATIVE_PROMPT', 'Pipeline', 'VideoOutput',
           'WanVAPPipeline']
