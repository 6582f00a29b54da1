"""Newton-Schulz against known answers and the SVD polar factor, in float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optax.contrib import MuonDimensionNumbers

from kimi_jax.optimizers.muon import newton_schulz, orthogonalize

pytestmark = pytest.mark.usefixtures("x64")

# The known answers are quoted to 6 decimals.
QUOTED_ATOL = 5e-7
# float64 round-off over a few matmuls.
F64_ATOL = 1e-12


def _gaussian(rows, cols, seed=0):
  return np.random.default_rng(seed).normal(size=(rows, cols))


def test_known_answer_diagonal():
  out = newton_schulz(jnp.diag(jnp.array([3.0, 4.0])))
  np.testing.assert_allclose(out, np.diag([0.722876, 1.119204]), atol=QUOTED_ATOL)


def test_known_answer_scaled_identity_is_independent_of_scale():
  for c in (0.5, 1.0, 250.0):  # norms >> eps, so eps shifts nothing at 6 decimals
    np.testing.assert_allclose(newton_schulz(c * jnp.eye(8)), 1.066968 * np.eye(8),
                               atol=QUOTED_ATOL)


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (32, 96)])
def test_singular_values_of_rectangular_gaussians_in_band(shape):
  out = np.asarray(newton_schulz(jnp.asarray(_gaussian(*shape))))
  singular = np.linalg.svd(out, compute_uv=False)
  assert out.shape == shape
  assert singular.min() >= 0.68 and singular.max() <= 1.2, singular


@pytest.mark.parametrize("shape", [(16, 48), (48, 16)])
def test_cubic_coefficients_converge_to_polar_factor(shape):
  g = _gaussian(*shape, seed=1)
  u, _, vt = np.linalg.svd(g, full_matrices=False)
  out = newton_schulz(jnp.asarray(g), steps=10, coeffs=(2.0, -1.5, 0.5))
  np.testing.assert_allclose(out, u @ vt, atol=1e-10)


def test_tall_input_is_transpose_of_wide_result():
  g = jnp.asarray(_gaussian(12, 40, seed=2))
  np.testing.assert_allclose(newton_schulz(g.T), newton_schulz(g).T, atol=F64_ATOL)


def test_rejects_non_matrix():
  with pytest.raises(ValueError, match="expects a matrix"):
    newton_schulz(jnp.ones((2, 3, 4)))


def test_stacked_orthogonalize_matches_per_matrix_loop():
  # [heads=3, in=8, out=5] with in as reduction, out as output: heads are independent.
  x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 3, 5)))
  dims = MuonDimensionNumbers(reduction_axis=0, output_axis=2)
  out = orthogonalize(x, dims, dtype="float64")
  for head in range(3):
    np.testing.assert_allclose(out[:, head, :], newton_schulz(x[:, head, :]), atol=F64_ATOL)


def test_multi_axis_output_is_flattened():
  # o_proj-style [heads=2, head_dim=3, embed=10]: reduction (0, 1) is one 6-wide axis.
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 10)))
  dims = MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=2)
  out = orthogonalize(x, dims, dtype="float64")
  np.testing.assert_allclose(out.reshape(6, 10), newton_schulz(x.reshape(6, 10)), atol=F64_ATOL)


def test_overlapping_axes_rejected():
  with pytest.raises(ValueError, match="disjoint"):
    orthogonalize(jnp.ones((4, 4)), MuonDimensionNumbers(0, 0))
