"""Key maps, loaders and converters for the diffusers ``vae/`` folders of Wan2.1 and CogVideoX.

Conv kernels (out, in, kt, kh, kw) become (kt, kh, kw, in, out) (`CONV_KERNEL`); kernel-size-1
convs are stored as dense (in, out) kernels (`CONV_TO_DENSE`); Wan's RMS-norm gammas (C, 1, 1[, 1])
are flattened to (C,).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from vap_jax.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig
from vap_jax.models.vae_wan import AutoencoderKLWan, WanVAEConfig

from vap_jax.parallel import DEFAULT_RULES
from vap_jax.parallel.sharding import Rules
from vap_jax.weights import component
from vap_jax.weights.component import ModelSpec, read_json_config
from vap_jax.weights.keymap import CONV_TO_DENSE, KeyMap, Rule, Transform
from vap_jax.weights.loading import load_model
from vap_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint

# torch conv weight (out, in, *k) -> (*k, in, out).
CONV_KERNEL = Transform(
    'conv_kernel', lambda a: np.transpose(a, tuple(range(2, a.ndim)) + (1, 0)),
    lambda s: tuple(s[2:]) + (s[1], s[0]))
FLATTEN = Transform('flatten', lambda a: a.reshape(-1), lambda s: (int(np.prod(s)),))

WAN = KeyMap('wan_vae', [
    # causal 3x3x3 convs: conv_in/out, residual convs, temporal resample convs.
    Rule(r'(.*\.(?:conv_in|conv_out|conv1|conv2|time_conv))\.weight', r'\1.kernel', CONV_KERNEL),
    Rule(r'(.*\.(?:conv_in|conv_out|conv1|conv2|time_conv))\.bias', r'\1.bias'),
    # 1x1x1 / 1x1 convs as dense layers.
    Rule(r'(.*\.conv_shortcut|quant_conv|post_quant_conv|.*\.to_qkv|.*\.proj)\.weight',
         r'\1.kernel', CONV_TO_DENSE),
    Rule(r'(.*\.conv_shortcut|quant_conv|post_quant_conv|.*\.to_qkv|.*\.proj)\.bias', r'\1.bias'),
    # spatial resample conv (nn.Sequential index 1).
    Rule(r'(.*)\.resample\.1\.weight', r'\1.resample.kernel', CONV_KERNEL),
    Rule(r'(.*)\.resample\.1\.bias', r'\1.resample.bias'),
    Rule(r'(.*\.(?:norm1|norm2|norm_out|norm))\.gamma', r'\1.gamma', FLATTEN),
])

# The original Wan repository's names (``Wan2.1_VAE.pth``, or its safetensors repackaging), as
# diffusers' ``convert_wan_vae_to_diffusers`` maps them: renamed to diffusers keys, then `WAN`.
_WAN_RESIDUAL = {'residual.0.gamma': 'norm1.gamma', 'residual.2.weight': 'conv1.weight',
                 'residual.2.bias': 'conv1.bias', 'residual.3.gamma': 'norm2.gamma',
                 'residual.6.weight': 'conv2.weight', 'residual.6.bias': 'conv2.bias',
                 'shortcut.weight': 'conv_shortcut.weight', 'shortcut.bias': 'conv_shortcut.bias'}
_WAN_TOP = {'conv1.weight': 'quant_conv.weight', 'conv1.bias': 'quant_conv.bias',
            'conv2.weight': 'post_quant_conv.weight', 'conv2.bias': 'post_quant_conv.bias'}


def wan_original_to_diffusers(key: str, num_res_blocks: int = 2) -> str | None:
  """Original Wan VAE key -> diffusers ``AutoencoderKLWan`` key (None if not a Wan VAE key).

  The original decoder keeps one flat ``upsamples`` list: per level ``num_res_blocks + 1``
  residual blocks then the resample layer.
  """
  if key in _WAN_TOP:
    return _WAN_TOP[key]
  m = re.fullmatch(r'(encoder|decoder)\.(.*)', key)
  if not m:
    return None
  part, rest = m.groups()
  for old, new in (('conv1.', 'conv_in.'), ('head.0.', 'norm_out.'), ('head.2.', 'conv_out.')):
    if rest.startswith(old):
      return f'{part}.{new}{rest[len(old):]}'
  if m := re.fullmatch(r'middle\.(\d+)\.(.*)', rest):
    index, inner = int(m.group(1)), m.group(2)
    if index == 1:
      return f'{part}.mid_block.attentions.0.{inner}'
    return f'{part}.mid_block.resnets.{index // 2}.{_WAN_RESIDUAL.get(inner, inner)}'
  if m := re.fullmatch(r'downsamples\.(\d+)\.(.*)', rest):
    return f'{part}.down_blocks.{m.group(1)}.{_WAN_RESIDUAL.get(m.group(2), m.group(2))}'
  if m := re.fullmatch(r'upsamples\.(\d+)\.(.*)', rest):
    level, j = divmod(int(m.group(1)), num_res_blocks + 2)
    inner = m.group(2)
    if j <= num_res_blocks:
      return f'{part}.up_blocks.{level}.resnets.{j}.{_WAN_RESIDUAL.get(inner, inner)}'
    return f'{part}.up_blocks.{level}.upsamplers.0.{inner}'
  return None


def wan_original_keymap(num_res_blocks: int = 2) -> KeyMap:
  return WAN.renamed('wan_vae (original Wan naming)',
                     lambda k: wan_original_to_diffusers(k, num_res_blocks))


_COG_CAUSAL = r'(.*\.(?:conv_in|conv_out|conv1|conv2))\.conv'
COGVIDEOX = KeyMap('cogvideox_vae', [
    Rule(_COG_CAUSAL + r'\.weight', r'\1.kernel', CONV_KERNEL),
    Rule(_COG_CAUSAL + r'\.bias', r'\1.bias'),
    # kernel-size-1 convs (spatial-norm conditioning, channel shortcuts) as dense layers.
    Rule(r'(.*\.(?:conv_y|conv_b))\.conv\.weight', r'\1.kernel', CONV_TO_DENSE),
    Rule(r'(.*\.(?:conv_y|conv_b))\.conv\.bias', r'\1.bias'),
    Rule(r'(.*\.conv_shortcut)\.weight', r'\1.kernel', CONV_TO_DENSE),
    Rule(r'(.*\.conv_shortcut)\.bias', r'\1.bias'),
    Rule(r'(.*\.(?:down|up)samplers\.0\.conv)\.weight', r'\1.kernel', CONV_KERNEL),
    Rule(r'(.*\.(?:down|up)samplers\.0\.conv)\.bias', r'\1.bias'),
    # GroupNorms (plain, or inside a spatial norm).
    Rule(r'(.*\.(?:norm1|norm2|norm_out|norm_layer))\.weight', r'\1.scale'),
    Rule(r'(.*\.(?:norm1|norm2|norm_out|norm_layer))\.bias', r'\1.bias'),
])


def _source_reader(class_name: str, keymap: KeyMap):
  def read_source(folder: Path) -> tuple[dict, KeyMap]:
    config = read_json_config(folder, 'a diffusers vae folder')
    if config.get('_class_name') != class_name:
      raise CheckpointError(f'{folder / "config.json"}: _class_name '
                            f'{config.get("_class_name")!r} is not {class_name}')
    return config, keymap
  return read_source


WAN_SPEC = ModelSpec('wan_vae', 'vae', _source_reader('AutoencoderKLWan', WAN),
                     WanVAEConfig.from_source, AutoencoderKLWan)
COGVIDEOX_SPEC = ModelSpec('cogvideox_vae', 'vae', _source_reader('AutoencoderKLCogVideoX', COGVIDEOX),
                           CogVideoXVAEConfig.from_source, AutoencoderKLCogVideoX)


def load_wan_vae(path: str | Path, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                 dtype: str = 'float32', param_dtype: str | None = None, **runtime):
  """Wan2.1 VAE from a diffusers or converted folder (pipeline root or ``vae`` folder), or one
  ``.safetensors`` file with the original Wan naming (the Wan2.1 config, fields overridable)."""
  path = Path(path)
  if path.is_file():
    config = WanVAEConfig(dtype=dtype, param_dtype=param_dtype or dtype, **runtime)
    return load_model(WAN_SPEC.factory(config), SafetensorsCheckpoint(path),
                      wan_original_keymap(config.num_res_blocks), mesh=mesh, rules=rules)
  return component.load(WAN_SPEC, path, mesh=mesh, rules=rules, dtype=dtype,
                        param_dtype=param_dtype or dtype, **runtime)


def convert_wan_vae(src, dst, *, param_dtype: str = 'float32', group_bytes: int | None = None,
                    overwrite: bool = False, progress: bool = True) -> int:
  """A diffusers folder, or one original-naming ``.safetensors`` file (Wan2.1 config)."""
  if not Path(src).is_file():
    return component.convert(WAN_SPEC, src, dst, param_dtype=param_dtype,
                             group_bytes=group_bytes, overwrite=overwrite, progress=progress)
  defaults = WanVAEConfig()
  raw = {'_class_name': 'AutoencoderKLWan',
         **{k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(defaults).items() if k in _WAN_ARCHITECTURE}}
  return component.convert_checkpoint(
      WAN_SPEC, SafetensorsCheckpoint(src), raw, wan_original_keymap(defaults.num_res_blocks), dst,
      param_dtype=param_dtype, group_bytes=group_bytes, overwrite=overwrite, progress=progress)


_WAN_ARCHITECTURE = ('base_dim', 'decoder_base_dim', 'z_dim', 'dim_mult', 'num_res_blocks',
                     'temperal_downsample', 'latents_mean', 'latents_std', 'in_channels',
                     'out_channels')


def load_cogvideox_vae(path: str | Path, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                       dtype: str = 'float32', param_dtype: str | None = None, **runtime):
  """CogVideoX VAE from a diffusers or converted folder (pipeline root or ``vae`` folder)."""
  return component.load(COGVIDEOX_SPEC, path, mesh=mesh, rules=rules, dtype=dtype,
                        param_dtype=param_dtype or dtype, **runtime)


def convert_cogvideox_vae(src, dst, *, param_dtype: str = 'float32',
                          group_bytes: int | None = None, overwrite: bool = False,
                          progress: bool = True) -> int:
  return component.convert(COGVIDEOX_SPEC, src, dst, param_dtype=param_dtype,
                           group_bytes=group_bytes, overwrite=overwrite, progress=progress)
