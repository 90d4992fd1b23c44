"""The precompute output format: record bytes and folder layout (no JAX needed to read it).

Record: a msgpack map, arrays as a msgpack extension.

A record is ``msgpack.packb({name: value})``. Values are plain msgpack types (str, int, float,
bool, None, lists) or arrays; an array is the extension type ``ARRAY_EXT`` (code 1) whose payload
is ``msgpack.packb([dtype_name, shape, raw_bytes])``: little-endian C-order data, dtype by its
NumPy name (``'bfloat16'`` is ml_dtypes' bfloat16). Any msgpack reader can decode it; no pickle.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import msgpack
import numpy as np

log = logging.getLogger(__name__)

ARRAY_EXT = 1
FORMAT = 'vap-precompute/1'
INFO_FILE = 'precompute.json'
EMPTY_TEXT_FILE = 'empty_text.msgpack'


def _dtype(name: str) -> np.dtype:
  if name == 'bfloat16':
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def _default(value):
  if isinstance(value, (np.ndarray, np.generic)):
    array = np.asarray(value)
    if array.dtype.kind in 'US':  # strings: plain msgpack (lists for arrays)
      return array.tolist()
    if array.dtype.kind == 'O':
      raise TypeError(f'object arrays cannot be stored: {array!r:.80}')
    if not array.flags.c_contiguous:  # (not ascontiguousarray: it makes 0-d arrays 1-d)
      array = array.copy(order='C')
    if array.dtype.byteorder == '>':
      array = array.astype(array.dtype.newbyteorder('<'))
    return msgpack.ExtType(ARRAY_EXT, msgpack.packb(
        [array.dtype.name, list(array.shape), array.tobytes()], use_bin_type=True))
  raise TypeError(f'cannot store a {type(value).__name__} in a record')


def _ext_hook(code: int, data: bytes):
  if code != ARRAY_EXT:
    return msgpack.ExtType(code, data)
  name, shape, raw = msgpack.unpackb(data, raw=False)
  return np.frombuffer(raw, dtype=_dtype(name)).reshape(shape)


def encode_record(sample: dict) -> bytes:
  """dict of arrays / str / numbers / lists -> bytes."""
  return msgpack.packb(sample, default=_default, use_bin_type=True)


def decode_record(data: bytes) -> dict:
  """bytes -> dict; arrays come back as read-only NumPy views of the record."""
  return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def shard_name(shard: int, num_shards: int) -> str:
  """`shard-00003-of-00008`: + `.array_record` (records) / `.json` (manifest, once complete)."""
  return f'shard-{shard:05d}-of-{num_shards:05d}'


def shard_complete(folder, shard: int, num_shards: int) -> dict | None:
  """The manifest of a finished shard, or None if the shard must be (re)done."""
  folder, name = Path(folder), shard_name(shard, num_shards)
  try:
    manifest = json.loads((folder / f'{name}.json').read_text())
    size = (folder / f'{name}.array_record').stat().st_size
  except (OSError, ValueError):
    return None
  if manifest.get('bytes') != size:
    log.warning('%s: file is %d bytes, its manifest says %s: redoing it', name, size,
                manifest.get('bytes'))
    return None
  return manifest
