"""The benchmark harnesses run end to end on CPU with tiny configs (so they do not rot)."""
import json

import pytest

from benchmarks import step


@pytest.mark.parametrize('model,attention,with_torch', [
    ('cogvideox-tiny', 'xla', False),
    ('cogvideox-tiny-base', 'xla', True),
    ('wan-tiny', 'xla', False),
])
def test_step_harness_reports_every_figure(model, attention, with_torch, capsys):
  rows = step.run(model, attention=attention, repeats=1, warmup=0, with_torch=with_torch,
                  peak_size=256)
  assert [r['framework'] for r in rows] == ['jax'] + (['torch'] if with_torch else [])
  for r in rows:
    assert r['seconds'] > 0 and r['model_tflops_per_step'] > 0 and r['peak_tflops_measured'] > 0
    assert r['achieved_tflops'] == pytest.approx(r['model_tflops_per_step'] / r['seconds'])
    assert r['mfu'] > 0 and json.loads(json.dumps(r)) == r
    assert model in step.format_row(r)
  assert rows[0]['attention'] == attention and rows[0]['compile_seconds'] > 0


def test_torch_comparison_refuses_the_expert_model():
  with pytest.raises(ValueError, match='base models'):
    step.run('cogvideox-tiny', repeats=1, warmup=0, with_torch=True, peak_size=128)


def test_aot_memory_analysis_on_fake_devices():
  from benchmarks import aot
  one = aot.analyze('wan-tiny', {'fsdp': 1}, attention='blockwise')
  eight = aot.analyze('wan-tiny', {'fsdp': 2, 'tensor': 4}, attention='blockwise')
  assert one['devices'] == 1 and eight['devices'] == 8
  for r in (one, eight):
    assert r['argument_bytes'] > 0 and r['per_device_bytes'] >= r['argument_bytes']
  # Weights are sharded 8 ways: each device holds well under half of the one-device arguments.
  assert eight['argument_bytes'] < 0.5 * one['argument_bytes']
  train = aot.analyze('wan-tiny', {'fsdp': 2}, train=True, remat='full')  # the real train step
  assert train['train'] and train['temp_bytes'] > 0 and train['alias_bytes'] > 0
  dpo = aot.analyze('cogvideox-tiny', {'fsdp': 2}, train='dpo', remat='full')  # LoRA + DPO
  assert dpo['train'] == 'dpo' and dpo['batch'] == 2 and dpo['temp_bytes'] > 0


def test_generate_harness_times_a_whole_video(tmp_path):
  from benchmarks import generate
  from tiny_checkpoint import write_tiny_checkpoint
  write_tiny_checkpoint(tmp_path / 'cog', 'cogvideox')
  row = generate.run(str(tmp_path / 'cog'), steps=2, frames=9, height=64, width=96,
                     dtype='float32')
  assert row['family'] == 'cogvideox' and row['steps'] == 2
  assert 0 < row['step_seconds'] <= row['denoise_seconds'] < row['video_seconds']
  assert row['video_seconds_cold'] > 0 and json.loads(json.dumps(row)) == row
  assert '2 steps' in generate.format_row(row)


def test_checksum_cost_harness():
  from benchmarks import checksums
  row = checksums.run(width=128, layers=2, repeat=1)
  assert row['files'] > 0 and row['state_mb'] > 0
  for key in ('convert_seconds', 'record_seconds', 'full_check_seconds', 'restore_seconds'):
    assert row[key] > 0, key


def test_scaling_harness_runs_each_layout():
  from benchmarks import scaling
  rows = scaling.main(['--model', 'cogvideox-tiny', '--devices', '1,8', '--repeats', '1',
                       '--attention', 'xla', '--layouts', 'fsdp,cfg_allgather,fsdp_tensor'])
  assert [(r['devices'], r['layout']) for r in rows] == [
      (1, 'one device'), (8, 'fsdp'), (8, 'cfg_allgather'), (8, 'fsdp_tensor')]
  assert all(r['seconds'] > 0 and r['speedup'] > 0 for r in rows)


def test_scaling_harness_times_whole_videos():
  """``--video``: whole videos of a checkpoint per layout, and the offloaded one-device row."""
  from benchmarks import scaling
  from conftest import DATA
  rows = scaling.main(['--video', str(DATA / 'cogvideox_pipeline' / 'components'), '--devices',
                       '1,8', '--layouts', 'cfg_allgather', '--offload', '--steps', '2',
                       '--frames', '9', '--height', '64', '--width', '96', '--attention', 'xla'])
  assert [(r['devices'], r['layout']) for r in rows] == [
      (1, 'one device'), (1, 'one device, offload'), (8, 'cfg_allgather')]
  assert all(r['seconds'] > 0 and r['step_seconds'] > 0 and r['speedup'] > 0 for r in rows)
