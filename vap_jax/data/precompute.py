"""Precompute VAE latents and encoder outputs for a VAP-Data table into ArrayRecord shards.

What one record holds (per training sample: a target row plus its drawn references, VAP_SPEC
§5.4) and why. The official trainer (finetrainers, `compute_posterior=False` path) stores the
VAE *moments* and draws the posterior sample at every training step; so do we, so the latent
noise still varies per step:

  latents_mean/_logvar            (C, T, h, w)      target video posterior, raw VAE space
  ref_latents_mean/_logvar        (R, C, T, h, w)   each reference video's posterior
  CogVideoX  image_latents_mean/_logvar (C, 1, h, w), ref_image_latents_* (R, C, 1, h, w):
             the first frame encoded as a 1-frame video (training samples it, x scaling_factor,
             zero-pads it to T frames).
  Wan        condition (C, T, h, w), ref_condition (R, C, T, h, w): [first frame, zeros] encoded,
             mode, normalised (z - latents_mean) / latents_std (training uses the mode);
             clip, ref_clip (257, D): CLIP penultimate hidden state of the first frame, fed
             as the inference pipeline does (uint8 frame -> CLIPImageProcessor's PIL path). The
             official trainer first min-max rescales each pixel across its three channels
             (`FF.normalize(image, 0, 1, dim=1)`), which distorts colours; not copied.
  text, ref_text                  (L, D), (R, L, D): T5 embeddings of the target caption and of
             each reference's caption. CogVideoX: L = text_max_length (226), no mask, padding
             embeddings kept. Wan: trimmed to the true length (`text_length`, `ref_text_length`);
             the reader zero-pads them back to text_max_length (512), = the pipeline's output.
  metadata   index (global sample index), row (position in the pair table), draw, csv_line,
             path, ref_paths, ref_mask, kind, ref_kinds, caption, ref_captions, caption_masked,
             fps, ref_fps (source), frame_indices, ref_frame_indices (into the decoded video),
             shape (frames, height, width).

Raw (unscaled, unnormalised) moments keep one code path for both families; the scaling factor /
latents_mean / latents_std sit in `precompute.json`, and `vap_jax.conditioning.cogvideox_latents`
/ `wan_latents` turn a batch into DiT inputs as the official trainer does. The empty-caption
embedding (caption dropout at train time) is `empty_text.msgpack`.

Layout of the output folder:
  precompute.json                      settings (checked on rerun), VAE statistics, shapes, the
                                       table rows dropped as bad (`dropped_rows`)
  empty_text.msgpack                   the '' caption embedding (same record format)
  shard-00000-of-00008.array_record    records in index order (see `records.py` for the bytes)
  shard-00000-of-00008.json            written (atomically) only once its shard is complete;
                                       lists each record's (path, kind) under `videos`

Sample i (i < draws * rows; row i % rows, pairing seeded by i) lives in shard
i // samples_per_shard; shard s belongs to process s % process_count. A rerun skips shards whose
manifest exists and matches its file, and redoes the others from scratch. Undecodable videos
(missing, cut short, corrupt, too short) are skipped, counted and listed in the shard manifests
(`failed`; a bad reference replaced by another of its kind under `replaced`).
Every process works on its own local devices (a mesh over `jax.local_devices()`), with no
collectives, so processes never wait for each other and may finish at different times.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from vap_jax import conditioning
from vap_jax.data import video_io
from vap_jax.data.pipeline import (DecodeSample, FailureCounter, _absl_flags_parsed,
                                   pairing_config, read_table)
from vap_jax.data.records import (EMPTY_TEXT_FILE, FORMAT, INFO_FILE, encode_record,
                                  shard_complete, shard_name)
from vap_jax.data.vap_data import build_pair_table

log = logging.getLogger(__name__)

FAMILIES = ('cogvideox', 'wan')
# Data settings that change what a record holds; a rerun must use the same ones.
DATA_KEYS = ('meta_csv', 'fps', 'buckets', 'frames_selection', 'resize_mode',
             'sample_ref_videos_num', 'mask_ref_ratio', 'mask_caption_ratio',
             'alignment_score_threshold', 'remove_llm_prefixes', 'truncate_multiple',
             'max_samples', 'seed')


@dataclasses.dataclass(frozen=True)
class PrecomputeConfig:
  """How to precompute. `model` is a diffusers pipeline folder (vae/, text_encoder/, tokenizer/,
  and for Wan image_encoder/, image_processor/); the per-component fields override it (e.g. a
  converted Orbax folder)."""
  family: str                        # 'cogvideox' or 'wan'
  model: str
  out: str
  samples_per_shard: int = 256
  batch_per_device: int = 1
  draws: int = 1                     # pairing draws per row (each one record)
  text_max_length: int | None = None  # default 226 (CogVideoX) / 512 (Wan)
  store_dtype: str = 'bfloat16'
  vae_dtype: str = 'float32'
  text_dtype: str = 'bfloat16'
  image_dtype: str = 'float32'
  vae_tiled: bool = False
  mesh: dict = dataclasses.field(default_factory=lambda: {'data': -1})  # over local devices
  writer_options: str = 'group_size:1'
  max_shards: int | None = None      # stop after this many shards in this run (per process)
  vae: str | None = None
  text_encoder: str | None = None
  tokenizer: str | None = None
  image_encoder: str | None = None

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f'family {self.family!r}: expected one of {FAMILIES}')
    for name in ('samples_per_shard', 'batch_per_device', 'draws'):
      if int(getattr(self, name)) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')

  def settings(self) -> dict:
    """What a rerun into the same folder must not change."""
    return dict(family=self.family, samples_per_shard=self.samples_per_shard, draws=self.draws,
                text_max_length=self.max_length, store_dtype=self.store_dtype,
                vae_dtype=self.vae_dtype, text_dtype=self.text_dtype,
                image_dtype=self.image_dtype, vae_tiled=self.vae_tiled)

  @property
  def max_length(self) -> int:
    from vap_jax.text import COGVIDEOX_MAX_LENGTH, WAN_MAX_LENGTH
    if self.text_max_length:
      return int(self.text_max_length)
    return COGVIDEOX_MAX_LENGTH if self.family == 'cogvideox' else WAN_MAX_LENGTH


def _dtype(name: str):
  return jnp.bfloat16 if name == 'bfloat16' else jnp.dtype(name)


# ------------------------------------------------------------------------------------- encoders


def read_image_processor(folder, image_size: int) -> dict:
  """`clip.preprocess` arguments from `image_processor/preprocessor_config.json` (or one in
  ``folder`` itself), else the CLIP defaults at the encoder's image size."""
  from vap_jax.weights.checkpoint import clip_preprocess_kwargs
  folder = Path(folder)
  for file in (folder / 'image_processor' / 'preprocessor_config.json',
               folder / 'preprocessor_config.json'):
    if file.is_file():
      return clip_preprocess_kwargs(json.loads(file.read_text()))
  log.warning('no preprocessor_config.json in %s: CLIP defaults at %d px', folder, image_size)
  return dict(size=image_size, crop_size=image_size)


class Encoders:
  """The frozen encoders of one family on `mesh` and the batched calls a record needs.

  Inputs are sharded over the mesh's batch axes (rules: `activation_batch`), parameters as the
  loaders place them. The jitted calls live on the instance, so reusing it reuses compilations.
  """

  def __init__(self, cfg: PrecomputeConfig, mesh):
    from vap_jax.text import Tokenizer
    from vap_jax.weights.encoders import load_image_encoder, load_text_encoder
    from vap_jax.weights.vae import load_cogvideox_vae, load_wan_vae
    from vap_jax.parallel import DEFAULT_RULES, logical_to_spec

    self.config, self.mesh, self.family = cfg, mesh, cfg.family
    self.max_length = cfg.max_length
    model = Path(cfg.model)
    start = time.time()
    self.tokenizer = Tokenizer(cfg.tokenizer or model)
    self.text_encoder = load_text_encoder(cfg.text_encoder or model, mesh=mesh,
                                          dtype=cfg.text_dtype)
    load_vae = load_cogvideox_vae if cfg.family == 'cogvideox' else load_wan_vae
    self.vae = load_vae(cfg.vae or model, mesh=mesh, dtype=cfg.vae_dtype)
    self.image_encoder = self.clip_args = None
    if cfg.family == 'wan':
      self.image_encoder = load_image_encoder(cfg.image_encoder or model, mesh=mesh,
                                              dtype=cfg.image_dtype)
      self.clip_args = read_image_processor(model, self.image_encoder.config.image_size)
    log.info('loaded %s encoders in %.1f s', cfg.family, time.time() - start)
    spec = logical_to_spec(('activation_batch',), DEFAULT_RULES, mesh)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    self.batch_sharding = NamedSharding(mesh, PartitionSpec(spec))
    self.batch_multiple = math.prod(mesh.shape[a] for a in axes)
    store, tiled = _dtype(cfg.store_dtype), cfg.vae_tiled

    @nnx.jit
    def posterior(vae, video):  # (N, F, H, W, 3) -> raw mean, logvar (N, C, T, h, w)
      post = vae.encode(jnp.moveaxis(video, -1, 1), tiled=tiled)
      return post.mean.astype(store), post.logvar.astype(store)

    @nnx.jit
    def with_condition(vae, video):  # Wan: the videos and [first frame, zeros] in one batch
      n, x = video.shape[0], jnp.moveaxis(video, -1, 1)
      both = jnp.concatenate([x, conditioning.first_frame_video(x[:, :, 0], x.shape[2])])
      post = vae.encode(both, tiled=tiled)
      condition = vae.normalize_latents(post.mean[n:].astype(jnp.float32))  # the mode
      return post.mean[:n].astype(store), post.logvar[:n].astype(store), condition.astype(store)

    @nnx.jit
    def clip_tokens(encoder, pixels):
      return conditioning.clip_tokens(encoder, pixels).astype(store)

    self._posterior, self._with_condition, self._clip = posterior, with_condition, clip_tokens

  @property
  def vae_info(self) -> dict:
    c = self.vae.config
    if self.family == 'cogvideox':
      return {'scaling_factor': float(c.scaling_factor)}
    return {'latents_mean': list(map(float, c.latents_mean)),
            'latents_std': list(map(float, c.latents_std))}

  def _put(self, array):
    return jax.device_put(np.ascontiguousarray(array), self.batch_sharding)

  def text(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(N, L, D) embeddings in the store dtype and (N,) true token lengths."""
    from vap_jax.parallel import sharding_context
    from vap_jax.text import encode_cogvideox, encode_wan, prompt_clean
    with sharding_context(self.mesh):
      if self.family == 'cogvideox':
        emb = encode_cogvideox(self.tokenizer, self.text_encoder, captions, self.max_length)
        lengths = np.full(len(captions), self.max_length, np.int32)
      else:
        emb = encode_wan(self.tokenizer, self.text_encoder, captions, self.max_length)
        _, mask = self.tokenizer([prompt_clean(c) for c in captions], self.max_length)
        lengths = mask.sum(1).astype(np.int32)
      return np.asarray(emb.astype(_dtype(self.config.store_dtype))), lengths

  def videos(self, clips: np.ndarray) -> dict[str, np.ndarray]:
    """Per clip (N, F, H, W, 3) in [-1, 1] (N a multiple of `batch_multiple`): every latent."""
    from vap_jax.models.clip import preprocess
    from vap_jax.parallel import sharding_context
    with sharding_context(self.mesh):
      x = self._put(clips)
      if self.family == 'cogvideox':
        out = dict(zip(('mean', 'logvar'), self._posterior(self.vae, x)))
        out['image_mean'], out['image_logvar'] = self._posterior(self.vae, x[:, :1])
      else:
        out = dict(zip(('mean', 'logvar', 'condition'), self._with_condition(self.vae, x)))
        pixels = preprocess(video_io.from_unit_range(clips[:, 0]), **self.clip_args)
        out['clip'] = self._clip(self.image_encoder, self._put(pixels))
      return {k: np.asarray(v) for k, v in out.items()}

  def encode(self, samples: list[dict]) -> list[dict]:
    """Decoded samples (`DecodeSample` with metadata) -> records (dicts), one per sample."""
    b = len(samples)
    r = samples[0]['ref_videos'].shape[0]
    clips = np.concatenate([np.stack([s['video'] for s in samples]),
                            np.stack([s['ref_videos'] for s in samples]).reshape(
                                (b * r,) + samples[0]['video'].shape)])
    lat = self.videos(clips)
    captions = [str(s['caption']) for s in samples] + [str(c) for s in samples
                                                       for c in s['ref_captions']]
    text, lengths = self.text(captions)
    wan = self.family == 'wan'
    records = []
    for i, s in enumerate(samples):
      refs = slice(b + i * r, b + (i + 1) * r)
      rec = {k: s[k] for k in ('index', 'csv_line', 'path', 'ref_paths', 'ref_mask', 'kind',
                               'ref_kinds', 'caption', 'ref_captions', 'caption_masked', 'fps',
                               'ref_fps', 'frame_indices', 'ref_frame_indices')}
      rec['shape'] = list(s['video'].shape[:3])
      for key, name in (('mean', 'latents_mean'), ('logvar', 'latents_logvar')):
        rec[name], rec['ref_' + name] = lat[key][i], lat[key][refs]
      if wan:
        rec['condition'], rec['ref_condition'] = lat['condition'][i], lat['condition'][refs]
        rec['clip'], rec['ref_clip'] = lat['clip'][i], lat['clip'][refs]
        n, ref_n = lengths[i], lengths[refs]
        rec['text'], rec['text_length'] = text[i, :n], np.int32(n)
        rec['ref_text'], rec['ref_text_length'] = text[refs, :ref_n.max()], ref_n
      else:
        for key, name in (('image_mean', 'image_latents_mean'),
                          ('image_logvar', 'image_latents_logvar')):
          rec[name], rec['ref_' + name] = lat[key][i], lat[key][refs]
        rec['text'], rec['ref_text'] = text[i], text[refs]
      records.append(rec)
    return records

  def empty_text(self, batch: int | None = None) -> dict:
    """The '' caption's embedding; `batch` (a multiple of `batch_multiple`) picks the batch size
    it is computed at (the one `encode` uses reuses that compilation)."""
    text, lengths = self.text([''] * (batch or self.batch_multiple))
    if self.family == 'wan':
      return {'text': text[0, :lengths[0]], 'text_length': lengths[0]}
    return {'text': text[0]}


# ---------------------------------------------------------------------------------------- shards


def _atomic_write(path: Path, data: bytes) -> None:
  tmp = path.with_name(path.name + f'.tmp{os.getpid()}')
  tmp.write_bytes(data)
  os.replace(tmp, path)


def _plain(data) -> dict:
  return data.to_dict() if hasattr(data, 'to_dict') else dict(data)


def _check_info(out: Path, settings: dict) -> dict | None:
  file = out / INFO_FILE
  if not file.is_file():
    return None
  info = json.loads(file.read_text())
  if info.get('format') != FORMAT:
    raise ValueError(f'{file}: format {info.get("format")!r}, expected {FORMAT!r}')
  old = info['settings']
  diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
  if diff:
    lines = '\n'.join(f'  {k}: {a!r} in the folder, {b!r} now' for k, (a, b) in diff.items())
    raise ValueError(f'{out} holds a precompute made with other settings:\n{lines}\nUse another '
                     f'output folder (or delete this one) to change them.')
  return info


class _ShardWriter:
  """Writes one shard to a temporary file; `finish` renames it and writes the manifest."""

  def __init__(self, out: Path, shard: int, num_shards: int, indices: range, options: str):
    from array_record.python.array_record_module import ArrayRecordWriter
    self.out, self.shard, self.num_shards, self.indices = out, shard, num_shards, indices
    self.name = shard_name(shard, num_shards)
    self.tmp = out / f'{self.name}.array_record.partial'
    self.writer = ArrayRecordWriter(str(self.tmp), options)
    self.count, self.failed, self.replaced, self.start = 0, [], [], time.time()
    self.videos = []  # (path, kind) of each record, for readers that pick records by video

  def write(self, record: dict) -> None:
    self.writer.write(encode_record(record))
    self.videos.append([str(record['path']), str(record['kind'])])
    self.count += 1

  def abort(self) -> None:
    if self.writer.is_open():
      self.writer.close()

  def finish(self, process: int) -> dict:
    self.writer.close()
    final = self.out / f'{self.name}.array_record'
    os.replace(self.tmp, final)
    manifest = dict(shard=self.shard, num_shards=self.num_shards, file=final.name,
                    indices=[self.indices.start, self.indices.stop], num_records=self.count,
                    failed=self.failed, replaced=self.replaced, videos=self.videos,
                    bytes=final.stat().st_size,
                    process=process,
                    seconds=round(time.time() - self.start, 2))
    _atomic_write(self.out / f'{self.name}.json', json.dumps(manifest, indent=1).encode())
    log.info('%s: %d records, %d skipped, %.1f MB, %.1f s', self.name, self.count,
             len(self.failed), manifest['bytes'] / 2**20, manifest['seconds'])
    return manifest


def _restore_failures(counter: FailureCounter, manifests: list[dict]) -> None:
  by_path, reasons = {}, {}
  for m in manifests:
    for f in m['failed']:
      by_path[f['path']] = by_path.get(f['path'], 0) + 1
      reasons[f['path']] = f['reason']
  counter.restore({'seen': sum(m['num_records'] + len(m['failed']) for m in manifests),
                   'failed': sum(len(m['failed']) for m in manifests),
                   'by_path': by_path, 'reasons': reasons})


def precompute(cfg: PrecomputeConfig, data, *, encoders: Encoders | None = None,
               process: tuple[int, int] | None = None, progress: bool = True) -> dict:
  """Runs (or resumes) the precompute of this process's shards; returns a summary.

  `data` is a `configs/vap_data.py` data block (root, pairing, frame recipe, workers, failure
  cap). `process` = (index, count) defaults to (jax.process_index(), jax.process_count()).
  `encoders` may be passed to reuse loaded models and compilations.
  """
  import grain
  from vap_jax.parallel import make_mesh

  data = _plain(data)
  if data.get('mask_caption_ratio') or data.get('mask_ref_ratio'):
    log.warning('mask_caption_ratio=%s / mask_ref_ratio=%s are baked into the records; set them '
                'to 0 and drop captions at train time (latent_source.Dropout)',
                data.get('mask_caption_ratio'), data.get('mask_ref_ratio'))
  out = Path(cfg.out)
  out.mkdir(parents=True, exist_ok=True)
  root = Path(data['root'])
  pairing = pairing_config(types.SimpleNamespace(**data))
  vap_rows, dropped = read_table(root / data['meta_csv'], data)
  table = build_pair_table(vap_rows, pairing)
  rows = table.rows
  total = len(rows) * cfg.draws
  sps = cfg.samples_per_shard
  num_shards = math.ceil(total / sps)
  settings = dict(cfg.settings(), num_samples=total, num_shards=num_shards,
                  data={k: data.get(k) for k in DATA_KEYS})
  settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back
  info = _check_info(out, settings)
  pid, pcount = process if process is not None else (jax.process_index(), jax.process_count())
  mine = [s for s in range(num_shards) if s % pcount == pid]
  finished = {s: m for s in mine if (m := shard_complete(out, s, num_shards))}
  todo = [s for s in mine if s not in finished]
  skipped = sorted(finished)
  if cfg.max_shards is not None:
    todo = todo[:cfg.max_shards]
  counter = FailureCounter(float(data['max_failure_fraction']),
                           int(data['min_samples_before_cap']))
  _restore_failures(counter, list(finished.values()))
  summary = dict(num_shards=num_shards, num_samples=total, process=(pid, pcount),
                 skipped=skipped, written=[], records=0, failed=counter.failed,
                 remaining=[s for s in mine if s not in finished], dropped_rows=len(dropped))
  log.info('process %d/%d: %d of %d shards are mine, %d already done, %d to do now', pid, pcount,
           len(mine), num_shards, len(finished), len(todo))
  if not todo:
    counter.finish()  # the folder's shards as a whole, as at the end of a run
    return summary

  if encoders is None:
    encoders = Encoders(cfg, make_mesh(dict(cfg.mesh), devices=jax.local_devices()))
  if encoders.family != cfg.family:
    raise ValueError(f'encoders are for {encoders.family}, the config asks for {cfg.family}')
  if info is None:
    info = dict(format=FORMAT, settings=settings, vae=encoders.vae_info,
                model=str(Path(cfg.model).resolve()), rows=len(rows),
                created=time.strftime('%Y-%m-%d %H:%M:%S'), dropped_rows=dropped)
    _atomic_write(out / INFO_FILE, json.dumps(info, indent=1).encode())
  batch = cfg.batch_per_device * encoders.batch_multiple
  if not (out / EMPTY_TEXT_FILE).is_file():
    clips = batch * (1 + int(data['sample_ref_videos_num']))  # = the text batch of `encode`
    _atomic_write(out / EMPTY_TEXT_FILE, encode_record(encoders.empty_text(clips)))

  decode = DecodeSample(root, table, pairing, fps=data['fps'], buckets=data['buckets'],
                        frames_selection=data['frames_selection'],
                        resize_mode=data['resize_mode'], output_dtype='float32', metadata=True)
  ranges = {s: range(s * sps, min((s + 1) * sps, total)) for s in todo}
  items = [(i, rows[i % len(rows)]) for s in todo for i in ranges[s]]
  ds = grain.MapDataset.source(items).map(decode).to_iter_dataset(grain.ReadOptions(
      num_threads=int(data.get('read_threads', 1)),
      prefetch_buffer_size=int(data.get('worker_buffer', 2))))
  if data.get('workers', 0) > 0:
    _absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(data['workers']), per_worker_buffer_size=int(data['worker_buffer'])))
  pending: list[dict] = []
  writer: _ShardWriter | None = None

  def flush():
    if not pending:
      return
    padded = pending + [pending[-1]] * (-len(pending) % encoders.batch_multiple)
    for rec in encoders.encode(padded)[:len(pending)]:
      rec['row'] = int(rec['index']) % len(rows)
      rec['draw'] = int(rec['index']) // len(rows)
      writer.write(rec)
    pending.clear()

  def finish():
    flush()
    manifest = writer.finish(pid)
    summary['written'].append(writer.shard)
    summary['records'] += manifest['num_records']

  from tqdm import tqdm
  bar = tqdm(total=len(items), unit='sample', disable=not progress, desc='precompute')
  iterator = iter(ds)
  try:
    for element in iterator:
      shard = int(element['index']) // sps
      if writer is None or writer.shard != shard:
        if writer is not None:
          finish()
        writer = _ShardWriter(out, shard, num_shards, ranges[shard], cfg.writer_options)
      bar.update(1)
      writer.replaced += [{'index': int(element['index']), 'path': path, 'reason': reason}
                          for path, reason in element.get('_replaced', ())]
      if not counter(element):
        writer.failed.append({'index': int(element['index']), 'path': element['_path'],
                              'reason': element['_error']})
        continue
      if pending and pending[0]['video'].shape != element['video'].shape:
        flush()  # another bucket: shapes cannot stack
      pending.append(element)
      if len(pending) == batch:
        flush()
    finish()
  except BaseException:
    if writer is not None:
      writer.abort()  # its .partial file stays; the shard has no manifest, a rerun redoes it
    raise
  finally:
    bar.close()
    if hasattr(iterator, 'close'):
      iterator.close()
  summary['failed'] = counter.failed
  if counter.failed:
    log.warning('%s', counter.report())
  counter.finish()  # all failed, or above max_failure_fraction: whatever the run's length
  remaining = [s for s in mine if shard_complete(out, s, num_shards) is None]
  summary['remaining'] = remaining
  log.info('process %d: wrote %d shards (%d records); %d of mine remain', pid,
           len(summary['written']), summary['records'], len(remaining))
  return summary
