"""Configs are big_vision-style Python files read by path, never imported as a package.

``load_config('configs/train_wan.py:d10')`` runs ``get_config('d10')`` of that file and returns
its ``ml_collections.ConfigDict``; without ``:arg`` it calls ``get_config()``.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import ml_collections


def load_config(spec: str | Path) -> ml_collections.ConfigDict:
  """``PATH[:ARG]`` -> ``get_config(ARG)`` of the file at PATH; a ValueError naming the file if
  it is missing or has no ``get_config``."""
  path, _, arg = str(spec).partition(':')
  file = Path(path)
  if not file.is_file():
    raise ValueError(f'config {file}: file not found (expected PATH.py[:ARG])')
  # A name unique to the file, so two configs of the same name never share a module.
  name = 'vap_config_' + hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
  module_spec = importlib.util.spec_from_file_location(name, file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'config {file}: defines no get_config(arg)')
  return module.get_config(arg or None)
