"""Peaks of one footprint split into separate sources.

Neighbouring changes (a transient beside another, a supernova on one side of a galaxy and a
variable nucleus) grow into one footprint. Its significant peaks are separate sources when
the significance dips between them, as SExtractor and the LSST deblender split peaks: a peak
of significance ``v`` is kept beside every brighter kept peak if the lowest significance on
the straight line between them is under ``v - max(contrast * v, min_dip)`` (or the line
leaves the footprint). A footprint with peaks of both signs is a dipole and stays whole.

A neighbour closer than that (1.5 PSF FWHM at S/N 10 beside S/N 30) leaves no dip, only a
shoulder. :func:`residual_peaks` takes each kept source's own profile off the filtered image
(the filter's response to a point source at its sub-pixel position, scaled to its peak) and
keeps what stands above the threshold in the rest, as DAOPHOT finds stars in the residual
of its first fit.

Everything here works on the host on the footprints' pixel lists (the pixels detection
already reads back), not on images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FootprintPixels", "local_maxima", "split_peaks", "subpixel_peaks", "residual_peaks"]


@dataclass(frozen=True)
class FootprintPixels:
    """The pixels of every footprint: coordinates, footprint label, signed significance, and
    whether the pixel may seed a detection (host arrays of one length)."""

    ys: np.ndarray
    xs: np.ndarray
    labels: np.ndarray
    values: np.ndarray
    eligible: np.ndarray
    noise: np.ndarray | None = None  # the significance's noise (filtered-flux units)
    bits: np.ndarray | None = None  # the difference's mask bits

    def seeds(self, sign: float, threshold: float) -> np.ndarray:
        """``sign`` x significance where a pixel may seed and reaches ``threshold``, -inf
        elsewhere (a footprint's peaks of that sign are its maxima)."""
        signed = sign * self.values
        return np.where(self.eligible & (signed >= threshold), signed, -np.inf)

    def lookup(self, nx: int, values=None):
        """A function mapping (ys, xs) arrays to the pixels' ``values`` (default: their
        significance; -inf off every footprint)."""
        values = self.values if values is None else values
        key = self.ys.astype(np.int64) * nx + self.xs
        order = np.argsort(key)
        sorted_key, sorted_values = key[order], values[order]

        def at(ys, xs):
            k = np.asarray(ys, np.int64) * nx + np.asarray(xs, np.int64)
            i = np.clip(np.searchsorted(sorted_key, k), 0, max(len(sorted_key) - 1, 0))
            found = (len(sorted_key) > 0) & (sorted_key[i] == k) & (xs >= 0) & (xs < nx)
            return np.where(found, sorted_values[i] if len(sorted_key) else 0.0, -np.inf)

        return at


def local_maxima(pixels: FootprintPixels, sign: float, threshold: float, nx: int,
                 radius: int = 2) -> np.ndarray:
    """Indices of the eligible pixels whose ``sign`` x significance is at least
    ``threshold`` and the largest within ``radius`` (ties: the first in raster order)."""
    value = pixels.seeds(sign, threshold)
    at = pixels.lookup(nx, value)
    cand = np.flatnonzero(np.isfinite(value))
    ys, xs, v = pixels.ys[cand], pixels.xs[cand], value[cand]
    key = ys.astype(np.int64) * nx + xs
    best = np.ones(len(cand), bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy or dx:
                nv = at(ys + dy, xs + dx)
                nkey = (ys + dy).astype(np.int64) * nx + xs + dx
                best &= (v > nv) | ((v == nv) & (key < nkey))
    return cand[best]


def split_peaks(pixels: FootprintPixels, peaks: np.ndarray, sign: float, nx: int,
                contrast: float = 0.3, min_dip: float = 2.0,
                min_separation: float = 3.0) -> list[np.ndarray]:
    """The ``peaks`` (pixel indices, one sign) grouped by footprint and thinned to those
    separated by a dip (see the module): one array per footprint with more than one kept
    peak, brightest first."""
    at = pixels.lookup(nx, sign * pixels.values)
    out = []
    labels = pixels.labels[peaks]
    for lab in np.unique(labels):
        members = peaks[labels == lab]
        if len(members) < 2:
            continue
        members = members[np.argsort(-sign * pixels.values[members], kind="stable")]
        kept = [members[0]]
        for m in members[1:]:
            v = sign * pixels.values[m]
            if all(_separated(pixels, at, m, k, v, contrast, min_dip, min_separation)
                   for k in kept):
                kept.append(m)
        if len(kept) > 1:
            out.append(np.array(kept))
    return out


def _separated(pixels, at, m, k, v, contrast, min_dip, min_separation) -> bool:
    """Whether peak ``m`` (value ``v``) is a source of its own beside peak ``k``."""
    y0, x0, y1, x1 = pixels.ys[m], pixels.xs[m], pixels.ys[k], pixels.xs[k]
    steps = int(max(abs(y1 - y0), abs(x1 - x0)))
    if np.hypot(y1 - y0, x1 - x0) < min_separation:
        return False
    t = np.arange(1, steps) / steps
    line = at(np.rint(y0 + t * (y1 - y0)).astype(int), np.rint(x0 + t * (x1 - x0)).astype(int))
    return bool(len(line) and line.min() <= v - max(contrast * v, min_dip))


def subpixel_peaks(at, xs, ys, radius: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel offsets (within +-0.5) of peaks at integer ``xs``, ``ys``: a Gaussian
    (a quadratic in the log, separable) fitted by least squares to the values
    ``at(ys, xs)`` returns on the (2 radius + 1)^2 around each (a wider window than the
    3x3 steadies the centre of a flat-topped peak); 0 where a value is off the
    footprint or the fit does not curve down."""
    xs, ys = np.asarray(xs, np.int64), np.asarray(ys, np.int64)
    o = np.arange(-radius, radius + 1)
    oy, ox = (a.ravel() for a in np.meshgrid(o, o, indexing="ij"))
    raw = np.stack([at(ys + j, xs + i) for j, i in zip(oy, ox)], axis=1)
    centre = raw[:, len(ox) // 2:len(ox) // 2 + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(np.isfinite(raw), np.log(np.maximum(raw, 1e-3 * centre)), np.nan)
        q = o * o - np.mean(o * o)  # orthogonal to the constant and the linear term
        qx, qy = ox * ox - np.mean(o * o), oy * oy - np.mean(o * o)
        slope_x, slope_y = s @ ox / np.sum(ox * ox), s @ oy / np.sum(oy * oy)
        curve_x, curve_y = s @ qx / (len(o) * np.sum(q * q)), s @ qy / (len(o) * np.sum(q * q))
        dx, dy = -slope_x / (2 * curve_x), -slope_y / (2 * curve_y)
    ok = (curve_x < 0) & (curve_y < 0) & (np.abs(dx) <= 0.5) & (np.abs(dy) <= 0.5)
    return np.where(ok, dx, 0.0), np.where(ok, dy, 0.0)


def residual_peaks(pixels: FootprintPixels, sources: np.ndarray, profiles, sign: float,
                   threshold: float, nx: int, min_separation: float,
                   floor: float) -> np.ndarray:
    """Sources hidden in the shoulders of others: peaks of a footprint's significance once
    the profiles of its known sources are taken off.

    Parameters
    ----------
    pixels : FootprintPixels
        Every footprint's pixels, with their ``noise``.
    sources : ndarray
        (K, 3) integer (x, y, label) of the known sources of sign ``sign``.
    profiles : callable
        ``profiles(x, y)`` (float arrays of K positions) -> (K, T, T) host images, T odd: the
        filtered image's response to a point source at each position, centred on the pixel
        nearest it (any normalisation).
    sign : float
        +1 or -1.
    threshold : float
        The residual significance a new source reaches.
    nx : int
        The image's width.
    min_separation : float
        A new source is at least this far (pixels) from every known one of its footprint,
        where the profiles' own errors (PSF model, sub-pixel position) are largest.
    floor : float
        ... and its filtered flux is at least this fraction of its footprint's brightest
        known source's (the PSF model's error scales with the source). The residual (above
        2 sigma) on the far side of its nearest known source must also be under half that
        on its own side: one source wider than the profile leaves a balanced residual, a
        neighbour does not.

    Returns
    -------
    ndarray
        (M, 4) rows (label, x, y, signed residual significance), brightest first within a
        footprint; new sources of one footprint are ``min_separation`` apart.
    """
    sources = np.asarray(sources, np.int64).reshape(-1, 3)
    if not len(sources) or pixels.noise is None:
        return np.zeros((0, 4))
    flux = sign * pixels.values * pixels.noise  # filtered flux, this sign positive
    at = pixels.lookup(nx, flux)
    x, y, lab = sources[:, 0], sources[:, 1], sources[:, 2]
    dx, dy = subpixel_peaks(at, x, y)
    g = np.asarray(profiles(x + dx, y + dy), float)
    h = g.shape[-1] // 2
    peak = at(y, x)
    amp = peak / np.where(g[:, h, h] > 0, g[:, h, h], np.inf)
    # every (source, pixel of its footprint) pair
    order = np.argsort(pixels.labels, kind="stable")
    first = np.searchsorted(pixels.labels[order], lab)
    count = np.searchsorted(pixels.labels[order], lab, side="right") - first
    rep = np.repeat(np.arange(len(sources)), count)
    within = np.arange(len(rep)) - np.repeat(np.cumsum(count) - count, count)
    pix = order[np.repeat(first, count) + within]
    ox, oy = pixels.xs[pix] - x[rep], pixels.ys[pix] - y[rep]
    inside = (np.abs(ox) <= h) & (np.abs(oy) <= h)
    contrib = np.where(inside, amp[rep] * g[rep, np.clip(oy + h, 0, 2 * h),
                                            np.clip(ox + h, 0, 2 * h)], 0.0)
    n = len(pixels.values)
    model = np.bincount(pix, contrib, minlength=n)
    nearest = np.full(n, np.inf)
    np.minimum.at(nearest, pix, ox * ox + oy * oy)
    brightest = np.zeros(n)
    np.maximum.at(brightest, pix, peak[rep])
    left = flux - model
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(pixels.noise > 0, left / pixels.noise, 0.0)
    closest = np.full(n, -1)  # each pixel's nearest known source
    d2 = np.where(inside, ox * ox + oy * oy, np.inf)
    by_distance = np.lexsort((d2, pix))
    head = by_distance[np.r_[True, np.diff(pix[by_distance]) != 0]]
    closest[pix[head]] = rep[head]
    candidate = (pixels.eligible & (brightest > 0) & (nearest >= min_separation**2)
                 & (left >= floor * brightest) & (closest >= 0))
    residual = FootprintPixels(pixels.ys, pixels.xs, pixels.labels, r, candidate)
    found = local_maxima(residual, 1.0, threshold, nx)
    found = found[np.lexsort((-r[found], pixels.labels[found]))]
    cx, cy = x + dx, y + dy
    strong = np.flatnonzero(r > 2.0)  # the residual the balance is taken over
    rows = []
    for i in found:  # few: a footprint's shoulders
        # one source wider than the profile (two unresolved ones, a trail, a galaxy's
        # residual) leaves a residual balanced about it; a neighbour's is on one side
        j = closest[i]
        mine = strong[closest[strong] == j]
        side = ((pixels.xs[mine] - cx[j]) * (pixels.xs[i] - cx[j])
                + (pixels.ys[mine] - cy[j]) * (pixels.ys[i] - cy[j]))
        if np.sum(r[mine][side < 0]) > 0.5 * np.sum(r[mine][side > 0]):
            continue
        kept = [(px, py) for lb, px, py, _ in rows if lb == pixels.labels[i]]
        if all(np.hypot(pixels.xs[i] - px, pixels.ys[i] - py) >= min_separation
               for px, py in kept):
            rows.append((pixels.labels[i], pixels.xs[i], pixels.ys[i], sign * r[i]))
    return np.array(rows, float).reshape(-1, 4)
