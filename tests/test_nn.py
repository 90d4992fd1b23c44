"""Shared building blocks against their diffusers/PyTorch definitions."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import assert_close, assert_trig_close
from vap_jax.nn.attention import attention
from vap_jax.nn.embeddings import sincos_3d_table, timestep_features
from vap_jax.nn.rope import apply_rope, cogvideox_rope, cogvideox_rope_angles


@pytest.mark.parametrize('dim', [32, 256, 3072])
def test_timestep_features_equal_diffusers(dim):
  """The phase t*f of frequency f = exp(-ln(1e4) i / half) is off by t f eps per ulp of f, and
  float32 exp is within an ulp or two in PyTorch (its error varies by CPU) while ours is
  correctly rounded: hence a per-frequency bound, not one number."""
  from diffusers.models.embeddings import get_timestep_embedding
  t = np.array([0, 1, 249, 749, 999], np.int64)
  expected = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=True,
                                    downscale_freq_shift=0).numpy()
  half = dim // 2
  phase = t[:, None] * np.exp(-math.log(10000) * np.arange(half) / half)[None]
  assert_trig_close(timestep_features(jnp.asarray(t), dim), expected,
                    np.concatenate([phase, phase], -1), what='timestep features')


def test_sincos_table_equals_diffusers():
  from diffusers.models.embeddings import get_3d_sincos_pos_embed
  expected = get_3d_sincos_pos_embed(64, (6, 4), 3, 1.875, 1.0, output_type='pt').flatten(0, 1)
  actual = sincos_3d_table(64, 4, 6, 3, spatial_scale=1.875, temporal_scale=1.0)
  assert_close(actual, expected.double().numpy(), atol=1e-12, rtol=0)


def test_apply_rope_is_a_complex_rotation_of_adjacent_pairs():
  """The CogVideoX real/interleaved form equals Wan's complex multiply, so one op serves both."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
  angles = rng.uniform(-3, 3, (5, 4))
  table = (np.repeat(np.cos(angles), 2, -1).astype(np.float32),
           np.repeat(np.sin(angles), 2, -1).astype(np.float32))
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles)[None, :, None]
  expected = np.stack([z.real, z.imag], -1).reshape(x.shape)
  assert_close(apply_rope(jnp.asarray(x), table), expected, atol=1e-6)


def test_cogvideox_rope_equals_diffusers_at_real_size():
  from diffusers.models.embeddings import get_3d_rotary_pos_embed
  cos, sin = get_3d_rotary_pos_embed(64, ((0, 0), (30, 45)), (30, 45), 13)
  ours = cogvideox_rope(64, 13, 30, 45, base_h=30, base_w=45)
  angles = cogvideox_rope_angles(64, 13, 30, 45, base_h=30, base_w=45)
  assert np.abs(angles).max() == 44  # the last column at w = 44
  assert_trig_close(ours[0], cos.numpy(), angles, what='cos')
  assert_trig_close(ours[1], sin.numpy(), angles, what='sin')


@pytest.mark.parametrize('num_refs', [1, 3])
def test_reference_rope_has_negative_time_and_target_space(num_refs):
  """n refs of T frames sit at t = -n*T..-1; their spatial rows equal the target's."""
  head_dim, frames = 64, 2
  target = cogvideox_rope(head_dim, frames, 3, 4, base_h=3, base_w=4)
  ref = cogvideox_rope(head_dim, frames, 3, 4, base_h=3, base_w=4, num_refs=num_refs)
  assert ref[0].shape == (num_refs * frames * 12, head_dim)
  t_cols = slice(0, head_dim // 4)
  inv_freq = 1.0 / 10000 ** (np.arange(0, head_dim // 4, 2) / (head_dim // 4))
  for i, t in enumerate(range(-num_refs * frames, 0)):
    np.testing.assert_allclose(ref[0][i * 12, t_cols][::2], np.cos(t * inv_freq), atol=1e-6)
    np.testing.assert_allclose(ref[1][i * 12, t_cols][::2], np.sin(t * inv_freq), atol=1e-6)
  np.testing.assert_array_equal(ref[0][:12, head_dim // 4:], target[0][:12, head_dim // 4:])


def test_attention_equals_naive_softmax_attention():
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, 7, 3, 16)).astype(np.float32) for _ in range(3))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(16)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  expected = np.einsum('bhqk,bkhd->bqhd', weights, v)
  assert_close(attention(q, k, v), expected, atol=1e-6)
  with pytest.raises(ValueError, match='not one of'):
    attention(q, k, v, implementation='flash')
  assert jax.devices()[0].platform == 'cpu'


def test_wan_rope_positions_and_split():
  """Wan: pairs [t | h | w] = [d/2 - 2(d//6) | d//6 | d//6], each axis with its own frequencies;
  n references at t = -n*F..-1."""
  from vap_jax.nn.rope import wan_rope
  head_dim, frames = 128, 2
  cos, sin = wan_rope(head_dim, frames, 3, 4, num_refs=2)
  inv_t = 1.0 / 10000 ** (np.arange(0, 44, 2) / 44)
  inv_h = 1.0 / 10000 ** (np.arange(0, 42, 2) / 42)
  for token, (t, h) in ((0, (-4, 0)), (12 * 3 + 4 + 1, (-1, 1))):
    np.testing.assert_allclose(cos[token, :44:2], np.cos(t * inv_t), atol=1e-6)
    np.testing.assert_allclose(sin[token, 44:86:2], np.sin(h * inv_h), atol=1e-6)


@pytest.mark.parametrize('s_q,s_k', [(37, 37), (64, 100), (5, 300)])
def test_blockwise_attention_equals_xla(s_q, s_k):
  from vap_jax.nn.attention import blockwise_attention
  rng = np.random.default_rng(1)
  q = rng.standard_normal((2, s_q, 3, 16)).astype(np.float32)
  k, v = (3 * rng.standard_normal((2, s_k, 3, 16)).astype(np.float32) for _ in range(2))
  expected = attention(q, k, v)
  assert_close(blockwise_attention(q, k, v, block_q=16, block_k=32), expected, atol=1e-5)
  assert_close(attention(q, k, v, implementation='blockwise'), expected, atol=1e-5)


@pytest.mark.parametrize('s_q,s_k', [(37, 53), (5, 300)])
def test_blockwise_attention_gradient_is_the_exact_gradient(s_q, s_k):
  """The flash-style backward (probabilities recomputed per block) equals autodiff of plain
  softmax attention, for padded query and key blocks alike."""
  from vap_jax.nn.attention import blockwise_attention
  rng = np.random.default_rng(2)
  q = rng.standard_normal((2, s_q, 3, 16)).astype(np.float32)
  k, v = (2 * rng.standard_normal((2, s_k, 3, 16)).astype(np.float32) for _ in range(2))
  w = rng.standard_normal((2, s_q, 3, 16)).astype(np.float32)
  loss = lambda fn: lambda *qkv: jnp.sum(fn(*qkv) * w)
  expected = jax.grad(loss(attention), (0, 1, 2))(q, k, v)
  actual = jax.grad(loss(lambda *a: blockwise_attention(*a, block_q=16, block_k=32)),
                    (0, 1, 2))(q, k, v)
  for name, a, e in zip('qkv', actual, expected):
    assert_close(a, e, atol=1e-5, rtol=1e-5, what=f'd{name}')


def test_key_mask_drops_keys_in_every_implementation():
  """Masked keys count for nothing: the result (and the gradient of the blockwise flash path)
  equals attention over the kept keys only."""
  from vap_jax.nn.attention import blockwise_attention
  rng = np.random.default_rng(3)
  q = rng.standard_normal((2, 9, 3, 16)).astype(np.float32)
  k, v = (rng.standard_normal((2, 40, 3, 16)).astype(np.float32) for _ in range(2))
  keep = np.ones((2, 40), bool)
  keep[0, 5:20] = False  # sample 0 drops keys 5..19
  expected = np.concatenate([attention(q[:1], k[:1][:, keep[0]], v[:1][:, keep[0]]),
                             attention(q[1:], k[1:], v[1:])])
  for impl in ('xla', 'blockwise'):
    assert_close(attention(q, k, v, key_mask=keep, implementation=impl), expected, atol=1e-5,
                 what=impl)
  w = rng.standard_normal(q.shape).astype(np.float32)
  grad = lambda fn: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), (0, 1, 2))(q, k, v)
  masked = lambda q, k, v: attention(q, k, v, key_mask=keep)
  flash = lambda q, k, v: blockwise_attention(q, k, v, key_mask=keep, block_q=4, block_k=16)
  for a, e in zip(grad(flash), grad(masked)):
    assert_close(a, e, atol=1e-5, rtol=1e-5, what='masked gradient')
