"""Video io against the official frame recipe (finetrainers dataset.py + functional/video.py).

The reference below is the official sequence written with torch: `x.float()/127.5-1`, int fps,
`get_resample_indices`, `find_nearest_video_resolution`, `torch.linspace(...).long()` and
`F.interpolate(mode='bicubic', align_corners=False)`. Frames come from the same PyAV decode (the
official code decodes with decord/torchvision, both FFmpeg). Tolerance for pixels: 1e-5 absolute
on the [-1, 1] scale (1/800 of one uint8 level); measured max 5.4e-6 (float32 summation order).
"""
import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fixtures_vap_data import BUCKETS, encode, make_vap_data, write_cut_mp4, write_trimmed_mp4
from conftest import assert_close
from vap_jax.data import video_io


@pytest.fixture(scope='module')
def vap_root(tmp_path_factory):
  return make_vap_data(tmp_path_factory.mktemp('vap'))


def official_resample_indices(source_fps, target_fps, n):
  if source_fps == target_fps:
    return np.arange(n)
  m = int(n * (target_fps / source_fps))
  if m < 1:
    return np.array([n // 2])
  idx = np.round(np.linspace(0, n - 1, num=m, dtype=float)).astype(int)
  _, first = np.unique(idx, return_index=True)
  return idx[np.sort(first)]


def official_bucket(video, buckets):
  num_frames, _, height, width = video.shape
  possible = [b for b in buckets if b[0] <= num_frames]
  best = (max(possible, key=lambda b: b[0]) if possible
          else min(buckets, key=lambda b: abs(b[0] - num_frames)))
  same = [b for b in buckets if b[0] == best[0]]
  return min(same, key=lambda b: (abs(b[2] / b[1] - width / height), (-b[1], -b[2])))


def official_clip(frames_uint8, fps, buckets):
  video = torch.from_numpy(frames_uint8).permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1.0
  fps = int(fps)
  if fps != 16:
    video = video[official_resample_indices(fps, 16, len(video))]
  t, h, w = official_bucket(video, buckets)
  indices = torch.linspace(0, video.shape[0] - 1, t).long()
  video = F.interpolate(video[indices], size=(h, w), mode='bicubic', align_corners=False)
  return video.permute(0, 2, 3, 1).numpy(), indices.numpy()


def test_evenly_indices_equal_torch_linspace_long():
  for n in (9, 13, 49, 81):
    for total in range(n, n + 700, 7):
      ours = video_io.select_frames(total, n, 'evenly')
      ref = torch.linspace(0, total - 1, n).long().numpy()
      np.testing.assert_array_equal(ours, ref, err_msg=f'{total} -> {n}')


def test_other_selections_and_resample():
  np.testing.assert_array_equal(video_io.select_frames(20, 5, 'first'), np.arange(5))
  a = video_io.select_frames(20, 5, 'random', np.random.default_rng(3))
  b = video_io.select_frames(20, 5, 'random', np.random.default_rng(3))
  np.testing.assert_array_equal(a, b)
  assert np.all(np.diff(a) == 1) and 0 <= a[0] <= 15
  with pytest.raises(ValueError, match='need 5 frames'):
    video_io.select_frames(4, 5)
  for src, n in [(24, 30), (30, 100), (8, 20), (25, 49), (60, 7), (120, 3)]:
    np.testing.assert_array_equal(video_io.resample_indices(src, 16, n),
                                  official_resample_indices(src, 16, n))
  assert len(video_io.resample_indices(30, 16, 300)) == 160


@pytest.mark.parametrize('size', [(48, 72), (20, 28), (17, 91), (32, 48)])
@pytest.mark.parametrize('mode', ['bicubic', 'bilinear'])
def test_resize_equals_torch_interpolate(size, mode):
  x = np.random.default_rng(0).uniform(-1, 1, (3, 32, 48, 3)).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode=mode,
                      align_corners=False).permute(0, 2, 3, 1).numpy()
  assert_close(video_io.resize(x, size, mode), ref, atol=1e-5, rtol=0, what=f'{mode} {size}')


@pytest.mark.parametrize('buckets', [BUCKETS, [[9, 48, 72], [9, 40, 40], [5, 20, 28]]])
def test_load_clip_equals_official_recipe_on_decoded_files(vap_root, buckets):
  root = vap_root['root']
  for rel in ['vfx_videos/zoom/zoom_1.mp4', 'vfx_videos/zoom/zoom_2.mp4',
              'vfx_videos/melt/melt_1.mp4', 'vfx_videos/orbit/orbit_1.webm',
              'vfx_videos/orbit/orbit_3.gif', 'vfx_videos/style_ink/style_ink_3.mp4']:
    frames, fps = video_io.read_video(root / rel)
    ref, _ = official_clip(frames, fps, buckets)
    n = len(frames) if int(fps) == 16 else len(video_io.resample_indices(int(fps), 16, len(frames)))
    bucket = video_io.nearest_bucket(n, *frames.shape[1:3], buckets)
    ours = video_io.load_clip(root / rel, num_frames=bucket[0], size=bucket[1:])
    assert_close(ours, ref, atol=1e-5, rtol=0, what=rel)


def test_frames_carry_their_index(vap_root):
  """The fixture paints frame i with level 9*i+const: evenly-chosen frames show it."""
  frames, fps = video_io.read_video(vap_root['root'] / 'vfx_videos/zoom/zoom_0.mp4')
  assert fps == 16 and len(frames) == 36
  idx = video_io.select_frames(36, 9)
  blue = frames[idx][..., 2].mean(axis=(1, 2))  # channel 2 = 255 - (9 i + 17 s) mod 200
  np.testing.assert_allclose(blue, 255 - (idx * 9 + 0) % 200, atol=3)


def test_read_errors_name_the_file(vap_root, tmp_path):
  root = vap_root['root']
  for rel, reason in [('vfx_videos/broken/missing.mp4', 'file not found'),
                      ('vfx_videos/broken/garbage.mp4', 'undecodable'),
                      ('vfx_videos/broken/empty.mp4', 'undecodable'),
                      ('vfx_videos/broken/truncated.mp4', 'undecodable')]:
    with pytest.raises(video_io.VideoError, match=reason) as e:
      video_io.read_video(root / rel)
    assert str(root / rel) in str(e.value)
  with pytest.raises(video_io.VideoError, match='too short: 5 frames'):
    video_io.load_clip(root / 'vfx_videos/broken/short.mp4', num_frames=9, size=(24, 32))


def test_write_and_read_back(tmp_path):
  frames = np.stack([np.full((32, 48, 3), 10 + 20 * i, np.uint8) for i in range(6)])
  video_io.write_mp4(tmp_path / 'a.mp4', frames, fps=16)
  back, fps = video_io.read_video(tmp_path / 'a.mp4')
  assert back.shape == frames.shape and fps == 16
  assert np.abs(back.astype(int) - frames).max() <= 3
  video_io.write_mp4(tmp_path / 'odd.mp4', video_io.to_unit_range(frames[:, :31, :47]), fps=8)
  assert video_io.read_video(tmp_path / 'odd.mp4')[0].shape == (6, 32, 48, 3)
  video_io.write_gif(tmp_path / 'a.gif', frames, fps=8)
  assert video_io.read_video(tmp_path / 'a.gif')[0].shape == frames.shape
  video_io.write_png_strip(tmp_path / 'strip.png', frames, max_frames=4)
  assert video_io.read_video(tmp_path / 'strip.png')[0].shape == (1, 32, 4 * 48, 3)
  folder = tmp_path / 'frames'
  folder.mkdir()
  for i, f in enumerate(frames):
    video_io.write_png_strip(folder / f'{i:03d}.png', f[None], max_frames=1)
  back, fps = video_io.read_video(folder, image_folder_fps=8)
  np.testing.assert_array_equal(back, frames)
  assert fps == 8


def test_mp4_writer_is_deterministic(tmp_path):
  """The same frames encode to the same bytes every time. With x264's macroblock tree on (now
  off) these frames gave 4-9 distinct files in every 10 encodes."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:128, :192]
  frames = np.stack([np.clip(((np.sin(xx / 17 + t / 3) + np.cos(yy / 11 - t / 5)) * 60 + 128)[..., None]
                             + rng.normal(0, 8, (128, 192, 3)), 0, 255).astype(np.uint8)
                     for t in range(25)])
  files = set()
  for _ in range(10):
    video_io.write_mp4(tmp_path / 'a.mp4', frames, fps=16)
    files.add((tmp_path / 'a.mp4').read_bytes())
  assert len(files) == 1


def test_nearest_bucket_and_crop_modes():
  buckets = [[49, 480, 720], [49, 480, 832], [25, 240, 360]]
  assert video_io.nearest_bucket(60, 720, 1280, buckets) == (49, 480, 832)
  assert video_io.nearest_bucket(60, 480, 720, buckets) == (49, 480, 720)
  assert video_io.nearest_bucket(30, 480, 720, buckets) == (25, 240, 360)
  assert video_io.nearest_bucket(10, 480, 720, buckets) == (25, 240, 360)
  x = np.random.default_rng(1).uniform(-1, 1, (2, 30, 40, 3)).astype(np.float32)
  np.testing.assert_array_equal(video_io.resize_to(x, (20, 20), 'center_crop'), x[:, 5:25, 10:30])
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(20, 26), mode='bilinear',
                      align_corners=False)[:, :, :, 3:23].permute(0, 2, 3, 1).numpy()
  assert_close(video_io.resize_to(x, (20, 20), 'resize_crop'), ref, atol=1e-5, rtol=0)


def test_single_pass_keeps_only_picked_frames_when_the_count_is_known(vap_root):
  root = vap_root['root']
  pick = lambda n, fps, h, w: video_io.clip_indices(n, fps, 9)  # noqa: E731
  for rel, planned in [('vfx_videos/zoom/zoom_1.mp4', True),
                       ('vfx_videos/orbit/orbit_1.webm', False)]:
    frames, fps, picked = video_io._decode_container(root / rel, pick=pick)
    assert picked == planned, rel
    all_frames, _ = video_io.read_video(root / rel)
    np.testing.assert_array_equal(video_io.read_video(root / rel, pick=pick)[0],
                                  all_frames[pick(len(all_frames), fps, 0, 0)])


def test_truncated_mp4_is_an_error_not_a_shorter_clip(tmp_path):
  """Issue 20: 200 frames, index first, cut at 75% of the bytes. Frame-threaded FFmpeg decodes
  147 frames of it without an error; it must not become a 147-frame clip."""
  path = write_cut_mp4(tmp_path / 't.mp4')
  with av.open(str(path)) as c:
    assert c.streams.video[0].frames == 200
  expected = r't.mp4: truncated: \d+ bytes, its index needs \d+'
  with pytest.raises(video_io.VideoError, match=expected) as e:
    video_io.read_video(path)
  assert e.value.path == str(path)
  with pytest.raises(video_io.VideoError, match=expected):
    video_io.load_clip(path, num_frames=49, size=(48, 64))
  with pytest.raises(video_io.VideoError, match=expected):
    video_io.read_video(path, max_frames=1)  # even when only a prefix is wanted


CONTAINERS = {  # extension: (codec, pix_fmt, muxer options)
    'mp4': ('libx264', 'yuv420p', {'movflags': '+faststart'}),
    'mov': ('libx264', 'yuv420p', {'movflags': '+faststart'}),
    'mkv': ('libx264', 'yuv420p', {}),
    'webm': ('libvpx-vp9', 'yuv420p', {}),
    'avi': ('mpeg4', 'yuv420p', {}),
    'flv': ('libx264', 'yuv420p', {}),
    'ts': ('libx264', 'yuv420p', {}),
}


@pytest.mark.parametrize('ext', CONTAINERS)
def test_cut_files_are_errors_in_every_container(tmp_path, ext):
  """Cut inside a packet and (where the container states its length) exactly between two.

  mp4/mov/mkv/webm/avi: the file is shorter than its container says. FLV: the demuxer flags the
  packet it read in part. MPEG-TS: the file ends inside a 188-byte transport packet, or (cut
  between two of them, inside a frame) the decoder flags the frame it had to conceal."""
  codec, pix_fmt, options = CONTAINERS[ext]
  frames = np.random.default_rng(0).integers(0, 255, (48, 48, 64, 3), np.uint8)
  path = tmp_path / f'v.{ext}'
  encode(path, frames, 24, codec, pix_fmt, options=options)
  assert len(video_io.read_video(path)[0]) == 48
  data = path.read_bytes()
  with av.open(str(path)) as c:
    starts = [p.pos for p in c.demux(c.streams.video[0]) if p.size]
  cuts = {f'{p}%': len(data) * p // 100 for p in (60, 75, 90)}
  if ext not in ('flv', 'ts'):  # these state no length: only a cut inside a packet shows
    cuts['between packets'] = starts[36]
  expected = 'truncated'
  if ext == 'ts':
    cuts['inside a frame, between transport packets'] = starts[36] + 3 * 188
    expected = r'truncated: \d+ bytes end inside a 188-byte packet|corrupt data: frame \d+ decoded'
  for name, at in cuts.items():
    (tmp_path / f'cut.{ext}').write_bytes(data[:at])
    with pytest.raises(video_io.VideoError, match=expected) as e:
      video_io.read_video(tmp_path / f'cut.{ext}')
    assert f'cut.{ext}' in str(e.value), name


def test_header_over_reporting_frames_still_decodes(tmp_path):
  """An intact mp4 whose edit list hides its first 5 of 30 frames: the header says 30, 25
  decode, and a pick planned on 30 is redone on the 25 (not an error)."""
  path = write_trimmed_mp4(tmp_path / 'trimmed.mp4', frames=30, skip=5)
  with av.open(str(path)) as c:
    assert c.streams.video[0].frames == 30
  frames, fps = video_io.read_video(path)
  assert frames.shape == (25, 48, 64, 3) and fps == 24
  np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)), 8 * np.arange(5, 30), atol=2)
  pick = lambda n, fps, h, w: video_io.clip_indices(n, fps, 9)  # noqa: E731
  picked, _, planned = video_io._decode_container(path, pick=pick)
  assert not planned  # the plan on 30 frames was dropped for the decoded 25
  np.testing.assert_array_equal(video_io.read_video(path, pick=pick)[0],
                                frames[pick(25, 24, 0, 0)])
  clip = video_io.load_clip(path, num_frames=9, size=(48, 64))
  assert clip.shape == (9, 48, 64, 3)
