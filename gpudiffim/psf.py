"""PSF models: a fixed image, or pixels that vary as a polynomial over the detector.

PSF models are small, so they live on the host as NumPy arrays (like a config);
stages send the images they need to the device explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def _normalised(image) -> np.ndarray:
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2 or image.shape[0] % 2 == 0 or image.shape[1] % 2 == 0:
        raise ValueError(f"PSF images must be 2-D with odd sides, got shape {image.shape}")
    total = image.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("PSF image must have a positive, finite sum")
    return image / total


def adaptive_moments(image: np.ndarray, n_iter: int = 50) -> tuple[float, float, float]:
    """Gaussian-weighted adaptive second moments (sigma_x, sigma_y, rho) of a centred stamp.

    The weight is iterated to the best-matching elliptical Gaussian, as HSM does, so the
    Moffat wings do not inflate the width the way unweighted moments would.
    """
    h, w = image.shape
    y, x = np.mgrid[:h, :w]
    x = x - (w - 1) / 2.0
    y = y - (h - 1) / 2.0
    sxx = syy = 2.0
    sxy = 0.0
    cx = cy = 0.0
    for _ in range(n_iter):
        det = sxx * syy - sxy**2
        ixx, iyy, ixy = syy / det, sxx / det, -sxy / det
        dx, dy = x - cx, y - cy
        wgt = np.exp(-0.5 * (ixx * dx * dx + iyy * dy * dy + 2 * ixy * dx * dy)) * image
        norm = wgt.sum()
        cx += (wgt * dx).sum() / norm
        cy += (wgt * dy).sum() / norm
        dx, dy = x - cx, y - cy
        mxx = (wgt * dx * dx).sum() / norm
        myy = (wgt * dy * dy).sum() / norm
        mxy = (wgt * dx * dy).sum() / norm
        new = (2 * mxx, 2 * myy, 2 * mxy)
        if np.allclose(new, (sxx, syy, sxy), rtol=1e-7, atol=1e-9):
            break
        sxx, syy, sxy = new
    return float(np.sqrt(sxx)), float(np.sqrt(syy)), float(sxy / np.sqrt(sxx * syy))


def half_max_fwhm(image: np.ndarray, upsample: int = 4) -> tuple[float, float]:
    """FWHM along x and y (pixels): the area inside the half-maximum contour of the
    Fourier-upsampled image gives the mean FWHM; adaptive moments split it into x and y."""
    h, w = image.shape
    spec = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image)))
    big = np.zeros((h * upsample, w * upsample), complex)
    y0, x0 = (h * upsample) // 2 - h // 2, (w * upsample) // 2 - w // 2
    big[y0:y0 + h, x0:x0 + w] = spec
    fine = np.real(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(big))))
    area = np.count_nonzero(fine >= 0.5 * fine.max()) / upsample**2
    mean = 2.0 * np.sqrt(area / np.pi)
    sx, sy, _ = adaptive_moments(image)
    return mean * np.sqrt(sx / sy), mean * np.sqrt(sy / sx)


@dataclass(frozen=True, eq=False)
class ImagePsf:
    """A spatially constant PSF given as a normalised image with odd sides."""

    image: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "image", _normalised(self.image))

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape

    def image_at(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """PSF image (sum 1, centred on the central pixel) at detector position (x, y)."""
        return self.image

    def sigma(self, x=None, y=None) -> tuple[float, float]:
        sx, sy, _ = adaptive_moments(self.image_at(x, y))
        return sx, sy

    def fwhm(self, x=None, y=None) -> tuple[float, float]:
        """FWHM along x and y in pixels (see :func:`half_max_fwhm`)."""
        return half_max_fwhm(self.image_at(x, y))

    def noise_equivalent_area(self, x=None, y=None) -> float:
        """1 / sum(psf**2): the number of pixels whose noise a PSF fit collects."""
        return float(1.0 / np.sum(self.image_at(x, y) ** 2))


def polynomial_terms(order: int) -> list[tuple[int, int]]:
    """Exponents (i, j) of x**i y**j with i + j <= order, in a fixed order."""
    return [(i, n - i) for n in range(order + 1) for i in range(n, -1, -1)]


@dataclass(frozen=True, eq=False)
class PolynomialPsf(ImagePsf):
    """PSF whose pixels vary as a polynomial in detector position (PSFEx-like).

    ``image`` holds one coefficient image per term of :func:`polynomial_terms`
    (shape ``(n_terms, h, w)``); positions are scaled to [-1, 1] over ``bbox``
    ``(width, height)``. ``image_at`` renormalises to unit sum.
    """

    order: int = 0
    bbox: tuple[int, int] = (1, 1)
    _terms: list = field(init=False, repr=False)

    def __post_init__(self):
        coeffs = np.asarray(self.image, dtype=np.float64)
        terms = polynomial_terms(self.order)
        if coeffs.ndim != 3 or coeffs.shape[0] != len(terms):
            raise ValueError(f"order {self.order} needs {len(terms)} coefficient images, "
                             f"got shape {coeffs.shape}")
        if coeffs.shape[1] % 2 == 0 or coeffs.shape[2] % 2 == 0:
            raise ValueError("PSF images must have odd sides")
        object.__setattr__(self, "image", coeffs)
        object.__setattr__(self, "_terms", terms)

    @property
    def shape(self):
        return self.image.shape[1:]

    def _uv(self, x, y):
        w, h = self.bbox
        x = (w - 1) / 2.0 if x is None else x
        y = (h - 1) / 2.0 if y is None else y
        return 2.0 * x / max(w - 1, 1) - 1.0, 2.0 * y / max(h - 1, 1) - 1.0

    def image_at(self, x=None, y=None):
        u, v = self._uv(x, y)
        weights = np.array([u**i * v**j for i, j in self._terms])
        return _normalised(np.tensordot(weights, self.image, axes=1))


def gaussian_psf(sigma: float, size: int | None = None, e1: float = 0.0) -> ImagePsf:
    """Pixel-integrated-ish elliptical Gaussian PSF (sigma in pixels)."""
    size = size or 2 * int(np.ceil(5 * sigma)) + 1
    half = size // 2
    y, x = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
    sx, sy = sigma * np.sqrt(1 + e1), sigma * np.sqrt(1 - e1)
    return ImagePsf(np.exp(-0.5 * ((x / sx) ** 2 + (y / sy) ** 2)))
