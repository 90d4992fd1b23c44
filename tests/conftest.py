"""Test set-up: 8 host CPU devices for mesh tests, no network, float32 everywhere, and one
compilation cache for the session."""
import atexit
import os
import shutil
import tempfile

# Tests compile hundreds of tiny programs: LLVM's optimisation passes cost more time than they
# save at these sizes (about a third of a compile). Results move by float32 rounding only (a tiny
# model's outputs within 2 ulp of the default level's), inside every float32 tolerance; runs that
# are compared bit for bit are all compiled with these flags (`xla_flags` for subprocesses).
XLA_TEST_FLAGS = '--xla_backend_optimization_level=0'
os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count=8 {XLA_TEST_FLAGS}')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  # Many tests compile the same program again -- a new Trainer, a command in a subprocess (which
  # inherits the variable): XLA's persistent cache compiles each once. A hit loads the very
  # executable a compile would give, so results are unchanged.
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='vap-jax-xla-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA = Path(__file__).parent / 'data'
CONFIGS = Path(__file__).parent.parent / 'configs'


# The slowest files, slowest first (measured serially): xdist hands files to its two workers in
# collection order, so starting with these keeps one worker from finishing alone on a long file.
SLOWEST_FIRST = ('test_convert_reliability.py', 'test_train_resume.py', 'test_stack.py',
                 'test_train.py', 'test_train_golden.py', 'test_train_vae.py',
                 'test_pipeline_wan.py', 'test_precompute.py', 'test_export.py',
                 'test_generate.py', 'test_pipeline_cogvideox.py', 'test_benchmarks.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a subprocess with ``devices`` fake CPU devices (and the suite's settings)."""
  return f'--xla_force_host_platform_device_count={devices} {XLA_TEST_FLAGS}'


def config_file(spec: str):
  """A config file of configs/, read by path as the commands do: ``config_file('wan_tiny.py')``,
  ``config_file('vap_data.py:wan')``."""
  from vap_jax.config import load_config
  return load_config(CONFIGS / spec)


def assert_close(actual, expected, *, atol=1e-5, rtol=1e-5, what='output'):
  """allclose with a message that reports max abs and max relative (to max |expected|) error."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, f'{what}: shape {actual.shape} != {expected.shape}'
  err = np.abs(actual - expected)
  rel = err.max() / max(np.abs(expected).max(), 1e-30)
  assert np.allclose(actual, expected, atol=atol, rtol=rtol), (
      f'{what}: max abs err {err.max():.3e}, max rel err {rel:.3e}')
  return err.max(), rel


def assert_trig_close(actual, expected, angles, *, what='table'):
  """sin/cos tables of float32 angles, compared with a bound that float32 gives, not a machine.

  A float32 angle is off its exact value by a few ulp of itself (a power for the frequency, a
  product with the position), and two math libraries may round it or evaluate sin/cos a few ulp
  apart: |error| <= 4 eps |angle| + 4 eps per element. At |angle| = 45 rad one ulp is 3.8e-6,
  so a fixed 1e-6 passes on one CPU and fails on another.
  """
  eps = float(np.finfo(np.float32).eps)
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  bound = 4 * eps * np.abs(np.asarray(angles, np.float64)) + 4 * eps
  err = np.abs(actual - expected)
  worst = np.unravel_index(np.argmax(err - bound), err.shape)
  assert (err <= bound).all(), (f'{what}: error {err[worst]:.3e} at {worst} above its float32 '
                                f'bound {bound[worst]:.3e} (angle {angles[worst]:.3f})')


@pytest.fixture(scope='session')
def golden_cog():
  return DATA / 'cogvideox_mot'


@pytest.fixture(scope='session')
def cog_latents(tmp_path_factory):
  """The fixture VAP-Data set precomputed with the tiny golden CogVideoX components (64x96, the
  tiny transformer's learned positions; 8 text tokens, 2 references): what the trainer tests
  train on."""
  from fixtures_vap_data import make_vap_data
  from vap_jax.cli.precompute import main as precompute
  root = tmp_path_factory.mktemp('train_data')
  make_vap_data(root / 'vap')
  assert precompute(['cogvideox', '--model', str(DATA / 'cogvideox_pipeline' / 'components'),
                     '--data', str(root / 'vap'), '--out', str(root / 'latents'),
                     '--set', 'buckets=[[9, 64, 96]]', '--set', 'truncate_multiple=1',
                     '--set', 'sample_ref_videos_num=2', '--set', 'max_failure_fraction=0.5',
                     '--set', 'min_samples_before_cap=10', '--text-max-length', '8',
                     '--store-dtype', 'float32', '--text-dtype', 'float32', '--workers', '0',
                     '--no-progress']) == 0
  return root / 'latents'
