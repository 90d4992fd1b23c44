"""Prompt -> embeddings equals the PyTorch pipelines end to end (transformers tokenizer + encoder,
diffusers' Wan prompt cleaning), with a sentencepiece tokenizer trained here: CogVideoX style
(pad, no mask, padded embeddings kept) and Wan style (clean, mask, trim, zero-pad).
"""
import numpy as np
import pytest
import torch

from conftest import assert_close
from test_t5 import make_hf_encoder
from vap_jax.text import Tokenizer, encode_cogvideox, encode_wan, prompt_clean
from vap_jax.weights.encoders import load_text_encoder

MAX_LENGTH = 16
PROMPTS = [
    'A cat walks on the grass, the camera follows it slowly.',
    'short',
    'a  dog   runs\n\tthrough the   park at night while the moon rises over the hills and the sea',
    'Tom &amp;amp; Jerry: caf\u00c3\u00a9 scene &lt;b&gt;  ',   # double-escaped html + mojibake
    '',
]

_WORDS = ('a the cat dog walks runs on in through grass park night moon rises over hills sea '
          'camera follows it slowly and while at scene Tom Jerry cafe video style motion people '
          'dancing forest river mountain city street light shadow reflection painting water fire '
          'smoke explosion transforms into golden silver purple yellow orange zoom pan tilt '
          'cinematic portrait landscape wide angle closeup background foreground quickly').split()


@pytest.fixture(scope='module')
def tokenizer_dirs(tmp_path_factory):
  """A trained unigram spiece.model (pad 0, eos 1, unk 2) and the tokenizer.json transformers
  derives from it; returns (spiece folder, tokenizer.json folder, transformers tokenizer)."""
  import sentencepiece
  from transformers import T5Tokenizer
  root = tmp_path_factory.mktemp('tok')
  rng = np.random.default_rng(0)
  corpus = root / 'corpus.txt'
  corpus.write_text('\n'.join(' '.join(rng.choice(_WORDS, 8)) for _ in range(300)) +
                    '\nABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;!?&<>\n')
  spm_dir = root / 'spm' / 'tokenizer'
  spm_dir.mkdir(parents=True)
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(spm_dir / 'spiece'), vocab_size=128, model_type='unigram',
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
  hf_tokenizer = T5Tokenizer.from_pretrained(spm_dir)  # as the pipelines load it
  json_dir = root / 'json' / 'tokenizer'
  hf_tokenizer.save_pretrained(json_dir)
  assert (json_dir / 'tokenizer.json').is_file()
  (json_dir / 'spiece.model').unlink(missing_ok=True)  # force the tokenizers path
  return spm_dir, json_dir, hf_tokenizer


def _hf_ids(hf_tokenizer, prompts):
  out = hf_tokenizer(prompts, padding='max_length', max_length=MAX_LENGTH, truncation=True,
                     add_special_tokens=True, return_attention_mask=True, return_tensors='pt')
  return out.input_ids, out.attention_mask


@pytest.mark.parametrize('source', ['spiece', 'tokenizer_json'])
def test_tokenizer_equals_transformers(tokenizer_dirs, source):
  spm_dir, json_dir, hf_tokenizer = tokenizer_dirs
  tokenizer = Tokenizer((spm_dir if source == 'spiece' else json_dir).parent)  # pipeline root
  texts = PROMPTS + [prompt_clean(p) for p in PROMPTS]
  ids, mask = tokenizer(texts, MAX_LENGTH)
  hf_ids, hf_mask = _hf_ids(hf_tokenizer, texts)
  np.testing.assert_array_equal(ids, hf_ids.numpy())
  np.testing.assert_array_equal(mask, hf_mask.numpy())
  assert (ids[:, -1] != 0).any() and (ids == 0).any()  # both truncation and padding happened


@pytest.mark.parametrize('source', ['spiece', 'tokenizer_json'])
def test_cut_is_what_truncation_leaves_out(tokenizer_dirs, source):
  """`Tokenizer.cut` (what vap-generate warns about) is the text of the tokens transformers'
  truncation drops, as diffusers reports it; '' for a caption that fits."""
  spm_dir, json_dir, hf_tokenizer = tokenizer_dirs
  tokenizer = Tokenizer((spm_dir if source == 'spiece' else json_dir).parent)
  known = [t for t in PROMPTS if 2 not in hf_tokenizer(t).input_ids]  # <unk> prints differently
  assert len(known) >= 2
  for text in known:
    full = hf_tokenizer(text).input_ids  # ends with </s>
    for length in (4, 9, len(full) - 1, len(full)):
      dropped = full[length - 1:-1]
      expected = hf_tokenizer.decode(dropped) if dropped else ''
      assert tokenizer.cut(text, length) == expected, (text, length)
  assert tokenizer(PROMPTS, MAX_LENGTH)[0].shape == (len(PROMPTS), MAX_LENGTH)  # still truncates


def test_prompt_clean_equals_diffusers():
  from diffusers.pipelines.wan.pipeline_wan import prompt_clean as reference
  for text in PROMPTS:
    assert prompt_clean(text) == reference(text)
  assert prompt_clean(PROMPTS[3]) == 'Tom & Jerry: caf\u00e9 scene <b>'


@pytest.fixture(scope='module')
def encoders(tmp_path_factory):
  out = {}
  for flavour in ('t5', 'umt5'):
    folder = tmp_path_factory.mktemp(flavour) / 'text_encoder'
    out[flavour] = (make_hf_encoder(folder, flavour, vocab_size=256), folder)
  return out


def test_cogvideox_prompt_embeddings_equal_pytorch(tokenizer_dirs, encoders):
  spm_dir, _, hf_tokenizer = tokenizer_dirs
  torch_model, folder = encoders['t5']
  with torch.no_grad():
    expected = torch_model(_hf_ids(hf_tokenizer, PROMPTS)[0])[0].numpy()
  actual = encode_cogvideox(Tokenizer(spm_dir), load_text_encoder(folder, dtype='float32'),
                            PROMPTS, max_length=MAX_LENGTH)
  assert actual.shape == (len(PROMPTS), MAX_LENGTH, 32)
  err, rel = assert_close(actual, expected, atol=1e-5, rtol=1e-5, what='cogvideox prompt embeds')
  print(f'cogvideox prompts: max abs {err:.2e} rel {rel:.2e}')


@pytest.mark.parametrize('source', ['spiece', 'tokenizer_json'])
def test_wan_prompt_embeddings_equal_pytorch(tokenizer_dirs, encoders, source):
  from diffusers.pipelines.wan.pipeline_wan import prompt_clean as reference_clean
  spm_dir, json_dir, hf_tokenizer = tokenizer_dirs
  torch_model, folder = encoders['umt5']
  ids, mask = _hf_ids(hf_tokenizer, [reference_clean(p) for p in PROMPTS])
  with torch.no_grad():
    hidden = torch_model(ids, mask).last_hidden_state
  lengths = mask.gt(0).sum(dim=1).long()
  expected = torch.stack([torch.cat([u[:v], u.new_zeros(MAX_LENGTH - v, u.size(1))])
                          for u, v in zip(hidden, lengths)]).numpy()
  tokenizer = Tokenizer(spm_dir if source == 'spiece' else json_dir)
  actual = encode_wan(tokenizer, load_text_encoder(folder, dtype='float32'), PROMPTS,
                      max_length=MAX_LENGTH)
  err, rel = assert_close(actual, expected, atol=1e-5, rtol=1e-5, what='wan prompt embeds')
  assert (np.asarray(actual)[1, int(lengths[1]):] == 0).all()
  print(f'wan prompts ({source}): max abs {err:.2e} rel {rel:.2e}')


def test_missing_tokenizer_file_names_the_path(tmp_path):
  (tmp_path / 'tokenizer').mkdir()
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'tokenizer' / 'spiece.model')):
    Tokenizer(tmp_path / 'tokenizer')
