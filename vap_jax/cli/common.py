"""What every command shares: quiet logging unless asked, output checks, the error contract."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path


def add_verbose(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('-v', '--verbose', action='store_true',
                      help='show library logs (vap_jax, JAX, Orbax) as well as progress')


def setup_logging(verbose: bool) -> None:
  """Commands print their own progress and summary; library INFO logs (ours, absl/Orbax, JAX)
  only with --verbose. Warnings and errors always show."""
  level = logging.INFO if verbose else logging.WARNING
  logging.basicConfig(format='%(levelname)s %(name)s: %(message)s')
  for name in ('', 'absl', 'jax', 'orbax', 'vap_jax'):
    logging.getLogger(name).setLevel(level)
  if not verbose:
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # tensorstore / XLA C++ INFO lines
    warnings.filterwarnings('ignore', module='orbax')


def _check_creatable(folder: Path, what: str) -> None:
  """``folder`` exists as a writable folder, or can be made inside one: probed by making and
  removing a folder in the nearest existing ancestor (permission bits do not tell, e.g. /proc
  for root), so nothing is left behind."""
  existing = folder
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise ValueError(f'{what}: {existing} is a file, not a folder')
  try:
    os.rmdir(tempfile.mkdtemp(prefix='.vap-write-check-', dir=existing))
  except OSError as e:
    raise ValueError(f'{what}: cannot write in {existing} ({e.strerror or e})') from None


def writable_folder(folder: str | Path, flag: str) -> Path:
  """Check, before any work starts, that the output folder ``flag`` names can be written."""
  folder = Path(folder).absolute()
  _check_creatable(folder, f'{flag} {folder}')
  return folder


def writable_file(path: str | Path, flag: str) -> Path:
  """Check, before any work starts, that the output file ``flag`` names can be written."""
  path = Path(path).absolute()
  if path.is_dir():
    raise ValueError(f'{flag} {path}: is a folder, expected a file name')
  if path.exists() and not os.access(path, os.W_OK):
    raise ValueError(f'{flag} {path}: the file exists and is read-only')
  _check_creatable(path.parent, f'{flag} {path}')
  return path


def error(e: BaseException) -> int:
  """The commands' error contract: one ``error: ...`` line on stderr, exit status 2. An OSError
  (a read-only or full disk, a folder where a file should be) names its file and the cause."""
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    e = f'{e.filename}: {e.strerror}'
  print(f'error: {e}', file=sys.stderr)
  return 2
