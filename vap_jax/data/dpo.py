"""DPO preference pairs from precomputed latents, by the official rules (VAP_SPEC §5.5,
``VideoAsPromptDPOV2Dataset``), each pair's draws seeded by (seed, its position in the stream)
so a resumed or re-sharded run draws the same pairs.

For the training row at stream position i (its kind is all the official loader reads of it):

* stage: the first 2 epochs (i // rows < 2) take win score >= 90 and lose <= 10, later ones
  >= 80 and <= 30 (`OFFICIAL_STAGES`);
* win: a random video of the kind with score >= pos_min; lose: one with score <= neg_max,
  other than the win; reference: a video of the kind with score 100, else one with
  80 < score < 100, other than both (rows where a pool is empty are skipped, as officially);
* weight ``(|s_w - s_l| beta / sqrt(p_w p_l))^alpha`` (beta 0.02, alpha 1), p the frequency
  of a score's 10-point bin over all the videos (100 is a bin of its own);
* with ``caption_dropout`` every caption of the pair (win, lose, reference) becomes ''.

The videos are those with a record in the precompute folder (its targets; precompute the
training table with ``alignment_score_threshold=0`` as the official DPO loader filters, and no
caption masking: captions drop here). The official pools also take test-split videos; ours
hold what was precomputed. A batch is B pairs as 2B rows [win, lose, ...] in the trainer's
record layout, each row with the pair's reference as its one reference, ``index`` 2i and 2i+1,
and ``dpo_weight``.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from pathlib import Path
from typing import Sequence

import grain
import numpy as np

from vap_jax.data.latent_source import TRAIN_KEYS, LatentLoader, LatentSource
from vap_jax.data.pipeline import FailureCounter, SkipFailures
from vap_jax.data.vap_data import read_vap_csv

# (epochs or None for the rest, pos_min, neg_max)
OFFICIAL_STAGES = ((2, 90, 10), (None, 80, 30))


@dataclasses.dataclass(frozen=True)
class Pair:
  win: str
  lose: str
  reference: str
  weight: float
  caption_masked: bool


class DPOPairing:
  """``pairing(position, row_kind) -> Pair or None`` over ``videos`` {path: (kind, score)}."""

  def __init__(self, videos: dict[str, tuple[str, float]], num_rows: int, *, seed: int = 42,
               stages=OFFICIAL_STAGES, caption_dropout: float = 0.02, reweight: bool = True,
               alpha: float = 1.0, beta: float = 0.02, prob_eps: float = 1e-8,
               bin_width: int = 10):
    if bin_width < 1 or 100 % bin_width:
      raise ValueError(f'bin_width must divide 100, got {bin_width}')
    if not stages or stages[-1][0] is not None:
      raise ValueError(f'stages {stages}: the last stage must have epochs None (the rest)')
    self.seed, self.num_rows, self.stages = seed, num_rows, tuple(map(tuple, stages))
    self.caption_dropout, self.reweight = caption_dropout, reweight
    self.alpha, self.beta, self.prob_eps = alpha, beta, prob_eps
    self.scores = {p: float(s) for p, (_, s) in videos.items()}
    by_kind = collections.defaultdict(list)
    for path, (kind, _) in sorted(videos.items()):
      by_kind[kind].append(path)
    self.by_kind = dict(by_kind)
    bins = {p: self._bin(s, bin_width) for p, s in self.scores.items()}
    counts = collections.Counter(bins.values())
    self.frequency = {p: counts[b] / len(bins) for p, b in bins.items()}

  @staticmethod
  def _bin(score: float, width: int) -> int:
    score = min(max(score, 0.0), 100.0)
    return 100 // width if score >= 100 else int(score) // width

  def stage(self, position: int) -> tuple[int, int]:
    """(pos_min, neg_max) at ``position`` in the stream (rounded down to tens, officially)."""
    epoch, start = position // self.num_rows, 0
    for epochs, pos_min, neg_max in self.stages:
      if epochs is None or epoch < start + epochs:
        return pos_min // 10 * 10, neg_max // 10 * 10
      start += epochs
    raise AssertionError('unreachable: the last stage is open-ended')

  def weight(self, win: str, lose: str) -> float:
    if not self.reweight:
      return 1.0
    prob = math.sqrt(max(self.frequency[win], self.prob_eps) *
                     max(self.frequency[lose], self.prob_eps))
    diff = abs(self.scores[win] - self.scores[lose])
    return (diff * self.beta / max(prob, self.prob_eps)) ** self.alpha

  def __call__(self, position: int, kind: str) -> Pair | None:
    pos_min, neg_max = self.stage(position)
    videos = self.by_kind.get(kind, [])
    wins = [v for v in videos if self.scores[v] >= pos_min]
    if not wins:
      return None
    rng = np.random.default_rng([self.seed, position])
    win = wins[rng.integers(len(wins))]
    loses = [v for v in videos if self.scores[v] <= neg_max and v != win]
    if not loses:
      return None
    lose = loses[rng.integers(len(loses))]
    refs = [v for v in videos if self.scores[v] == 100 and v not in (win, lose)] or [
        v for v in videos if 80 < self.scores[v] < 100 and v not in (win, lose)]
    if not refs:
      return None
    reference = refs[rng.integers(len(refs))]
    masked = bool(rng.random() < self.caption_dropout)
    return Pair(win, lose, reference, self.weight(win, lose), masked)


def pairing_for(source: LatentSource, table: str | Path, **settings) -> tuple[DPOPairing, list]:
  """The pairing over ``source``'s videos, their scores from the VAP-Data ``table``, and the
  (path, kind) of every record (`LatentSource.videos`). A ValueError names a video the table
  lacks."""
  scores = {r['video_paths']: r['reference_alignment_score'] for r in read_vap_csv(table)}
  videos = source.videos()
  missing = sorted({p for p, _ in videos if p not in scores})
  if missing:
    raise ValueError(f'{table}: no reference_alignment_score for {len(missing)} precomputed '
                     f'videos of {source.folder}, e.g. {missing[:3]} (the table it was '
                     'precomputed from?)')
  unique = {p: (k, scores[p]) for p, k in videos}
  return DPOPairing(unique, len(videos), **settings), videos


class ReadPair(grain.transforms.Map):
  """(position, row) -> the pair's two rows (leading axis 2) in the trainer's record layout,
  or None when the row makes no pair; a failure marker when a record cannot be read."""

  def __init__(self, source: LatentSource, pairing: DPOPairing,
               videos: Sequence[tuple[str, str]], keys):
    self.source, self.pairing, self.keys = source, pairing, keys
    self.kinds = [kind for _, kind in videos]
    self.record_of = {}
    for i, (path, _) in enumerate(videos):
      self.record_of.setdefault(path, i)
    self.empty_text = None

  def map(self, item):
    position, row = item
    pair = self.pairing(int(position), self.kinds[int(row)])
    if pair is None:
      return None
    try:
      win, lose, ref = (self.source[self.record_of[v]] for v in (pair.win, pair.lose,
                                                                   pair.reference))
    except Exception as e:  # a damaged record must not stop a long run: skip and count it
      return {'_error': f'{type(e).__name__}: {e}', '_path': f'{self.source.folder}#{row}',
              'index': np.int64(position)}
    if pair.caption_masked:
      if self.empty_text is None:
        self.empty_text = self.source.empty_text
      win, lose, ref = (dict(r, text=self.empty_text.astype(r['text'].dtype))
                        for r in (win, lose, ref))
    out = {}
    for key in self.keys:
      if key == 'index':
        out[key] = np.array([2 * position, 2 * position + 1], np.int64)
      elif key == 'ref_mask':
        out[key] = np.ones((2, 1), bool)
      elif key.startswith('ref_'):
        out[key] = np.repeat(np.asarray(ref[key[4:]])[None, None], 2, axis=0)
      else:
        out[key] = np.stack([win[key], lose[key]])
    out['dpo_weight'] = np.full(2, pair.weight, np.float32)
    return out


def _with_position(position: int, row: int) -> tuple[int, int]:
  return position, row


def _is_pair(element) -> bool:
  return element is not None


def _rows(batch: dict) -> dict:
  """(B, 2, ...) pairs -> (2B, ...) rows [win_0, lose_0, win_1, ...]."""
  return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


def make_dpo_loader(folder, table, *, batch_size: int, seed: int = 42,
                    shard: tuple[int, int] | None = None, workers: int = 0,
                    max_failure_fraction: float = 0.05, min_samples_before_cap: int = 100,
                    **pairing) -> LatentLoader:
  """shuffle(seed) rows -> repeat -> this process's slice -> pair and read (rows without a pair
  skipped, damaged records skipped and counted) -> ``batch_size`` pairs as 2 x batch_size rows.
  ``pairing``: `DPOPairing` settings (stages, caption_dropout, reweight, ...)."""
  source = LatentSource(folder)
  if shard is None:
    import jax
    shard = jax.process_index(), jax.process_count()
  index, count = shard
  the_pairing, videos = pairing_for(source, table, seed=seed, **pairing)
  ds = grain.MapDataset.range(len(videos)).shuffle(seed=seed).repeat(None)
  ds = ds.map_with_index(_with_position)  # module functions: worker processes pickle them
  ds = ds[index::count].map(ReadPair(source, the_pairing, videos, TRAIN_KEYS[source.family]))
  it = ds.to_iter_dataset().filter(_is_pair)
  failures = FailureCounter(max_failure_fraction, min_samples_before_cap)
  it = SkipFailures(it, failures)
  if workers > 0:
    from vap_jax.data.pipeline import _absl_flags_parsed
    _absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  it = it.batch(batch_size, drop_remainder=True).map(_rows)
  return LatentLoader(iter(it), failures, source, shard)
