"""Kernel sources: bright, isolated, unmasked stars spread over the detector.

Both the PSF-matching kernel fit and PSF measurement need stars whose stamps they can trust.
Candidates are the maxima of a matched-filter S/N image (a compensated PSF, so local sky
does not count, and the noise taken from the variance *around* each pixel, so a bright
star's S/N peaks at its centre), kept when their S/N is within a range, their core is
clean, no brighter neighbour shares their stamp, and taken round robin over cells so that
a cap keeps them spread over the detector (``ip_diffim``'s ``sizeCellX`` / ``nStarPerCell``).
"""

from __future__ import annotations

import itertools
import logging

import numpy as np

from .backend import get_backend
from .convolve import fft_convolve
from .options import configclass, option
from .stamps import gather_stamps

__all__ = ["SourceSelectionConfig", "PEAK_FLOOR", "source_snr_maps", "smoothed_variance",
           "box_sizes", "local_peaks", "select_kernel_sources"]

log = logging.getLogger(__name__)


@configclass
class SourceSelectionConfig:
    """Kernel-source selection (``ip_diffim`` names where it has them)."""

    detectionThreshold: float = option(10.0, "lowest matched-filter S/N of a kernel source")
    maxSnr: float = option(2000.0, "highest S/N of a kernel source (ip_diffim: 500)")
    sizeCellX: int = option(128, "cell width (pixels) for spreading sources over the detector")
    sizeCellY: int = option(128, "cell height (pixels)")
    nStarPerCell: int = option(5, "at most this many sources per cell, the brightest")
    maxKernelSources: int = option(400, "at most this many sources in all (ip_diffim: 1000)")
    isolation: float = option(1.0, "no neighbour brighter than this fraction of the source "
                                   "inside its stamp")
    minIsolated: int = option(3, "fewer isolated sources than this: accept any fainter "
                                 "neighbour")
    samePeakRadius: int = option(2, "S/N maxima this close (pixels) are one source")
    cleanCore: int = option(11, "no masked pixel in this central box of a source")


def source_snr_maps(target, target_var, psf_image, backend=None):
    """Matched-filter flux and S/N images of ``target`` and the (ys, xs) of its S/N peaks
    of at least ``PEAK_FLOOR`` (all on the device), for :func:`select_kernel_sources`;
    computed once, they serve several selections."""
    backend = get_backend(backend)
    xp = backend.xp
    # matched filter with a compensated PSF (PSF minus a 65x65 box mean): local sky removed
    psf = np.asarray(psf_image, np.float64)
    size = max(65, psf.shape[0] + 2)
    size += 1 - size % 2
    comp = np.full((size, size), -1.0 / size**2)
    o = (size - psf.shape[0]) // 2
    comp[o:o + psf.shape[0], o:o + psf.shape[1]] += np.flip(psf) / psf.sum()
    flux_map = fft_convolve(target, backend.to_device(comp.astype(np.float32)), backend)
    # where the box reaches past the image it summed fewer sky pixels than it divided by:
    # take the mean over the pixels inside (else stars near an edge, on a sky left in the
    # image, look brighter than they are)
    ny, nx = target.shape[-2:]
    inside = (_box_count(backend, ny, size)[:, None] * _box_count(backend, nx, size)[None, :])
    flux_map = flux_map + backend.uniform_filter(target, size) * (1.0 - size * size / inside)
    # the filter's noise from the variance around each pixel, not at it: with the local
    # variance alone a bright star's S/N is flat over its core (signal and photon noise
    # both follow the profile) and its "peak" lands anywhere within a few pixels
    noise = xp.sqrt(xp.clip(smoothed_variance(backend, target_var, psf / psf.sum(),
                                              float(np.sum(comp**2))), min=0.0))
    snr = flux_map / xp.where(noise > 0, noise, xp.inf)
    return flux_map, snr, local_peaks(backend, snr, PEAK_FLOOR)


def smoothed_variance(backend, variance, profile: np.ndarray, total: float):
    """``variance`` averaged with the weights ``profile**2`` and scaled to ``total`` (the
    squared filter's sum), without a Fourier transform: passes of boxes whose second moments
    add up to the weights' (:func:`box_sizes`), the remainder by blending in a 3-pixel box.
    Exact where the variance is flat; around a star it follows the photon noise on the
    profile's scale, which is all a kernel source's S/N needs."""
    w = np.asarray(profile, np.float64) ** 2
    yy, xx = np.indices(w.shape)
    cy, cx = np.sum(w * yy) / w.sum(), np.sum(w * xx) / w.sum()
    per_axis = np.sum(w * ((yy - cy) ** 2 + (xx - cx) ** 2)) / w.sum() / 2.0
    sizes = box_sizes(per_axis)
    for size in sizes:
        variance = backend.uniform_filter(variance, size)
    blend = float(min(1.0, (per_axis - _boxes_variance(sizes)) * 1.5))  # a 3-box's is 2/3
    if blend > 0.01:
        variance = (1.0 - blend) * variance + blend * backend.uniform_filter(variance, 3)
    return variance * float(total)


def box_sizes(per_axis_variance: float, passes: int = 3) -> tuple:
    """Odd box sides (> 1), at most ``passes`` of them, whose successive passes have the
    largest per-axis variance (``(size**2 - 1) / 12`` each) not above
    ``per_axis_variance``."""
    odd = range(1, 2 * int(np.sqrt(12.0 * per_axis_variance + 1.0)) + 4, 2)
    fits = [c for c in itertools.combinations_with_replacement(odd, passes)
            if _boxes_variance(c) <= per_axis_variance + 1e-9]
    return tuple(s for s in max(fits, key=_boxes_variance) if s > 1)


def _boxes_variance(sizes) -> float:
    """Per-axis variance of successive box passes of odd ``sizes``."""
    return sum((s * s - 1) / 12.0 for s in sizes)


def _box_count(backend, n: int, size: int):
    """How many of a centred ``size`` window's pixels lie inside ``0..n-1``, per pixel."""
    xp = backend.xp
    i = backend.arange(n)
    h = size // 2
    return xp.astype(xp.clip(i + h, max=n - 1) - xp.clip(i - h, min=0) + 1, xp.float32)


PEAK_FLOOR = 5.0  # S/N maxima below this are nobody's kernel source nor a bright neighbour


def local_peaks(backend, snr, floor: float, size: int = 5):
    """Device (ys, xs) of the pixels with ``snr >= floor`` that are the maximum of their
    ``size`` x ``size`` box (row-major order; the box is what lies inside the image). On a
    device a running maximum over the frame, one selection (one sync); in host memory
    only the candidates' boxes are read (the running maximum cost ~0.1 s per 2048^2)."""
    xp = backend.xp
    if not backend.host_memory:
        return xp.nonzero((snr >= floor) & (snr >= backend.maximum_filter(snr, size)))
    ny, nx = snr.shape
    ys, xs = xp.nonzero(snr >= floor)
    off = backend.arange(size) - size // 2
    yy = xp.clip(xp.reshape(ys, (-1, 1)) + xp.reshape(off, (1, -1)), 0, ny - 1)
    xx = xp.clip(xp.reshape(xs, (-1, 1)) + xp.reshape(off, (1, -1)), 0, nx - 1)
    flat = xp.reshape(xp.reshape(yy, (-1, size, 1)) * nx + xp.reshape(xx, (-1, 1, size)), (-1,))
    box = xp.reshape(xp.take(xp.reshape(snr, (-1,)), flat), (-1, size * size))
    keep = snr[ys, xs] >= xp.max(box, axis=1)  # edges clipped: the box is what lies inside
    return ys[keep], xs[keep]


def select_kernel_sources(target, target_var, bad, psf_image,
                          config: SourceSelectionConfig, stamp_size: int, kernel_size: int = 1,
                          backend=None, maps=None) -> np.ndarray:
    """Pick kernel sources on ``target``: matched-filter S/N within
    [detectionThreshold, maxSnr], a clean core (no ``bad`` pixel), isolated within a stamp
    of ``stamp_size``, inside the image with room for that stamp convolved with a kernel of
    ``kernel_size``, at most ``nStarPerCell`` per cell. ``maps``: the
    :func:`source_snr_maps` of ``target``, when already at hand.

    Returns host integer (x, y) pixel positions, brightest first, shape (n, 2).
    """
    backend = get_backend(backend)
    xp = backend.xp
    ny, nx = target.shape
    flux_map, snr, (all_y, all_x) = maps if maps is not None else source_snr_maps(
        target, target_var, psf_image, backend)
    half = (stamp_size + kernel_size - 1) // 2 + 1
    ys, xs = ((all_y, all_x) if config.detectionThreshold >= PEAK_FLOOR
              else local_peaks(backend, snr, config.detectionThreshold))
    # a clean core (masked pixels elsewhere in the stamp just get no weight)
    if xs.shape[0]:
        stamps = gather_stamps(backend, bad, xp.stack([xs, ys], axis=1), config.cleanCore)
        dirty = xp.any(xp.reshape(stamps, (stamps.shape[0], -1)), axis=1)
    else:
        dirty = backend.zeros((0,), dtype=xp.bool)
    hx, hy, s_cand, f_cand, dirty, ox, oy, f_others = backend.to_host_all(  # one device read
        xs, ys, snr[ys, xs], flux_map[ys, xs], dirty, all_x, all_y, flux_map[all_y, all_x])
    pos, others = np.column_stack([hx, hy]), np.column_stack([ox, oy])
    keep = ((s_cand >= config.detectionThreshold) & (s_cand <= config.maxSnr) & ~dirty
            & (hy >= half) & (hy < ny - half) & (hx >= half) & (hx < nx - half))
    pos, s_cand, f_cand = pos[keep], s_cand[keep], f_cand[keep]
    # maxima a pixel or two apart are one source, which must neither count twice nor be
    # taken for its own neighbour
    same = config.samePeakRadius
    first = np.ones(len(pos), bool)
    for k in np.argsort(-s_cand, kind="stable"):
        if first[k]:
            d = np.abs(pos - pos[k]).max(axis=1)
            first[(d <= same) & (np.arange(len(pos)) != k)] = False
    pos, s_cand, f_cand = pos[first], s_cand[first], f_cand[first]
    # isolation: no other peak brighter (in flux) than `isolation` x this one in the stamp
    r = stamp_size / 2 + 2
    brightest_near = np.zeros(len(pos))
    for k, p in enumerate(pos):
        d = np.abs(others - p).max(axis=1)
        near = (d > same) & (d <= r)
        brightest_near[k] = f_others[near].max() if near.any() else -np.inf
    isolated = brightest_near <= config.isolation * f_cand
    if isolated.sum() < config.minIsolated:  # a sparse field: no brighter neighbour
        log.info("%d isolated kernel sources; accepting faint neighbours", int(isolated.sum()))
        isolated = brightest_near <= f_cand
    pos, s_cand = pos[isolated], s_cand[isolated]
    order = np.argsort(-s_cand, kind="stable")
    pos = pos[order]
    cell = ((pos[:, 1] // config.sizeCellY) * (nx // config.sizeCellX + 1)
            + pos[:, 0] // config.sizeCellX)
    rank = np.zeros(len(cell), int)  # brightness rank of each source within its cell
    seen: dict = {}
    for k, c in enumerate(cell):
        rank[k] = seen.get(c, 0)
        seen[c] = rank[k] + 1
    # round robin over the cells (every cell's brightest first), so a cap keeps the spread
    chosen = [k for k in np.lexsort((np.arange(len(cell)), rank)) if rank[k] < config.nStarPerCell]
    return pos[chosen][:config.maxKernelSources]
