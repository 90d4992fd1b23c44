"""Wan VAP pipeline against the official pipeline run (golden/wan_pipeline), stage by stage, with
the official initial noise injected. The official cond/uncond passes are one batch-2 pass here."""
import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import DATA, assert_close
from vap_jax.pipelines import WanVAPPipeline

GOLDEN = DATA / 'wan_pipeline'
REF_INDICES = [0, 1, 3, 4, 6, 7, 9, 10, 12]


@pytest.fixture(scope='module')
def pipe():
  return WanVAPPipeline.from_pretrained(GOLDEN / 'components', dtype='float32')


@pytest.fixture(scope='module')
def golden():
  names = ('inputs', 'text', 'clip', 'vae_encode', 'latents', 'denoise', 'output',
           'transformer_text_args')
  return {name: load_file(GOLDEN / f'{name}.safetensors') for name in names}


@pytest.fixture(scope='module')
def kwargs():
  return json.loads((GOLDEN / 'call.json').read_text())['kwargs']


def test_prompt_and_image_embeddings(pipe, golden, kwargs):
  args = golden['transformer_text_args']
  text, ref_text = pipe.encode_prompts(kwargs['prompt'], kwargs['prompt_mot_ref'],
                                       kwargs['negative_prompt'], kwargs['negative_prompt_mot_ref'])
  # The CFG batch is [negative, positive], as in the CogVideoX pipeline.
  assert_close(text[1], args['prompt_embeds'][0], what='prompt embeds')
  assert_close(text[0], args['negative_prompt_embeds'][0], what='negative prompt embeds')
  assert_close(ref_text[1], args['prompt_embeds_mot_ref'][0], what='ref prompt embeds')
  assert_close(ref_text[0], args['negative_prompt_embeds_mot_ref'][0], what='negative ref embeds')
  inputs = golden['inputs']
  assert_close(pipe.encode_images([inputs['image']]), golden['clip']['image.image_embeds'],
               what='image CLIP tokens')
  assert_close(pipe.encode_images([inputs['ref_videos'][0][0]]),
               golden['clip']['ref_first_frame0.image_embeds'], what='ref CLIP tokens')


def test_conditioning_latents(pipe, golden):
  inputs, expected = golden['inputs'], golden['latents']
  lat = pipe.encode_latents(inputs['image'], [inputs['ref_videos'][0][REF_INDICES]], 9,
                            jax.random.key(0), dict(latents=expected['initial_noise']))
  for mine, theirs in (('latents', 'initial_noise'), ('condition', 'condition'),
                       ('ref', 'latents_mot_ref'), ('ref_condition', 'condition_mot_ref')):
    assert_close(lat[mine], expected[theirs], what=theirs)


def test_end_to_end_matches_official(pipe, golden, kwargs):
  inputs, denoise, out = golden['inputs'], golden['denoise'], golden['output']
  steps = []
  result = pipe(inputs['image'], list(inputs['ref_videos']), kwargs['prompt'],
                kwargs['prompt_mot_ref'], negative_prompt=kwargs['negative_prompt'],
                negative_ref_prompt=kwargs['negative_prompt_mot_ref'], height=48, width=64,
                num_frames=9, num_inference_steps=4, guidance_scale=5.0,
                noise=dict(latents=golden['latents']['initial_noise']), progress=False,
                on_step=lambda i, x: steps.append(np.asarray(x)))
  np.testing.assert_array_equal(np.asarray(pipe.scheduler.set_timesteps(4).timesteps),
                                denoise['timesteps'])
  assert len(steps) == 4
  for i, latents in enumerate(steps):
    assert_close(latents, denoise[f'step{i}.latents_out'], atol=1e-4, rtol=1e-4,
                 what=f'latents after step {i}')
  assert_close(result.latents, out['final_latents'], atol=1e-4, rtol=1e-4, what='final latents')
  assert_close(result.video[None], out['frames'], atol=1e-4, rtol=1e-4, what='frames')


def test_batched_cfg_equals_two_passes(pipe, golden):
  """The batch-2 [cond, uncond] pass gives the official two separate passes' predictions."""
  d, lat = golden['denoise'], golden['latents']
  model = pipe.transformer
  args = golden['transformer_text_args']
  x = d['step0.transformer_hidden_states']
  t = d['step0.transformer_timestep']
  common = (lat['transformer_encoder_hidden_states_image'],
            lat['transformer_hidden_states_mot_ref'])
  for text, ref_text, key in ((args['prompt_embeds'], args['prompt_embeds_mot_ref'], 'cond'),
                              (args['negative_prompt_embeds'], args['negative_prompt_embeds_mot_ref'],
                               'uncond')):
    out = model(x, t, text, image=common[0], ref_latents=common[1], ref_text=ref_text,
                ref_image=lat['transformer_encoder_hidden_states_image_mot_ref'])
    assert_close(out, d[f'step0.noise_pred_{key}'], what=f'noise_pred_{key}')


def test_two_references(pipe, golden):
  """Several references (the official code asserts one): own caption, CLIP tokens, condition."""
  video = golden['inputs']['ref_videos'][0]
  two = pipe(golden['inputs']['image'], [video, video[::-1]], 'a', ['b', 'c'], height=48, width=64,
             num_frames=9, num_inference_steps=1, progress=False)
  assert two.ref_frames.shape == (2, 9, 48, 64, 3) and two.frames.shape == (9, 48, 64, 3)
  assert np.isfinite(two.video).all()


def test_guidance_interval_leaves_the_low_timesteps_unguided(pipe, golden):
  """``guidance_min_timestep`` above every timestep: each step unguided, as guidance 1 gives."""
  run = lambda g, **kw: pipe(golden['inputs']['image'], [golden['inputs']['ref_videos'][0]],
                             'a', ['b'], height=48, width=64, num_frames=9, num_inference_steps=2,
                             guidance_scale=g, progress=False, **kw).latents
  unguided = run(3.0, guidance_min_timestep=1000)
  assert_close(unguided, run(1.0), atol=1e-6, what='latents with guidance off at every step')
  assert np.abs(unguided - run(3.0)).max() > 1e-3


def test_sharded_pipeline_equals_one_device(pipe, golden):
  """CFG batch over 'data', weights over 'fsdp': same frames as one device."""
  from vap_jax.parallel import make_mesh
  kw = dict(height=48, width=64, num_frames=9, num_inference_steps=1, progress=False,
            noise=dict(latents=golden['latents']['initial_noise']))
  args = (golden['inputs']['image'], list(golden['inputs']['ref_videos']), 'a', ['b'])
  sharded = WanVAPPipeline.from_pretrained(GOLDEN / 'components', dtype='float32',
                                           mesh=make_mesh({'data': 2, 'fsdp': 4}))
  assert_close(sharded(*args, **kw).video, pipe(*args, **kw).video, atol=1e-5, what='frames')
