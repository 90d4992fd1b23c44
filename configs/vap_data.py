"""VAP-Data loader settings: the official SFT recipe (VAP_SPEC §5.3-5.4, training.json).

Read by path:
  from vap_jax.config import load_config
  from vap_jax.data import make_loader
  loader = make_loader(load_config('configs/vap_data.py:wan').data)
  vap-precompute wan --config configs/vap_data.py:wan ...

Arg: 'cog' (default, 49x480x720) or 'wan' (49x480x832); ',3ref' adds the 3-reference ablation
(3 references, mask_ref_ratio 0.3, caption dropout 0.1, alignment score >= 10). Every setting and
its default is in `vap_jax.data.pipeline.default_data_config`; change them here or with --set.
"""
import ml_collections

from vap_jax.data import default_data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.data = default_data_config(arg)
  return config
