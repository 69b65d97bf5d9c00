"""Polynomials over the detector: term maps built from 1-D factors against full images."""

import numpy as np
import pytest

from gpudiffim.spatial import (
    chebyshev_terms,
    linear_term_map,
    polynomial_terms,
    quadratic_term_map,
    scaled_coords,
)


def term_images(shape, bbox, order):
    """(n_terms, ny, nx) Chebyshev term images at full resolution: the reference the 1-D
    factorised maps must equal."""
    ny, nx = shape
    u, v = scaled_coords(np.arange(nx, dtype=float), np.arange(ny, dtype=float), bbox)
    uu, vv = np.broadcast_to(u[None, :], shape), np.broadcast_to(v[:, None], shape)
    return chebyshev_terms(np, uu, vv, order)


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_term_maps_from_one_dimensional_factors(backend, rng, order):
    """The kernel's power over the detector (sum_ij G_ij w_i w_j) and any polynomial
    (sum_i c_i w_i: kernel sum, background), built from the term images' 1-D Chebyshev
    factors, equal the sums over the term images themselves."""
    n = len(polynomial_terms(order))
    a = rng.normal(size=(n, n))
    gram = a @ a.T
    shape, bbox = (37, 53), (60, 40)  # a bbox other than the image: the map follows it
    w = term_images(shape, bbox, order)
    want = np.einsum("ij,iyx,jyx->yx", gram, w, w)
    got = backend.to_host(quadratic_term_map(gram, shape, bbox, order, backend))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    c = rng.normal(size=n)
    want = np.tensordot(c, w, axes=1)
    got = backend.to_host(linear_term_map(c, shape, bbox, order, backend))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
