"""Resample a template onto the science pixel grid (Lanczos-3), carrying variance and masks.

The pixel mapping science -> sky -> template comes from the two WCSs (astropy), evaluated
on a coarse grid on the host and interpolated bilinearly (the mapping is smooth); the
resampling itself runs on the backend, one separable Lanczos tap at a time. Variance is
resampled with the squared weights; mask bits are carried from the four nearest template
pixels; science pixels the template does not cover get NO_DATA.
"""

from __future__ import annotations

import numpy as np

from .backend import get_backend
from .errors import GpuDiffimError
from .exposure import Exposure, mask_bits

__all__ = ["LANCZOS_A", "REQUIRED_TEMPLATE_FRACTION", "lanczos", "pixel_mapping",
           "warp_exposure", "same_grid", "template_on_science_grid"]

REQUIRED_TEMPLATE_FRACTION = 0.1  # ip_diffim's requiredTemplateFraction

LANCZOS_A = 3
#: taps x pixels per chunk of the general warp (2 MB of float32: cache-sized on the CPU)
PATCH_CHUNK = 1 << 19


def _coarse_mapping(science_wcs, template_wcs, shape, step: int = 32):
    """Grid rows ``gy``, columns ``gx`` and the template pixel coordinates (ty, tx) there."""
    ny, nx = shape
    gy = np.unique(np.r_[np.arange(0, ny, step), ny - 1]).astype(float)
    gx = np.unique(np.r_[np.arange(0, nx, step), nx - 1]).astype(float)
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    ra, dec = science_wcs.pixel_to_world_values(xx, yy)
    tx, ty = template_wcs.world_to_pixel_values(ra, dec)
    return gy, gx, ty, tx


def pixel_mapping(science_wcs, template_wcs, shape, step: int = 32):
    """Host (ty, tx) float arrays: template pixel coordinates of every science pixel."""
    ny, nx = shape
    gy, gx, ty, tx = _coarse_mapping(science_wcs, template_wcs, shape, step)
    # bilinear interpolation of the coarse mapping onto every pixel
    iy = np.interp(np.arange(ny), gy, np.arange(len(gy)))
    ix = np.interp(np.arange(nx), gx, np.arange(len(gx)))
    y0 = np.clip(np.floor(iy).astype(int), 0, len(gy) - 2)
    x0 = np.clip(np.floor(ix).astype(int), 0, len(gx) - 2)
    fy, fx = (iy - y0)[:, None], (ix - x0)[None, :]

    def interp(g):
        a, b = g[y0][:, x0], g[y0][:, x0 + 1]
        c, d = g[y0 + 1][:, x0], g[y0 + 1][:, x0 + 1]
        return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy

    return interp(ty), interp(tx)


def lanczos(xp, t, a: int = LANCZOS_A):
    """Lanczos weights (``a`` lobes, 3 by default) for offsets ``t`` (array)."""
    pt = np.pi * t
    safe = xp.where(xp.abs(t) < 1e-6, 1.0, pt)
    w = a * xp.sin(safe) * xp.sin(safe / a) / (safe * safe)
    return xp.where(xp.abs(t) < 1e-6, 1.0, xp.where(xp.abs(t) >= a, 0.0, w))


def warp_exposure(template: Exposure, science_wcs, shape, backend=None) -> tuple[Exposure, float]:
    """``template`` resampled onto a grid of ``shape`` with ``science_wcs``.

    Returns the warped exposure (on the backend) and the fraction of science pixels
    the template covers.
    """
    backend = get_backend(backend)
    xp = backend.xp
    th, tw = template.shape
    a = LANCZOS_A
    gy, gx, cty, ctx = _coarse_mapping(science_wcs, template.wcs, shape)
    if (np.abs(ctx - ctx[:1, :]).max() < 1e-3) and (np.abs(cty - cty[:, :1]).max() < 1e-3):
        # axis-aligned mapping (shifts, scales): rows and columns map on their own, so two
        # passes of 1-D taps, and only the two 1-D mappings are interpolated
        ty1 = np.interp(np.arange(shape[0]), gy, cty[:, 0])
        tx1 = np.interp(np.arange(shape[1]), gx, ctx[0, :])
        covered = (((ty1 >= 0) & (ty1 <= th - 1))[:, None]
                   & ((tx1 >= 0) & (tx1 <= tw - 1))[None, :])
        warped = _warp_separable(template, ty1, tx1, covered, backend)
        return warped.replace(wcs=science_wcs), float(covered.mean())
    ty, tx = pixel_mapping(science_wcs, template.wcs, shape)
    covered = (ty >= 0) & (ty <= th - 1) & (tx >= 0) & (tx <= tw - 1)
    fraction = float(covered.mean())
    iy0, ix0 = np.floor(ty).astype(np.int64), np.floor(tx).astype(np.int64)
    fy = backend.to_device((ty - iy0).astype(np.float32))
    fx = backend.to_device((tx - ix0).astype(np.float32))
    iy0d, ix0d = backend.to_device(iy0), backend.to_device(ix0)
    msk = xp.reshape(backend.asarray(template.mask), (-1,))
    # the planes padded by a with their edge values (what clipping each tap's index gave):
    # every tap of a pixel is then the pixel's base index plus a constant
    wide = tw + 2 * a
    img = xp.reshape(_edge_pad(backend, backend.asarray(template.image), a), (-1,))
    var = xp.reshape(_edge_pad(backend, backend.asarray(template.variance), a), (-1,))
    base = backend.to_device((np.clip(iy0, -1, th - 1) + 1) * wide  # the first tap's index
                             + np.clip(ix0, -1, tw - 1) + 1)
    offsets = backend.to_device(np.add.outer(np.arange(2 * a) * wide, np.arange(2 * a)).ravel())
    taps = backend.to_device(np.arange(-a + 1, a + 1, dtype=np.float32))[:, None]
    out, out_var = [], []
    # rows in chunks: each pixel's 2a x 2a patch gathered at once, weighted in one product
    rows = max(1, PATCH_CHUNK // (4 * a * a * shape[1]))
    for r0 in range(0, shape[0], rows):
        r1 = min(r0 + rows, shape[0])
        idx = offsets[:, None] + xp.reshape(base[r0:r1, :], (1, -1))  # (taps, pixels)
        wy = lanczos(xp, xp.reshape(fy[r0:r1, :], (1, -1)) - taps)  # (2a, pixels)
        wx = lanczos(xp, xp.reshape(fx[r0:r1, :], (1, -1)) - taps)
        w = xp.reshape(wy[:, None, :] * wx[None, :, :], (4 * a * a, -1))
        flat = xp.reshape(idx, (-1,))
        g = xp.reshape(xp.take(img, flat), w.shape)
        gv = xp.reshape(xp.take(var, flat), w.shape)
        wsum = xp.sum(w, axis=0)
        out.append(xp.reshape(xp.sum(w * g, axis=0) / wsum, (r1 - r0, shape[1])))
        out_var.append(xp.reshape(xp.sum(w * w * gv, axis=0) / (wsum * wsum),
                                  (r1 - r0, shape[1])))
    out, out_var = xp.concat(out, axis=0), xp.concat(out_var, axis=0)
    mask = backend.zeros(shape, dtype=xp.int32)
    for j in (0, 1):
        for i in (0, 1):
            flat = xp.clip(iy0d + j, 0, th - 1) * tw + xp.clip(ix0d + i, 0, tw - 1)
            mask = mask | xp.reshape(xp.take(msk, xp.reshape(flat, (-1,))), shape)
    outside = backend.to_device(~covered)
    nodata = mask_bits("NO_DATA", planes=template.mask_planes)
    mask = xp.where(outside, mask | nodata, mask)
    out = xp.where(outside, 0.0, out)
    out_var = xp.where(outside, 0.0, out_var)
    warped = template.replace(image=xp.astype(out, xp.float32), mask=mask,
                              variance=xp.astype(out_var, xp.float32), wcs=science_wcs)
    return warped, fraction


def _edge_pad(backend, plane, p: int):
    """``plane`` padded by ``p`` pixels on every side with its edge values."""
    xp = backend.xp
    h, w = plane.shape
    left = xp.broadcast_to(plane[:, :1], (h, p))
    right = xp.broadcast_to(plane[:, w - 1:], (h, p))
    plane = xp.concat([left, plane, right], axis=1)
    top = xp.broadcast_to(plane[:1, :], (p, w + 2 * p))
    bottom = xp.broadcast_to(plane[h - 1:, :], (p, w + 2 * p))
    return xp.concat([top, plane, bottom], axis=0)


def _taps(coords, size):
    """Per output index: 2a tap indices (clipped) and normalised Lanczos weights."""
    a = LANCZOS_A
    i0 = np.floor(coords).astype(np.int64)
    f = coords - i0
    offs = np.arange(-a + 1, a + 1)
    idx = np.clip(i0[:, None] + offs[None, :], 0, size - 1)
    w = lanczos(np, f[:, None] - offs[None, :], a)
    w /= w.sum(axis=1, keepdims=True)
    return idx, w


def _warp_separable(template, ty, tx, covered, backend):
    xp = backend.xp
    th, tw = template.shape
    iy, wy = _taps(ty, th)
    ix, wx = _taps(tx, tw)
    planes = []
    for plane, square in ((template.image, False), (template.variance, True)):
        a = backend.asarray(plane)
        mid = 0.0
        for k in range(ix.shape[1]):
            w = backend.to_device((wx[:, k] ** (2 if square else 1)).astype(np.float32))
            mid = mid + xp.take(a, backend.to_device(ix[:, k]), axis=1) * w[None, :]
        out = 0.0
        for k in range(iy.shape[1]):
            w = backend.to_device((wy[:, k] ** (2 if square else 1)).astype(np.float32))
            out = out + xp.take(mid, backend.to_device(iy[:, k]), axis=0) * w[:, None]
        planes.append(out)
    m = backend.asarray(template.mask)
    near_x, near_y = np.floor(tx).astype(np.int64), np.floor(ty).astype(np.int64)
    mask = None
    for dx in (0, 1):
        cols = xp.take(m, backend.to_device(np.clip(near_x + dx, 0, tw - 1)), axis=1)
        for dy in (0, 1):
            part = xp.take(cols, backend.to_device(np.clip(near_y + dy, 0, th - 1)), axis=0)
            mask = part if mask is None else mask | part
    outside = backend.to_device(~covered)
    nodata = mask_bits("NO_DATA", planes=template.mask_planes)
    mask = xp.where(outside, mask | nodata, mask)
    image = xp.astype(xp.where(outside, 0.0, planes[0]), xp.float32)
    var = xp.astype(xp.where(outside, 0.0, planes[1]), xp.float32)
    return template.replace(image=image, mask=mask, variance=var)


def same_grid(wcs_a, wcs_b, shape, tol: float = 1e-3) -> bool:
    """True when two WCSs map the corners and centre of ``shape`` to the same pixels."""
    if wcs_a is None or wcs_b is None:
        return True
    ny, nx = shape
    x = np.array([0, nx - 1, 0, nx - 1, nx / 2])
    y = np.array([0, 0, ny - 1, ny - 1, ny / 2])
    ra, dec = wcs_a.pixel_to_world_values(x, y)
    xb, yb = wcs_b.world_to_pixel_values(ra, dec)
    return bool(np.all(np.abs(xb - x) < tol) and np.all(np.abs(yb - y) < tol))


def template_on_science_grid(science: Exposure, template: Exposure, backend=None,
                             required: float = REQUIRED_TEMPLATE_FRACTION):
    """``template`` resampled onto the science's pixel grid when the two differ (their WCSs
    or their shapes), with the fraction of the science it covers.

    Raises :class:`~gpudiffim.errors.GpuDiffimError` when the grids differ and a WCS is
    missing, or when the template covers less than ``required`` of the science (ip_diffim's
    ``requiredTemplateFraction``).
    """
    if same_grid(science.wcs, template.wcs, science.shape) and template.shape == science.shape:
        return template, 1.0
    if science.wcs is None or template.wcs is None:
        raise GpuDiffimError(f"template ({template.shape[1]} x {template.shape[0]}) and science "
                             f"({science.shape[1]} x {science.shape[0]}) grids differ and "
                             f"{'the science' if science.wcs is None else 'the template'} has "
                             "no WCS to resample with")
    warped, fraction = warp_exposure(template, science.wcs, science.shape, backend)
    if fraction < required:
        raise GpuDiffimError(f"template covers {100 * fraction:.1f}% of the science image "
                             f"(< {100 * required:.0f}% required)")
    return warped, fraction
