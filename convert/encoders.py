"""Convert a text encoder (T5 / umT5) or image encoder (CLIP vision) to a vap_jax Orbax folder.

  python -m convert.encoders --kind t5 --src CogVideoX-5b-I2V --dst ckpt/t5_xxl
  python -m convert.encoders --kind t5 --src Wan2.1-I2V-14B-480P-Diffusers --dst ckpt/umt5_xxl
  python -m convert.encoders --kind clip --src Wan2.1-I2V-14B-480P-Diffusers --dst ckpt/clip_h14

``--src`` is a diffusers pipeline folder (its ``text_encoder/`` or ``image_encoder/`` is used) or
the component folder itself. Tensors stream one at a time. Tokenizers are not converted: load them
from the original ``tokenizer/`` folder with `vap_jax.text.Tokenizer`.
"""
import functools
import sys

from convert._cli import run
from vap_jax.weights.encoders import convert


def main(argv=None) -> int:
  return run('vap-convert-encoder', __doc__,
             {kind: functools.partial(convert, kind) for kind in ('t5', 'clip')}, argv,
             kind_help='t5: text_encoder/ (T5 or umT5); clip: image_encoder/ (CLIP vision)')


if __name__ == '__main__':
  sys.exit(main())
