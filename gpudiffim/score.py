"""The preconvolution flavor's score image: its pre-filter and its flux normalisation.

The score is the difference matched-filtered with the science PSF ``P``: the science is
convolved with ``P~`` (``P`` reflected, unit sum), the template matched to that, and the
result is a map whose value at a point source, over :func:`score_norm`, is its PSF flux.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import fftconvolve

from .psf import PolynomialPsf
from .spatial import polynomial_terms, scaled_coords

__all__ = ["prefilter", "self_convolved", "score_norm", "filter_response"]


def prefilter(psf: np.ndarray) -> np.ndarray:
    """The score's pre-filter: the centre PSF image reflected, unit sum."""
    return np.flip(psf) / psf.sum()


def self_convolved(psf: np.ndarray) -> np.ndarray:
    """PSF of an image pre-convolved with its own reflected PSF, on a grid large enough
    for the wider profile (sqrt(2) wider)."""
    h = psf.shape[0]
    pad = h // 4 + 1
    p = np.pad(psf, pad)
    out = fftconvolve(p, np.flip(psf), mode="same")
    return out / out.sum()


def score_norm(backend, psf_model, psf_centre, shape, phi=None):
    """The score's value per unit flux of a point source: ``sum F P(x, y)`` with the PSF at
    (x, y) and the filter ``F = P_centre * phi~`` that the score applied (the pre-filter
    made from the centre PSF, then the decorrelation ``phi`` when given: it reshapes the
    filtered source, so its peak moves); :func:`filter_response` of that filter.
    """
    p_c = psf_centre / psf_centre.sum()
    filt = p_c if phi is None else fftconvolve(p_c, np.flip(phi), mode="same")
    return filter_response(backend, psf_model, filt, shape)


def filter_response(backend, psf_model, filt, shape):
    """``sum F P(x, y)``: an image correlated with ``filt`` (convolved with its reflection),
    at a point source of unit flux at (x, y), with the PSF there. A constant for a constant
    PSF; for a :class:`PolynomialPsf`, ``sum_j w_j C_j / sum_j w_j sum(C_j)`` with monomial
    weights ``w_j(x, y)``, so the map (device, ``shape``) is exactly a ratio of two
    polynomials in position.
    """
    if not isinstance(psf_model, PolynomialPsf):
        p = psf_model.image_at()
        p = p / p.sum()
        h = min(p.shape[0], filt.shape[0]) // 2
        c, k = p.shape[0] // 2, filt.shape[0] // 2
        return float(np.sum(p[c - h:c + h + 1, c - h:c + h + 1]
                            * filt[k - h:k + h + 1, k - h:k + h + 1]))
    coeffs = psf_model.image
    h = min(coeffs.shape[1], filt.shape[0]) // 2
    c, k = coeffs.shape[1] // 2, filt.shape[0] // 2
    overlap = np.sum(coeffs[:, c - h:c + h + 1, c - h:c + h + 1]
                     * filt[k - h:k + h + 1, k - h:k + h + 1], axis=(1, 2))
    totals = coeffs.sum(axis=(1, 2))
    xp = backend.xp
    ny, nx = shape
    u, v = scaled_coords(backend.arange(nx, dtype=xp.float32),
                         backend.arange(ny, dtype=xp.float32), psf_model.bbox)
    u, v = xp.reshape(u, (1, nx)), xp.reshape(v, (ny, 1))
    num = backend.zeros((ny, nx), dtype=xp.float32)
    den = backend.zeros((ny, nx), dtype=xp.float32)
    for (i, j), a, b in zip(polynomial_terms(psf_model.order), overlap, totals):
        term = (u**i) * (v**j)
        num, den = num + float(a) * term, den + float(b) * term
    return num / den
