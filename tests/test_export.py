"""Export to the diffusers (PyTorch) layout: the key maps and configs run backwards to the official
names and fields.
"""
import json

import numpy as np
import pytest
from flax import nnx

from conftest import DATA
from tiny_checkpoint import COGVIDEOX_TRANSFORMER, WAN_TRANSFORMER
from vap_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer
from vap_jax.models.stack import checkpoint_blocks
from vap_jax.models.wan import WanConfig, WanTransformer
from vap_jax.weights import cogvideox, keymap as km, wan
from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint

FAMILIES = ('cogvideox', 'wan')
GOLDEN = {'cogvideox': DATA / 'cogvideox_mot' / 'transformer',
          'wan': DATA / 'wan_mot' / 'transformer'}
CONFIG = {'cogvideox': CogVideoXConfig, 'wan': WanConfig}
MODEL = {'cogvideox': CogVideoXTransformer, 'wan': WanTransformer}
KEYMAP = {'cogvideox': cogvideox.COGVIDEOX, 'wan': wan.WAN}
KERNEL = {'cogvideox': (2, 2), 'wan': (1, 2, 2)}


def _golden_config(family) -> dict:
  return json.loads((GOLDEN[family] / 'config.json').read_text())


# ------------------------------------------------------------------- key maps and configs backwards


@pytest.mark.parametrize('family', FAMILIES)
def test_key_maps_run_backwards_to_the_official_names(family):
  config = CONFIG[family].from_source(_golden_config(family))
  _, state = nnx.split(nnx.eval_shape(lambda: MODEL[family](config, rngs=nnx.Rngs(0))))
  block_of = checkpoint_blocks(config.block_idx_with_mot_ref)
  exported = {}
  for (path, layer), (shape, _) in km.slots(state).items():
    key, transform = KEYMAP[family].key_of(path, None if layer is None else block_of(path, layer))
    exported[key] = tuple(transform.inverse_shape(shape, KERNEL[family]))
  golden = SafetensorsCheckpoint(GOLDEN[family])
  assert exported == {k: golden.shape(k) for k in golden.keys()}
  # Expert slot 1 sits on block 1 (CogVideoX) / block 2 (Wan): its key names that block.
  experts = config.block_idx_with_mot_ref
  key, _ = KEYMAP[family].key_of(('expert', 'blocks', 'attn1', 'to_out', 'kernel'), experts[1])
  prefix = 'transformer_blocks' if family == 'cogvideox' else 'blocks'
  assert key == f'{prefix}.{experts[1]}.attn1_mot_ref.to_out.0.weight'


def test_original_wan_names_run_backwards_too():
  assert wan.WAN_ORIGINAL.key_of(('blocks', 'attn2', 'add_k_proj', 'kernel'), 3)[0] == \
      'blocks.3.cross_attn.k_img.weight'
  assert wan.WAN_ORIGINAL.key_of(('scale_shift_table',), None)[0] == 'head.modulation'


def test_rules_that_cannot_run_backwards_are_named():
  optional = km.KeyMap('x', [km.Rule(r'a\.(to_q|to_out)(?:\.0)?\.weight', r'a.\1.kernel')])
  assert optional(r'a.to_out.0.weight') == (('a', 'to_out', 'kernel'), None, km.IDENTITY)
  with pytest.raises(ValueError, match=r'cannot run backwards: .*not a literal'):
    optional.key_of(('a', 'to_q', 'kernel'), None)
  dropped = km.KeyMap('y', [km.Rule(r'(a|b)\.(w)', r'c.\2')])
  with pytest.raises(ValueError, match=r'groups \[1\] do not appear in the target'):
    dropped.key_of(('c', 'w'), None)
  with pytest.raises(CheckpointError, match='no rule names variable c.v'):
    km.KeyMap('z', [km.Rule(r'a\.(w)', r'c.\1')]).key_of(('c', 'v'), None)


def test_transforms_undo_themselves():
  rng = np.random.default_rng(0)
  for kernel in [(2, 2), (1, 2, 2)]:
    conv = rng.standard_normal((5, 3, *kernel)).astype(np.float32)
    dense = km.CONV_TO_DENSE.array(conv)
    np.testing.assert_array_equal(km.CONV_TO_DENSE.inverse(dense, kernel), conv)
    assert km.CONV_TO_DENSE.inverse_shape(dense.shape, kernel) == conv.shape
  with pytest.raises(ValueError, match='needs the conv kernel size'):
    km.CONV_TO_DENSE.inverse(dense, None)
  linear = rng.standard_normal((4, 7)).astype(np.float32)
  np.testing.assert_array_equal(km.TRANSPOSE.inverse(km.TRANSPOSE.array(linear), None), linear)
  assert km.TRANSPOSE.inverse_shape((7, 4), None) == (4, 7)
  assert km.IDENTITY.inverse(linear, None) is linear


@pytest.mark.parametrize('family', FAMILIES)
def test_configs_round_trip(family):
  golden = _golden_config(family)
  golden.pop('_diffusers_version')
  config = CONFIG[family].from_source(golden, dtype='bfloat16', attention='blockwise')
  assert config.to_source() == golden  # every field, the VAP ones included
  assert CONFIG[family].from_source(config.to_source()).to_source() == golden


@pytest.mark.parametrize('family', FAMILIES)
def test_base_config_has_every_diffusers_field(family):
  """A model without an expert writes the PyPI class and exactly the fields diffusers records."""
  import diffusers
  kwargs = COGVIDEOX_TRANSFORMER if family == 'cogvideox' else WAN_TRANSFORMER
  cls = diffusers.CogVideoXTransformer3DModel if family == 'cogvideox' else \
      diffusers.WanTransformer3DModel
  theirs = {k: list(v) if isinstance(v, tuple) else v for k, v in cls(**kwargs).config.items()
            if not k.startswith('_')}
  ours = CONFIG[family].from_source(theirs).to_source()
  assert ours.pop('_class_name') == cls.__name__
  assert ours == theirs
