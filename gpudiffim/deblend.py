"""Peaks of one footprint split into separate sources.

Neighbouring changes (a transient beside another, a supernova on one side of a galaxy and a
variable nucleus) grow into one footprint. Its significant peaks are separate sources when
the significance dips between them, as SExtractor and the LSST deblender split peaks: a peak
of significance ``v`` is kept beside every brighter kept peak if the lowest significance on
the straight line between them is under ``v - max(contrast * v, min_dip)`` (or the line
leaves the footprint). A footprint with peaks of both signs is a dipole and stays whole.

Everything here works on the host on the footprints' pixel lists (the pixels detection
already reads back), not on images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FootprintPixels", "local_maxima", "split_peaks"]


@dataclass(frozen=True)
class FootprintPixels:
    """The pixels of every footprint: coordinates, footprint label, signed significance, and
    whether the pixel may seed a detection (host arrays of one length)."""

    ys: np.ndarray
    xs: np.ndarray
    labels: np.ndarray
    values: np.ndarray
    eligible: np.ndarray

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
