"""VAP-Data tables and the official (reference, target) pairing rules (VAP_SPEC §5.4, §6).

Tables are read with the csv module and validated up front, so a bad cell is reported with its
file, line and column instead of failing deep inside a worker. A bad row (blank or non-numeric
score, broken reference list, repeated video path, ...) is dropped, counted and logged, as one
bad row of 100K should not stop a run; the table is refused above `max_bad_row_fraction` of its
rows or, with `strict=True`, at the first bad row. (The official loader drops rows with a blank
score silently and trains on repeated paths.) Pairing follows the official dataset
(`filter_and_update_refs` and `VideoAsPromptDataset.__iter__`), with its randomness drawn from
generators seeded by (seed, sample index) so that a resumed run draws the same pairs.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

VAP_COLUMNS = ('video_paths', 'ref_video_paths', 'tar_video_caption', 'kind', 'split',
               'reference_alignment_score')
BENCHMARK_COLUMNS = ('video_paths', 'ref_video_path', 'tar_video_caption', 'ref_video_caption')

# finetrainers `COMMON_LLM_START_PHRASES` (training.json: remove_common_llm_caption_prefixes).
_BEGINNINGS = ('This video', 'The video', 'This clip', 'The clip', 'The animation', 'This image',
               'The image', 'This picture', 'The picture')
_CONTINUATIONS = ('shows', 'depicts', 'features', 'captures', 'highlights', 'introduces',
                  'presents')
LLM_CAPTION_PREFIXES = (('In the video,', 'In this video,', 'In this video clip,', 'In the clip,',
                         'Caption:')
                        + tuple(f'{b} {c}' for b in _BEGINNINGS for c in _CONTINUATIONS))


class SchemaError(ValueError):
  """A table that does not follow the VAP-Data schema; names file, line and column."""


def remove_llm_prefix(caption: str) -> str:
  """Strips the first matching LLM boilerplate prefix (and surrounding space), as finetrainers."""
  for prefix in LLM_CAPTION_PREFIXES:
    if caption.startswith(prefix):
      return caption.removeprefix(prefix).strip()
  return caption


class _BadRow(Exception):
  """One row to drop: its column and what is wrong with it."""

  def __init__(self, column, reason):
    super().__init__(reason)
    self.column, self.reason = column, reason


def _cell(row, column, what):
  return _BadRow(column, f'{what}: {row[column]!r}' if row[column] else f'{what}: empty')


def _number(row, column) -> float:
  try:
    value = float(row[column])
  except (TypeError, ValueError):
    raise _cell(row, column, 'expected a number') from None
  if math.isnan(value):
    raise _BadRow(column, 'expected a number: NaN')
  return value


def _read_table(path, columns, parse, strict: bool, max_bad_row_fraction: float,
                unique: str | None = None):
  """(rows, dropped) of a table whose rows `parse` turns into dicts (or raises `_BadRow`).

  Rows keep their first line as `_line`; a repeat of an earlier good row's `unique` column is
  bad. `dropped` holds {'line', 'column', 'reason', 'video_paths'} per bad row (JSON-ready).
  """
  path = Path(path)
  if not path.is_file():
    raise SchemaError(f'{path}: file not found')
  data = path.read_bytes()
  try:  # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark (pandas reads it too)
    text = data.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    line = data.count(b'\n', 0, e.start) + 1
    raise SchemaError(f'{path}: line {line}: not UTF-8 text; save it as "CSV UTF-8"') from None
  reader = csv.reader(io.StringIO(text, newline=''))
  rows, dropped, seen = [], [], {}
  try:
    header = next(reader, None)
    missing = [c for c in columns if c not in (header or ())]
    if missing:
      raise SchemaError(f'{path}: missing column(s) {missing}; header is {header}')
    end = reader.line_num
    for cells in reader:
      line, end = end + 1, reader.line_num  # the first line of a row that spans several
      if not cells:
        continue  # a blank line
      row = dict(zip(header, cells))
      try:
        if len(cells) != len(header):
          raise _BadRow(None, f'{len(cells)} cells, the header has {len(header)}')
        parsed = dict(parse(row), _line=line)
        key = parsed[unique] if unique else None
        if key in seen:
          raise _BadRow(unique, f'duplicate of line {seen[key]}: {key!r}')
        if unique:
          seen[key] = line
        rows.append(parsed)
      except _BadRow as e:
        dropped.append(dict(line=line, column=e.column, reason=e.reason,
                            video_paths=row.get('video_paths')))
  except csv.Error as e:
    raise SchemaError(f'{path}: line {reader.line_num}: not readable as CSV ({e})') from None
  total = len(rows) + len(dropped)
  if dropped:
    first = _where(dropped[0])
    if strict:
      raise SchemaError(f'{path}: {first} (strict: {len(dropped)} of {total} rows are bad)')
    if len(dropped) > max_bad_row_fraction * total:
      raise SchemaError(f'{path}: {len(dropped)} of {total} rows are bad, above '
                        f'max_bad_row_fraction {max_bad_row_fraction:.1%}; the first: {first}')
    log.warning('%s: dropped %d of %d rows:\n%s', path, len(dropped), total,
                '\n'.join('  ' + _where(d) for d in dropped))
  return rows, dropped


def _where(bad: dict) -> str:
  column = '' if bad['column'] is None else f', column {bad["column"]!r}'
  return f'line {bad["line"]}{column}: {bad["reason"]}'


def _parse_vap_row(row: dict) -> dict:
  for col in ('video_paths', 'kind', 'split'):
    if not row[col].strip():
      raise _BadRow(col, 'empty')
  try:
    refs = json.loads(row['ref_video_paths'])
  except json.JSONDecodeError as e:
    raise _cell(row, 'ref_video_paths', f'not JSON ({e})') from None
  if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
    raise _cell(row, 'ref_video_paths', 'expected a JSON list of paths')
  parsed = dict(row, ref_video_paths=refs)
  for col in ('reference_alignment_score', '_valid'):
    if col in row:
      parsed[col] = _number(row, col)
  return parsed


def read_vap_table(path, *, strict: bool = False,
                   max_bad_row_fraction: float = 0.05) -> tuple[list[dict], list[dict]]:
  """`vap_data.csv` as (rows, dropped rows); see `read_vap_csv`."""
  return _read_table(path, VAP_COLUMNS, _parse_vap_row, strict, max_bad_row_fraction,
                     unique='video_paths')


def read_vap_csv(path, *, strict: bool = False,
                 max_bad_row_fraction: float = 0.05) -> list[dict]:
  """Rows of `vap_data.csv`: ref_video_paths parsed (JSON list of str), scores as floats.

  Bad rows are dropped and logged (a later repeat of a video path is the bad one); a
  `SchemaError` names the file, line and column if there are more than `max_bad_row_fraction` of
  them, or any with `strict`. Each row keeps its (first) line number as `_line`.
  """
  return read_vap_table(path, strict=strict, max_bad_row_fraction=max_bad_row_fraction)[0]


def _parse_benchmark_row(row: dict) -> dict:
  for col in ('video_paths', 'ref_video_path'):
    if not row[col].strip():
      raise _BadRow(col, 'empty')
  return row


def read_benchmark_csv(path, *, strict: bool = False,
                       max_bad_row_fraction: float = 0.05) -> list[dict]:
  """Rows of `benchmark.csv` (one reference per target); bad rows as in `read_vap_csv`."""
  return _read_table(path, BENCHMARK_COLUMNS, _parse_benchmark_row, strict,
                     max_bad_row_fraction)[0]


# ---------------------------------------------------------------------------------------- pairing


@dataclasses.dataclass(frozen=True)
class PairingConfig:
  alignment_score_threshold: float = 5.0
  sample_ref_videos_num: int = 1
  mask_ref_ratio: float = 0.0
  mask_caption_ratio: float = 0.02
  remove_llm_prefixes: bool = True
  truncate_multiple: int = 48      # official: the train table is cut to a multiple of 48
  max_samples: int | None = None   # official --ablation_scaling_data_num
  split: str = 'train'
  table_shuffle_seed: int = 42     # official: df.sample(frac=1, random_state=42)
  seed: int = 42                   # substitution of refs and per-sample draws


def filter_and_update_refs(rows: list[dict], threshold: float,
                           rng: np.random.Generator) -> list[dict]:
  """Official `filter_and_update_refs`: keep `_valid > 0` and score > threshold; prune each
  row's refs to surviving videos other than itself; if none survive, substitute one random
  surviving video of the same kind; drop rows left without any reference."""
  alive = [r for r in rows
           if r.get('_valid', 1) > 0 and r['reference_alignment_score'] > threshold]
  alive_paths = {r['video_paths'] for r in alive}
  pools: dict[str, list[str]] = {}
  for r in alive:
    pools.setdefault(r['kind'], []).append(r['video_paths'])
  out = []
  for r in alive:
    me = r['video_paths']
    refs = [p for p in r['ref_video_paths'] if p in alive_paths and p != me]
    if not refs:
      pool = [p for p in pools[r['kind']] if p != me]
      if pool:
        refs = [pool[int(rng.integers(0, len(pool)))]]
    if refs:
      out.append(dict(r, ref_video_paths=refs))
  return out


@dataclasses.dataclass(frozen=True)
class PairTable:
  """The training rows plus the caption/kind of every video (refs may come from any row)."""
  rows: tuple
  captions: dict
  kinds: dict


def build_pair_table(vap_rows: list[dict], cfg: PairingConfig) -> PairTable:
  captions = {r['video_paths']: r['tar_video_caption'] for r in vap_rows}
  kinds = {r['video_paths']: r['kind'] for r in vap_rows}
  rows = [r for r in vap_rows if r['split'] == cfg.split]
  perm = np.random.RandomState(cfg.table_shuffle_seed).permutation(len(rows))  # = pandas .sample
  rows = [rows[i] for i in perm]
  rows = filter_and_update_refs(rows, cfg.alignment_score_threshold,
                                np.random.default_rng([cfg.seed, 0x5eed]))
  if cfg.truncate_multiple > 1:
    rows = rows[:len(rows) - len(rows) % cfg.truncate_multiple]
  if cfg.max_samples is not None:
    rows = rows[:cfg.max_samples]
  if not rows:
    raise ValueError(f'no {cfg.split!r} rows left after the alignment threshold '
                     f'{cfg.alignment_score_threshold} and truncation to a multiple of '
                     f'{cfg.truncate_multiple}')
  return PairTable(tuple(rows), captions, kinds)


def sample_pair(table: PairTable, row: dict, cfg: PairingConfig, index: int) -> dict:
  """The per-sample draws of the official loader, seeded by (seed, index).

  `sample_ref_videos_num` references without replacement (fewer if the row has fewer: the
  official `random.sample` would raise), each after the first dropped with `mask_ref_ratio`;
  ref captions are the refs' own captions (stripped); with `mask_caption_ratio` the target and
  all ref captions become ''. LLM prefixes are removed from the target caption.
  """
  rng = np.random.default_rng([cfg.seed, index])
  refs = row['ref_video_paths']
  chosen = [refs[i] for i in rng.permutation(len(refs))[:cfg.sample_ref_videos_num]]
  kept = []
  for ref in chosen:
    if rng.random() < cfg.mask_ref_ratio and kept:
      continue
    kept.append(ref)
  caption = row['tar_video_caption']
  ref_captions = [table.captions[r].strip() for r in kept]
  masked = bool(rng.random() < cfg.mask_caption_ratio)
  if masked:
    caption, ref_captions = '', [''] * len(kept)
  if cfg.remove_llm_prefixes:
    caption = remove_llm_prefix(caption)
  return dict(video=row['video_paths'], refs=kept, caption=caption, ref_captions=ref_captions,
              kinds=[table.kinds[r] for r in kept], kind=row['kind'], caption_masked=masked)
