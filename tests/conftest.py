"""Test-wide setup: 8 fake CPU devices so sharded code paths really run; compiled programs are
kept in the repository's `.cache/jax` so later runs (and test subprocesses, which inherit the
environment) skip recompiling them; the `x64` fixture for float64 references."""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(__file__).resolve().parents[1] / ".cache" / "jax"))

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """jax in float64 for the test's duration (closed-form and numpy float64 references)."""
  with jax.enable_x64(True):
    yield
