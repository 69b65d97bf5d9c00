"""Fake injection: add PSF-shaped point sources to an exposure, with their truth.

The same function serves the simulator and fake injection into real exposures.
Stamps are small and positions scattered, so this edge stage works on host
(NumPy) exposures, as read by :mod:`gpudiffim.io`.
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table

from .backend import host_threads
from .exposure import Exposure

__all__ = ["inject", "shift_image", "psf_stamp", "overlap_slices", "optimal_snr"]


def shift_image(image: np.ndarray, dx, dy) -> np.ndarray:
    """Shift a small, well-sampled image by (dx, dy) pixels with the Fourier shift theorem.

    A stack (..., h, w) with ``dx``, ``dy`` of its leading shape shifts every image by its
    own amount in one batched transform."""
    from scipy import fft

    pad = 8
    image = np.asarray(image)
    h, w = image.shape[-2:]
    after = [fft.next_fast_len(n + 2 * pad, real=True) - n - pad for n in (h, w)]  # no primes
    big = np.pad(image, [(0, 0)] * (image.ndim - 2) + [(pad, after[0]), (pad, after[1])])
    dx = np.asarray(dx, float)[..., None, None]
    dy = np.asarray(dy, float)[..., None, None]
    ky = np.fft.fftfreq(big.shape[-2])[:, None]
    kx = np.fft.rfftfreq(big.shape[-1])[None, :]
    threads = host_threads()
    spectrum = fft.rfft2(big, workers=threads)
    spectrum *= np.exp(-2j * np.pi * ky * dy)  # the phase ramp is separable: one exp per
    spectrum *= np.exp(-2j * np.pi * kx * dx)  # row and per column, not per frequency
    out = fft.irfft2(spectrum, s=big.shape[-2:], workers=threads)
    return out[..., pad:pad + h, pad:pad + w]


def psf_stamp(psf, x: float, y: float) -> tuple[np.ndarray, int, int]:
    """The PSF model at (x, y), shifted so its centre falls on (x, y).

    Returns ``(stamp, y0, x0)`` with the stamp's lower-left pixel at (x0, y0);
    the stamp sums to one.
    """
    img = psf.image_at(x, y)
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    stamp = shift_image(img, x - ix, y - iy)
    stamp /= stamp.sum()
    hy, hx = img.shape[0] // 2, img.shape[1] // 2
    return stamp, iy - hy, ix - hx


def overlap_slices(shape, y0, x0, h, w):
    """Slices of the image and of a stamp at (y0, x0) where they overlap (None if none)."""
    ya, yb = max(y0, 0), min(y0 + h, shape[0])
    xa, xb = max(x0, 0), min(x0 + w, shape[1])
    if ya >= yb or xa >= xb:
        return None
    return (slice(ya, yb), slice(xa, xb)), (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))


def optimal_snr(flux: float, stamp: np.ndarray, variance: np.ndarray) -> float:
    """Optimal (PSF-weighted) SNR of ``flux`` with profile ``stamp`` over ``variance`` pixels."""
    good = variance > 0
    return float(flux * np.sqrt(np.sum(stamp[good] ** 2 / variance[good])))


def inject(exposure: Exposure, catalog, *, rng: np.random.Generator | None = None,
           gain: float = 1.0, footprint: float = 0.01) -> tuple[Exposure, Table]:
    """Add point sources drawn with ``exposure.psf`` at the catalogue's positions.

    Parameters
    ----------
    exposure : Exposure
        Host exposure with a PSF model (``psf.image_at(x, y)``).
    catalog : table-like
        Columns ``x``, ``y`` (0-based pixels) and ``flux`` (counts) or ``mag`` (needs
        ``exposure.zero_point``); other columns are carried into the truth table.
    rng : numpy Generator, optional
        When given, the sources' own photon noise (variance ``model / gain``) is added
        to the image and to the variance plane.
    footprint : float
        Pixels where the source exceeds this fraction of its peak get INJECTED.

    Returns
    -------
    (Exposure, astropy.table.Table)
        The new exposure (inputs are not modified) and one truth row per source:
        x, y, ra, dec, flux, mag, snr (expected optimal SNR on the new variance
        plane) and ``inside`` (whether the stamp centre lies on the image).
    """
    if exposure.psf is None:
        raise ValueError("inject needs an exposure with a PSF model")
    cat = Table(catalog)
    if "flux" not in cat.colnames:
        if exposure.zero_point is None:
            raise ValueError("a catalogue in magnitudes needs the exposure's zero point")
        cat["flux"] = 10 ** (-0.4 * (np.asarray(cat["mag"], float) - exposure.zero_point))
    image = np.array(exposure.image, dtype=np.float32, copy=True)
    mask = np.array(exposure.mask, dtype=np.int32, copy=True)
    variance = np.array(exposure.variance, dtype=np.float32, copy=True)
    injected = exposure.bit("INJECTED")
    stamps = []
    for x, y, flux in zip(cat["x"], cat["y"], cat["flux"]):
        stamp, y0, x0 = psf_stamp(exposure.psf, float(x), float(y))
        cut = overlap_slices(image.shape, y0, x0, *stamp.shape)
        stamps.append((stamp, cut))
        if cut is None:
            continue
        (img_sl, st_sl) = cut
        model = float(flux) * stamp[st_sl]
        if rng is not None:
            source_var = np.clip(model, 0, None) / gain
            image[img_sl] += rng.normal(0.0, np.sqrt(source_var)).astype(np.float32)
            variance[img_sl] += source_var.astype(np.float32)
        image[img_sl] += model.astype(np.float32)
        core = stamp[st_sl] >= footprint * stamp.max()
        mask[img_sl] |= np.where(core, injected, 0).astype(np.int32)
    truth = cat.copy()
    h, w = image.shape
    truth["inside"] = [(0 <= x < w - 0.5) and (0 <= y < h - 0.5)
                       for x, y in zip(cat["x"], cat["y"])]
    truth["snr"] = [optimal_snr(f, st[cut[1]], variance[cut[0]]) if cut else 0.0
                    for f, (st, cut) in zip(cat["flux"], stamps)]
    if exposure.zero_point is not None and "mag" not in truth.colnames:
        with np.errstate(divide="ignore", invalid="ignore"):
            flux = np.abs(np.asarray(cat["flux"], float))
            truth["mag"] = exposure.zero_point - 2.5 * np.log10(flux)
    if exposure.wcs is not None:
        ra, dec = exposure.wcs.pixel_to_world_values(np.asarray(cat["x"], float),
                                                     np.asarray(cat["y"], float))
        truth["ra"], truth["dec"] = ra, dec
    out = exposure.replace(image=image, mask=mask, variance=variance)
    return out, truth
