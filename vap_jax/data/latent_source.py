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

import dataclasses
import json
from pathlib import Path

import grain
import numpy as np

from vap_jax.data.pipeline import FailureCounter, SkipFailures
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

  def videos(self) -> list[tuple[str, str]]:
    """(video path, kind) of every record, in index order: from the shard manifests, or (a
    folder precomputed before they listed them) read from the records."""
    if all('videos' in m for m in self.manifests):
      return [(p, k) for m in self.manifests for p, k in m['videos']]
    return [(str(r['path']), str(r['kind'])) for r in map(self.__getitem__, range(len(self)))]

  @property
  def failures(self) -> list[dict]:
    """Samples skipped while precomputing: {'index', 'path', 'reason'}."""
    return [f for m in self.manifests for f in m['failed']]


def drop_captions(element: dict, empty_text: np.ndarray, ratio: float,
                  rng: np.random.Generator) -> dict:
  """With probability `ratio`, the target and every reference caption embedding become the ''
  embedding (the official `mask_caption_ratio`, VAP_SPEC §5.4), drawn per step."""
  if rng.random() >= ratio:
    return dict(element, caption_masked=np.asarray(False))
  element = dict(element, caption_masked=np.asarray(True))
  empty = np.asarray(empty_text).astype(element['text'].dtype)
  element['text'] = empty
  element['ref_text'] = np.broadcast_to(empty, element['ref_text'].shape[:1] + empty.shape)
  return element


# What the trainer reads of a record, per family (the rest is metadata).
TRAIN_KEYS = {
    'cogvideox': ('latents_mean', 'latents_logvar', 'ref_latents_mean', 'ref_latents_logvar',
                  'image_latents_mean', 'image_latents_logvar', 'ref_image_latents_mean',
                  'ref_image_latents_logvar', 'text', 'ref_text', 'ref_mask', 'index'),
    'wan': ('latents_mean', 'latents_logvar', 'ref_latents_mean', 'ref_latents_logvar',
            'condition', 'ref_condition', 'clip', 'ref_clip', 'text', 'ref_text', 'ref_mask',
            'index'),
}


DRAW_SEED = '_draw_seed'


def _with_draw_seed(index, rng: np.random.Generator):
  return index, rng.integers(2**63)


class ReadRecord(grain.transforms.Map):
  """(index, draw seed) -> record, or a failure marker (`FailureCounter` skips and counts it)
  when the stored bytes cannot be decoded; with ``keys``, only those fields (arrays: they
  batch). The draw seed travels with the record, for `Dropout`."""

  def __init__(self, source: 'LatentSource', keys=None):
    self.source, self.keys = source, keys

  def map(self, item):
    index, seed = item
    try:
      record = self.source[int(index)]
    except Exception as e:  # a damaged record must not stop a long run: skip and count it
      return {'_error': f'{type(e).__name__}: {e}', '_path': f'{self.source.folder}#{index}',
              'index': np.int64(index)}
    if self.keys is not None:
      record = {k: record[k] for k in self.keys}
    return dict(record, **{DRAW_SEED: seed})


def drop_references(element: dict, ratio: float, rng: np.random.Generator) -> dict:
  """The official ``mask_ref_ratio`` (VAP_SPEC §5.4): each reference is dropped with probability
  ``ratio``, at least one kept. ``ref_mask`` (R,) marks the kept ones, which are moved last so
  they take the positions next to the target that n references would have; the model masks the
  dropped ones out of the joint attention."""
  mask = np.asarray(element['ref_mask'], bool).copy()
  if ratio > 0 and mask.sum() > 1:
    kept = np.flatnonzero(mask)
    drop = rng.random(len(kept)) < ratio
    if drop.all():
      drop[rng.integers(len(kept))] = False
    mask[kept[drop]] = False
  order = np.argsort(mask, kind='stable')  # dropped first, kept last, each in their order
  out = dict(element, ref_mask=mask[order])
  for key, value in element.items():
    if key.startswith('ref_') and key != 'ref_mask' and np.ndim(value) >= 1 and \
        np.shape(value)[0] == len(mask):
      out[key] = np.asarray(value)[order]
  return out


class Dropout(grain.transforms.Map):
  """Caption then reference dropout, drawn from the seed `ReadRecord` attached to the record
  (`DRAW_SEED`), which belongs to the sample's position in the global stream: the draws do
  not depend on how many processes share the stream."""

  def __init__(self, empty_text: np.ndarray, caption_ratio: float, reference_ratio: float):
    self.empty_text = np.asarray(empty_text)
    self.caption_ratio, self.reference_ratio = float(caption_ratio), float(reference_ratio)

  def map(self, element: dict) -> dict:
    element = dict(element)
    rng = np.random.default_rng(int(element.pop(DRAW_SEED)))
    if self.caption_ratio > 0:
      element = drop_captions(element, self.empty_text, self.caption_ratio, rng)
    if self.reference_ratio > 0:
      element = drop_references(element, self.reference_ratio, rng)
    return element


@dataclasses.dataclass
class LatentLoader:
  """The batch iterator over precomputed records plus what is checkpointed with it."""
  iterator: grain.DatasetIterator
  failures: FailureCounter
  source: 'LatentSource'
  shard: tuple[int, int]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self.iterator)

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state) -> None:
    self.iterator.set_state(state)

  def save_args(self) -> dict:
    """Composite items for `CheckpointManager.save` (one JSON file per process)."""
    return {'data_iterator': grain.checkpoint.CheckpointSave(self.iterator)}

  def restore_args(self) -> dict:
    """Composite items for `CheckpointManager.restore`; the iterator is restored in place."""
    return {'data_iterator': grain.checkpoint.CheckpointRestore(self.iterator)}


def make_latent_loader(folder, *, batch_size: int, seed: int = 42, num_epochs: int | None = None,
                       shard: tuple[int, int] | None = None, caption_dropout: float = 0.0,
                       reference_dropout: float = 0.0, workers: int = 0, worker_buffer: int = 2,
                       keys=None, max_failure_fraction: float = 0.05,
                       min_samples_before_cap: int = 100) -> LatentLoader:
  """shuffle(seed) -> repeat -> this process's slice -> read (skip and count damaged records)
  -> caption and reference dropout -> batch.

  As `pipeline.make_loader`: every process sees the same permutation and takes every
  `count`-th element, so the processes partition each epoch; the iterator (position, failure
  counts) is checkpointable. ``keys``: fields to keep ('train' = the trainer's, `TRAIN_KEYS`).
  """
  source = LatentSource(folder)
  if shard is None:
    import jax
    shard = jax.process_index(), jax.process_count()
  index, count = shard
  usable = len(source) - len(source) % count
  if usable == 0:
    raise ValueError(f'{len(source)} records cannot be split over {count} processes')
  if keys == 'train':
    keys = TRAIN_KEYS[source.family]
  ds = grain.MapDataset.range(usable).shuffle(seed=seed).repeat(num_epochs)
  # Seeds drawn per position before the processes take their slices (see `Dropout`).
  ds = ds.random_map(_with_draw_seed, seed=seed + 1)
  ds = ds[index::count].map(ReadRecord(source, keys))
  it = ds.to_iter_dataset()
  failures = FailureCounter(max_failure_fraction, min_samples_before_cap)
  it = SkipFailures(it, failures)
  it = it.map(Dropout(source.empty_text, caption_dropout, reference_dropout))
  if workers > 0:
    from vap_jax.data.pipeline import _absl_flags_parsed
    _absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                      per_worker_buffer_size=worker_buffer))
  return LatentLoader(iter(it.batch(batch_size, drop_remainder=True)), failures, source, shard)
