"""The two VAP pipelines: (reference videos, image, prompts) -> video."""
from vap_jax.pipelines.cogvideox_vap import CogVideoXVAPPipeline
from vap_jax.pipelines.common import DEFAULT_NEGATIVE_PROMPT, VideoOutput
from vap_jax.pipelines.wan_vap import WanVAPPipeline

__all__ = ['CogVideoXVAPPipeline', 'DEFAULT_NEGATIVE_PROMPT', 'VideoOutput', 'WanVAPPipeline']
