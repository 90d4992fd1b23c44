"""LoRA adapters by their PyTorch module names: which layers a target regex selects, and the
adapter files diffusers and PEFT read and write.

Every `Linear` of a transformer has the PyTorch module name its kernel's checkpoint key gives
through the production key map (``transformer_blocks.3.attn1.to_q``, the expert's
``transformer_blocks.3.attn1_mot_ref.to_q``), so a target regex is written against the names PEFT
users know and the official one works unchanged (`OFFICIAL_TARGET`, full match as PEFT). A
stacked layer takes adapters on all its layers or none.

Files: diffusers' ``save_lora_weights`` layout -- ``pytorch_lora_weights.safetensors`` with keys
``transformer.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r) and the PEFT
``LoraConfig`` fields (``r``, ``lora_alpha``, ``target_modules``, ...) in the safetensors metadata
(``lora_adapter_metadata``, each field under ``transformer.``), which ``load_lora_weights`` /
``load_lora_adapter`` read. `load` also reads PEFT's ``save_pretrained`` folders
(``adapter_model.safetensors``, keys ``base_model.model.<module>...``, ``adapter_config.json``) and
files without metadata (alpha = rank, diffusers' default).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import re
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from vap_jax.models.stack import checkpoint_blocks
from vap_jax.nn import lora
from vap_jax.nn.layers import Linear
from vap_jax.weights import keymap as km
from vap_jax.weights.export import to_host, family_of

# The official DPO target (VAP_SPEC §5.5): every attention projection of the base and the expert.
OFFICIAL_TARGET = r'(transformer_blocks|single_transformer_blocks).*(to_q|to_k|to_v|to_out.0)'
WEIGHTS_NAME = 'pytorch_lora_weights.safetensors'    # diffusers
PEFT_WEIGHTS_NAME = 'adapter_model.safetensors'       # PEFT save_pretrained
PEFT_CONFIG_NAME = 'adapter_config.json'
METADATA_KEY = 'lora_adapter_metadata'
PREFIX = 'transformer'
_PREFIXES = (PREFIX + '.', 'base_model.model.')


@dataclasses.dataclass(frozen=True)
class Site:
  """A linear layer that can take an adapter: its path, the layer, and its PyTorch module name
  per stacked layer (one name for an unstacked layer)."""
  path: tuple
  layer: Linear
  names: tuple[str, ...]

  @property
  def stacked(self) -> bool:
    return km.is_stacked(self.layer.kernel)


def sites(model: nnx.Module) -> list[Site]:
  """Every linear layer of a transformer that is a linear layer in PyTorch too (a patch
  embedding stored as a convolution is not), with its module names."""
  keymap = family_of(model).keymap
  block_of = checkpoint_blocks(model.config.block_idx_with_mot_ref)
  out = []
  for path, layer in nnx.iter_graph(model):
    if not isinstance(layer, Linear):
      continue
    kernel = tuple(path) + ('kernel',)
    slots = range(layer.kernel.shape[0]) if km.is_stacked(layer.kernel) else [None]
    keys = [keymap.key_of(kernel, None if s is None else block_of(kernel, s)) for s in slots]
    if all(t.name == 'transpose' for _, t in keys):
      out.append(Site(tuple(path), layer, tuple(k.removesuffix('.weight') for k, _ in keys)))
  return out


def add(model: nnx.Module, target: str = OFFICIAL_TARGET, *, rank: int, alpha: float,
        seed: int = 0) -> list[str]:
  """Adapters (PEFT's init: the model's output is unchanged) on every linear layer whose module
  name fully matches ``target``; returns the names. A ValueError when nothing matches, or when
  the regex takes some layers of a stack but not the others."""
  if rank < 1:
    raise ValueError(f'LoRA rank must be at least 1, got {rank}')
  regex, key, chosen = re.compile(target), jax.random.key(seed), []
  found = sites(model)
  for i, site in enumerate(found):
    hits = [bool(regex.fullmatch(n)) for n in site.names]
    if not any(hits):
      continue
    if not all(hits):
      raise ValueError(f'LoRA target {target!r} selects {sum(hits)} of the {len(hits)} layers '
                       f'stacked as {"/".join(map(str, site.path))} (e.g. {site.names[0]}): a '
                       'stack takes adapters on all its layers or none')
    site.layer.lora = lora.init(jax.random.fold_in(key, i), site.layer.kernel, rank, alpha)
    chosen += site.names
  if not chosen:
    examples = ', '.join(s.names[0] for s in found[:4])
    raise ValueError(f'LoRA target {target!r} matches no linear layer (names look like '
                     f'{examples})')
  return chosen


# ------------------------------------------------------------------------------------- files


def state_dict(model: nnx.Module) -> tuple[dict[str, np.ndarray], dict]:
  """(PyTorch-layout tensors by PEFT key without prefix, the PEFT ``LoraConfig`` fields)."""
  tensors, ranks, alphas = {}, {}, {}
  for site in sites(model):
    adapter = site.layer.lora
    if adapter is None:
      continue
    a, b = (to_host(v[...]).astype(np.float32) for v in (adapter.a, adapter.b))
    for i, name in enumerate(site.names):
      a_i, b_i = (a[i], b[i]) if site.stacked else (a, b)
      tensors[f'{name}.lora_A.weight'] = np.ascontiguousarray(a_i.T)
      tensors[f'{name}.lora_B.weight'] = np.ascontiguousarray(b_i.T)
      ranks[name], alphas[name] = adapter.rank, adapter.scale * adapter.rank
  if not tensors:
    raise ValueError('the model has no LoRA adapters')
  return tensors, dict(_with_patterns('r', 'rank_pattern', ranks),
                       **_with_patterns('lora_alpha', 'alpha_pattern', alphas),
                       target_modules=sorted(ranks), lora_dropout=0.0, bias='none',
                       init_lora_weights=True, use_dora=False)


def _with_patterns(field: str, pattern: str, values: dict) -> dict:
  """PEFT's encoding: the most common value, and the modules that differ by exact name."""
  common = collections.Counter(values.values()).most_common(1)[0][0]
  return {field: common,
          pattern: {re.escape(n): v for n, v in values.items() if v != common}}


def save(model: nnx.Module, path: str | Path) -> Path:
  """The model's adapters as a diffusers LoRA file (``path``: a ``.safetensors`` file, or a
  folder that gets `WEIGHTS_NAME`); returns the file. Only process 0 writes."""
  path = Path(path)
  file = path if path.suffix == '.safetensors' else path / WEIGHTS_NAME
  tensors, config = state_dict(model)
  if jax.process_index() == 0:
    file.parent.mkdir(parents=True, exist_ok=True)
    metadata = {'format': 'pt', METADATA_KEY: json.dumps(
        {f'{PREFIX}.{k}': v for k, v in config.items()}, indent=2, sort_keys=True)}
    save_file({f'{PREFIX}.{k}': v for k, v in tensors.items()}, str(file), metadata=metadata)
  return file


def _adapter_file(path: Path) -> Path:
  if path.is_dir():
    for name in (WEIGHTS_NAME, PEFT_WEIGHTS_NAME):
      if (path / name).is_file():
        return path / name
    raise FileNotFoundError(f'{path}: no {WEIGHTS_NAME} (diffusers) or {PEFT_WEIGHTS_NAME} '
                            '(PEFT) in this folder')
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no such LoRA file')
  return path


def read(path: str | Path) -> tuple[dict[str, dict[str, np.ndarray]], dict, Path]:
  """({module: {'A': (r, in), 'B': (out, r)}}, the LoraConfig fields, the file) of an adapter
  file or folder, diffusers or PEFT."""
  file = _adapter_file(Path(path))
  try:
    with safe_open(str(file), 'np') as f:
      metadata = f.metadata() or {}
      raw = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises its own error type for a damaged file
    raise ValueError(f'{file}: not a readable safetensors file ({e})') from None
  config = {}
  if METADATA_KEY in metadata:
    config = {k.removeprefix(PREFIX + '.'): v for k, v in json.loads(metadata[METADATA_KEY]).items()
              if k.startswith(PREFIX + '.')}
  elif (file.parent / PEFT_CONFIG_NAME).is_file():
    config = json.loads((file.parent / PEFT_CONFIG_NAME).read_text())
  modules: dict[str, dict[str, np.ndarray]] = {}
  for key, value in raw.items():
    m = re.fullmatch(r'(.+)\.lora_([AB])(?:\.default)?\.weight', key)
    prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
    if m is None or prefix is None:
      raise ValueError(f'{file}: tensor {key!r} is not a transformer LoRA weight (expected '
                       f'{PREFIX}.<module>.lora_A.weight / .lora_B.weight)')
    modules.setdefault(m.group(1).removeprefix(prefix), {})[m.group(2)] = value
  for name, pair in modules.items():
    if set(pair) != {'A', 'B'}:
      raise ValueError(f'{file}: {name} has lora_{"".join(pair)} but not both lora_A and lora_B')
  return modules, config, file


def _alpha(config: dict, name: str, rank: int) -> float:
  """PEFT's rule: an ``alpha_pattern`` entry matching the name's end, else ``lora_alpha``, else
  (no config: diffusers' default) the rank."""
  for pattern, value in (config.get('alpha_pattern') or {}).items():
    if re.match(rf'(.*\.)?({pattern})$', name):
      return float(value)
  return float(config.get('lora_alpha', rank))


def load(model: nnx.Module, path: str | Path, *, scale: float = 1.0) -> list[str]:
  """Adapters from a diffusers or PEFT LoRA file onto ``model`` (replacing any it has), each
  scaled by ``scale`` on top of alpha/r; returns the module names. Every tensor must land on a
  linear layer of the model with the right shape, and a stacked layer needs all its layers."""
  modules, config, file = read(path)
  loaded = []
  for site in sites(model):
    present = [n in modules for n in site.names]
    if not any(present):
      continue
    if not all(present):
      missing = [n for n, p in zip(site.names, present) if not p]
      raise ValueError(f'{file}: adapters for {sum(present)} of the {len(present)} layers '
                       f'stacked as {"/".join(map(str, site.path))}; missing {missing[:3]}: '
                       'a stack takes adapters on all its layers or none')
    fan_in, fan_out = site.layer.kernel.shape[-2:]
    a, b, alphas = [], [], set()
    for name in site.names:
      pair = modules[name]
      rank = pair['A'].shape[0]
      if pair['A'].shape != (rank, fan_in) or pair['B'].shape != (fan_out, rank):
        raise ValueError(f'{file}: {name} lora_A {pair["A"].shape} / lora_B {pair["B"].shape} '
                         f'do not fit the layer ({fan_out}, {fan_in}) (expected (r, {fan_in}) '
                         f'and ({fan_out}, r))')
      a.append(pair['A'].T.astype(np.float32))
      b.append(pair['B'].T.astype(np.float32))
      alphas.add((rank, _alpha(config, name, rank)))
    if len(alphas) > 1:
      raise ValueError(f'{file}: the layers stacked as {"/".join(map(str, site.path))} have '
                       f'different (rank, alpha) {sorted(alphas)}: one stack, one setting')
    (rank, alpha), = alphas
    a, b = (np.stack(x) if site.stacked else x[0] for x in (a, b))
    site.layer.lora = lora.LoRA(a, b, alpha / rank * scale,
                                kernel_axes=lora.kernel_axes(site.layer.kernel))
    loaded += site.names
  unused = sorted(set(modules) - set(loaded))
  if unused:
    raise ValueError(f'{file}: {len(unused)} adapters name no linear layer of this '
                     f'{type(model).__name__}: {unused[:5]}')
  return loaded
