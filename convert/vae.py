"""Convert a diffusers video-VAE folder (Wan2.1 or CogVideoX) to a vap_jax Orbax folder.

  python -m convert.vae wan --src Wan2.1-I2V-14B-480P-Diffusers --dst ckpt/wan_vae
  python -m convert.vae cogvideox --src CogVideoX-5b-I2V --dst ckpt/cogvideox_vae

``--src`` is a diffusers pipeline folder (its ``vae/`` is used) or the ``vae`` folder itself;
for ``wan`` also one ``.safetensors`` file with the original Wan naming (Wan2.1 config).
Tensors stream one at a time. The VAEs run in float32 in the official pipelines (Wan) or bf16
(CogVideoX); the default writes float32.
"""
import sys

from convert._cli import run
from vap_jax.weights import vae


def main(argv=None) -> int:
  return run('vap-convert-vae', __doc__,
             {'wan': vae.convert_wan_vae, 'cogvideox': vae.convert_cogvideox_vae}, argv,
             kind_arg='model', kind_help='which VAE', default_dtype='float32')


if __name__ == '__main__':
  sys.exit(main())
