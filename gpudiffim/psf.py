"""PSF models: a fixed image, or pixels that vary as a polynomial over the detector.

PSF models are small, so they live on the host as NumPy arrays (like a config);
stages send the images they need to the device explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import fftconvolve

from .backend import get_backend
from .exposure import KERNEL_FIT_EXCLUDED
from .inject import shift_image
from .sources import SourceSelectionConfig, select_kernel_sources
from .spatial import monomial_terms, polynomial_terms, scaled_coords
from .stamps import gather_stamps

__all__ = ["FWHM_PER_SIGMA", "ImagePsf", "PolynomialPsf", "adaptive_moments", "half_max_fwhm",
           "convolved_psf", "kernel_convolved_psf", "gaussian_psf", "measure_psf"]

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

    def image_at(self, x: float | None = None, y: float | None = None) -> np.ndarray:  # noqa: ARG002
        """PSF image (sum 1, centred on the central pixel) at detector position (x, y)."""
        return self.image

    def fwhm(self, x=None, y=None) -> tuple[float, float]:
        """FWHM along x and y in pixels (see :func:`half_max_fwhm`)."""
        return half_max_fwhm(self.image_at(x, y))


@dataclass(frozen=True, eq=False)
class PolynomialPsf(ImagePsf):
    """PSF whose pixels vary as a polynomial in detector position (PSFEx-like).

    ``image`` holds one coefficient image per term of :func:`polynomial_terms`
    (shape ``(n_terms, h, w)``); positions are scaled to [-1, 1] over ``bbox``
    ``(width, height)``. ``image_at`` renormalises to unit sum.
    """

    order: int = 0
    bbox: tuple[int, int] = (1, 1)

    def __post_init__(self):
        coeffs = np.asarray(self.image, dtype=np.float64)
        terms = polynomial_terms(self.order)
        if coeffs.ndim != 3 or coeffs.shape[0] != len(terms):
            raise ValueError(f"order {self.order} needs {len(terms)} coefficient images, "
                             f"got shape {coeffs.shape}")
        if coeffs.shape[1] % 2 == 0 or coeffs.shape[2] % 2 == 0:
            raise ValueError("PSF images must have odd sides")
        object.__setattr__(self, "image", coeffs)

    @property
    def shape(self):
        return self.image.shape[1:]

    def image_at(self, x=None, y=None):
        return _normalised(self.polynomial_at(x, y))

    def polynomial_at(self, x=None, y=None):
        """The pixels' polynomial itself at (x, y), before ``image_at`` divides by its sum
        (which makes the pixels a ratio of polynomials in position)."""
        w, h = self.bbox
        u, v = scaled_coords((w - 1) / 2.0 if x is None else x, (h - 1) / 2.0 if y is None else y,
                             self.bbox)
        return np.tensordot(monomial_terms(u, v, self.order), self.image, axes=1)


def convolved_psf(psf: ImagePsf, kernel: np.ndarray) -> ImagePsf:
    """``psf`` convolved with a small centred ``kernel``, keeping its spatial variation:
    every coefficient image of a :class:`PolynomialPsf` is convolved (the model is linear
    in them), so ``image_at(x, y)`` is the convolved PSF there."""
    if isinstance(psf, PolynomialPsf):
        coeffs = np.array([fftconvolve(c, kernel, mode="same") for c in psf.image])
        return PolynomialPsf(coeffs, order=psf.order, bbox=psf.bbox)
    return ImagePsf(fftconvolve(psf.image_at(), kernel, mode="same"))


def kernel_convolved_psf(psf: ImagePsf, kernel_at, kernel_order: int, bbox) -> PolynomialPsf:
    """``psf`` after a spatially varying convolution: ``image_at(x, y)`` is
    ``psf.image_at(x, y) * kernel_at(x, y)``, the shape a point source takes there.

    ``kernel_at(x, y)`` gives the (odd, square) kernel image, a polynomial of
    ``kernel_order`` in position over ``bbox`` (width, height); a :class:`PolynomialPsf`
    of order ``p`` then becomes one of order ``p + kernel_order`` (pixels are products of
    the two polynomials), fitted exactly on a grid of positions. The image takes the
    larger of the two sizes: the PSF's extent plus the kernel's core (the far wings of a
    broad kernel, beyond both, are dropped).
    """
    order = kernel_order + (psf.order if isinstance(psf, PolynomialPsf) else 0)
    width, height = psf.bbox if isinstance(psf, PolynomialPsf) else bbox
    n = order + 3
    xs, ys = np.meshgrid(np.linspace(0, width - 1, n), np.linspace(0, height - 1, n))
    terms = polynomial_terms(order)
    rows, images = [], []
    for x, y in zip(xs.ravel(), ys.ravel()):
        rows.append(monomial_terms(*scaled_coords(x, y, (width, height)), order))
        p = psf.polynomial_at(x, y) if isinstance(psf, PolynomialPsf) else psf.image_at(x, y)
        k = kernel_at(x, y)
        full = fftconvolve(p, k, mode="full")
        c, h = full.shape[0] // 2, max(p.shape[0], k.shape[0]) // 2
        images.append(full[c - h:c + h + 1, c - h:c + h + 1].ravel())
    coeffs, *_ = np.linalg.lstsq(np.array(rows), np.array(images), rcond=None)
    size = 2 * h + 1
    return PolynomialPsf(coeffs.reshape(len(terms), size, size), order=order,
                         bbox=(width, height))


def gaussian_psf(sigma: float, size: int | None = None, e1: float = 0.0) -> ImagePsf:
    """Pixel-integrated-ish elliptical Gaussian PSF (sigma in pixels)."""
    size = size or 2 * int(np.ceil(5 * sigma)) + 1
    half = size // 2
    y, x = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
    sx, sy = sigma * np.sqrt(1 + e1), sigma * np.sqrt(1 - e1)
    return ImagePsf(np.exp(-0.5 * ((x / sx) ** 2 + (y / sy) ** 2)))


def measure_psf(exposure, order: int = 2, size: int | None = None, snr_range=(50.0, 2000.0),
                max_stars: int = 200, backend=None) -> PolynomialPsf:
    """Measure a spatially varying PSF from the exposure's stars (PSFEx-like).

    Bright (S/N in ``snr_range``), isolated, unmasked peaks are found with a Gaussian matched
    filter on the backend; the compact ones (the stellar locus of adaptive-moment sizes)
    are cut out, their local sky removed, recentred by Fourier shifts and normalised; each
    pixel of the PSF is then fitted as a polynomial of ``order`` in detector position.
    """
    backend = get_backend(backend)
    ny, nx = exposure.shape
    bad = (backend.asarray(exposure.mask)
           & exposure.bit(*[p for p in KERNEL_FIT_EXCLUDED if p in exposure.mask_planes])) != 0
    guess = gaussian_psf(2.0, size=15).image
    cfg = SourceSelectionConfig(detectionThreshold=snr_range[0], maxSnr=snr_range[1],
                                nStarPerCell=3, maxKernelSources=4 * max_stars, isolation=0.05,
                                cleanCore=15)
    image = backend.asarray(exposure.image)
    pos = select_kernel_sources(image, backend.asarray(exposure.variance), bad, guess, cfg, 25,
                                backend=backend)
    if len(pos) < 5:
        raise ValueError(f"only {len(pos)} usable stars to measure a PSF from")
    big = 2 * ((size or 41) // 2) + 1 + 8
    stamps = backend.to_host(gather_stamps(backend, image, pos, big))
    stamps = stamps.astype(np.float64)
    border = np.concatenate([stamps[:, :3].reshape(len(pos), -1),
                             stamps[:, -3:].reshape(len(pos), -1)], 1)
    stamps -= np.median(border, axis=1)[:, None, None]
    sizes, shifts = [], []
    for st in stamps:
        sx, sy, _ = adaptive_moments(np.clip(st, 0, None) + 1e-12)
        sizes.append(np.sqrt(sx * sy))
        y, x = np.mgrid[:big, :big] - big // 2
        w = np.exp(-0.5 * (x * x + y * y) / (sx * sy)) * st
        shifts.append((np.sum(w * x) / np.sum(w), np.sum(w * y) / np.sum(w)))
    sizes = np.array(sizes)
    locus = np.median(np.sort(sizes)[:max(5, len(sizes) // 2)])  # stars: the compact end
    keep = np.abs(sizes / locus - 1) < 0.12
    final = 2 * ((size or int(np.clip(8 * locus * FWHM_PER_SIGMA / 2.0, 15, 41))) // 2) + 1
    cut = (big - final) // 2
    images, xy, fluxes = [], [], []
    for st, (dx, dy), ok, p in zip(stamps, shifts, keep, pos):
        if not ok:
            continue
        centred = shift_image(st, -dx, -dy)[cut:cut + final, cut:cut + final]
        total = centred.sum()
        if total > 0:
            images.append(centred / total)
            xy.append(p[:2] + np.array([dx, dy]))
            fluxes.append(total)
    images, xy = np.array(images), np.array(xy)
    weight = np.sqrt(np.array(fluxes))[:, None]  # sky-limited: S/N per pixel grows with flux
    while order > 0 and len(images) < 3 * len(polynomial_terms(order)):
        order -= 1
    u, v = scaled_coords(xy[:, 0], xy[:, 1], (nx, ny))
    design = monomial_terms(u, v, order).T
    flat = images.reshape(len(images), -1)
    weight = weight / weight.max()
    coeffs = np.linalg.lstsq(design * weight, flat * weight, rcond=None)[0]
    for _ in range(2):  # drop stars far from the model (neighbours, cosmic rays), refit
        resid = np.sqrt(np.mean((design @ coeffs - flat) ** 2, axis=1)) * weight[:, 0]
        good = resid <= 3 * np.median(resid)
        coeffs = np.linalg.lstsq(design[good] * weight[good], flat[good] * weight[good],
                                 rcond=None)[0]
    return PolynomialPsf(coeffs.reshape(-1, final, final), order=order, bbox=(nx, ny))
