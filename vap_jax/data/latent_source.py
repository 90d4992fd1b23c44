"""Reading precomputed shards back: a Grain source, a loader, and the records -> DiT inputs step.

  source = LatentSource('latents/wan')          # every shard must be finished
  loader = make_latent_loader('latents/wan', batch_size=2, caption_dropout=0.1)
  batch = next(loader)                           # numpy dict, leading batch axis
  # vap_jax.conditioning.wan_latents / cogvideox_latents turn it into model inputs

Records come back as NumPy dicts (strings as str arrays). Wan text embeddings, stored trimmed to
their token length, are zero-padded back to `text_max_length` (what the pipeline's encoder
returns), so batches stack.
"""
from __future__ import annotations

import json
from pathlib import Path

import grain
import numpy as np

from vap_jax.data.records import EMPTY_TEXT_FILE, INFO_FILE, decode_record, shard_complete, \
  shard_name


def _pad_rows(text: np.ndarray, length: int) -> np.ndarray:
  """Zero-pads the token axis (-2) to `length`."""
  pad = [(0, 0)] * text.ndim
  pad[-2] = (0, length - text.shape[-2])
  return np.pad(text, pad)


class LatentSource:
  """`grain.sources.RandomAccessDataSource` over the finished shards of a precompute folder.

  Index order = shard order, then sample index. Picklable (for grain worker processes).
  """

  def __init__(self, folder, *, allow_incomplete: bool = False):
    self.folder = Path(folder)
    info_file = self.folder / INFO_FILE
    if not info_file.is_file():
      raise FileNotFoundError(f'{info_file} not found: not a vap-precompute output folder')
    self.info = json.loads(info_file.read_text())
    settings = self.info['settings']
    self.family, self.max_length = settings['family'], settings['text_max_length']
    n = settings['num_shards']
    manifests = [shard_complete(self.folder, s, n) for s in range(n)]
    missing = [shard_name(s, n) for s, m in enumerate(manifests) if m is None]
    if missing and not allow_incomplete:
      raise ValueError(f'{self.folder}: {len(missing)} of {n} shards are not finished '
                       f'({", ".join(missing[:5])}{", ..." if len(missing) > 5 else ""}); run '
                       f'vap-precompute again to finish them, or pass allow_incomplete=True')
    self.manifests = [m for m in manifests if m is not None]
    paths = [str(self.folder / m['file']) for m in self.manifests if m['num_records']]
    self._source = grain.sources.ArrayRecordDataSource(paths) if paths else None

  def __len__(self) -> int:
    return 0 if self._source is None else len(self._source)

  def __getitem__(self, index: int) -> dict:
    return self._finish(decode_record(self._source[index]))

  def __repr__(self) -> str:
    return f'LatentSource({str(self.folder)!r}, records={len(self)})'

  def _finish(self, record: dict) -> dict:
    out = {k: np.asarray(v) for k, v in record.items()}
    if self.family == 'wan':
      for key in ('text', 'ref_text'):
        if key in out:
          out[key] = _pad_rows(out[key], self.max_length)
    return out

  @property
  def empty_text(self) -> np.ndarray:
    """The '' caption embedding (L, D): what caption dropout substitutes."""
    record = decode_record((self.folder / EMPTY_TEXT_FILE).read_bytes())
    return self._finish(record)['text']

  @property
  def failures(self) -> list[dict]:
    """Samples skipped while precomputing: {'index', 'path', 'reason'}."""
    return [f for m in self.manifests for f in m['failed']]


class CaptionDropout(grain.transforms.RandomMap):
  """With probability `ratio`, the target and every reference caption embedding become the ''
  embedding (the official `mask_caption_ratio`, VAP_SPEC §5.4), drawn per step."""

  def __init__(self, empty_text: np.ndarray, ratio: float):
    self.empty_text, self.ratio = np.asarray(empty_text), float(ratio)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    if rng.random() >= self.ratio:
      return element
    element = dict(element, caption_masked=np.asarray(True))
    empty = self.empty_text.astype(element['text'].dtype)
    element['text'] = empty
    element['ref_text'] = np.broadcast_to(empty, element['ref_text'].shape[:1] + empty.shape)
    return element


def make_latent_loader(folder, *, batch_size: int, seed: int = 42, num_epochs: int | None = None,
                       shard: tuple[int, int] | None = None, caption_dropout: float = 0.0,
                       workers: int = 0, worker_buffer: int = 2) -> grain.DatasetIterator:
  """shuffle(seed) -> repeat -> this process's slice -> caption dropout -> batch.

  As `pipeline.make_loader`: every process sees the same permutation and takes every
  `count`-th element, so the processes partition each epoch; the iterator is checkpointable with
  `grain.checkpoint.CheckpointSave/Restore`.
  """
  source = LatentSource(folder)
  if shard is None:
    import jax
    shard = jax.process_index(), jax.process_count()
  index, count = shard
  usable = len(source) - len(source) % count
  if usable == 0:
    raise ValueError(f'{len(source)} records cannot be split over {count} processes')
  ds = grain.MapDataset.source(source)[:usable].shuffle(seed=seed).repeat(num_epochs)
  ds = ds[index::count]
  if caption_dropout > 0:
    ds = ds.random_map(CaptionDropout(source.empty_text, caption_dropout), seed=seed)
  it = ds.to_iter_dataset()
  if workers > 0:
    from vap_jax.data.pipeline import _absl_flags_parsed
    _absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                      per_worker_buffer_size=worker_buffer))
  return iter(it.batch(batch_size, drop_remainder=True))
