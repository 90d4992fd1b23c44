"""Grain pipeline over VAP-Data: shuffle -> shard -> decode in worker processes -> batch.

Order of operations and why:
  rows --shuffle(seed)--> repeat(epochs) --tag global index--> [process::processes]
       --decode (mp_prefetch workers)--> skip+count failures (caller) --> batch
Shuffling before the shard gives every process the same permutation, so the shards partition each
epoch exactly (the table is cut to a multiple of the process count). The global index seeds the
pairing draws, so a restored iterator redraws the same pairs. Failures travel as marker elements
out of the workers and are counted in the caller, where the cap is enforced; the counts are part
of the grain iterator state, which Orbax saves as one file per process.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from pathlib import Path

import grain
import ml_collections
import numpy as np

from vap_jax.data import video_io
from vap_jax.data.vap_data import PairingConfig, PairTable, build_pair_table, read_vap_table, \
  sample_pair

log = logging.getLogger(__name__)


class DataFailureError(RuntimeError):
  """Too many samples failed to load."""


def _out_dtype(name):
  if name == 'bfloat16':
    import ml_dtypes
    return ml_dtypes.bfloat16
  return np.dtype(name)


class TagIndex:
  """map_with_index fn: keeps the global (epoch-aware) position of each row."""

  def __call__(self, index, row):
    return int(index), row


class DecodeSample:
  """Row -> training sample (runs in the workers). Importable and picklable.

  Output: video (F, H, W, 3) and ref_videos (R, F, H, W, 3) in [-1, 1], R =
  sample_ref_videos_num with dropped refs zero and `ref_mask` False; captions; the index and
  path; with `metadata` also the ref paths, kinds, source fps and chosen frame indices (-1 pads
  dropped refs). A reference that fails to decode is replaced by another training video of its
  kind (up to `MAX_REPLACEMENTS` tries, drawn per sample), so one bad file does not drop every
  sample that draws it; `_replaced` lists the (path, reason) replaced, for `FailureCounter`. A
  target that fails, or a reference without a usable replacement, returns {'_error', '_path',
  'index'} instead of raising.
  """
  MAX_REPLACEMENTS = 3

  def __init__(self, root, table: PairTable, pairing: PairingConfig, *, fps, buckets,
               frames_selection, resize_mode, output_dtype, metadata: bool = False):
    self.root, self.table, self.pairing = Path(root), table, pairing
    self.fps, self.buckets = fps, [tuple(b) for b in buckets]
    self.frames_selection, self.resize_mode = frames_selection, resize_mode
    self.output_dtype = output_dtype
    self.metadata = metadata
    self.pools = {}  # kind -> training videos: where a bad reference's replacement comes from
    for r in table.rows:
      self.pools.setdefault(r['kind'], []).append(r['video_paths'])

  def _clip(self, rel_path, rng, bucket=None, meta=None):
    """One decode pass; the bucket is the target's, else chosen from this video (official).

    `meta`, a list, receives (source fps, indices of the chosen frames in the decoded video)."""
    chosen, picked = [], []

    def pick(count, fps, height, width):
      n = count
      if self.fps and fps > 0 and int(fps) != self.fps:
        n = len(video_io.resample_indices(int(fps), self.fps, count))
      chosen.append(bucket or video_io.nearest_bucket(n, height, width, self.buckets))
      picked.append(video_io.clip_indices(count, fps, chosen[0][0], target_fps=self.fps,
                                          frames_selection=self.frames_selection, rng=rng))
      return picked[-1]

    frames, fps = video_io.read_video(self.root / rel_path, pick=pick)
    if meta is not None:
      meta.append((fps, np.asarray(picked[-1], np.int64)))
    clip = video_io.resize_to(video_io.to_unit_range(frames), chosen[0][1:], self.resize_mode)
    return clip.astype(_out_dtype(self.output_dtype)), chosen[0]

  def _reference(self, pair: dict, j: int, index: int, rng, bucket, meta, replaced: list):
    """Reference j of ``pair`` in the target's bucket (so they stack); a bad one is replaced in
    ``pair`` (path, caption) by another video of its kind, each failure added to ``replaced``."""
    draw = np.random.default_rng([self.pairing.seed, index, 2, j])
    used = {pair['video'], *pair['refs']}
    while True:
      try:
        return self._clip(pair['refs'][j], rng, bucket, meta=meta)[0]
      except video_io.VideoError as e:
        pool = [p for p in self.pools.get(pair['kinds'][j], ()) if p not in used]
        if not pool or len(replaced) >= self.MAX_REPLACEMENTS:
          raise
        replaced.append((e.path, e.reason))
        new = pool[int(draw.integers(len(pool)))]
        used.add(new)
        pair['refs'][j] = new
        if not pair['caption_masked']:
          pair['ref_captions'][j] = self.table.captions[new].strip()

  def __call__(self, item):
    index, row = item
    pair = sample_pair(self.table, row, self.pairing, index)
    rng = np.random.default_rng([self.pairing.seed, index, 1])
    meta = [] if self.metadata else None
    replaced = []
    try:
      video, bucket = self._clip(pair['video'], rng, meta=meta)
      refs = [self._reference(pair, j, index, rng, bucket, meta, replaced)
              for j in range(len(pair['refs']))]
    except video_io.VideoError as e:
      return {'_error': e.reason, '_path': e.path, 'index': index}
    r = self.pairing.sample_ref_videos_num
    ref_videos = np.zeros((r,) + video.shape, video.dtype)
    if refs:  # none when sample_ref_videos_num is 0 (a VAE run's clips)
      ref_videos[:len(refs)] = refs
    pad = [''] * (r - len(refs))
    out = {
        'video': video, 'ref_videos': ref_videos,
        'ref_mask': np.arange(r) < len(refs),
        'caption': np.array(pair['caption']),
        'ref_captions': np.array(pair['ref_captions'] + pad),
        'path': np.array(pair['video']),
        'index': np.int64(index),
    }
    if self.metadata:  # where the frames came from (precompute stores it)
      indices = np.full((1 + r, bucket[0]), -1, np.int64)
      fps = np.zeros(1 + r, np.float64)
      for i, (f, idx) in enumerate(meta):
        fps[i], indices[i] = f, idx
      out.update(ref_paths=np.array(pair['refs'] + pad), kind=np.array(pair['kind']),
                 ref_kinds=np.array(pair['kinds'] + pad), caption_masked=pair['caption_masked'],
                 fps=fps[0], ref_fps=fps[1:], frame_indices=indices[0],
                 ref_frame_indices=indices[1:], csv_line=np.int64(row.get('_line', -1)))
    if replaced:
      out['_replaced'] = replaced  # taken off by FailureCounter, before batching
    return out


class FailureCounter:
  """Counts the failure markers that `SkipFailures` drops (in the caller) and enforces the cap.

  A sample whose target or any reference fails is skipped; the path that failed is counted. A
  reference that `DecodeSample` replaced is counted in `replaced` (the sample is kept).
  """

  def __init__(self, max_fraction: float = 0.05, min_samples: int = 100):
    self.max_fraction, self.min_samples = max_fraction, min_samples
    self.seen = self.failed = 0
    self.by_path = collections.Counter()
    self.replaced = collections.Counter()
    self.reasons = {}
    self.recent = collections.deque(maxlen=1000)  # (sample index, path); not checkpointed

  def __call__(self, element) -> bool:
    self.seen += 1
    for path, reason in element.pop('_replaced', ()):
      self.replaced[path] += 1
      self.reasons[path] = reason
      log.warning('sample %d: replaced reference %s: %s (%d replaced so far)', element['index'],
                  path, reason, sum(self.replaced.values()))
    if '_error' not in element:
      return True
    self.failed += 1
    path = element['_path']
    self.by_path[path] += 1
    self.reasons[path] = element['_error']
    self.recent.append((int(element['index']), path))
    log.warning('skipping sample %d: %s: %s (%d/%d failed so far)', element['index'], path,
                element['_error'], self.failed, self.seen)
    if self.seen >= self.min_samples:
      self._cap()
    return False

  def finish(self) -> None:
    """At the end of the data the cap applies whatever the count: a short run that loaded
    nothing, or too little, must fail too (`min_samples` only keeps early noise from firing)."""
    self._cap()

  def _cap(self) -> None:
    if self.failed and (self.failed == self.seen or self.failed > self.max_fraction * self.seen):
      worst = '; '.join(f'{n}x {path}: {self.reasons[path]}'
                        for path, n in self.by_path.most_common(3))
      raise DataFailureError(
          f'{self.failed} of {self.seen} samples failed to load ({self.failed / self.seen:.1%}), '
          f'above max_failure_fraction {self.max_fraction:.1%}. Worst offenders: {worst}. Fix '
          'or remove these files, or raise the limit.')

  def report(self, worst: int = 10) -> str:
    lines = [f'{self.failed} of {self.seen} samples failed to load '
             f'({self.failed / max(self.seen, 1):.1%}). Worst offenders:']
    for path, n in self.by_path.most_common(worst):
      lines.append(f'  {n}x {path}: {self.reasons[path]}')
    return '\n'.join(lines)

  def state(self) -> dict:
    return {'seen': self.seen, 'failed': self.failed, 'by_path': dict(self.by_path),
            'replaced': dict(self.replaced), 'reasons': self.reasons}

  def restore(self, state: dict) -> None:
    self.seen, self.failed = int(state['seen']), int(state['failed'])
    self.by_path = collections.Counter(state['by_path'])
    self.replaced = collections.Counter(state.get('replaced', {}))  # absent before issue 19
    self.reasons = dict(state['reasons'])


class SkipFailures(grain.IterDataset):
  """Drops and counts failure markers; the counts are part of the iterator state, so grain's
  per-process checkpoint files carry them (Orbax's JSON items are written by process 0 only)."""

  def __init__(self, parent: grain.IterDataset, counter: FailureCounter):
    super().__init__(parent)
    self._counter = counter

  def __iter__(self):
    return _SkipFailuresIterator(self._parent.__iter__(), self._counter)


class _SkipFailuresIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, counter: FailureCounter):
    super().__init__(parent)
    self._counter = counter

  def __next__(self):
    while True:
      try:
        element = next(self._parent)
      except StopIteration:
        self._counter.finish()  # a finite run (num_epochs) ends: the cap applies now
        raise
      if self._counter(element):
        return element

  def get_state(self):
    return {'parent': self._parent.get_state(), 'failures': self._counter.state()}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._counter.restore(state['failures'])


def _process_shard():
  import jax
  return jax.process_index(), jax.process_count()


@dataclasses.dataclass
class VapLoader:
  """The batch iterator plus what is checkpointed with it."""
  iterator: grain.DatasetIterator
  failures: FailureCounter
  table: PairTable
  shard: tuple[int, int]
  rows_per_epoch: int  # for this process
  dropped_rows: list = dataclasses.field(default_factory=list)  # bad table rows (also logged)

  def __iter__(self):
    return self

  def __next__(self):
    return next(self.iterator)

  def close(self) -> None:
    """Stops the worker processes (also done when the iterator is garbage collected)."""
    self.iterator.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def save_args(self) -> dict:
    """Composite items for `CheckpointManager.save(step, args=Composite(**model, **these))`.

    One JSON file per process (position in the epoch stream, prefetch state, failure counts).
    """
    return {'data_iterator': grain.checkpoint.CheckpointSave(self.iterator)}

  def restore_args(self) -> dict:
    """Composite items for `CheckpointManager.restore`; the iterator is restored in place."""
    return {'data_iterator': grain.checkpoint.CheckpointRestore(self.iterator)}


def default_data_config(recipe: str | None = None) -> ml_collections.ConfigDict:
  """The loader settings of the official SFT recipe (VAP_SPEC §5.3-5.4, training.json).

  ``recipe``: comma-separated 'cog' (default, 49x480x720), 'wan' (49x480x832), '3ref' (the
  3-reference ablation). `configs/vap_data.py` documents them; `make_loader` reads them.
  """
  args = set((recipe or 'cog').split(','))
  unknown = args - {'cog', 'wan', '3ref'}
  if unknown:
    raise ValueError(f'data recipe {recipe!r}: unknown {sorted(unknown)} (expected cog, wan, 3ref)')
  data = ml_collections.ConfigDict(dict(
      root='data/VAP-Data',
      meta_csv='vap_data.csv',
      benchmark_csv='benchmark/benchmark.csv',
      fps=16,
      buckets=[[49, 480, 832]] if 'wan' in args else [[49, 480, 720]],  # (frames, height, width)
      frames_selection='evenly',
      resize_mode='bicubic',
      output_dtype='float32',
      sample_ref_videos_num=1,
      mask_ref_ratio=0.0,
      mask_caption_ratio=0.02,
      alignment_score_threshold=0.0 if 'cog' in args else 10.0,
      remove_llm_prefixes=True,
      truncate_multiple=48,
      max_samples=None,
      seed=42,
      num_epochs=None,              # None: repeat forever, a new shuffle each epoch
      batch_size=1,                 # per process
      workers=4,                    # grain mp_prefetch processes; 0 decodes in the caller
      read_threads=1,               # decode threads per worker
      worker_buffer=2,
      max_failure_fraction=0.05,    # of samples seen; stop with the worst offenders above this
      min_samples_before_cap=100,
      max_bad_row_fraction=0.05,    # of table rows; bad rows are dropped and listed, above this
      strict_table=False,           # True: refuse a table with any bad row
  ))
  if '3ref' in args:
    data.update(sample_ref_videos_num=3, mask_ref_ratio=0.3, mask_caption_ratio=0.1,
                alignment_score_threshold=10.0)
  return data


def pairing_config(cfg) -> PairingConfig:
  return PairingConfig(
      alignment_score_threshold=float(cfg.alignment_score_threshold),
      sample_ref_videos_num=int(cfg.sample_ref_videos_num),
      mask_ref_ratio=float(cfg.mask_ref_ratio), mask_caption_ratio=float(cfg.mask_caption_ratio),
      remove_llm_prefixes=bool(cfg.remove_llm_prefixes),
      truncate_multiple=int(cfg.truncate_multiple), max_samples=cfg.max_samples,
      seed=int(cfg.seed))


class SelectKeys(grain.transforms.Map):
  """Keeps only ``keys`` of each sample (e.g. the trainer's arrays, not the captions)."""

  def __init__(self, keys):
    self.keys = tuple(keys)

  def map(self, element: dict) -> dict:
    return {k: element[k] for k in self.keys}


def make_loader(cfg, *, shard: tuple[int, int] | None = None, keys=None) -> VapLoader:
  """Builds the per-process iterator from loader settings (`default_data_config`).

  `shard` = (index, count) defaults to (jax.process_index(), jax.process_count()); `keys`: the
  fields to keep (default all), e.g. ('video', 'index') for a VAE run.
  """
  if len(cfg.buckets) > 1 and cfg.batch_size > 1:
    raise ValueError(f'{len(cfg.buckets)} buckets need batch_size 1 per process (samples of '
                     f'different buckets cannot be stacked); got batch_size {cfg.batch_size}')
  root = Path(cfg.root)
  pairing = pairing_config(cfg)
  vap_rows, dropped = read_table(root / cfg.meta_csv, cfg)
  table = build_pair_table(vap_rows, pairing)
  index, count = shard if shard is not None else _process_shard()
  rows = list(table.rows)
  rows = rows[:len(rows) - len(rows) % count]  # every process sees the same number per epoch
  if not rows:
    raise ValueError(f'{len(table.rows)} rows cannot be split over {count} processes')
  ds = grain.MapDataset.source(rows).shuffle(seed=int(cfg.seed))
  ds = ds.repeat(cfg.num_epochs).map_with_index(TagIndex())[index::count]
  ds = ds.map(DecodeSample(root, table, pairing, fps=cfg.fps, buckets=cfg.buckets,
                           frames_selection=cfg.frames_selection, resize_mode=cfg.resize_mode,
                           output_dtype=cfg.output_dtype))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(cfg.read_threads),
                                            prefetch_buffer_size=int(cfg.worker_buffer)))
  if cfg.workers > 0:
    _absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(cfg.workers), per_worker_buffer_size=int(cfg.worker_buffer)))
  failures = FailureCounter(float(cfg.max_failure_fraction), int(cfg.min_samples_before_cap))
  it = SkipFailures(it, failures)
  if keys is not None:
    it = it.map(SelectKeys(keys))
  it = it.batch(int(cfg.batch_size), drop_remainder=True)
  return VapLoader(iter(it), failures, table, (index, count), len(rows) // count, dropped)


def read_table(path, cfg) -> tuple[list[dict], list[dict]]:
  """`read_vap_table` with the bad-row settings of a data block (dict or ConfigDict)."""
  return read_vap_table(path, strict=bool(cfg.get('strict_table', False)),
                        max_bad_row_fraction=float(cfg.get('max_bad_row_fraction', 0.05)))


def _absl_flags_parsed():
  """grain 0.2.18 reads absl flags in its workers (google/grain#1355)."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
