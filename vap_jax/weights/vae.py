"""Key maps, loaders and converters for the diffusers ``vae/`` folders of Wan2.1 and CogVideoX.

Conv kernels (out, in, kt, kh, kw) become (kt, kh, kw, in, out) (`CONV_KERNEL`); kernel-size-1
convs are stored as dense (in, out) kernels (`CONV_TO_DENSE`); Wan's RMS-norm gammas (C, 1, 1[, 1])
are flattened to (C,).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from vap_jax.parallel import DEFAULT_RULES
from vap_jax.parallel.sharding import Rules
from vap_jax.weights import orbax_io
from vap_jax.weights.keymap import CONV_TO_DENSE, KeyMap, Rule, Transform
from vap_jax.weights.loading import component_dir, load_model
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


def read_vae_config(path: str | Path, class_name: str) -> dict:
  folder = component_dir(Path(path), 'vae')
  config_file = folder / 'config.json'
  if not config_file.is_file():
    raise CheckpointError(f'{folder} has no config.json (expected a diffusers vae folder)')
  config = json.loads(config_file.read_text())
  if config.get('_class_name') != class_name:
    raise CheckpointError(f'{config_file}: _class_name {config.get("_class_name")!r} is not '
                          f'{class_name}')
  return config


class _Spec:
  """What differs between the two VAEs: class names, config, module, key map."""

  def __init__(self, name, class_name, keymap, make_config, make_model):
    self.name, self.class_name, self.keymap = name, class_name, keymap
    self.make_config, self.make_model = make_config, make_model

  def factory(self, config, seed: int = 0):
    return lambda: self.make_model(config, rngs=nnx.Rngs(seed))


def _wan_spec() -> _Spec:
  from vap_jax.models.vae_wan import AutoencoderKLWan, WanVAEConfig
  return _Spec('wan_vae', 'AutoencoderKLWan', WAN, WanVAEConfig.from_diffusers, AutoencoderKLWan)


def _cog_spec() -> _Spec:
  from vap_jax.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig
  return _Spec('cogvideox_vae', 'AutoencoderKLCogVideoX', COGVIDEOX,
               CogVideoXVAEConfig.from_diffusers, AutoencoderKLCogVideoX)


def _load(spec: _Spec, path, mesh, rules, dtype, param_dtype, **runtime):
  path = Path(path)
  runtime = dict(dtype=dtype, param_dtype=param_dtype or dtype, **runtime)
  if (path / orbax_io.STATE_DIR).is_dir():
    meta = orbax_io.read_config(path)
    if meta.get('model') != spec.name:
      raise CheckpointError(f'{path} holds a {meta.get("model")!r} checkpoint, not {spec.name}')
    config = spec.make_config(meta['diffusers_config'], **runtime)
    return orbax_io.restore_model(spec.factory(config), path, mesh=mesh, rules=rules)
  config = spec.make_config(read_vae_config(path, spec.class_name), **runtime)
  checkpoint = SafetensorsCheckpoint(component_dir(path, 'vae'))
  return load_model(spec.factory(config), checkpoint, spec.keymap, mesh=mesh, rules=rules)


def _convert(spec: _Spec, src, dst, *, param_dtype, group_bytes, overwrite, progress) -> int:
  raw = read_vae_config(src, spec.class_name)
  config = spec.make_config(raw, dtype=param_dtype, param_dtype=param_dtype)
  checkpoint = SafetensorsCheckpoint(component_dir(Path(src), 'vae'))
  count = orbax_io.convert_safetensors(checkpoint, spec.keymap, spec.factory(config), dst,
                                       group_bytes=group_bytes, overwrite=overwrite,
                                       progress=progress)
  orbax_io.write_config(dst, {'model': spec.name, 'param_dtype': param_dtype,
                              'source': str(Path(src).resolve()), 'diffusers_config': raw})
  return count


def load_wan_vae(path: str | Path, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                 dtype: str = 'float32', param_dtype: str | None = None, **runtime):
  """Wan2.1 VAE from a diffusers (pipeline or vae) folder, a converted Orbax folder, or one
  ``.safetensors`` file with the original Wan naming (the Wan2.1 config, fields overridable)."""
  path = Path(path)
  if path.is_file():
    from vap_jax.models.vae_wan import AutoencoderKLWan, WanVAEConfig
    config = WanVAEConfig(dtype=dtype, param_dtype=param_dtype or dtype, **runtime)
    return load_model(lambda: AutoencoderKLWan(config, rngs=nnx.Rngs(0)),
                      SafetensorsCheckpoint(path), wan_original_keymap(config.num_res_blocks),
                      mesh=mesh, rules=rules)
  return _load(_wan_spec(), path, mesh, rules, dtype, param_dtype, **runtime)


def convert_wan_vae(src, dst, *, param_dtype: str = 'float32', group_bytes: int | None = None,
                    overwrite: bool = False, progress: bool = True) -> int:
  """A diffusers folder, or one original-naming ``.safetensors`` file (Wan2.1 config)."""
  if not Path(src).is_file():
    return _convert(_wan_spec(), src, dst, param_dtype=param_dtype, group_bytes=group_bytes,
                    overwrite=overwrite, progress=progress)
  from vap_jax.models.vae_wan import AutoencoderKLWan, WanVAEConfig
  config = WanVAEConfig(dtype=param_dtype, param_dtype=param_dtype)
  count = orbax_io.convert_safetensors(
      SafetensorsCheckpoint(src), wan_original_keymap(config.num_res_blocks),
      lambda: AutoencoderKLWan(config, rngs=nnx.Rngs(0)), dst, group_bytes=group_bytes,
      overwrite=overwrite, progress=progress)
  architecture = {k: list(v) if isinstance(v, tuple) else v
                  for k, v in dataclasses.asdict(config).items() if k in _WAN_ARCHITECTURE}
  orbax_io.write_config(dst, {'model': 'wan_vae', 'param_dtype': param_dtype,
                              'source': str(Path(src).resolve()),
                              'diffusers_config': {'_class_name': 'AutoencoderKLWan',
                                                   **architecture}})
  return count


_WAN_ARCHITECTURE = ('base_dim', 'decoder_base_dim', 'z_dim', 'dim_mult', 'num_res_blocks',
                     'temperal_downsample', 'latents_mean', 'latents_std', 'in_channels',
                     'out_channels')


def load_cogvideox_vae(path: str | Path, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                       dtype: str = 'float32', param_dtype: str | None = None, **runtime):
  """CogVideoX VAE from a diffusers (pipeline or vae) folder or a converted Orbax folder."""
  return _load(_cog_spec(), path, mesh, rules, dtype, param_dtype, **runtime)


def convert_cogvideox_vae(src, dst, *, param_dtype: str = 'float32',
                          group_bytes: int | None = None, overwrite: bool = False,
                          progress: bool = True) -> int:
  return _convert(_cog_spec(), src, dst, param_dtype=param_dtype, group_bytes=group_bytes,
                  overwrite=overwrite, progress=progress)
