"""Analytic light profiles for the simulator: elliptical Moffat PSFs and Sersic galaxies.

Host-side NumPy: these draw small stamps for the data generator, not engine stages.
A :class:`PsfField` describes one exposure's PSF over its detector: Moffat with a
width and ellipticity that vary smoothly with position and a per-exposure wing
slope ``beta``; it draws exact stamps at any position and turns itself into the
:class:`~gpudiffim.psf.PolynomialPsf` model that goes with the exposure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import gammaincinv

from .psf import PolynomialPsf
from .spatial import monomial_terms, polynomial_terms, scaled_coords

__all__ = ["ARCSEC_PER_PIXEL", "PsfField", "moffat", "moffat_alpha", "moffat_radius",
           "sersic_b", "sersic_stamp"]

ARCSEC_PER_PIXEL = 0.168  # HSC


def moffat_alpha(fwhm: float, beta: float) -> float:
    """Moffat core width alpha for a given FWHM and wing slope beta."""
    return fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def moffat(dx, dy, fwhm, beta, e1=0.0, e2=0.0):
    """Unit-flux elliptical Moffat surface brightness at offsets (dx, dy) in pixels.

    The ellipse is an area-preserving shear, so the integral over the plane is 1.
    """
    alpha = moffat_alpha(fwhm, beta)
    norm = np.sqrt(max(1.0 - e1 * e1 - e2 * e2, 1e-6))
    r2 = ((1 - e1) * dx * dx + (1 + e1) * dy * dy - 2 * e2 * dx * dy) / norm
    return (beta - 1.0) / (np.pi * alpha**2) * (1.0 + r2 / alpha**2) ** (-beta)


def moffat_radius(flux: float, fwhm: float, beta: float, floor: float,
                  lost: float = 1e-3) -> float:
    """Radius beyond which a Moffat of total ``flux`` is both fainter than ``floor`` (surface
    brightness) and holds less than ``lost`` of its flux, so truncating there shows no
    edge and loses no measurable flux."""
    alpha = moffat_alpha(fwhm, beta)
    r_flux = alpha * np.sqrt(lost ** (1.0 / (1.0 - beta)) - 1.0)
    peak = flux * (beta - 1.0) / (np.pi * alpha**2)
    if peak <= floor:
        return r_flux
    return max(r_flux, alpha * np.sqrt((peak / floor) ** (1.0 / beta) - 1.0))


@dataclass(frozen=True)
class PsfField:
    """One exposure's PSF over its detector.

    FWHM (pixels) = ``fwhm * (1 + gx*u + gy*v + c*(u**2 + v**2))`` with u, v in [-1, 1]
    across the detector; ellipticity ``e1 = e1_0 + e1_u*u``, ``e2 = e2_0 + e2_v*v``.
    """

    fwhm: float
    beta: float
    width: int
    height: int
    gx: float = 0.0
    gy: float = 0.0
    curvature: float = 0.0
    e1_0: float = 0.0
    e1_u: float = 0.0
    e2_0: float = 0.0
    e2_v: float = 0.0

    def params(self, x, y):
        """(fwhm, e1, e2) at detector position(s) (x, y)."""
        u, v = scaled_coords(np.asarray(x), np.asarray(y), (self.width, self.height))
        fwhm = self.fwhm * (1 + self.gx * u + self.gy * v + self.curvature * (u * u + v * v))
        return fwhm, self.e1_0 + self.e1_u * u, self.e2_0 + self.e2_v * v

    def stamp(self, x, y, half: int, flux: float = 1.0):
        """Moffat image of ``flux`` centred at (x, y), on the pixel box of half-size ``half``
        around the nearest pixel. Returns ``(image, y0, x0)``, the box's lower corner."""
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        yy, xx = np.mgrid[iy - half:iy + half + 1, ix - half:ix + half + 1]
        fwhm, e1, e2 = self.params(x, y)
        return flux * moffat(xx - x, yy - y, fwhm, self.beta, e1, e2), iy - half, ix - half

    def image_at(self, x, y, size: int) -> np.ndarray:
        """Centred PSF image (odd ``size``) at (x, y), normalised to unit sum."""
        img, _, _ = self.stamp(np.floor(x + 0.5), np.floor(y + 0.5), size // 2)
        return img / img.sum()

    def model(self, size: int, order: int = 2, grid: int = 5) -> PolynomialPsf:
        """The :class:`PolynomialPsf` fitted (least squares per pixel) on a grid of positions."""
        xs = np.linspace(0, self.width - 1, grid)
        ys = np.linspace(0, self.height - 1, grid)
        terms = polynomial_terms(order)
        rows, images = [], []
        for y in ys:
            for x in xs:
                u, v = scaled_coords(x, y, (self.width, self.height))
                rows.append(monomial_terms(u, v, order))
                images.append(self.image_at(x, y, size).ravel())
        coeffs, *_ = np.linalg.lstsq(np.array(rows), np.array(images), rcond=None)
        return PolynomialPsf(coeffs.reshape(len(terms), size, size), order=order,
                             bbox=(self.width, self.height))


def sersic_b(n: float) -> float:
    """b_n such that the effective radius holds half the light."""
    return float(gammaincinv(2.0 * n, 0.5))


def sersic_stamp(n: float, r_eff: float, q: float, theta: float, half: int,
                 dx: float = 0.0, dy: float = 0.0, oversample: int = 3) -> np.ndarray:
    """Unit-sum Sersic image on a (2*half+1)^2 box, centre offset (dx, dy) from the
    central pixel, integrated over pixels by ``oversample``^2 sub-samples."""
    side = 2 * half + 1
    sub = (np.arange(side * oversample) + 0.5) / oversample - half - 0.5
    yy, xx = np.meshgrid(sub - dy, sub - dx, indexing="ij")
    c, s = np.cos(theta), np.sin(theta)
    xr, yr = c * xx + s * yy, (-s * xx + c * yy) / q
    r = np.sqrt(xr * xr + yr * yr) / r_eff
    img = np.exp(-sersic_b(n) * (r ** (1.0 / n) - 1.0))
    img = img.reshape(side, oversample, side, oversample).sum(axis=(1, 3))
    return img / img.sum()
