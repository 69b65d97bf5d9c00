"""Cosmic rays in single exposures that come without a CR mask: found, masked, interpolated.

A cosmic ray deposits its charge in a pixel or a short track, sharper than any source the
optics could image. As in LSST's ``findCosmicRays``, a pixel is a cosmic ray when it stands
``minSigma`` above the sky *and*, along at least one of the four directions through it
(rows, columns, both diagonals), it is ``cond3Fac`` times more peaked over its two
neighbours than the PSF allows (the PSF's own centre-to-neighbour ratio), even with
``noiseMargin`` sigmas taken off it and added to them (so a faint star's noisy neighbours
do not make it one); a track's other
pixels join it while they stand ``neighbourSigma`` above the sky and are sharper than the
PSF allows at all (so a track does not swallow a star it crosses). The pixels are then
flagged CR | INTRP and replaced by the mean of the clean pixels around them, so a template's
cosmic rays are not spread by the matching kernel and a science's are not taken for changes.
Exposures whose mask already has CR pixels (an ISR that did this) are left alone.
"""

from __future__ import annotations

import logging

import numpy as np

from .arrayops import window_or
from .exposure import Exposure
from .interpolate import interpolate_masked
from .options import configclass, option
from .stats import median_where_device

__all__ = ["CosmicRayConfig", "psf_neighbour_ratios", "find_cosmic_rays", "repair_cosmic_rays"]

log = logging.getLogger(__name__)

#: the four directions through a pixel, as (dy, dx) of one neighbour (the other mirrored)
DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))


@configclass
class CosmicRayConfig:
    """Cosmic-ray finding (LSST ``findCosmicRays`` names where it has them)."""

    doFindCosmicRays: bool = option(True, "find cosmic rays in inputs with none masked")
    minSigma: float = option(6.0, "a cosmic ray stands this many sigma above the sky")
    cond3Fac: float = option(2.5, "and is this much more peaked than the PSF in one direction")
    noiseMargin: float = option(1.5, "sigmas taken off the centre and added to its neighbours "
                                     "in that comparison")
    neighbourSigma: float = option(3.0, "a track's pixels join it above this significance")
    grow: int = option(1, "the mask grows by this many pixels")
    repairBox: int = option(5, "cosmic-ray pixels take the mean of the clean ones in this box")


def psf_neighbour_ratios(psf: np.ndarray) -> np.ndarray:
    """Per direction, the PSF's centre over the mean of its two neighbours there."""
    c = psf.shape[0] // 2
    return np.array([psf[c, c] / (0.5 * (psf[c + dy, c + dx] + psf[c - dy, c - dx]))
                     for dy, dx in DIRECTIONS])


def _usable(exposure: Exposure):
    """Pixels that hold a value a cosmic ray could be found in (not NO_DATA, SAT, BAD)."""
    return (exposure.mask & exposure.bit("NO_DATA", "SAT", "BAD")) == 0


def _shifted(backend, a, dy, dx):
    """``a[y + dy, x + dx]``, edge values repeated past the border."""
    xp = backend.xp
    ny, nx = a.shape
    ys = xp.clip(backend.arange(ny) + dy, 0, ny - 1)
    xs = xp.clip(backend.arange(nx) + dx, 0, nx - 1)
    return xp.take(xp.take(a, ys, axis=0), xs, axis=1)


def _sharpness(xp, value, sigma, neighbour, usable, ratios, config: CosmicRayConfig):
    """Per pixel (full frame or a list of candidates): (more peaked than ``cond3Fac`` x the
    PSF allows in some direction, more peaked than it allows at all). ``neighbour(dy, dx)``
    and ``usable(dy, dx)`` give the image values and usability at an offset."""
    sharp = loose = None
    centre = value - config.noiseMargin * sigma
    margin = config.noiseMargin * sigma * 0.5**0.5  # on the mean of two neighbours
    for (dy, dx), ratio in zip(DIRECTIONS, ratios):
        mean = 0.5 * (neighbour(dy, dx) + neighbour(-dy, -dx))
        expected = float(ratio) * (xp.clip(mean, 0.0, None) + margin)
        # only where both neighbours hold a value (not beside NO_DATA or a bad column)
        both = usable(dy, dx) & usable(-dy, -dx)
        peaked, above = both & (centre > config.cond3Fac * expected), both & (centre > expected)
        sharp = peaked if sharp is None else sharp | peaked
        loose = above if loose is None else loose | above
    return sharp, loose


def find_cosmic_rays(exposure: Exposure, psf: np.ndarray, config: CosmicRayConfig,
                     backend, sky: float = 0.0, usable=None):
    """Device boolean map of the exposure's cosmic-ray pixels, None when there is none
    (``sky``: the level the image's sources stand on; ``usable``: its pixels with a value,
    when already at hand). In host memory the test runs first on the significant pixels
    alone (a clean coadd costs little), then, when one is a cosmic ray, over the frame for
    the tracks; on a device over the frame at once (one read, where a selection of the
    significant pixels would be another)."""
    xp = backend.xp
    ny, nx = exposure.shape
    image = backend.asarray(exposure.image) - sky
    sigma = xp.sqrt(xp.where(exposure.variance > 0, exposure.variance, xp.inf))
    if usable is None:
        usable = _usable(exposure)
    significant = usable & (image > config.minSigma * sigma)
    ratios = psf_neighbour_ratios(psf)
    if not backend.host_memory:
        return _cosmic_ray_map(backend, image, sigma, usable, significant, ratios, config)
    idx = xp.nonzero(xp.reshape(significant, (-1,)))[0]
    ys, xs = idx // nx, idx % nx

    def at(a):
        flat = xp.reshape(a, (-1,))
        return lambda dy, dx: xp.take(flat, xp.clip(ys + dy, 0, ny - 1) * nx
                                      + xp.clip(xs + dx, 0, nx - 1))

    seeds, _ = _sharpness(xp, at(image)(0, 0), at(sigma)(0, 0), at(image), at(usable), ratios,
                          config)
    if idx.shape[0] == 0 or not backend.scalar(xp.any(seeds)):
        return None
    return _cosmic_ray_map(backend, image, sigma, usable, significant, ratios, config)


def _cosmic_ray_map(backend, image, sigma, usable, significant, ratios, config):
    """:func:`find_cosmic_rays` over the frame: the sharp significant pixels, their tracks,
    grown; None when no pixel is sharp."""
    xp = backend.xp
    sharp, loose = _sharpness(xp, image, sigma, lambda dy, dx: _shifted(backend, image, dy, dx),
                              lambda dy, dx: _shifted(backend, usable, dy, dx), ratios, config)
    cr = significant & sharp
    if not backend.host_memory and not backend.scalar(xp.any(cr)):
        return None
    # a track's pixels: significant, and sharper than the PSF (not a star it crosses)
    neighbours = usable & loose & (image > config.neighbourSigma * sigma)
    for _ in range(2):  # along the track
        near = window_or(backend, xp.astype(cr, xp.uint8), (3, 3), (-1, -1), 1) > 0
        cr = cr | (near & neighbours)
    g = 2 * config.grow + 1
    return window_or(backend, xp.astype(cr, xp.uint8), (g, g), (-config.grow, -config.grow),
                     1) > 0


def repair_cosmic_rays(exposure: Exposure, psf: np.ndarray, config: CosmicRayConfig, backend,
                       has_cosmic_rays: bool | None = None):
    """The exposure (on the backend) with its cosmic rays found, flagged CR | INTRP and
    interpolated; as it is when its mask already has cosmic rays (``has_cosmic_rays``, when
    already known) or none are found."""
    xp = backend.xp
    if "CR" not in exposure.mask_planes:
        return exposure
    if has_cosmic_rays is None:
        has_cosmic_rays = backend.scalar(xp.any((exposure.mask & exposure.bit("CR")) != 0))
    if has_cosmic_rays:
        return exposure
    good = _usable(exposure)
    sky = median_where_device(backend, exposure.image, good)
    sky = xp.where(xp.isnan(sky), 0.0, sky)  # no usable pixel: nothing to find anyway
    cr = find_cosmic_rays(exposure, psf, config, backend, sky, good)
    if cr is None:
        return exposure
    image = interpolate_masked(backend, exposure.image, cr, good, config.repairBox, sky)
    mask = xp.where(cr, exposure.mask | exposure.bit("CR", "INTRP"), exposure.mask)
    log.info("cosmic rays found, masked and interpolated")
    return exposure.replace(image=image, mask=mask)
