"""Semantic-following score of a VAP checkpoint on the held-out pairs of a VAP-Toy dataset.

For each benchmark row (a held-out subject, or a held-out (subject, condition) pair, with a
training video of the same condition as its reference), generate from the subject's first frame
with a prompt that names the subject only (`vap_jax.data.toy.subject_caption`; the reference's
prompt names only its own subject), so that only the reference video carries the condition.
Then classify the generated clip by the renderer's ground truth: the condition whose rendering
of that subject is nearest in mean absolute pixel difference (`nearest_condition`). The distance
is fair because every condition starts from the same frame 0 and the conditions were chosen far
apart in exactly this distance (tests/test_toy_data.py: each rendering's nearest other condition
is more than twice as far as its own codec round trip).

Three settings, on the same rows, noise seeds and prompts:

- ``vap``: the row's reference: accuracy = the generated condition is the reference's;
- ``shuffled``: the references permuted over the rows (seeded): accuracy against the row's own
  condition sits near chance when the model follows its reference, and ``follows_reference``
  (against the condition of the reference it was given) stays high;
- ``no_expert``: no reference, the base model alone (the expert off): near chance, since the
  prompt does not name the condition;
- ``caption``: no reference either, but a prompt that names the condition too: what the base
  model learned to do from words, for comparison.

Subject fidelity: the generated clip is nearer to the rendering of its own subject (under the
classified condition) than to that of any other subject of the dataset.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from vap_jax.data import toy
from vap_jax.data.vap_data import read_benchmark_csv

log = logging.getLogger(__name__)

SETTINGS = ('vap', 'shuffled', 'no_expert', 'caption')
# CFG's unconditional prompts: the empty caption, what caption dropout trained the toy model on.
UNCONDITIONAL = dict(negative_prompt='', negative_ref_prompt='')


def benchmark_rows(root, limit: int | None = None, seed: int = 0) -> list[dict]:
  """The benchmark rows of the dataset at ``root`` with a reference permutation for
  ``shuffled``; ``limit`` keeps an evenly spread subset (every condition represented first)."""
  root = Path(root)
  rows = read_benchmark_csv(root / 'benchmark' / 'benchmark.csv')
  if limit is not None:
    rows = _by_kind(rows)[:limit]
  perm = np.random.default_rng([seed, 0x5f]).permutation(len(rows))
  return [dict(r, shuffled_ref=rows[j]['ref_video_path'], shuffled_subject=rows[j]['ref_subject'],
               shuffled_kind=rows[j]['kind']) for r, j in zip(rows, perm)]


def _by_kind(rows):
  """Round robin over the conditions: rows[k] of each kind before rows[k + 1] of any."""
  groups = {k: [r for r in rows if r['kind'] == k] for k in toy.KINDS}
  out = []
  for i in range(max(map(len, groups.values()), default=0)):
    out += [g[i] for g in groups.values() if i < len(g)]
  return out


def subject_rank(video: np.ndarray, subject: toy.Subject, condition: toy.Condition,
                 subjects) -> int:
  """How many other ``subjects`` render (under ``condition``) nearer to ``video`` than its own
  ``subject`` does (0: the subject is kept)."""
  f, s = video.shape[:2]
  k = toy.KINDS.index(condition.kind)
  dist = lambda o: np.abs(toy.renders(o, f, s)[k].astype(np.float32)  # cached per subject
                          - video.astype(np.float32)).mean()
  own = dist(subject)
  return int(sum(dist(o) < own for o in subjects if o != subject))


def evaluate(ckpt, root, *, settings=SETTINGS, steps: int = 20, guidance: float = 2.0,
             limit: int | None = None, seed: int = 0, reference_guidance: bool = False,
             guidance_min_timestep: float = 0, pipeline=None, progress: bool = True) -> dict:
  """Scores of the checkpoint ``ckpt`` (any folder `Pipeline.from_pretrained` reads, or an
  already loaded ``pipeline``) on the VAP-Toy dataset at ``root``; see the module docstring."""
  from PIL import Image
  from tqdm import tqdm

  from vap_jax.data.video_io import read_video
  from vap_jax.pipelines import Pipeline
  root = Path(root)
  summary = json.loads((root / 'toy.json').read_text())
  frames, size = summary['frames'], summary['size']
  subjects = [toy.subject_by_name(n) for n in summary['subjects']]
  pipe = pipeline or Pipeline.from_pretrained(ckpt, dtype='float32')
  rows = benchmark_rows(root, limit, seed)
  start = time.perf_counter()
  results = {s: [] for s in settings}
  work = [(s, i, r) for i, r in enumerate(rows) for s in settings]
  for setting, i, row in tqdm(work, desc='vap-eval', unit='video', disable=not progress):
    subject = toy.subject_by_name(row['subject'])
    image = np.asarray(Image.open(root / row['image_path']).convert('RGB'))
    ref_path, ref_subject, ref_kind = (row['ref_video_path'], row['ref_subject'], row['kind'])
    if setting == 'shuffled':
      ref_path, ref_subject, ref_kind = (row['shuffled_ref'], row['shuffled_subject'],
                                         row['shuffled_kind'])
    refs, ref_prompts, prompt = [], [], toy.subject_caption(subject)
    if setting == 'caption':
      prompt = f'{prompt[:-1]} {toy.condition_by_kind(row["kind"]).phrase}.'
    elif setting != 'no_expert':
      refs = [read_video(root / ref_path)[0]]
      ref_prompts = [toy.subject_caption(toy.subject_by_name(ref_subject))]
    out = pipe(image, refs, prompt, ref_prompts, height=size, width=size,
               num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
               use_dynamic_cfg=False, seed=seed + i, progress=False,
               reference_guidance=reference_guidance,
               guidance_min_timestep=guidance_min_timestep, **UNCONDITIONAL)
    predicted, dist = toy.nearest_condition(out.frames, subject)
    results[setting].append(dict(
        subject=row['subject'], kind=row['kind'], reference_kind=ref_kind,
        predicted=predicted.kind, distance=float(dist.min()),
        subject_rank=subject_rank(out.frames, subject, predicted, subjects)))
  report = dict(checkpoint=str(ckpt), data=str(root), rows=len(rows), steps=steps,
                guidance=guidance, reference_guidance=reference_guidance,
                guidance_min_timestep=guidance_min_timestep, seed=seed,
                chance=1 / len(toy.KINDS),
                seconds=round(time.perf_counter() - start, 1))
  for setting, items in results.items():
    report[setting] = _scores(items)
  return report


def _scores(items: list[dict]) -> dict:
  hit = lambda it: it['predicted'] == it['kind']
  categories = sorted({it['kind'].split('_')[0] for it in items})
  return dict(
      accuracy=float(np.mean([hit(it) for it in items])),
      follows_reference=float(np.mean([it['predicted'] == it['reference_kind'] for it in items])),
      category_accuracy={c: float(np.mean([hit(it) for it in items
                                           if it['kind'].startswith(c + '_')]))
                         for c in categories},
      subject_fidelity=float(np.mean([it['subject_rank'] == 0 for it in items])),
      items=items)
