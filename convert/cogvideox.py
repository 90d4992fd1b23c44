"""Convert a diffusers CogVideoX(-VAP) transformer to a vap_jax Orbax folder.

  python -m convert.cogvideox --src Video-As-Prompt-CogVideoX-5B --dst ckpt/cogvideox_vap

``--src`` is the downloaded ``ByteDance/Video-As-Prompt-CogVideoX-5B`` folder (its
``transformer/`` is used) or any diffusers CogVideoX transformer folder (sharded safetensors with
index, or one file). Tensors stream one at a time: host memory stays a few times the largest
tensor, not the model size.
"""
import sys

from convert._cli import run
from vap_jax.weights.cogvideox import convert


def main(argv=None) -> int:
  return run('vap-convert-cogvideox', __doc__, convert, argv)


if __name__ == '__main__':
  sys.exit(main())
