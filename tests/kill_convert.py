"""Run ``vap-convert`` and SIGKILL it at a chosen point of its writing (tests only).

  python tests/kill_convert.py POINT ARG -- <vap-convert arguments>

POINT ARG, where the process kills itself (``kill -9`` of its own pid, so nothing is cleaned up):
  save NAME:N       right after the N-th Orbax partial save into component NAME
  finalize NAME     just before Orbax finalizes NAME's state (every group written)
  config NAME       just before NAME/config.json is written (state finalized)
  manifest N        in the N-th manifest write: half of manifest.json.tmp written, not renamed
  copy NAME         after copying the first file of the file component NAME
"""
import os
import shutil
import signal
import sys
from pathlib import Path


def die():
  os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner, name, before=None, after=None):
  real = getattr(owner, name)

  def call(*args, **kwargs):
    if before:
      before(*args, **kwargs)
    out = real(*args, **kwargs)
    if after:
      after(*args, **kwargs)
    return out
  setattr(owner, name, call)


def main(point: str, arg: str, argv: list[str]) -> int:
  from orbax.checkpoint.experimental.v1 import partial
  from vap_jax.weights import checkpoint, orbax_io
  calls = []
  if point == 'save':
    name, n = arg.split(':')

    def after(path, *_, **__):
      if Path(path).parent.name == name:
        calls.append(path)
        if len(calls) == int(n):
          die()
    wrap(partial, 'save', after=after)
  elif point == 'finalize':
    wrap(partial, 'finalize', before=lambda path, *_: Path(path).parent.name == arg and die())
  elif point == 'config':
    wrap(orbax_io, 'write_config', before=lambda dst, *_: Path(dst).name == arg and die())
  elif point == 'manifest':
    def before(dst, manifest):
      calls.append(dst)
      if len(calls) == int(arg):
        (Path(dst) / 'manifest.json.tmp').write_text('{"format": "vap_jax pipe')
        die()
    wrap(checkpoint, '_write_manifest', before=before)
  elif point == 'copy':
    def copy(src, dst, *args, **kwargs):
      if Path(src).parent.name == arg and os.path.exists(os.path.dirname(dst)) and any(
          Path(dst).parent.iterdir()):
        die()
      return shutil.copy2(src, dst, *args, **kwargs)
    real = shutil.copytree
    shutil.copytree = lambda src, dst, **kw: real(src, dst, copy_function=copy, **kw)
  else:
    raise SystemExit(f'unknown point {point!r}')
  from vap_jax.cli.convert import main as convert
  return convert(argv)


if __name__ == '__main__':
  sep = sys.argv.index('--')
  sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[sep + 1:]))
