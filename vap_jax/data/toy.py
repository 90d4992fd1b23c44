"""VAP-Toy: a procedural semantic-control dataset in the VAP-Data layout (VAP_SPEC §6).

A subject (shape x colour x texture on a two-tone checkered background) is rendered with NumPy
under a condition: motion, camera, style or concept, as in VAP's four categories. Every condition
starts from the same frame 0 (the reference image of an image-to-video model) and diverges, so a
video's condition is its only difference from the other renderings of its subject. Rendering is a
pure function of (subject, condition, frames, size): an evaluation can classify a generated video
by its nearest ground-truth rendering (`nearest_condition`).

  python -m vap_jax.data.toy --out data/VAP-Toy     (or vap-toy-data --out ...)

writes root/videos/<kind>/<subject>.mp4 (H.264, 16 fps), root/vap_data.csv, root/benchmark/
benchmark.csv, root/images/<subject>.png (first frames) and root/toy.json (the split), which
`read_vap_csv`, the pairing, vap-precompute and vap-train read unchanged.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from vap_jax.data import video_io

# ---------------------------------------------------------------------------------- subjects

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'cross', 'ring')
COLOURS = {'red': (230, 40, 40), 'orange': (250, 140, 20), 'yellow': (245, 225, 30),
           'green': (40, 200, 70), 'cyan': (30, 205, 225), 'blue': (45, 85, 235),
           'purple': (155, 60, 215), 'pink': (245, 95, 185)}
TEXTURES = ('flat', 'striped', 'dotted')
# Muted, so that every subject colour has backgrounds far from it (> 150 RGB apart); drawn as a
# checker, so that camera moves shift a visible pattern.
BACKGROUNDS = {'navy': (35, 45, 95), 'cream': (225, 212, 180), 'charcoal': (60, 60, 64),
               'olive': (115, 120, 55), 'plum': (95, 45, 80), 'slate': (95, 125, 140)}
_TEXTURE_WORDS = {'flat': '', 'striped': 'striped ', 'dotted': 'dotted '}


@dataclasses.dataclass(frozen=True)
class Subject:
  """What frame 0 shows: any combination of the names above (`SUBJECTS` is the dataset's)."""
  shape: str
  colour: str
  texture: str
  background: str

  @property
  def name(self) -> str:
    """Stable and file-safe: the video's file name in root/videos/<kind>/."""
    return f'{self.colour}_{self.texture}_{self.shape}_on_{self.background}'

  @property
  def description(self) -> str:
    """'a red striped triangle on a navy background': the subject in captions."""
    return (f'{_a(self.colour)} {self.colour} {_TEXTURE_WORDS[self.texture]}{self.shape} '
            f'on {_a(self.background)} {self.background} background')


def _a(word: str) -> str:
  return 'an' if word[0] in 'aeiou' else 'a'


def _far_backgrounds(colour: str) -> list[str]:
  rgb = np.array(COLOURS[colour], float)
  return [b for b, v in BACKGROUNDS.items() if np.linalg.norm(rgb - v) > 150]


def _make_subjects(n: int = 24) -> tuple[Subject, ...]:
  # i -> (i mod 6, 3i mod 8) are 24 distinct (shape, colour) pairs; the k-th subject of a
  # colour (k = i // 8) gets the k-th texture, so every colour and shape shows every texture.
  out = []
  for i in range(n):
    c, k = 3 * i % len(COLOURS), i // len(COLOURS)
    far = _far_backgrounds(list(COLOURS)[c])
    out.append(Subject(SHAPES[i % len(SHAPES)], list(COLOURS)[c], TEXTURES[k % len(TEXTURES)],
                       far[(c + k) % len(far)]))
  return tuple(out)


SUBJECTS = _make_subjects()

# ---------------------------------------------------------------------------------- conditions


@dataclasses.dataclass(frozen=True)
class Scene:
  """What a condition sets at one time; the defaults are frame 0 of every condition."""
  cam: tuple = (0.0, 0.0, 1.0)     # world point at the frame centre, zoom
  copies: tuple = ((0.0, 0.0),)    # subject centres (world units; the frame spans [-1, 1])
  scale: float = 1.0
  angle: float = 0.0               # radians, clockwise on screen
  squash: tuple = (1.0, 1.0)       # x, y stretch of the subject
  drip: float = 0.0                # melt drips, 0..1 of their length
  sketch: float = 0.0              # 0..1: white paper, the subject as an ink outline
  neon: float = 0.0                # 0..1: dark scene, glowing outline
  invert: float = 0.0              # 0..1: radius of a negative, 1.5 = the whole frame
  hue: float = 0.0                 # radians of hue rotation


@dataclasses.dataclass(frozen=True)
class Condition:
  kind: str                        # the VAP-Data `kind` column: <category>_<name>
  phrase: str                      # what happens, after the subject in a caption (-ing / as)
  scene: Callable[[float], Scene]  # normalized time t in [0, 1] -> Scene

  @property
  def category(self) -> str:
    return self.kind.split('_')[0]


R0 = 0.5  # subject radius at scale 1, world units


def _at(x, y):
  return Scene(copies=((x, y),))


def _orbit(t):
  a = 2 * np.pi * 0.8 * t  # anticlockwise from the start, up first; 0.8 turn ends elsewhere
  return _at(-0.45 * (1 - np.cos(a)), -0.45 * np.sin(a))


def _melt(t):
  u = 1 - (1 - t) ** 2  # fast, then settling: apart from spin early on
  sy = 1 - 0.7 * u  # sinks onto its bottom edge and spreads
  return Scene(copies=((0.0, R0 * (1 - sy)),), squash=(1 + 0.8 * u, sy), drip=u)


def _shatter(t):
  return Scene(copies=tuple((0.6 * t * i, 0.6 * t * j) for i in (-1, 1) for j in (-1, 1)),
               scale=1 - 0.5 * t)


# Chosen (and tuned) so that every pair is far apart in mean absolute pixel difference, also for
# the dullest subject: camera and style conditions change the whole frame; the rest only the
# subject's pixels. Tried and dropped as too close to others: bounce (vs up), gray and pixelate
# (vs spin), shrink and fade (vs each other), split in two (vs left/right), stretch (vs up).
CONDITIONS = (
    Condition('motion_right', 'moving to the right', lambda t: _at(0.75 * t, 0.0)),
    Condition('motion_left', 'moving to the left', lambda t: _at(-0.75 * t, 0.0)),
    Condition('motion_up', 'rising upward', lambda t: _at(0.0, -0.75 * t)),
    Condition('motion_orbit', 'moving around in a circle', _orbit),
    Condition('camera_zoom_in', 'as the camera zooms in',
              lambda t: Scene(cam=(0.22 * t, -0.18 * t, 1 + 1.3 * t))),
    Condition('camera_zoom_out', 'as the camera zooms out',
              lambda t: Scene(cam=(0.0, 0.0, 1 - 0.55 * t))),
    Condition('camera_pan_left', 'as the camera pans left',  # one checker cell: a visible shift
              lambda t: Scene(cam=(-0.5 * t, 0.0, 1.0))),
    Condition('camera_tilt_up', 'as the camera tilts up',
              lambda t: Scene(cam=(0.0, -0.5 * t, 1.0))),
    Condition('style_sketch', 'turning into an ink sketch on white paper',
              lambda t: Scene(sketch=t)),
    Condition('style_neon', 'turning into a glowing neon sign in the dark',
              lambda t: Scene(neon=t)),
    Condition('style_invert', 'turning into a colour negative from the centre out',
              lambda t: Scene(invert=t)),
    Condition('style_hue', 'as its colours cycle around the colour wheel',
              lambda t: Scene(hue=np.pi * t)),
    Condition('concept_grow', 'growing bigger', lambda t: Scene(scale=1 + 1.0 * t)),
    Condition('concept_spin', 'spinning around', lambda t: Scene(angle=2.5 * np.pi * t)),
    Condition('concept_melt', 'melting into a puddle', _melt),
    Condition('concept_shatter', 'shattering into four pieces', _shatter),
)
KINDS = tuple(c.kind for c in CONDITIONS)

# ---------------------------------------------------------------------------------- rendering
# Shapes are signed distance functions in subject-local units (radius ~1, y down); a pixel's
# coverage is 0.5 - distance / pixel width, clipped: one-pixel soft edges, no supersampling.

_MARKS = {'circle': (0.0, -0.5), 'square': (0.42, -0.42), 'triangle': (0.0, -0.1),
          'diamond': (0.0, -0.45), 'cross': (0.0, -0.62), 'ring': (0.0, -0.72)}
_BOTTOMS = {'square': 0.82, 'triangle': 0.55}  # lowest local y where not 1 (melt drips)
_RIM = 0.25  # outline width, local units
_INK, _PAPER = 0.12, 0.94


def _box(x, y, hx, hy):
  qx, qy = np.abs(x) - hx, np.abs(y) - hy
  return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _triangle(x, y, r=1.05):
  # Equilateral, apex up; Inigo Quilez's exact distance, with y flipped to point up.
  k = np.sqrt(3.0)
  x, y = np.abs(x) - r, -y + r / k
  fold = x + k * y > 0
  x, y = np.where(fold, (x - k * y) / 2, x), np.where(fold, (-k * x - y) / 2, y)
  x = x - np.clip(x, -2 * r, 0)
  return -np.hypot(x, y) * np.sign(y)


def _sdf(shape, x, y):
  if shape == 'circle':
    return np.hypot(x, y) - 1
  if shape == 'square':
    return _box(x, y, 0.82, 0.82)
  if shape == 'triangle':
    return _triangle(x, y)
  if shape == 'diamond':
    return (np.abs(x) + np.abs(y) - 1.05) / np.sqrt(2)
  if shape == 'cross':
    return np.minimum(_box(x, y, 1.0, 0.34), _box(x, y, 0.34, 1.0))
  if shape == 'ring':
    return np.abs(np.hypot(x, y) - 0.72) - 0.28
  raise ValueError(f'unknown shape {shape!r}; expected one of {SHAPES}')


def _cover(d, width):
  return np.clip(0.5 - d / width, 0, 1)


def _rgb(name, table):
  return np.array(table[name], np.float64) / 255


def _fill(subject, x, y, w):
  """Texture and orientation mark at local (x, y): (H, W, 3) colour in [0, 1]."""
  base = _rgb(subject.colour, COLOURS)
  out = np.broadcast_to(base, x.shape + (3,))
  if subject.texture == 'striped':  # soft bands 0.5 apart, darker
    m = np.clip(0.5 + np.sin(2 * np.pi * y / 0.5) * 0.5 / (2 * np.pi * w), 0, 1)
    out = out + (base * 0.45 - base) * m[..., None]
  elif subject.texture == 'dotted':  # light dots on a 0.5 grid
    d = np.hypot(x - 0.5 * np.round(x / 0.5), y - 0.5 * np.round(y / 0.5)) - 0.13
    out = out + ((base + 0.7 * (1 - base)) - base) * _cover(d, w)[..., None]
  # An eye off the centre: spinning shows even on a flat circle.
  mx, my = _MARKS[subject.shape]
  eye = np.full(3, 0.1 if base @ (0.299, 0.587, 0.114) > 0.45 else 0.96)
  m = _cover(np.hypot(x - mx, y - my) - 0.2, w)[..., None]
  return out + (eye - out) * m


def _background(name, x, y, w):
  """A checker of 0.5-unit cells +-0.11 around the colour, lighter at the top (world units)."""
  c = _rgb(name, BACKGROUNDS)
  half = 0.5 / np.pi / w  # sin slope at a cell edge -> one-pixel ramp
  check = np.clip(np.sin(np.pi * x / 0.5) * half, -1, 1) * np.clip(np.sin(np.pi * y / 0.5) * half,
                                                                    -1, 1)
  shade = np.clip(1 - 0.12 * y, 0.7, 1.3)
  return np.clip(c * shade[..., None] + 0.11 * check[..., None], 0, 1)


def _subject(subject, s: Scene, x, y, w):
  """Coverage (H, W) and colour (H, W, 3) of the subject's copies and drips."""
  cover = np.zeros(x.shape)
  colour = np.zeros(x.shape + (3,))
  ca, sa = np.cos(s.angle), np.sin(s.angle)
  unit_x, unit_y = R0 * s.scale * s.squash[0], R0 * s.scale * s.squash[1]
  lw = w / min(unit_x, unit_y)  # a pixel in local units
  outline = max(s.sketch, s.neon)
  for cx, cy in s.copies:
    dx, dy = x - cx, y - cy
    lx, ly = (ca * dx + sa * dy) / unit_x, (-sa * dx + ca * dy) / unit_y
    d = _sdf(subject.shape, lx, ly)
    a = _cover(d, lw)
    fill = _fill(subject, lx, ly, lw)
    if outline:
      a = a - outline * _cover(d + _RIM, lw)
    if s.neon:
      glow = s.neon * 0.6 * np.exp(-np.maximum(d, 0) / 0.35)
      a = np.maximum(a, glow * (d > 0))
      fill = fill + (np.minimum(1, fill * 1.2 + 0.35) - fill) * s.neon
    if s.sketch:
      fill = fill + (_INK - fill) * s.sketch
    # Copies are a union, not layers: two copies in one place draw exactly one copy.
    take = a > cover
    cover = np.where(take, a, cover)
    colour = np.where(take[..., None], fill, colour)
    if s.drip > 0:
      base = _rgb(subject.colour, COLOURS)
      bottom = cy + unit_y * _BOTTOMS.get(subject.shape, 1.0)
      for ox, length in ((-0.45, 0.5), (0.05, 0.75), (0.5, 0.35)):
        px = cx + ox * unit_x
        end = bottom + s.drip * length * R0
        seg = np.hypot(x - px, np.maximum(np.maximum(cy - y, y - end), 0)) - 0.055
        a = _cover(seg, w) * min(1.0, 4 * s.drip)
        take = a > cover
        cover = np.where(take, a, cover)
        colour = np.where(take[..., None], base, colour)
  return cover, colour


def _hue_matrix(angle):
  """Rotation about the grey axis of RGB space."""
  c, s = np.cos(angle), np.sin(angle)
  k = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / np.sqrt(3)
  return c * np.eye(3) + (1 - c) / 3 * np.ones((3, 3)) + s * k


def render_scene(subject: Subject, s: Scene, size: int = 64) -> np.ndarray:
  """One frame, uint8 (size, size, 3)."""
  px = 2 / size
  u = (np.arange(size) + 0.5) * px - 1
  sx, sy = np.meshgrid(u, u)
  cx, cy, zoom = s.cam
  x, y, w = cx + sx / zoom, cy + sy / zoom, px / zoom  # world coordinates, pixel width
  img = _background(subject.background, x, y, w)
  if s.neon:
    img = img * (1 - 0.85 * s.neon)
  if s.sketch:
    img = img + (_PAPER - img) * s.sketch
  cover, colour = _subject(subject, s, x, y, w)
  img = img + (colour - img) * cover[..., None]
  if s.hue:
    img = img @ _hue_matrix(s.hue).T
  if s.invert:  # a negative that spreads from the centre (a uniform blend passes through grey)
    edge = _cover(np.hypot(sx, sy) - 1.5 * s.invert, px)[..., None]
    img = img + (1 - 2 * img) * edge
  return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def times(frames: int) -> np.ndarray:
  """Normalized time of each frame: 0 ... 1."""
  return np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)


def render(subject: Subject, condition: Condition, *, frames: int = 17,
           size: int = 64) -> np.ndarray:
  """The clip, uint8 (frames, size, size, 3); a pure function of its arguments."""
  return np.stack([render_scene(subject, condition.scene(float(t)), size) for t in times(frames)])


def first_frame(subject: Subject, size: int = 64) -> np.ndarray:
  """Frame 0 of every condition (the reference image), uint8 (size, size, 3)."""
  return render_scene(subject, Scene(), size)


@functools.lru_cache(maxsize=32)  # every subject of the dataset: 24 x 3.3 MB at 17x64x64
def renders(subject: Subject, frames: int = 17, size: int = 64) -> np.ndarray:
  """Every condition's clip of `subject`, uint8 (len(CONDITIONS), F, S, S, 3), read-only
  (cached: an evaluation asks for the same subject once per generated video)."""
  out = np.stack([render(subject, c, frames=frames, size=size) for c in CONDITIONS])
  out.flags.writeable = False
  return out


def nearest_condition(video, subject: Subject) -> tuple[Condition, np.ndarray]:
  """The condition whose rendering of `subject` is nearest to `video` (uint8, or float in
  [-1, 1]; (F, S, S, 3) as rendered) in mean absolute difference; and the distances to each,
  in levels of 0..255, in `CONDITIONS` order."""
  video = np.asarray(video)
  if video.dtype != np.uint8:
    video = video_io.from_unit_range(video)
  if video.ndim != 4 or video.shape[1] != video.shape[2] or video.shape[3] != 3:
    raise ValueError(f'expected a square RGB video (F, S, S, 3), got {video.shape}')
  truth = renders(subject, video.shape[0], video.shape[1])
  dist = np.abs(truth.astype(np.float32) - video.astype(np.float32)).mean(axis=(1, 2, 3, 4))
  return CONDITIONS[int(np.argmin(dist))], dist


def subject_by_name(name: str) -> Subject:
  """Inverse of `Subject.name` (any combination, not only `SUBJECTS`)."""
  colour, texture, shape, on, background = name.split('_')
  subject = Subject(shape, colour, texture, background)
  if on != 'on' or subject.name != name or colour not in COLOURS or texture not in TEXTURES \
      or shape not in SHAPES or background not in BACKGROUNDS:
    raise ValueError(f'not a toy subject name: {name!r}')
  return subject


def condition_by_kind(kind: str) -> Condition:
  for c in CONDITIONS:
    if c.kind == kind:
      return c
  raise ValueError(f'unknown toy condition {kind!r}; expected one of {KINDS}')


# ---------------------------------------------------------------------------------- captions

_TEMPLATES = ('{S}{p}.', 'The video shows {s}{p}.', 'In this video, we see {s}{p}.')


def caption(subject: Subject, condition: Condition) -> str:
  """One of a few templates, chosen by a stable hash of (subject, condition). Two carry the
  LLM prefixes that the pairing strips (`remove_llm_prefixes`), as the official captions do.
  Half of the captions name the subject only (no condition phrase): a model then has to take
  the condition from somewhere else -- for the VAP expert, its reference video -- and a prompt
  that names only the subject (`subject_caption`) is one it has seen in training."""
  d = subject.description
  i = zlib.crc32(f'{subject.name}/{condition.kind}'.encode()) % (2 * len(_TEMPLATES))
  phrase = f' {condition.phrase}' if i < len(_TEMPLATES) else ''
  return _TEMPLATES[i % len(_TEMPLATES)].format(S=d[0].upper() + d[1:], s=d, p=phrase)


def subject_caption(subject: Subject) -> str:
  """'A red striped triangle on a navy background.': a prompt that names the subject only."""
  d = subject.description
  return f'{d[0].upper()}{d[1:]}.'


# ---------------------------------------------------------------------------------- dataset

FPS = 16  # the official recipe's rate: its resampling then keeps every frame


def video_path(subject: Subject, condition: Condition) -> str:
  """Relative to the dataset root, as in vap_data.csv."""
  return f'videos/{condition.kind}/{subject.name}.mp4'


def split_plan(subjects=SUBJECTS, conditions=CONDITIONS, *, seed: int = 0,
               held_out_subjects: int = 4, held_out_pairs: int = 32):
  """(held-out subjects, held-out (subject name, kind) pairs of the other subjects).

  Held-out subjects are drawn until every shape, colour, texture and background still appears
  in training (so each is a new combination of seen parts); the pairs are spread evenly over
  the conditions, so each condition keeps most of its training subjects.
  """
  rng = np.random.default_rng([seed, 0x70f])
  n_train = len(subjects) - held_out_subjects
  if n_train < 3 or held_out_pairs > len(conditions) * (n_train - 2):
    raise ValueError(f'cannot hold out {held_out_subjects} of {len(subjects)} subjects and '
                     f'{held_out_pairs} pairs: each condition needs 2 training subjects left')
  for _ in range(1000):
    perm = rng.permutation(len(subjects))
    held = [subjects[i] for i in sorted(perm[:held_out_subjects])]
    train = [s for s in subjects if s not in held]
    if all({getattr(s, a) for s in train} == {getattr(s, a) for s in subjects}
           for a in ('shape', 'colour', 'texture', 'background')):
      break
  else:
    raise ValueError(f'no {held_out_subjects} subjects can be held out with every part seen')
  pairs = set()
  for i, c in enumerate(conditions):
    count = held_out_pairs // len(conditions) + (i < held_out_pairs % len(conditions))
    for j in rng.choice(len(train), count, replace=False):
      pairs.add((train[j].name, c.kind))
  return held, pairs


def _write_csv(path: Path, rows: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w', newline='', encoding='utf-8') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def write_toy_dataset(root, *, seed: int = 0, frames: int = 17, size: int = 64,
                      subjects=SUBJECTS, conditions=CONDITIONS, held_out_subjects: int = 4,
                      held_out_pairs: int = 32) -> dict:
  """Writes VAP-Toy under `root` in the VAP-Data layout; returns a summary (also root/toy.json).

  vap_data.csv has one row per video: split 'test' for held-out subjects and pairs, else
  'train'; ref_video_paths lists the training videos of the same condition with other
  subjects (the official data pairs videos of one condition); score 100, _valid 1, plus the
  `subject` name. benchmark/benchmark.csv has one row per test video, its reference a training
  video of the same condition, and its first frame as `image_path`. The default split (24
  subjects x 16 conditions, 4 subjects and 32 pairs held out) leaves 288 = 6 x 48 training
  rows, so the official cut to a multiple of 48 keeps them all. `seed` picks the split and the
  benchmark references; the videos depend only on (subject, condition, frames, size).
  """
  if frames < 1 or size < 16 or size % 2:
    raise ValueError(f'frames >= 1 and an even size >= 16 expected, got {frames=} {size=}')
  start = time.perf_counter()
  root = Path(root)
  held, held_pairs = split_plan(subjects, conditions, seed=seed,
                                held_out_subjects=held_out_subjects, held_out_pairs=held_out_pairs)
  held_names = {s.name for s in held}

  def is_test(s, c):
    return s.name in held_names or (s.name, c.kind) in held_pairs

  rows, bench = [], []
  rng = np.random.default_rng([seed, 0xbe7c])
  for c in conditions:
    train = [s for s in subjects if not is_test(s, c)]
    for s in subjects:
      video_io.write_mp4(root / video_path(s, c), render(s, c, frames=frames, size=size), FPS)
      refs = [video_path(o, c) for o in train if o != s]
      rows.append(dict(video_paths=video_path(s, c), ref_video_paths=json.dumps(refs),
                       tar_video_caption=caption(s, c), kind=c.kind,
                       split='test' if is_test(s, c) else 'train', reference_alignment_score=100,
                       _valid=1, subject=s.name))
      if is_test(s, c):
        ref = train[int(rng.integers(len(train)))]
        bench.append(dict(video_paths=video_path(s, c), ref_video_path=video_path(ref, c),
                          tar_video_caption=caption(s, c), ref_video_caption=caption(ref, c),
                          image_path=f'images/{s.name}.png', subject=s.name, kind=c.kind,
                          ref_subject=ref.name))
  for s in subjects:  # the reference images: frame 0 of every video of the subject
    video_io.write_png_strip(root / 'images' / f'{s.name}.png', first_frame(s, size)[None], 1)
  _write_csv(root / 'vap_data.csv', rows)
  _write_csv(root / 'benchmark' / 'benchmark.csv', bench)
  summary = dict(
      frames=frames, size=size, fps=FPS, seed=seed, videos=len(rows),
      train_rows=sum(r['split'] == 'train' for r in rows), test_rows=len(bench),
      subjects=[s.name for s in subjects], kinds=[c.kind for c in conditions],
      held_out_subjects=sorted(held_names), held_out_pairs=sorted(map(list, held_pairs)))
  (root / 'toy.json').write_text(json.dumps(summary, indent=1) + '\n')
  return dict(summary, root=str(root), seconds=round(time.perf_counter() - start, 2))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(
      prog='vap-toy-data', description=__doc__.split('\n\n')[0],
      epilog='Read it with the data settings root=OUT and buckets=[[FRAMES,SIZE,SIZE]], e.g. '
             "vap-precompute ... --data OUT --set 'buckets=[[17,64,64]]'; the rest of the "
             'official recipe (fps 16, evenly, score threshold, cut to a multiple of 48) keeps '
             'every training row of the default split.')
  p.add_argument('--out', required=True, help='dataset root to write (created)')
  p.add_argument('--seed', type=int, default=0, help='picks the held-out split (default 0)')
  p.add_argument('--frames', type=int, default=17, help='frames per video (default 17, 4k+1 '
                 'for the VAEs)')
  p.add_argument('--size', type=int, default=64, help='frame height and width (default 64)')
  p.add_argument('--held-out-subjects', type=int, default=4,
                 help='subjects only in the test split (default 4)')
  p.add_argument('--held-out-pairs', type=int, default=32,
                 help='(subject, condition) pairs of the others in the test split (default 32)')
  args = p.parse_args(argv)
  try:
    s = write_toy_dataset(args.out, seed=args.seed, frames=args.frames, size=args.size,
                          held_out_subjects=args.held_out_subjects,
                          held_out_pairs=args.held_out_pairs)
  except ValueError as e:
    p.error(str(e))
  print(f'{s["videos"]} videos of {s["frames"]}x{s["size"]}x{s["size"]} '
        f'({s["train_rows"]} train rows, {s["test_rows"]} test/benchmark rows) '
        f'written to {s["root"]} in {s["seconds"]:.1f} s')


if __name__ == '__main__':
  main()
