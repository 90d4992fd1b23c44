"""Convert a Wan2.1(-VAP) transformer to a vap_jax Orbax folder.

  python -m convert.wan --src Video-As-Prompt-Wan2.1-14B --dst ckpt/wan_vap

``--src`` is the downloaded ``ByteDance/Video-As-Prompt-Wan2.1-14B`` folder (its ``transformer/``
is used), a diffusers Wan transformer folder (e.g. ``Wan2.1-I2V-14B-480P-Diffusers/transformer``)
or an original-format Wan2.1 folder (``config.json`` with ``dim``/``num_heads``, tensors named
``self_attn``/``cross_attn``/``modulation``). Tensors stream one at a time.
"""
import sys

from convert._cli import run
from vap_jax.weights.wan import convert


def main(argv=None) -> int:
  return run('vap-convert-wan', __doc__, convert, argv)


if __name__ == '__main__':
  sys.exit(main())
