"""PSF models: a fixed image, or pixels that vary as a polynomial over the detector.

PSF models are small, so they live on the host as NumPy arrays (like a config);
stages send the images they need to the device explicitly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.signal import fftconvolve

from .arrayops import bin_sum
from .backend import get_backend
from .errors import GpuDiffimError
from .exposure import KERNEL_FIT_EXCLUDED
from .inject import shift_image
from .sources import SourceSelectionConfig, select_kernel_sources, source_snr_maps
from .spatial import monomial_terms, polynomial_terms, scaled_coords
from .stamps import gather_stamps

__all__ = ["FWHM_PER_SIGMA", "STAR_FINDING_SIGMA", "STAR_FINDING_BIN", "ImagePsf",
           "PolynomialPsf", "adaptive_moments", "adaptive_moments_batch", "half_max_fwhm",
           "centred_psf_image", "psf_stack", "convolved_psf", "kernel_convolved_psf",
           "gaussian_psf",
           "measure_psf", "PsfMeasurementError", "psf_image_problem"]

log = logging.getLogger(__name__)

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def _normalised(image) -> np.ndarray:
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2 or image.shape[0] % 2 == 0 or image.shape[1] % 2 == 0:
        raise ValueError(f"PSF images must be 2-D with odd sides, got shape {image.shape}")
    total = image.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("PSF image must have a positive, finite sum")
    return image / total


def centred_psf_image(image, centre: tuple[int, int] | None = None) -> np.ndarray:
    """A PSF image of any size as one with odd sides centred on its central pixel.

    ``centre`` (x, y): the pixel the PSF is centred on (afw kernels give it); the image is
    zero-padded around it. Without one, an even side's centre lies between two pixels: the
    image is shifted half a pixel (Fourier) and padded by one.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"a PSF image must be 2-D, got shape {image.shape}")
    h, w = image.shape
    if centre is not None:
        cx, cy = centre
        half = max(cx, w - 1 - cx, cy, h - 1 - cy)
        out = np.zeros((2 * half + 1, 2 * half + 1))
        out[half - cy:half - cy + h, half - cx:half - cx + w] = image
        return out
    if h % 2 and w % 2:
        return image
    shifted = shift_image(image, 0.5 * (1 - w % 2), 0.5 * (1 - h % 2))
    return np.pad(shifted, ((0, 1 - h % 2), (0, 1 - w % 2)))


def adaptive_moments(image: np.ndarray, n_iter: int = 50) -> tuple[float, float, float]:
    """Gaussian-weighted adaptive second moments (sigma_x, sigma_y, rho) of a centred stamp.

    The weight is iterated to the best-matching elliptical Gaussian, as HSM does, so the
    Moffat wings do not inflate the width the way unweighted moments would.
    """
    sx, sy, rho = adaptive_moments_batch(np.asarray(image, dtype=np.float64)[None], n_iter)
    return float(sx[0]), float(sy[0]), float(rho[0])


def adaptive_moments_batch(images: np.ndarray, n_iter: int = 50):
    """:func:`adaptive_moments` of a stack of centred stamps (n, h, w) at once: arrays
    ``(sigma_x, sigma_y, rho)``. Each stamp stops iterating when its moments converge, or
    when they collapse onto one pixel (a cosmic ray, a hot pixel: the last are kept)."""
    n, h, w = images.shape
    y, x = np.mgrid[:h, :w]
    x = (x - (w - 1) / 2.0)[None]
    y = (y - (h - 1) / 2.0)[None]
    sxx, syy, sxy = np.full(n, 2.0), np.full(n, 2.0), np.zeros(n)
    cx, cy = np.zeros(n), np.zeros(n)
    active = np.ones(n, bool)
    for _ in range(n_iter):
        if not active.any():
            break
        i = np.flatnonzero(active)
        det = sxx[i] * syy[i] - sxy[i] ** 2
        ixx, iyy, ixy = (syy[i] / det)[:, None, None], (sxx[i] / det)[:, None, None], \
            (-sxy[i] / det)[:, None, None]
        dx, dy = x - cx[i, None, None], y - cy[i, None, None]
        wgt = np.exp(-0.5 * (ixx * dx * dx + iyy * dy * dy + 2 * ixy * dx * dy)) * images[i]
        norm = wgt.sum(axis=(1, 2))
        cx[i] += (wgt * dx).sum(axis=(1, 2)) / norm
        cy[i] += (wgt * dy).sum(axis=(1, 2)) / norm
        dx, dy = x - cx[i, None, None], y - cy[i, None, None]
        new = np.stack([2 * (wgt * dx * dx).sum(axis=(1, 2)) / norm,
                        2 * (wgt * dy * dy).sum(axis=(1, 2)) / norm,
                        2 * (wgt * dx * dy).sum(axis=(1, 2)) / norm])
        old = np.stack([sxx[i], syy[i], sxy[i]])
        done = np.all(np.isclose(new, old, rtol=1e-5, atol=1e-7), axis=0)
        collapsed = ~((new[0] > 1e-6) & (new[1] > 1e-6) & (new[0] * new[1] - new[2] ** 2 > 1e-12))
        update = ~done & ~collapsed
        sxx[i[update]], syy[i[update]], sxy[i[update]] = new[:, update]
        active[i[~update]] = False
    return np.sqrt(sxx), np.sqrt(syy), sxy / np.sqrt(sxx * syy)


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


def psf_image_problem(image) -> str | None:
    """Why ``image`` is not a PSF (None when it is one): non-finite pixels, no positive
    light, light spread over most of the image (flat: nothing peaked), or its light centred
    far from the central pixel (more than 2 px and half the FWHM)."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2 or not image.size:
        return f"is not a 2-D image (shape {image.shape})"
    if not np.all(np.isfinite(image)):
        return f"holds {int(np.sum(~np.isfinite(image)))} non-finite pixels"
    total = image.sum()
    if not total > 0 or image.max() <= 0:
        return f"holds no positive light (sum {total:.3g}, peak {image.max():.3g})"
    spread = total**2 / np.sum(image**2) / image.size  # effective area / image area
    if spread > 0.5:
        return (f"is flat: its light spreads over {spread:.0%} of its {image.shape[1]}x"
                f"{image.shape[0]} pixels, where a PSF is peaked")
    core = image >= 0.5 * image.max()
    ys, xs = np.nonzero(core)
    w = image[core]
    h, wd = image.shape
    dx = float(np.sum(w * xs) / w.sum() - (wd - 1) / 2)
    dy = float(np.sum(w * ys) / w.sum() - (h - 1) / 2)
    half_width = np.sqrt(core.sum() / np.pi)  # half the FWHM
    if np.hypot(dx, dy) > max(2.0, half_width):
        return (f"is not centred: its core lies ({dx:+.1f}, {dy:+.1f}) px from the central "
                "pixel")
    return None


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


def psf_stack(psf, xs, ys, size):
    """Host (n, size, size) PSF images shifted to sub-pixel positions. Each is the central
    part of a unit-sum PSF, not renormalised: the fitted amplitude is then the total flux,
    wings beyond the stamp included (renormalising the crop biased fluxes ~1% low)."""
    out = np.zeros((len(xs), size, size))
    if not len(xs):
        return out
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    img = np.stack([psf.image_at(x, y) for x, y in zip(xs, ys)])
    img = shift_image(img, xs - np.floor(xs + 0.5), ys - np.floor(ys + 0.5))  # one batch
    img = img / img.sum(axis=(1, 2), keepdims=True)
    h, half = img.shape[1] // 2, size // 2
    c = min(h, half)
    out[:, half - c:half + c + 1, half - c:half + c + 1] = img[:, h - c:h + c + 1, h - c:h + c + 1]
    return out


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


class PsfMeasurementError(GpuDiffimError):
    """No star of the exposure could be used to measure its PSF."""


MIN_MODEL_STARS = 5  # fewer stars than this: a Gaussian of their FWHM, not a pixel model


def measure_psf(exposure, order: int = 2, size: int | None = None, snr_range=(50.0, 2000.0),
                max_stars: int = 200, backend=None) -> ImagePsf:
    """Measure a spatially varying PSF from the exposure's stars (PSFEx-like).

    Bright (S/N in ``snr_range``; from 20 up, without limit, when fewer than 5 are found),
    isolated, unmasked peaks are found with a Gaussian matched filter on the backend; the
    compact ones (the stellar locus of adaptive-moment sizes) are cut out, their local sky
    removed, recentred by Fourier shifts and normalised; each pixel of the PSF is then a
    fitted polynomial of ``order`` in detector position (lowered while there are too few stars).
    With fewer than 5 usable stars the PSF is a round Gaussian of their measured FWHM, with
    a warning; with none, :class:`PsfMeasurementError`.
    """
    backend = get_backend(backend)
    finding = _star_finding(exposure, backend)
    pos = _psf_stars(exposure, finding, snr_range, max_stars, backend)
    if len(pos) < MIN_MODEL_STARS:  # a sparse, shallow or very deep field: any star
        pos = _psf_stars(exposure, finding, (min(20.0, snr_range[0]), np.inf), max_stars,
                         backend)
    if not len(pos):
        raise PsfMeasurementError("no star usable to measure a PSF from (S/N >= 20, isolated, "
                                  "unmasked, away from the edges)")
    big = 2 * ((size or 41) // 2) + 1 + 8
    stamps = _sky_subtracted_stamps(exposure, pos, big, backend)
    core = (big - 25) // 2 if big > 25 else 0  # the core fixes the moments (4x less work)
    sizes, shifts = _star_shapes(stamps[:, core:big - core, core:big - core])
    locus = np.median(np.sort(sizes)[:max(5, len(sizes) // 2)])  # stars: the compact end
    keep = np.abs(sizes / locus - 1) < 0.12
    final = 2 * ((size or int(np.clip(8 * locus * FWHM_PER_SIGMA / 2.0, 15, 41))) // 2) + 1
    images, xy, fluxes = _centred_stars(stamps[keep], shifts[keep], pos[keep], final)
    if len(images) < MIN_MODEL_STARS:
        if not len(images):
            raise PsfMeasurementError(f"none of {len(pos)} PSF star candidates is usable")
        fwhm = float(np.median([np.mean(half_max_fwhm(im)) for im in images]))
        log.warning("only %d usable stars: the PSF is a Gaussian of their FWHM, %.2f px",
                    len(images), fwhm)
        return gaussian_psf(fwhm / FWHM_PER_SIGMA, size=final)
    return _pixel_model(images, xy, fluxes, order, exposure.shape, final)


#: the Gaussian (sigma 2 px) that finds PSF stars before their PSF is known
STAR_FINDING_SIGMA = 2.0
#: stars are found on pixels binned by this factor (a quarter of the matched-filter work),
#: then placed on their brightest 3 x 3 pixels
STAR_FINDING_BIN = 2


def _star_finding(exposure, backend):
    """The exposure's image, variance and unusable pixels binned by ``STAR_FINDING_BIN``,
    with their :func:`~gpudiffim.sources.source_snr_maps` for the star-finding Gaussian."""
    b = STAR_FINDING_BIN
    bits = exposure.bit(*[p for p in KERNEL_FIT_EXCLUDED if p in exposure.mask_planes])
    bad = bin_sum(backend, (backend.asarray(exposure.mask) & bits) != 0, b) > 0
    image = bin_sum(backend, backend.asarray(exposure.image), b)
    var = bin_sum(backend, backend.asarray(exposure.variance), b)
    maps = source_snr_maps(image, var, gaussian_psf(STAR_FINDING_SIGMA / b, size=9).image,
                           backend)
    return image, var, bad, maps


def _psf_stars(exposure, finding, snr_range, max_stars, backend) -> np.ndarray:
    """Host (n, 2) positions of PSF star candidates, found on the binned ``finding``
    (:func:`_star_finding`) and placed on the brightest 3 x 3 pixels of the exposure
    around their block."""
    b = STAR_FINDING_BIN
    cfg = SourceSelectionConfig(detectionThreshold=snr_range[0], maxSnr=snr_range[1],
                                nStarPerCell=3, maxKernelSources=4 * max_stars, isolation=0.05,
                                cleanCore=2 * (15 // (2 * b)) + 1, sizeCellX=128 // b,
                                sizeCellY=128 // b)
    binned = select_kernel_sources(*finding[:3], None, cfg, 11,
                                   backend=backend, maps=finding[3])
    if not len(binned):
        return binned
    centres = binned * b + b // 2
    near = backend.to_host(gather_stamps(backend, backend.asarray(exposure.image), centres,
                                         2 * b + 5, np.nan)).astype(np.float64)
    near = np.nan_to_num(near, nan=-np.inf)
    box = sum(near[:, i:i + near.shape[1] - 2, j:j + near.shape[2] - 2]
              for i in range(3) for j in range(3))
    best = np.argmax(box.reshape(len(box), -1), axis=1)
    dy, dx = np.divmod(best, box.shape[2])
    half = box.shape[1] // 2
    return centres + np.column_stack([dx - half, dy - half])


def _sky_subtracted_stamps(exposure, pos, size, backend) -> np.ndarray:
    """Host float64 stamps, less the median of their top and bottom rows; pixels beyond the
    image are at the sky (0 once it is removed)."""
    image = backend.asarray(exposure.image)
    stamps = backend.to_host(gather_stamps(backend, image, pos, size, np.nan)).astype(np.float64)
    border = np.concatenate([stamps[:, :3].reshape(len(pos), -1),
                             stamps[:, -3:].reshape(len(pos), -1)], 1)
    with np.errstate(all="ignore"):
        sky = np.nanmedian(border, axis=1)
    stamps -= np.where(np.isfinite(sky), sky, 0.0)[:, None, None]
    return np.nan_to_num(stamps, nan=0.0)


def _star_shapes(stamps):
    """Each stamp's adaptive-moment size sqrt(sx sy) and centroid offset (x, y), all stamps
    iterated at once (:func:`adaptive_moments_batch`)."""
    big = stamps.shape[-1]
    y, x = np.mgrid[:big, :big] - big // 2
    sx, sy, _ = adaptive_moments_batch(np.clip(stamps, 0, None) + 1e-12)
    w = np.exp(-0.5 * (x * x + y * y)[None] / (sx * sy)[:, None, None]) * stamps
    total = np.sum(w, axis=(1, 2))
    shifts = np.column_stack([np.sum(w * x, axis=(1, 2)) / total,
                              np.sum(w * y, axis=(1, 2)) / total])
    return np.sqrt(sx * sy), shifts


def _centred_stars(stamps, shifts, pos, final):
    """Stars shifted onto their central pixel, cut to ``final``, normalised; with their
    positions and fluxes (stars of no positive flux dropped)."""
    cut = (stamps.shape[-1] - final) // 2
    images, xy, fluxes = [], [], []
    for st, (dx, dy), p in zip(stamps, shifts, pos):
        centred = shift_image(st, -dx, -dy)[cut:cut + final, cut:cut + final]
        total = centred.sum()
        if total > 0:
            images.append(centred / total)
            xy.append(p[:2] + np.array([dx, dy]))
            fluxes.append(total)
    return np.array(images), np.array(xy).reshape(-1, 2), np.array(fluxes)


def _pixel_model(images, xy, fluxes, order, shape, final) -> PolynomialPsf:
    """Each PSF pixel a polynomial in position, flux-weighted, stars far from the model
    (neighbours, cosmic rays) dropped twice."""
    ny, nx = shape
    weight = np.sqrt(fluxes)[:, None]  # sky-limited: S/N per pixel grows with flux
    while order > 0 and len(images) < 3 * len(polynomial_terms(order)):
        order -= 1
    u, v = scaled_coords(xy[:, 0], xy[:, 1], (nx, ny))
    design = monomial_terms(u, v, order).T
    flat = images.reshape(len(images), -1)
    weight = weight / weight.max()
    coeffs = np.linalg.lstsq(design * weight, flat * weight, rcond=None)[0]
    for _ in range(2):
        resid = np.sqrt(np.mean((design @ coeffs - flat) ** 2, axis=1)) * weight[:, 0]
        good = resid <= 3 * np.median(resid)
        coeffs = np.linalg.lstsq(design[good] * weight[good], flat[good] * weight[good],
                                 rcond=None)[0]
    return PolynomialPsf(coeffs.reshape(-1, final, final), order=order, bbox=(nx, ny))
