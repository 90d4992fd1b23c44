"""Tokenizers from the files that ship in a checkpoint's ``tokenizer/`` folder, plus Wan's prompt
cleaning.

``tokenizer.json`` (a Hugging Face ``tokenizers`` file, e.g. Wan's umT5) is preferred: it is the
exact pipeline transformers runs, truncation and padding included. Without it, ``spiece.model``
(CogVideoX's T5) is run with ``sentencepiece``: pieces + ``</s>``, truncated to leave room for
``</s>``, right-padded with the pad id. transformers is not needed at run time. (On that path,
special-token strings typed into a prompt, e.g. ``</s>`` or ``<extra_id_0>``, are tokenized as
text, where transformers would map them to their ids; prompts do not contain them.)
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

TOKENIZER_FILES = ('tokenizer.json', 'spiece.model')


def prompt_clean(text: str) -> str:
  """Wan's prompt cleaning: ftfy fix, html-unescape twice, collapse whitespace, strip."""
  import ftfy
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return re.sub(r'\s+', ' ', text).strip()


class Tokenizer:
  """``tokenizer(texts, max_length)`` -> (ids, mask), both (B, max_length) int32, right-padded."""

  def __init__(self, folder: str | Path):
    folder = Path(folder)
    if (folder / 'tokenizer' / TOKENIZER_FILES[1]).is_file() or (
        folder / 'tokenizer' / TOKENIZER_FILES[0]).is_file():
      folder = folder / 'tokenizer'
    self.folder = folder
    special = _special_tokens(folder)
    if (folder / 'tokenizer.json').is_file():
      from tokenizers import Tokenizer as HFTokenizer
      self._hf = HFTokenizer.from_file(str(folder / 'tokenizer.json'))
      self._sp = None
      pad = special.get('pad_token', '<pad>')
      self.pad_id = self._hf.token_to_id(pad)
      if self.pad_id is None:
        raise ValueError(f'{folder / "tokenizer.json"} has no pad token {pad!r}')
    elif (folder / 'spiece.model').is_file():
      import sentencepiece
      self._sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / 'spiece.model'))
      self._hf = None
      self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0
      self.eos_id = self._sp.eos_id()
      if self.eos_id < 0:
        raise ValueError(f'{folder / "spiece.model"} defines no end-of-sequence piece')
    else:
      raise FileNotFoundError(f'no tokenizer in {folder}: expected one of '
                              f'{", ".join(str(folder / f) for f in TOKENIZER_FILES)}')

  def __call__(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(texts, str):
      texts = [texts]
    if self._hf is not None:
      self._hf.enable_truncation(max_length)
      self._hf.enable_padding(length=max_length, pad_id=self.pad_id,
                              pad_token=self._hf.id_to_token(self.pad_id))
      encoded = self._hf.encode_batch(list(texts), add_special_tokens=True)
      rows = [(e.ids, e.attention_mask) for e in encoded]
    else:
      rows = []
      for text in texts:
        ids = self._sp.encode(text)[:max_length - 1] + [self.eos_id]
        rows.append((ids + [self.pad_id] * (max_length - len(ids)),
                     [1] * len(ids) + [0] * (max_length - len(ids))))
    ids = np.asarray([r[0] for r in rows], np.int32)
    mask = np.asarray([r[1] for r in rows], np.int32)
    return ids, mask

  def cut(self, text: str, max_length: int) -> str:
    """The end of ``text`` that ``max_length`` tokens leave out, as text ('' if it fits)."""
    if self._hf is not None:
      self._hf.no_truncation()  # __call__ sets truncation and padding again
      self._hf.no_padding()
      full = self._hf.encode(text, add_special_tokens=True).ids
      plain = self._hf.encode(text, add_special_tokens=False).ids
      keep = max_length - (len(full) - len(plain))  # room left by </s> and other specials
      return self._hf.decode(plain[keep:]) if len(full) > max_length else ''
    ids = self._sp.encode(text)
    return self._sp.decode(ids[max_length - 1:]) if len(ids) >= max_length else ''


def train_sentencepiece(texts: Sequence[str], folder: str | Path, vocab_size: int,
                        model_type: str = 'unigram') -> Path:
  """Train a sentencepiece model (``model_type`` 'unigram' as T5's, or 'bpe', which finds whole
  words in a small corpus where unigram falls back to letters) on ``texts`` into ``folder``
  (created), in the layout of
  the official T5 ``tokenizer/`` folders: ``spiece.model`` (pad 0, eos 1, unk 2, no bos) beside
  the ``special_tokens_map.json`` and ``tokenizer_config.json`` that transformers'
  ``T5Tokenizer`` wrote before version 5, so both `Tokenizer` and transformers read it.
  ``vocab_size`` is an upper bound when the texts have fewer pieces. Deterministic (one thread).
  """
  import io
  import sentencepiece
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  model = io.BytesIO()  # trained from memory: the model file records no corpus path
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
      model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
      hard_vocab_limit=False, num_threads=1, minloglevel=2)
  (folder / 'spiece.model').write_bytes(model.getvalue())
  special = {'eos_token': '</s>', 'pad_token': '<pad>', 'unk_token': '<unk>'}
  token = dict(lstrip=False, normalized=False, rstrip=False, single_word=False)
  _write_json(folder / 'special_tokens_map.json',
              {k: {'content': v, **token} for k, v in special.items()})
  _write_json(folder / 'tokenizer_config.json', {
      'add_prefix_space': True,
      'added_tokens_decoder': {str(i): {'content': t, **token, 'special': True}
                               for i, t in enumerate(('<pad>', '</s>', '<unk>'))},
      'additional_special_tokens': [], 'clean_up_tokenization_spaces': False, 'extra_ids': 0,
      'extra_special_tokens': {}, 'legacy': True, 'model_max_length': 512, 'sp_model_kwargs': {},
      'tokenizer_class': 'T5Tokenizer', **special})
  return folder


def _write_json(path: Path, data: dict) -> None:
  path.write_text(json.dumps(data, indent=2, sort_keys=True) + '\n')


def _special_tokens(folder: Path) -> dict:
  """pad/eos token strings from tokenizer_config.json or special_tokens_map.json, when present."""
  out = {}
  for name in ('special_tokens_map.json', 'tokenizer_config.json'):
    file = folder / name
    if file.is_file():
      data = json.loads(file.read_text())
      for key in ('pad_token', 'eos_token'):
        value = data.get(key)
        if isinstance(value, dict):
          value = value.get('content')
        if isinstance(value, str):
          out.setdefault(key, value)
  return out
