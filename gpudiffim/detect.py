"""Detection of both signs on a difference (or score) image.

The difference is filtered with its own PSF where each pixel is (a matched filter that
follows a spatially varying PSF model, :mod:`~gpudiffim.matched_filter`) and divided by the
filtered noise, so the significance image is in units of the optimal point-source
S/N; a score image is already matched-filtered and is thresholded as it is. Pixels
above ``thresholdValue`` and below ``-thresholdValue`` form positive and negative
footprints (8-connected), grown by ``growFootprint`` pixels; positive and negative
footprints that touch merge into one source, a dipole candidate; a footprint of one sign
is split into its sources (:mod:`~gpudiffim.deblend`: peaks separated by a dip, then those
left standing once the others' profiles are taken off). Masked pixels
(:data:`~gpudiffim.exposure.DETECTION_EXCLUDED`: NO_DATA, EDGE, BAD, SAT, SAT_TEMPLATE, and
CR, interpolated cosmic rays) cannot seed a detection. With the subtraction's
:class:`~gpudiffim.noise.NoiseModel` the noise also carries the template's misregistration
and the kernel's own error near bright sources, both measured here at the kernel sources.

Thresholding, filtering, labelling and growing run on the backend; the footprints'
pixel lists (small) come to the host for peak bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import fftconvolve

from .backend import get_backend
from .deblend import FootprintPixels, local_maxima, residual_peaks, split_peaks
from .exposure import DETECTION_EXCLUDED, UNUSABLE_PLANES, Exposure, mask_bits
from .matched_filter import matched_filter
from .noise import NoiseModel, registration_scale, registration_variance, residual_scale
from .options import configclass, option
from .psf import psf_stack

__all__ = ["DetectionConfig", "Detections", "significance_image", "point_source_profiles",
           "detect"]


@configclass
class DetectionConfig:
    """Detection settings (``ip_diffim``/``meas_algorithms`` names)."""

    thresholdValue: float = option(5.0, "detection threshold, in units of the noise")
    growFootprint: int = option(2, "footprints grow by this many pixels")
    badMaskPlanes: tuple = option(DETECTION_EXCLUDED, "mask planes that cannot seed a "
                                                      "detection")
    minPixels: int = option(1, "smallest footprint kept (pixels)")
    doResidualVariance: bool = option(True, "add the kernel's own error near bright sources "
                                            "and the template's misregistration to the noise")
    minRegistrationSigma: float = option(0.01, "misregistration (pixels rms per axis) below "
                                               "which none is added")
    doDeblend: bool = option(True, "split a footprint's peaks of one sign separated by a "
                                   "dip into sources of their own")
    deblendContrast: float = option(0.3, "a peak is a source of its own when the significance "
                                         "dips between it and a brighter one by this "
                                         "fraction of its own...")
    deblendMinDip: float = option(2.0, "... and by at least this much")
    deblendMinSeparation: float = option(3.0, "peaks closer than this (pixels) are one source")
    doDeblendResiduals: bool = option(True, "look for sources in what is left of a footprint "
                                            "once its sources' profiles are taken off")
    deblendResidualThreshold: float = option(7.0, "such a source's significance in what is "
                                                  "left (the profiles' errors add to the "
                                                  "noise there)...")
    deblendResidualSeparation: float = option(1.0, "... its distance from every other of its "
                                                   "footprint (PSF FWHM)...")
    deblendResidualFloor: float = option(0.1, "... and has at least this fraction of the "
                                              "brightest one's filtered flux")
    minFilterCorrelation: float = option(0.995, "the PSF at the detector's centre filters "
                                                "all of it when it correlates this well with "
                                                "the PSF everywhere; else the filter follows "
                                                "the PSF model")


@dataclass(frozen=True, eq=False)
class Detections:
    """Detected sources (host arrays, one entry per source) and the significance image."""

    x: np.ndarray  # peak of |significance| (int pixel)
    y: np.ndarray
    significance: np.ndarray  # signed peak significance
    area: np.ndarray  # footprint pixels (grown)
    pos_x: np.ndarray  # positive and negative peaks (-1 where that sign is absent)
    pos_y: np.ndarray
    neg_x: np.ndarray
    neg_y: np.ndarray
    labels: object  # backend int32 image of footprint ids (1..n; 0 = none)
    snr_image: object  # backend significance image
    residual_scale: float = 0.0  # variance per unit of residual power (0: none added)
    registration_scale: float = 0.0  # misregistration variance per axis (pixels^2)
    blend: np.ndarray | None = None  # index of the blend's brightest source (-1: none)
    pixels: FootprintPixels | None = None  # the footprints' pixels, as read (host)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def is_dipole(self) -> np.ndarray:
        return (self.pos_x >= 0) & (self.neg_x >= 0)


def significance_image(difference: Exposure, is_score: bool, backend=None,
                       noise: NoiseModel | None = None):
    """Signed S/N image: matched-filtered difference over its noise (score: as it is).

    With a ``noise`` model that has residual power and calibration positions, the noise also
    carries the template's misregistration (:func:`~gpudiffim.noise.registration_variance`
    of ``psf * g_T * T``) with ``sigma^2`` from the kernel sources' residual shifts
    (:func:`~gpudiffim.noise.registration_scale`), and the matching's own error,
    ``scale * residual_power``, the scale measured around the kernel sources
    (:func:`~gpudiffim.noise.residual_scale`).
    """
    return _significance(difference, is_score, get_backend(backend), noise,
                         DetectionConfig())[0]


def point_source_profiles(difference: Exposure, is_score: bool, size: int | None = None):
    """A function of float positions ``(xs, ys)`` giving the (n, size, size) host images of
    the significance's numerator around a point source at each: the difference's PSF there
    correlated with the filter (the PSF at the nearest pixel), or for a score, which is
    filtered already, its PSF itself; centred on the nearest pixel, any normalisation."""
    psf = difference.psf
    if size is None:
        full = psf.image_at().shape[0]
        size = min(full - 1 + full % 2, 2 * int(np.ceil(3 * np.max(psf.fwhm()))) + 1)

    def at(xs, ys):
        moved = psf_stack(psf, xs, ys, size)
        if is_score:
            return moved
        centred = psf_stack(psf, np.round(xs), np.round(ys), size)
        return fftconvolve(moved, centred[:, ::-1, ::-1], mode="same", axes=(1, 2))

    return at


def _significance(difference, is_score, backend, noise, config):
    """:func:`significance_image`, its noise (the numerator's standard deviation), and the
    residual scale and misregistration it used (0: none)."""
    xp = backend.xp
    image, var = backend.asarray(difference.image), backend.asarray(difference.variance)
    unusable = (backend.asarray(difference.mask)
                & difference.bit(*UNUSABLE_PLANES)) != 0
    image = raw = xp.where(unusable, 0.0, image)  # masked values must not leak into the filter
    ny, nx = difference.shape
    psf = difference.psf.image_at((nx - 1) / 2, (ny - 1) / 2)
    psf = psf / psf.sum()
    if not is_score:
        image, var = matched_filter(backend, image, var, difference.psf,
                                    config.minFilterCorrelation)
    scale = shift2 = 0.0
    if noise is not None and noise.registration and noise.calibrate_at is not None:
        template, filt = noise.registration
        shift2 = registration_scale(backend, raw, backend.asarray(difference.variance),
                                    ~unusable, template, filt, noise.calibrate_at,
                                    psf.shape[0], noise.correlation)
        if shift2 > config.minRegistrationSigma**2:  # a score is matched-filtered already
            path = filt if is_score else fftconvolve(np.flip(psf), filt)
            var = var + registration_variance(backend, template, path, shift2)
    if noise is not None and noise.residual_power is not None and noise.calibrate_at is not None:
        power = backend.asarray(noise.residual_power)
        scale = residual_scale(backend, image, var, power, ~unusable & (var > 0),
                               noise.calibrate_at, noise.box)
        if scale > 0:
            var = var + scale * power
    ok = var > 0
    sigma = xp.sqrt(xp.where(ok, var, 0.0))
    return xp.where(ok, image / xp.where(ok, sigma, 1.0), 0.0), sigma, scale, shift2


def _footprint_pixels(backend, labels, snr, eligible, sigma, mask) -> FootprintPixels:
    """Every footprint pixel's position, label, significance, eligibility as a seed, noise
    and mask bits, on the host (one device read)."""
    xp = backend.xp
    ys, xs = xp.nonzero(labels > 0)
    data = backend.to_host(xp.stack([xp.astype(a, xp.float64) for a in (
        ys, xs, labels[ys, xs], snr[ys, xs], eligible[ys, xs], sigma[ys, xs], mask[ys, xs])]))
    return FootprintPixels(data[0].astype(np.int64), data[1].astype(np.int64),
                           data[2].astype(np.int64), data[3], data[4] > 0, data[5],
                           data[6].astype(np.int64))


def _peaks(pixels: FootprintPixels, n: int, sign: float, threshold: float):
    """(n, 3) host (x, y, value) of each label's most significant eligible pixel of one
    sign at or past the threshold (-1 where there is none)."""
    val = pixels.seeds(sign, threshold)
    out = np.full((n + 1, 3), -1.0)
    order = np.lexsort((val, pixels.labels))  # by label, then value: each label's last
    if len(order):
        last = np.r_[np.nonzero(np.diff(pixels.labels[order]))[0], len(order) - 1]
        best = order[last]
        best = best[np.isfinite(val[best])]
        out[pixels.labels[best], 0] = pixels.xs[best]
        out[pixels.labels[best], 1] = pixels.ys[best]
        out[pixels.labels[best], 2] = val[best] * sign
    return out[1:]


def _deblended(pixels, pos, neg, config, nx, profiles, fwhm):
    """Per footprint (0-based label), the extra peaks (host (x, y, value) rows) that
    :func:`~gpudiffim.deblend.split_peaks` separates, then those
    :func:`~gpudiffim.deblend.residual_peaks` finds beside them, for footprints of one
    sign only (a dipole stays whole)."""
    extra = {}
    for sign, own, other in ((1.0, pos, neg), (-1.0, neg, pos)):
        peaks = local_maxima(pixels, sign, config.thresholdValue, nx)
        single = other[pixels.labels[peaks] - 1, 0] < 0
        for group in split_peaks(pixels, peaks[single], sign, nx, config.deblendContrast,
                                 config.deblendMinDip, config.deblendMinSeparation):
            lab = int(pixels.labels[group[0]]) - 1
            rest = [(pixels.xs[g], pixels.ys[g], pixels.values[g]) for g in group
                    if (pixels.xs[g], pixels.ys[g]) != (own[lab, 0], own[lab, 1])]
            extra[lab] = np.array(rest[:len(group) - 1], float)
        if not config.doDeblendResiduals:
            continue
        labs = np.flatnonzero((own[:, 0] >= 0) & (other[:, 0] < 0))
        known = [(own[lab, 0], own[lab, 1], lab + 1) for lab in labs]
        known += [(x, y, lab + 1) for lab in labs for x, y, _ in extra.get(lab, ())]
        for lab, x, y, v in residual_peaks(pixels, np.array(known), profiles, sign,
                                           config.deblendResidualThreshold, nx,
                                           config.deblendResidualSeparation * fwhm,
                                           config.deblendResidualFloor):
            lab = int(lab) - 1
            extra[lab] = np.vstack([extra.get(lab, np.zeros((0, 3))), [(x, y, v)]])
    return extra


def detect(difference: Exposure, is_score: bool = False,
           config: DetectionConfig | None = None, backend=None,
           noise: NoiseModel | None = None) -> Detections:
    """Find positive, negative and dipole sources on a difference or score image.

    Parameters
    ----------
    difference : Exposure
        The difference (or score) image with its mask, variance and PSF.
    is_score : bool
        True for a preconvolution score, which is thresholded as it is.
    config : DetectionConfig, optional
        Threshold, footprint growth and the masks that cannot seed a detection.
    backend : str or Backend, optional
        Where the arrays live.
    noise : NoiseModel, optional
        The subtraction's noise model (:attr:`SubtractionResult.noise`); its residual term
        is used when ``config.doResidualVariance``.

    Returns
    -------
    Detections
        One entry per source (host arrays), the significance image and the residual scale.
    """
    config = config or DetectionConfig()
    backend = get_backend(backend)
    xp = backend.xp
    snr, sigma, scale, shift2 = _significance(difference, is_score, backend,
                                       noise if config.doResidualVariance else None,
                                       config)
    mask = backend.asarray(difference.mask)
    bad = (mask & mask_bits(*config.badMaskPlanes, planes=difference.mask_planes)) != 0
    t = config.thresholdValue
    size = 2 * config.growFootprint + 1
    grown = {}
    for sign, name in ((1.0, "pos"), (-1.0, "neg")):
        seeds = (snr * sign >= t) & ~bad
        grown[name] = backend.maximum_filter(xp.astype(seeds, xp.uint8), size) > 0
    merged, n = backend.label(grown["pos"] | grown["neg"])
    if n == 0:
        empty = np.zeros(0)
        return Detections(*([empty.astype(int)] * 2), empty, empty.astype(int),
                          *([empty.astype(int)] * 4), merged, snr, scale, shift2)
    pixels = _footprint_pixels(backend, merged, snr, ~bad, sigma, mask)
    pos, neg = _peaks(pixels, n, 1.0, t), _peaks(pixels, n, -1.0, t)
    area = np.bincount(pixels.labels, minlength=n + 1)[1:]
    extra = (_deblended(pixels, pos, neg, config, difference.shape[1],
                        point_source_profiles(difference, is_score),
                        float(np.mean(difference.psf.fwhm())))
             if config.doDeblend else {})
    use_pos = pos[:, 2] * (pos[:, 0] >= 0) >= -neg[:, 2] * (neg[:, 0] >= 0)
    peak = np.where(use_pos[:, None], pos, neg)
    rows, blend = [], []
    for lab in np.flatnonzero((peak[:, 0] >= 0) & (area >= config.minPixels)):
        first = len(rows)
        rows.append((*peak[lab], area[lab], *pos[lab, :2], *neg[lab, :2]))
        for x, y, v in extra.get(lab, ()):  # the footprint's other sources, one sign
            p, q = ((x, y), (-1, -1)) if v > 0 else ((-1, -1), (x, y))
            rows.append((x, y, v, area[lab], *p, *q))
        blend += [first if lab in extra else -1] * (len(rows) - first)
    r = np.array(rows, float).reshape(-1, 8)
    i = r.astype(int)
    return Detections(i[:, 0], i[:, 1], r[:, 2], i[:, 3], i[:, 4], i[:, 5], i[:, 6], i[:, 7],
                      merged, snr, scale, shift2, np.array(blend, int), pixels)
