"""Polynomials over the detector: coordinates scaled to [-1, 1], monomial and Chebyshev terms.

Every spatially varying model of the engine (the matching kernel and background, PSF models,
the score's normalisation) is a polynomial in detector position. They share one coordinate
scaling, :func:`scaled_coords`, and one ordering of their terms, :func:`polynomial_terms`.
Term images over a whole detector are built from their 1-D factors
(:func:`linear_term_map`, :func:`quadratic_term_map`): one small matrix product on the
backend instead of a sum over full-frame images.
"""

from __future__ import annotations

import numpy as np

__all__ = ["polynomial_terms", "scaled_coords", "chebyshev_terms", "monomial_terms",
           "term_factors", "linear_term_map", "quadratic_term_map"]


def polynomial_terms(order: int) -> list[tuple[int, int]]:
    """Exponents (i, j) of x**i y**j with i + j <= order, in a fixed order."""
    return [(i, n - i) for n in range(order + 1) for i in range(n, -1, -1)]


def scaled_coords(x, y, bbox):
    """Detector pixel coordinates mapped onto [-1, 1] over ``bbox`` (width, height)."""
    w, h = bbox
    return 2.0 * x / max(w - 1, 1) - 1.0, 2.0 * y / max(h - 1, 1) - 1.0


def chebyshev_terms(xp, u, v, order: int):
    """Stack of T_i(u) T_j(v), i + j <= order, in :func:`polynomial_terms` order."""
    def cheb(t, n):
        out = [xp.ones_like(t), t]
        for _ in range(2, n + 1):
            out.append(2 * t * out[-1] - out[-2])
        return out[:n + 1]

    tu, tv = cheb(u, order), cheb(v, order)
    return xp.stack([tu[i] * tv[j] for i, j in polynomial_terms(order)])


def monomial_terms(u, v, order: int) -> np.ndarray:
    """Host array of u**i v**j, i + j <= order, in :func:`polynomial_terms` order (first axis)."""
    return np.array([u**i * v**j for i, j in polynomial_terms(order)])


def term_factors(shape, bbox, order: int):
    """Host 1-D Chebyshev factors of the term images: (nx, order + 1) ``T_k(u)`` along x
    and (ny, order + 1) ``T_k(v)`` along y; term ``i`` is ``T_a(u) T_b(v)`` with
    ``(a, b) = polynomial_terms(order)[i]``."""
    ny, nx = shape
    u, _ = scaled_coords(np.arange(nx, dtype=float), 0.0, bbox)
    _, v = scaled_coords(0.0, np.arange(ny, dtype=float), bbox)
    cheb = np.polynomial.chebyshev.chebvander
    return cheb(u, order), cheb(v, order)


def linear_term_map(coeffs, shape, bbox, order: int, backend):
    """``sum_i c_i T_i(x, y)`` over a (ny, nx) image (device), ``T_i`` the Chebyshev terms of
    :func:`chebyshev_terms`: one (ny, order + 1) x (order + 1, nx) matrix product of their
    1-D factors."""
    tu, tv = term_factors(shape, bbox, order)
    c = np.zeros((order + 1, order + 1))
    for value, (a, b) in zip(np.asarray(coeffs, float), polynomial_terms(order)):
        c[b, a] += value
    return backend.xp.matmul(backend.to_device(tv @ c, np.float32),
                             backend.to_device(np.ascontiguousarray(tu.T), np.float32))


def quadratic_term_map(gram, shape, bbox, order: int, backend):
    """``sum_ij gram_ij T_i(x, y) T_j(x, y)`` over a (ny, nx) image (device): one
    (ny, n^2) x (n^2, nx) matrix product of the terms' 1-D factors."""
    tu, tv = term_factors(shape, bbox, order)
    powers = polynomial_terms(order)
    fu = np.array([gram[i, j] * tu[:, a] * tu[:, c] for i, (a, b) in enumerate(powers)
                   for j, (c, d) in enumerate(powers)])
    gv = np.array([tv[:, b] * tv[:, d] for a, b in powers for c, d in powers])
    return backend.xp.matmul(backend.to_device(np.ascontiguousarray(gv.T), np.float32),
                             backend.to_device(fu, np.float32))
