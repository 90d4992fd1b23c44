"""Content checksums of converted folders: recorded when written, checked when read.

A conversion records every file it wrote, ``{relative path: {'bytes': size, 'sha256': hex}}``:
a component's in its ``config.json`` (``files``), the copied tokenizer / scheduler / image
processor files in the pipeline's ``manifest.json``. Loading checks the sizes (one ``stat`` per
file: catches a missing or cut file at no cost); ``full`` hashes every byte (``vap-convert
--verify``: catches any change, at the disk's or sha256's speed, see benchmarks/RESULTS.md).
Folders converted before checksums were recorded have none and are not checked.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vap_jax.weights.safetensors_io import CheckpointError

CHUNK = 16 * 2**20
AGAIN = 'convert it again (vap-convert ... --overwrite)'


def sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _hashes(paths: list[Path]) -> list[str]:
  # hashlib releases the GIL on large buffers: files hash in parallel.
  with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    return list(pool.map(sha256, paths))


def record(root: Path, folder: Path) -> dict[str, dict]:
  """Size and sha256 of every file under ``folder``, keyed by its path relative to ``root``."""
  paths = sorted(p for p in Path(folder).rglob('*') if p.is_file())
  return {p.relative_to(root).as_posix(): {'bytes': p.stat().st_size, 'sha256': h}
          for p, h in zip(paths, _hashes(paths))}


def check(root: Path, files: dict | None, *, full: bool = False) -> tuple[int, int]:
  """Check the files recorded under ``root``: sizes always, contents too with ``full``.

  Returns (files, bytes) checked; raises `CheckpointError` naming the first bad file.
  """
  if not files:
    return 0, 0
  root = Path(root)
  total = 0
  for rel, want in files.items():
    path = root / rel
    if not path.is_file():
      raise CheckpointError(f'{path} is missing (it was written at conversion): {AGAIN}')
    size = path.stat().st_size
    if size != want['bytes']:
      raise CheckpointError(f'{path} has {size} bytes, {want["bytes"]} were written at '
                            f'conversion (damaged or cut short): {AGAIN}')
    total += size
  if full:
    paths = [root / rel for rel in files]
    for path, rel, got in zip(paths, files, _hashes(paths)):
      if got != files[rel]['sha256']:
        raise CheckpointError(f'{path} is damaged: its sha256 differs from the one recorded at '
                              f'conversion: {AGAIN}')
  return len(files), total
