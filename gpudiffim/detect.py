"""Detection of both signs on a difference (or score) image.

The difference is filtered with its own PSF (a matched filter) and divided by the
filtered noise, so the significance image is in units of the optimal point-source
S/N; a score image is already matched-filtered and is thresholded as it is. Pixels
above ``thresholdValue`` and below ``-thresholdValue`` form positive and negative
footprints (8-connected), grown by ``growFootprint`` pixels; positive and negative
footprints that touch merge into one source, a dipole candidate. Masked pixels
(NO_DATA, EDGE, BAD, SAT, SAT_TEMPLATE, and CR: interpolated cosmic rays) cannot seed a
detection.

Thresholding, filtering, labelling and growing run on the backend; the footprints'
pixel lists (small) come to the host for peak bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import get_backend
from .convolve import fft_convolve
from .exposure import UNUSABLE_PLANES, Exposure, mask_bits
from .kernel_fit import _gather


@dataclass(frozen=True)
class DetectionConfig:
    """Detection settings (``ip_diffim``/``meas_algorithms`` names)."""

    thresholdValue: float = 5.0
    growFootprint: int = 2
    badMaskPlanes: tuple = ("NO_DATA", "EDGE", "BAD", "SAT", "SAT_TEMPLATE", "CR")
    minPixels: int = 1
    # gpudiffim's own: add the kernel's own error to the noise near bright sources (see
    # :func:`residual_scale`). On 24 no-change 2048^2 pairs: 30 detections -> 18, the 15
    # within 20 px of 14.8-17.6 mag stars -> 3; white noise through the same pipeline gives 14
    doResidualVariance: bool = True


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

    def __len__(self) -> int:
        return len(self.x)

    @property
    def is_dipole(self) -> np.ndarray:
        return (self.pos_x >= 0) & (self.neg_x >= 0)


def significance_image(difference: Exposure, is_score: bool, backend=None,
                       residual_power=None, calibrate_at=None, box: int = 0):
    """Signed S/N image: matched-filtered difference over its noise (score: as it is).

    With ``residual_power`` (the box-summed square of the image the kernel convolved, see
    :class:`~gpudiffim.subtract.SubtractionResult`) and ``calibrate_at`` (host (n, 2)
    positions of bright isolated stars, the kernel sources), the noise also carries the
    matching's own error, ``residual_scale * residual_power`` (:func:`residual_scale`).
    """
    return _significance(difference, is_score, get_backend(backend), residual_power,
                         calibrate_at, box)[0]


def _significance(difference, is_score, backend, residual_power, calibrate_at, box):
    """:func:`significance_image` and the residual scale it used (0: none)."""
    xp = backend.xp
    image, var = backend.asarray(difference.image), backend.asarray(difference.variance)
    unusable = (backend.asarray(difference.mask)
                & difference.bit(*UNUSABLE_PLANES)) != 0
    image = xp.where(unusable, 0.0, image)  # masked values must not leak into the filter
    if not is_score:
        ny, nx = difference.shape
        psf = difference.psf.image_at((nx - 1) / 2, (ny - 1) / 2)
        psf = psf / psf.sum()
        image = fft_convolve(image, backend.to_device(np.flip(psf).astype(np.float32)), backend)
        var = fft_convolve(var, backend.to_device((psf**2).astype(np.float32)), backend)
    scale = 0.0
    if residual_power is not None and calibrate_at is not None:
        scale = residual_scale(backend, image, var, residual_power, ~unusable & (var > 0),
                               calibrate_at, box)
        if scale > 0:
            var = var + scale * residual_power
    ok = var > 0
    return xp.where(ok, image / xp.sqrt(xp.where(ok, var, 1.0)), 0.0), scale


def residual_scale(backend, image, var, power, good, positions, box: int) -> float:
    """How much variance the matching's own error leaves per unit of ``power``.

    A kernel off by ``dk`` leaves ``dk * I`` in the difference, ``I`` the image it
    convolved, with variance ``sum_m var(dk(m)) I(x - m)^2``: for errors alike over the
    kernel's box, a scale times ``I^2`` summed over that box (``power``). Around each
    calibration star the (filtered) difference's excess over its noise,
    ``sum (image^2 - var)``, against ``sum power``, in boxes of ``box`` pixels; the scale
    is the brightness-weighted median of those ratios (a variable star among them does not
    move it), 0 where the difference is as quiet as its noise. ZOGY (Zackay et al. 2016)
    adds the like for registration and flux-scale errors.
    """
    xp = backend.xp
    ny, nx = image.shape
    h = box // 2
    pos = np.asarray(positions, np.int64).reshape(-1, 2)
    inside = ((pos[:, 0] >= h) & (pos[:, 0] < nx - h) & (pos[:, 1] >= h) & (pos[:, 1] < ny - h))
    if box < 1 or not inside.any():
        return 0.0
    p = backend.to_device(pos[inside])
    w = xp.astype(_gather(backend, good, p, box), xp.float64)
    excess = (xp.astype(_gather(backend, image, p, box), xp.float64) ** 2
              - xp.astype(_gather(backend, var, p, box), xp.float64))
    e = backend.to_host(xp.sum(xp.reshape(excess * w, (w.shape[0], -1)), axis=1))
    pw = backend.to_host(xp.sum(xp.reshape(xp.astype(_gather(backend, power, p, box), xp.float64)
                                           * w, (w.shape[0], -1)), axis=1))
    use = pw > 0
    if not use.any():
        return 0.0
    ratio, weight = e[use] / pw[use], pw[use]
    order = np.argsort(ratio)
    cum = np.cumsum(weight[order])
    return max(0.0, float(ratio[order][np.searchsorted(cum, 0.5 * cum[-1])]))


def _peaks(backend, labels, snr, n, sign):
    """Host (x, y, value) of the most significant pixel of each label 1..n for one sign."""
    xp = backend.xp
    ys, xs = xp.nonzero(labels > 0)
    lab = backend.to_host(labels[ys, xs])
    val = backend.to_host(snr[ys, xs]) * sign
    ys, xs = backend.to_host(ys), backend.to_host(xs)
    order = np.lexsort((val, lab))  # by label, then value: the last of each label is its peak
    last = np.r_[np.nonzero(np.diff(lab[order]))[0], len(order) - 1] if len(order) else []
    best = order[last] if len(order) else np.array([], int)
    out = np.full((n + 1, 3), -1.0)
    out[lab[best], 0] = xs[best]
    out[lab[best], 1] = ys[best]
    out[lab[best], 2] = val[best] * sign
    area = np.bincount(lab, minlength=n + 1)
    return out[1:], area[1:]


def detect(difference: Exposure, is_score: bool = False,
           config: DetectionConfig = DetectionConfig(), backend=None,
           residual_power=None, calibrate_at=None, box: int = 0) -> Detections:
    """Find positive, negative and dipole sources on a difference or score image.

    ``residual_power``, ``calibrate_at`` and ``box``: see :func:`significance_image` (used
    when ``config.doResidualVariance``).
    """
    backend = get_backend(backend)
    xp = backend.xp
    if not config.doResidualVariance:
        residual_power = None
    snr, scale = _significance(difference, is_score, backend, residual_power, calibrate_at, box)
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
                          *([empty.astype(int)] * 4), merged, snr, scale)
    pos_lab = xp.where(grown["pos"] & (snr * 1.0 >= t) & ~bad, merged, 0)
    neg_lab = xp.where(grown["neg"] & (snr * -1.0 >= t) & ~bad, merged, 0)
    pos, _ = _peaks(backend, pos_lab, snr, n, 1.0)
    neg, _ = _peaks(backend, neg_lab, snr, n, -1.0)
    _, area = _peaks(backend, merged, snr, n, 1.0)
    use_pos = pos[:, 2] * (pos[:, 0] >= 0) >= -neg[:, 2] * (neg[:, 0] >= 0)
    peak = np.where(use_pos[:, None], pos, neg)
    keep = (peak[:, 0] >= 0) & (area >= config.minPixels)
    pos, neg, peak, area = pos[keep], neg[keep], peak[keep], area[keep]
    return Detections(peak[:, 0].astype(int), peak[:, 1].astype(int), peak[:, 2], area,
                      pos[:, 0].astype(int), pos[:, 1].astype(int),
                      neg[:, 0].astype(int), neg[:, 1].astype(int), merged, snr, scale)
