"""DPO: the official preference pairing on the fixture table (rules, stages, weights,
determinism per seed and position), its loader over precomputed latents, and `vap-train` with
task 'dpo' (LoRA adapters on the tiny CogVideoX-VAP: the first loss is log 2 times the pair
weights, only the adapters move, the export loads back)."""
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import config_file
from vap_jax.data.dpo import DPOPairing, OFFICIAL_STAGES, make_dpo_loader
from vap_jax.data.vap_data import read_vap_csv
from vap_jax.train.step import TrainState


@pytest.fixture(scope='module')
def table(tmp_path_factory):
  from fixtures_vap_data import make_vap_data
  root = tmp_path_factory.mktemp('dpo_table')
  make_vap_data(root)
  return root / 'vap_data.csv'


def _pairing(table, **kw):
  rows = [r for r in read_vap_csv(table) if r['reference_alignment_score'] > 0]
  videos = {r['video_paths']: (r['kind'], r['reference_alignment_score']) for r in rows}
  # wide enough stages that every kind of the 28-video fixture makes pairs
  kw.setdefault('stages', ((1, 60, 40), (None, 50, 50)))
  return DPOPairing(videos, num_rows=len(rows), **kw), videos, [r['kind'] for r in rows]


def test_pairs_follow_the_official_rules(table):
  pairing, videos, kinds = _pairing(table, caption_dropout=0.25)
  score = {p: s for p, (_, s) in videos.items()}
  n, made, masked = len(kinds), 0, 0
  for position in range(4 * n):
    kind = kinds[position % n]
    pos_min, neg_max = (60, 40) if position < n else (50, 50)
    assert pairing.stage(position) == (pos_min, neg_max)
    pair = pairing(position, kind)
    same_kind = [p for p, (k, _) in videos.items() if k == kind]
    can_win = [p for p in same_kind if score[p] >= pos_min]
    if pair is None:  # skipped only when a pool is empty
      refs = [p for p in same_kind if score[p] == 100 or 80 < score[p] < 100]
      loses = [p for p in same_kind if score[p] <= neg_max]
      assert not can_win or not loses or len(set(refs)) <= 2
      continue
    made += 1
    masked += pair.caption_masked
    assert {videos[v][0] for v in (pair.win, pair.lose, pair.reference)} == {kind}
    assert score[pair.win] >= pos_min and score[pair.lose] <= neg_max
    assert len({pair.win, pair.lose, pair.reference}) == 3
    hundred = [p for p in same_kind if score[p] == 100 and p not in (pair.win, pair.lose)]
    assert score[pair.reference] == 100 or (not hundred and 80 < score[pair.reference] < 100)
    # the weight: (|s_w - s_l| * 0.02 / sqrt(p_w p_l)), p the frequency of the 10-point bin
    bins = [min(int(s) // 10, 10) for s in score.values()]
    p = lambda v: bins.count(min(int(score[v]) // 10, 10)) / len(bins)
    expected = abs(score[pair.win] - score[pair.lose]) * 0.02 / math.sqrt(p(pair.win) * p(pair.lose))
    assert pair.weight == pytest.approx(expected, rel=1e-12)
  assert made > 2 * n  # most rows make a pair at these stages
  assert 0.1 < masked / made < 0.4
  # the official stages by epoch: two epochs of (90, 10), then (80, 30)
  official = DPOPairing(videos, num_rows=10, stages=OFFICIAL_STAGES)
  assert [official.stage(i) for i in (0, 19, 20, 10**6)] == [(90, 10)] * 2 + [(80, 30)] * 2


def test_pairs_are_deterministic_per_seed_and_position(table):
  a, _, kinds = _pairing(table, seed=7)
  b, _, _ = _pairing(table, seed=7)
  c, _, _ = _pairing(table, seed=8)
  positions = range(3 * len(kinds))
  first = [a(i, kinds[i % len(kinds)]) for i in positions]
  assert first == [b(i, kinds[i % len(kinds)]) for i in reversed(positions)][::-1]
  assert first != [c(i, kinds[i % len(kinds)]) for i in positions]


def test_bad_stages_and_missing_scores(cog_latents, tmp_path):
  with pytest.raises(ValueError, match='last stage'):
    DPOPairing({}, 1, stages=((2, 90, 10),))
  (tmp_path / 't.csv').write_text(
      'video_paths,ref_video_paths,tar_video_caption,kind,split,reference_alignment_score\n'
      'x.mp4,[],c,k,train,50\n')
  with pytest.raises(ValueError, match='no reference_alignment_score'):
    make_dpo_loader(cog_latents, tmp_path / 't.csv', batch_size=1, shard=(0, 1))


def test_loader_gives_pairs_as_rows(cog_latents):
  table = cog_latents.parent / 'vap' / 'vap_data.csv'
  loader = make_dpo_loader(cog_latents, table, batch_size=2, seed=3, shard=(0, 1),
                           stages=((None, 50, 50),), caption_dropout=0.0)
  batch = next(loader)
  assert batch['latents_mean'].shape[0] == 4 and batch['ref_latents_mean'].shape[:2] == (4, 1)
  np.testing.assert_array_equal(batch['index'][0::2] + 1, batch['index'][1::2])
  np.testing.assert_array_equal(batch['dpo_weight'][0::2], batch['dpo_weight'][1::2])
  # win and lose share the reference; they are different videos
  np.testing.assert_array_equal(batch['ref_latents_mean'][0], batch['ref_latents_mean'][1])
  assert not np.array_equal(batch['latents_mean'][0], batch['latents_mean'][1])
  # resumable: the same state gives the same next batch
  state = loader.get_state()
  after = next(loader)
  loader.set_state(state)
  np.testing.assert_array_equal(next(loader)['index'], after['index'])


def test_dpo_run_trains_only_adapters_and_exports(cog_latents, tmp_path):
  from vap_jax.cli.export import main as vap_export
  from vap_jax.nn import lora
  from vap_jax.train.trainer import Trainer
  from vap_jax.weights import lora as lora_files
  from vap_jax.weights.cogvideox import load_cogvideox
  config = config_file('dpo_cogvideox.py:tiny')
  config.data.latents = str(cog_latents)
  config.dpo.table = str(cog_latents.parent / 'vap' / 'vap_data.csv')
  config.steps = 3
  trainer = Trainer(config, tmp_path / 'run')
  assert set(jax.tree.leaves(jax.tree.map(lambda v: type(v).__name__, trainer.state.params,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable)))) == {
      'LoRAParam'}
  frozen = jax.tree.map(np.asarray, trainer.frozen)
  first = next(make_dpo_loader(cog_latents, config.dpo.table, batch_size=4, seed=config.seed,
                               shard=(0, 1), stages=config.dpo.stages,
                               caption_dropout=config.data.caption_dropout))
  summary = trainer.run(progress=False)
  # adapters start at zero: policy = reference, every pair's loss log 2 times its weight
  assert summary['losses'][0] == pytest.approx(math.log(2) * first['dpo_weight'][0::2].mean(),
                                               rel=1e-5)
  assert summary['losses'][-1] != summary['losses'][0]
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(trainer.frozen)):
    np.testing.assert_array_equal(a, b)
  metrics = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').open()]
  assert {'win_loss', 'lose_loss', 'logit', 'preference_accuracy'} <= set(metrics[-1])
  assert vap_export(['--run', str(tmp_path / 'run'), '--dst', str(tmp_path / 'lora')]) == 0
  model = load_cogvideox(config.model.checkpoint, dtype='float32')
  names = lora_files.load(model, tmp_path / 'lora')
  assert len(names) == 4 * (model.config.num_layers + len(model.config.block_idx_with_mot_ref))
  trained = trainer.model()
  for (path, ours), (_, theirs) in zip(lora.adapted(trained), lora.adapted(model)):
    np.testing.assert_allclose(theirs.lora.b[...], ours.lora.b[...], rtol=1e-6, err_msg=str(path))


@pytest.fixture(scope='module')
def dpo_one_device(cog_latents, tmp_path_factory):
  """A DPO batch of 4 pairs, draws, and one step on one device from trained-looking adapters."""
  from vap_jax.train.trainer import Trainer
  config = _tiny(cog_latents, mesh=dict(data=1, fsdp=1, context=1, tensor=1))
  one = Trainer(config, tmp_path_factory.mktemp('dpo_one'), devices=jax.devices()[:1])
  params = jax.tree.map(np.asarray, _nonzero(one.state.params))  # host copies: steps donate
  batch = next(one.loader)
  draws = one.objective.draws(jax.random.key(4), batch)
  state = TrainState(one.state.step, params, one.optimizer.init(params), one.state.rng)
  return (config, params, batch, draws) + one.step(state, one.frozen, one.put(batch), draws)


def _tiny(cog_latents, **changes):
  config = config_file('dpo_cogvideox.py:tiny')
  config.data.latents = str(cog_latents)
  config.dpo.table = str(cog_latents.parent / 'vap' / 'vap_data.csv')
  config.update(changes)
  return config


def _nonzero(params):
  """Adapters as after some training: B no longer zero (so A gets gradients too)."""
  flat = []
  for i, (path, var) in enumerate(nnx.to_flat_state(params)):
    value = np.asarray(var[...])
    if path[-1] == 'b':
      value = 0.05 * np.random.default_rng(i).standard_normal(value.shape).astype(np.float32)
    flat.append((path, var.replace(value=jax.numpy.asarray(value))))
  return nnx.from_flat_state(flat)


@pytest.mark.parametrize('mesh_shape', [dict(data=2, fsdp=4), dict(fsdp=4, tensor=2)])
def test_a_dpo_step_on_a_mesh_equals_one_device(dpo_one_device, tmp_path, mesh_shape):
  from conftest import assert_close
  from vap_jax.train.trainer import Trainer
  config, params, batch, draws, state, metrics = dpo_one_device
  mesh = dict(dict(data=1, fsdp=1, context=1, tensor=1), **mesh_shape)
  many = Trainer(_tiny(Path(config.data.latents), mesh=mesh), tmp_path)
  assert many.mesh.size == 8
  start = TrainState(many.state.step, params, many.optimizer.init(params), many.state.rng)
  state8, metrics8 = many.step(start, many.frozen, many.put(batch), draws)
  for key in ('loss', 'grad_norm'):
    assert_close(metrics8[key], metrics[key], atol=1e-7, rtol=1e-5, what=key)
  # the logit is 125 x a mean of (e - e_ref)(e + e_ref): predictions rounded differently on 8
  # devices (~1e-7 each of e, e_ref ~ 1) move it by up to 125 x 4e-7
  assert_close(metrics8['logit'], metrics['logit'], atol=5e-5, rtol=0, what='logit')
  for (path, a), (_, b) in zip(nnx.to_flat_state(state8.params), nnx.to_flat_state(state.params)):
    assert_close(a[...], b[...], atol=1e-6, rtol=1e-5, what='.'.join(map(str, path)))


def test_cogvideox_lora_sft_run_exports_adapters(cog_latents, tmp_path):
  """task 'lora' through vap-train on the precomputed fixture: adapters on the attention
  projections of the base blocks, written as a diffusers LoRA file."""
  from vap_jax.cli.export import main as vap_export
  from vap_jax.train.trainer import Trainer
  from vap_jax.weights import lora as lora_files
  config = config_file('lora_sft.py:cogvideox_tiny')
  config.data.latents = str(cog_latents)
  config.steps = 2
  summary = Trainer(config, tmp_path / 'run').run(progress=False)
  assert summary['steps'] == 2 and all(np.isfinite(summary['losses']))
  assert vap_export(['--run', str(tmp_path / 'run'), '--dst', str(tmp_path / 'lora')]) == 0
  modules, settings, _ = lora_files.read(tmp_path / 'lora')
  assert settings['r'] == 4 and all('attn1.' in m and '_mot_ref' not in m for m in modules)
