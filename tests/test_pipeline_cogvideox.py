"""CogVideoX VAP pipeline against the official pipeline run (golden/cogvideox_pipeline), stage by
stage, with the official random draws injected."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import DATA, assert_close
from vap_jax.pipelines import CogVideoXVAPPipeline

GOLDEN = DATA / 'cogvideox_pipeline'


@pytest.fixture(scope='module')
def pipe():
  return CogVideoXVAPPipeline.from_pretrained(GOLDEN / 'components', dtype='float32')


@pytest.fixture(scope='module')
def golden():
  return {name: load_file(GOLDEN / f'{name}.safetensors')
          for name in ('inputs', 'text', 'vae_encode', 'latents', 'denoise', 'output')}


def test_prompt_embeddings(pipe, golden):
  kw = json.loads((GOLDEN / 'call.json').read_text())['kwargs']
  text = golden['text']
  ids, _ = pipe.tokenizer([kw['prompt']], 8)
  np.testing.assert_array_equal(ids, text['prompt.input_ids'])
  embeds, ref_embeds = pipe.encode_prompts(kw['prompt'], kw['prompt_mot_ref'],
                                           kw['negative_prompt'], kw['negative_prompt_mot_ref'], 8)
  assert_close(embeds, text['prompt_embeds_cfg'], what='prompt embeds')
  assert_close(ref_embeds, text['prompt_embeds_mot_ref_cfg'], what='ref prompt embeds')


def test_vae_posteriors(pipe, golden):
  enc = golden['vae_encode']
  for name in ('image', 'ref_video0', 'ref_first_frame0'):
    posterior = pipe._encode(jnp.asarray(enc[f'{name}.vae_input']))
    mean, logvar = np.split(enc[f'{name}.posterior_params'], 2, axis=1)
    assert_close(posterior.mean, mean, what=f'{name} mean')
    assert_close(posterior.logvar, np.clip(logvar, -30, 20), what=f'{name} logvar')


def _noise(golden):
  enc = golden['vae_encode']
  return dict(latents=golden['latents']['initial_noise'], image=enc['image.posterior_noise'],
              ref_video=[enc['ref_video0.posterior_noise']],
              ref_image=[enc['ref_first_frame0.posterior_noise']])


def test_end_to_end_matches_official(pipe, golden):
  kw = json.loads((GOLDEN / 'call.json').read_text())['kwargs']
  inputs, denoise, out = golden['inputs'], golden['denoise'], golden['output']
  steps = []
  result = pipe(inputs['image'], list(inputs['ref_videos']), kw['prompt'], kw['prompt_mot_ref'],
                negative_prompt=kw['negative_prompt'],
                negative_ref_prompt=kw['negative_prompt_mot_ref'], height=64, width=96,
                num_frames=9, num_inference_steps=4, guidance_scale=6.0, use_dynamic_cfg=True,
                max_sequence_length=8, noise=_noise(golden), progress=False,
                on_step=lambda i, x: steps.append(np.asarray(x)))
  np.testing.assert_array_equal(np.asarray(pipe.scheduler.set_timesteps(4).timesteps),
                                denoise['timesteps'])
  for i, latents in enumerate(steps):
    assert_close(latents, denoise[f'step{i}.latents_out'], atol=1e-4, rtol=1e-4,
                 what=f'latents after step {i}')
  assert_close(result.latents, out['final_latents'], atol=1e-4, rtol=1e-4, what='final latents')
  assert_close(result.video[None], out['frames'], atol=1e-4, rtol=1e-4, what='frames')
  expected_uint8 = np.round(out['frames'][0] * 255)
  assert np.abs(result.frames.astype(np.float64) - expected_uint8).max() <= 1
  assert result.ref_frames.shape == (1, 9, 64, 96, 3)


def test_conditioning_latents(pipe, golden):
  import jax
  lat = pipe.encode_latents(golden['inputs']['image'],
                            [golden['inputs']['ref_videos'][0][[0, 1, 3, 4, 6, 7, 9, 10, 12]]],
                            9, jax.random.key(0), _noise(golden))
  expected = golden['latents']
  for mine, theirs in (('latents', 'initial_noise'), ('image', 'image_latents'),
                       ('ref', 'ref_video_latents'), ('ref_image', 'ref_video_image_latents')):
    assert_close(lat[mine], expected[theirs], what=theirs)


def test_denoising_step_compiles_once(pipe, golden):
  """All steps share one executable (a traced step index; latents placed where steps put them)."""
  import logging
  import jax
  records = []
  handler = logging.Handler()
  handler.emit = lambda record: records.append(record.getMessage())
  logger = logging.getLogger('jax._src.interpreters.pxla')
  logger.addHandler(handler)
  jax.config.update('jax_log_compiles', True)
  try:
    pipe(golden['inputs']['image'], list(golden['inputs']['ref_videos']), 'a', ['b'], height=64,
         width=96, num_frames=9, num_inference_steps=5, seed=1, progress=False)
  finally:
    jax.config.update('jax_log_compiles', False)
    logger.removeHandler(handler)
  assert sum('jit(_step)' in r for r in records) <= 1  # 0 if an earlier test compiled it


def test_two_references(pipe, golden):
  """Several references: each is encoded on its own and concatenated along frames / text."""
  video = golden['inputs']['ref_videos'][0]
  two = pipe(golden['inputs']['image'], [video, video[::-1]], 'a', ['b', 'c'], height=64, width=96,
             num_frames=9, num_inference_steps=1, progress=False)
  assert two.ref_frames.shape == (2, 9, 64, 96, 3) and two.frames.shape == (9, 64, 96, 3)
  assert np.isfinite(two.video).all()


def test_reference_guidance_guides_from_the_base_alone(pipe, golden):
  """With ``reference_guidance`` the negative half reads no reference: one step's latents are
  then (affine in the model output) neg_without + g (pos_with - neg_without), each half taken
  from a plain run at guidance 0 (no references) or 1 (the references)."""
  image, video = golden['inputs']['image'], golden['inputs']['ref_videos'][0]
  run = lambda refs, prompts, g, **kw: pipe(
      image, refs, 'a', prompts, negative_prompt='n', negative_ref_prompt='m', height=64,
      width=96, num_frames=9, num_inference_steps=1, guidance_scale=g, use_dynamic_cfg=False,
      progress=False, **kw).latents
  negative, positive = run([], [], 0.0), run([video], ['b'], 1.0)
  guided = run([video], ['b'], 3.0, reference_guidance=True)
  assert_close(guided, negative + 3.0 * (positive - negative), atol=1e-5, what='guided latents')
  assert np.abs(guided - run([video], ['b'], 3.0)).max() > 1e-3  # not the official CFG


def test_guidance_interval_leaves_the_low_timesteps_unguided(pipe, golden):
  """``guidance_min_timestep`` above every timestep: each step takes the positive half alone,
  as guidance 1 does; at 0 (the default) every step is guided."""
  image, video = golden['inputs']['image'], golden['inputs']['ref_videos'][0]
  run = lambda g, **kw: pipe(
      image, [video], 'a', ['b'], height=64, width=96, num_frames=9, num_inference_steps=2,
      guidance_scale=g, use_dynamic_cfg=False, reference_guidance=True, progress=False,
      **kw).latents
  unguided = run(3.0, guidance_min_timestep=1000)
  assert_close(unguided, run(1.0), atol=1e-6, what='latents with guidance off at every step')
  assert_close(run(3.0, guidance_min_timestep=0), run(3.0), what='the default')
  assert np.abs(unguided - run(3.0)).max() > 1e-3


def test_guidance_interval_schedule():
  from vap_jax.pipelines.common import guidance_interval
  scales = guidance_interval(np.array([4.0, 4.0, 4.0, 4.0]), np.array([999, 749, 499, 249]), 500)
  np.testing.assert_array_equal(scales, [4.0, 4.0, 1.0, 1.0])
  np.testing.assert_array_equal(guidance_interval(scales, [999, 749, 499, 249], 0), scales)


@pytest.mark.parametrize('mesh_shape,context_parallel', [
    ({'fsdp': 2, 'context': 2, 'tensor': 2}, 'gspmd'),
    ({'data': 2, 'context': 4}, 'allgather'),  # CFG halves over data x sequence over context
])
def test_sharded_pipeline_equals_one_device(pipe, golden, mesh_shape, context_parallel):
  """The whole pipeline on an 8-device mesh (weights and activations sharded) gives the frames of
  one device."""
  from vap_jax.parallel import make_mesh
  kw = dict(height=64, width=96, num_frames=9, num_inference_steps=1, noise=_noise(golden),
            progress=False)
  args = (golden['inputs']['image'], list(golden['inputs']['ref_videos']), 'a', ['b'])
  sharded = CogVideoXVAPPipeline.from_pretrained(
      GOLDEN / 'components', dtype='float32', mesh=make_mesh(mesh_shape),
      context_parallel=context_parallel)
  assert_close(sharded(*args, **kw).video, pipe(*args, **kw).video, atol=1e-5, what='frames')


def _replica_groups(line: str) -> list[list[int]]:
  """The device groups of one collective in compiled HLO text (explicit or iota form; a
  collective-permute's source/target pairs)."""
  m = re.search(r'source_target_pairs=\{([^=]*?)\}(,|$| )', line)
  if m:
    return [list(map(int, p.split(','))) for p in re.findall(r'\{(\d+,\d+)\}', m.group(0))]
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](T\(([\d,]+)\))?', line)
  if m:
    dims = [int(d) for d in m.group(3).split(',')]
    ids = np.arange(np.prod(dims)).reshape(dims)
    if m.group(5):
      ids = ids.transpose([int(p) for p in m.group(5).split(',')])
    return ids.reshape(int(m.group(1)), int(m.group(2))).tolist()
  m = re.search(r'replica_groups=\{(.*?)\}\}', line)
  if m:
    return [list(map(int, g.split(','))) for g in re.findall(r'\{([\d,]+)', m.group(0))]
  return []


def test_cfg_halves_exchange_only_the_guidance(golden):
  """CFG halves over data=2, the sequence over context=4 (all-gather K/V): in the compiled
  denoising step no collective inside the transformer's loops joins devices of the two halves;
  the only ones that do come after it, on the model output, for the guidance combination."""
  from vap_jax.parallel import make_mesh
  pipe = CogVideoXVAPPipeline.from_pretrained(
      GOLDEN / 'components', dtype='float32', mesh=make_mesh({'data': 2, 'context': 4}),
      context_parallel='allgather')
  calls = []  # the step's arguments, as shapes (it donates its state)
  step = pipe._step
  spec = lambda a: (jax.ShapeDtypeStruct(  # mesh-placed as called; the rest left to jit
      a.shape, a.dtype, sharding=a.sharding if len(a.sharding.device_set) > 1 else None)
      if isinstance(a, jax.Array) else a)
  pipe._step = lambda *args: calls.append(jax.tree.map(spec, args)) or step(*args)
  pipe(golden['inputs']['image'], list(golden['inputs']['ref_videos']), 'a', ['b'], height=64,
       width=96, num_frames=9, num_inference_steps=1, noise=_noise(golden), progress=False)
  hlo = step.lower(*calls[0]).compile().as_text()
  half = lambda device: device // 4  # mesh devices in order: data major
  crossing, in_loops, entry = [], 0, False
  for line in hlo.splitlines():
    if line.startswith(('%', 'ENTRY')):  # a computation begins: loop bodies are not the entry
      entry = line.startswith('ENTRY')
    if re.search(r'= \S+ (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)'
                 r'(-start)?\(', line):
      in_loops += not entry
      if any(len({half(d) for d in g}) > 1 for g in _replica_groups(line)):
        crossing.append((entry, line.split('=')[1].split('{')[0].strip()))
  assert in_loops  # the K/V gathers of the blocks, within each half
  assert crossing and all(at_entry for at_entry, _ in crossing), crossing
  latent = np.prod(calls[0][0].shape)  # (1, F', C, h, w): one half's model output
  for _, shape in crossing:
    size = np.prod([int(d) for d in re.findall(r'\d+', shape.split('[')[1])])
    assert size <= 2 * latent, shape
