"""The matched filter of an image whose PSF varies over the detector.

A point source's optimal S/N comes from correlating the image with the PSF *where the source
is*. A :class:`~gpudiffim.psf.PolynomialPsf` is linear in its coefficient images, so its
filter at every pixel is a few full-frame correlations weighted by smooth maps: the
coefficient images are taken to Chebyshev terms (the maps :mod:`~gpudiffim.spatial` builds
from 1-D factors) and reduced to their principal components, rarely more than two or three.
The variance follows the same model: the centre PSF's filtered variance scaled by the
squared filter's sum at each pixel relative to the centre (a quadratic form in the terms).
A PSF that hardly varies (its profile everywhere correlated with the centre's to 0.995,
an S/N loss under 0.5%) is filtered with the centre's alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .convolve import fft_convolve, fft_convolve_weighted_sum
from .psf import PolynomialPsf
from .spatial import linear_term_map, polynomial_terms, quadratic_term_map

__all__ = ["FilterComponents", "psf_components", "matched_filter"]


@dataclass(frozen=True)
class FilterComponents:
    """A PSF model as ``sum_r a_r(x, y) images[r]``, ``a_r`` Chebyshev polynomials.

    Attributes
    ----------
    images : ndarray
        (R, h, w) host component images.
    coeffs : ndarray
        (R, n_terms) Chebyshev coefficients of each component's weight over the detector.
    order : int
        The polynomials' order.
    bbox : tuple of int
        (width, height) the positions are scaled over.
    """

    images: np.ndarray
    coeffs: np.ndarray
    order: int
    bbox: tuple


def _monomials_to_chebyshev(order: int) -> np.ndarray:
    """Matrix taking monomial coefficients ``u^i v^j`` to Chebyshev ``T_a(u) T_b(v)`` ones
    (both in :func:`~gpudiffim.spatial.polynomial_terms` order)."""
    terms = polynomial_terms(order)
    index = {t: k for k, t in enumerate(terms)}
    out = np.zeros((len(terms), len(terms)))
    for col, (i, j) in enumerate(terms):
        cu = np.polynomial.chebyshev.poly2cheb(np.eye(i + 1)[i])
        cv = np.polynomial.chebyshev.poly2cheb(np.eye(j + 1)[j])
        for a, wa in enumerate(cu):
            for b, wb in enumerate(cv):
                out[index[(a, b)], col] += wa * wb
    return out


def psf_components(psf, min_correlation: float = 0.995, max_components: int = 4,
                   samples: int = 5) -> FilterComponents | None:
    """The principal components of a spatially varying PSF for :func:`matched_filter`, or
    None when one filter serves the whole detector: a constant PSF, or one whose profile at
    every point of a ``samples`` x ``samples`` grid correlates with the centre's to at least
    ``min_correlation``. Components above 1% of the first singular value are kept, at most
    ``max_components``."""
    if not isinstance(psf, PolynomialPsf) or psf.order == 0:
        return None
    w, h = psf.bbox
    centre = psf.image_at()
    worst = 1.0
    for y in np.linspace(0, h - 1, samples):
        for x in np.linspace(0, w - 1, samples):
            p = psf.image_at(x, y)
            worst = min(worst, float(np.sum(p * centre) / np.sqrt(np.sum(p * p)
                                                                   * np.sum(centre**2))))
    if worst >= min_correlation:
        return None
    n = len(polynomial_terms(psf.order))
    cheb = np.tensordot(_monomials_to_chebyshev(psf.order), psf.image, axes=1)  # (n, h, w)
    u, s, vt = np.linalg.svd(cheb.reshape(n, -1), full_matrices=False)
    keep = int(min(max_components, np.sum(s > 0.01 * s[0])))
    return FilterComponents(vt[:keep].reshape((keep,) + psf.shape),
                            (u[:, :keep] * s[:keep]).T, psf.order, tuple(psf.bbox))


def matched_filter(backend, image, variance, psf, min_correlation: float = 0.995):
    """The PSF-correlated ``image`` and its variance, the PSF normalised to unit sum at
    every pixel, so ``filtered / sqrt(filtered variance)`` is a point source's optimal S/N
    where it is.

    Parameters
    ----------
    backend : Backend
        The backend the images live on.
    image, variance : array
        The image (masked pixels zeroed) and its variance plane.
    psf : ImagePsf
        The image's PSF model; a :class:`~gpudiffim.psf.PolynomialPsf` is followed over the
        detector (:func:`psf_components`).
    min_correlation : float
        The centre's PSF filters everything when it correlates this well with the PSF
        everywhere.

    Returns
    -------
    tuple of array
        The filtered image and its variance, on the backend.
    """
    xp = backend.xp
    ny, nx = image.shape
    centre = psf.image_at((nx - 1) / 2, (ny - 1) / 2)
    centre = centre / centre.sum()
    base_var = fft_convolve(variance, backend.to_device((centre**2).astype(np.float32)),
                            backend)
    parts = psf_components(psf, min_correlation)
    if parts is None:
        return (fft_convolve(image, backend.to_device(np.flip(centre).astype(np.float32)),
                             backend), base_var)
    shape, order, bbox = (ny, nx), parts.order, parts.bbox

    def weight(r):
        return linear_term_map(parts.coeffs[r], shape, bbox, order, backend)

    filtered = fft_convolve_weighted_sum(
        image, backend.to_device(np.flip(parts.images, axis=(1, 2)).astype(np.float32)),
        weight, backend)
    total = linear_term_map(parts.coeffs.T @ parts.images.sum(axis=(1, 2)), shape, bbox,
                            order, backend)  # the model's sum at each pixel
    gram = np.tensordot(parts.images, parts.images, axes=([1, 2], [1, 2]))
    squared = quadratic_term_map(parts.coeffs.T @ gram @ parts.coeffs, shape, bbox, order,
                                 backend)  # the squared model's sum
    safe = xp.where(total != 0, total, 1.0)
    ratio = squared / (safe * safe) / float(np.sum(centre**2))
    return filtered / safe, base_var * ratio
