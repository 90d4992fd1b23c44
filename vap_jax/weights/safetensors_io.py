"""Read diffusers/HF safetensors checkpoints one tensor at a time.

A checkpoint is a folder with ``*.safetensors.index.json`` (sharded) or a single ``*.safetensors``
file, or the path of one file. Shapes and dtypes come from the headers without reading data; each
`read` loads exactly one tensor, so peak host memory is bounded by the largest tensor.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import safe_open


class CheckpointError(ValueError):
  """A checkpoint is missing, malformed, or does not match the model."""


class SafetensorsCheckpoint:
  """Lazy, tensor-by-tensor view of a (possibly sharded) safetensors checkpoint."""

  def __init__(self, path: str | os.PathLike):
    path = Path(path)
    if path.is_file():
      files = [path]
    elif path.is_dir():
      indexes = sorted(path.glob('*.safetensors.index.json'))
      if len(indexes) > 1:
        raise CheckpointError(f'{path} holds several index files: {[i.name for i in indexes]}')
      if indexes:
        weight_map = self._read_index(indexes[0])
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
          raise CheckpointError(f'{indexes[0]} names shard files that do not exist: {missing}')
      else:
        files = sorted(path.glob('*.safetensors'))
        if len(files) != 1:
          raise CheckpointError(f'{path} has no *.safetensors.index.json and '
                                f'{len(files)} *.safetensors files (expected exactly one)')
    else:
      raise CheckpointError(f'checkpoint path {path} does not exist')
    self.path = path
    self._file_of: dict[str, Path] = {}
    self._info: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
      try:
        with safe_open(file, 'numpy') as f:
          for key in f.keys():
            if key in self._file_of:
              raise CheckpointError(f'tensor {key} appears in both {self._file_of[key]} and {file}')
            self._file_of[key] = file
            sl = f.get_slice(key)
            self._info[key] = (tuple(sl.get_shape()), sl.get_dtype())
      except CheckpointError:
        raise
      except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f'cannot read safetensors file {file}: {e}') from e

  @staticmethod
  def _read_index(index: Path) -> dict[str, str]:
    try:
      weight_map = json.loads(index.read_text())['weight_map']
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f'{index} is not a safetensors index (needs a "weight_map"): {e}') from e
    return weight_map

  def keys(self) -> list[str]:
    return list(self._file_of)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._info[key][0]

  def dtype(self, key: str) -> str:
    return self._info[key][1]

  def nbytes(self, key: str) -> int:
    return int(np.prod(self.shape(key))) * np.dtype(self.read_dtype(key)).itemsize

  def read_dtype(self, key: str):
    import ml_dtypes
    return {'BF16': ml_dtypes.bfloat16, 'F16': np.float16, 'F32': np.float32, 'F64': np.float64,
            'I64': np.int64, 'I32': np.int32}.get(self._info[key][1], np.float32)

  def read(self, key: str) -> np.ndarray:
    if key not in self._file_of:
      raise CheckpointError(f'tensor {key} is not in checkpoint {self.path}')
    with safe_open(self._file_of[key], 'numpy') as f:
      return f.get_tensor(key)

  def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
    """Only the part ``index`` of one tensor (what one device's shard needs)."""
    if key not in self._file_of:
      raise CheckpointError(f'tensor {key} is not in checkpoint {self.path}')
    with safe_open(self._file_of[key], 'numpy') as f:
      return f.get_slice(key)[index]

  def __contains__(self, key: str) -> bool:
    return key in self._file_of

  def __len__(self) -> int:
    return len(self._file_of)
