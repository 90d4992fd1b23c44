"""Test set-up: 8 host CPU devices for mesh tests, no network, float32 everywhere."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA = Path(__file__).parent / 'data'


def assert_close(actual, expected, *, atol=1e-5, rtol=1e-5, what='output'):
  """allclose with a message that reports max abs and max relative (to max |expected|) error."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, f'{what}: shape {actual.shape} != {expected.shape}'
  err = np.abs(actual - expected)
  rel = err.max() / max(np.abs(expected).max(), 1e-30)
  assert np.allclose(actual, expected, atol=atol, rtol=rtol), (
      f'{what}: max abs err {err.max():.3e}, max rel err {rel:.3e}')
  return err.max(), rel


@pytest.fixture(scope='session')
def golden_cog():
  return DATA / 'cogvideox_mot'
