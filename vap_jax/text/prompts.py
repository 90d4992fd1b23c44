"""Prompt -> text-encoder embeddings, exactly as the two VAP pipelines do it (VAP_SPEC §3.1, §3.2).

CogVideoX: pad/truncate to 226 tokens, encode *without* an attention mask; the embeddings of the
padding positions are kept as the encoder produced them.
Wan: clean the prompt, pad/truncate to 512, encode *with* the mask, then zero every position past
the prompt's true length (the reference trims to the length and zero-pads back to 512).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vap_jax.models.stack import fetch_unstacked
from vap_jax.models.t5 import T5Encoder
from vap_jax.text.tokenizer import Tokenizer, prompt_clean

COGVIDEOX_MAX_LENGTH = 226
WAN_MAX_LENGTH = 512


@nnx.jit
def _encode(encoder: T5Encoder, ids, mask):
  graphdef, state = nnx.split(encoder)  # weights offloaded to host memory come in for the call
  return nnx.merge(graphdef, fetch_unstacked(state))(ids, mask)


def encode_cogvideox(tokenizer: Tokenizer, encoder: T5Encoder, prompts: Sequence[str],
                     max_length: int = COGVIDEOX_MAX_LENGTH) -> jax.Array:
  """(B, max_length, d_model): no mask, padded positions keep their embeddings."""
  ids, _ = tokenizer(list(prompts), max_length)
  return _encode(encoder, ids, None)


def encode_wan(tokenizer: Tokenizer, encoder: T5Encoder, prompts: Sequence[str],
               max_length: int = WAN_MAX_LENGTH) -> jax.Array:
  """(B, max_length, d_model): cleaned prompts, masked attention, zeros past each true length."""
  ids, mask = tokenizer([prompt_clean(p) for p in prompts], max_length)
  embeddings = _encode(encoder, ids, mask)
  lengths = mask.sum(axis=1)
  keep = jnp.arange(max_length)[None, :] < jnp.asarray(lengths)[:, None]
  return jnp.where(keep[..., None], embeddings, jnp.zeros((), embeddings.dtype))
