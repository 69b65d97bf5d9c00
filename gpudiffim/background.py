"""The difference's background, re-fitted over empty sky.

The kernel fit's differential background is fitted on stamps around bright stars, where it
absorbs PSF-wing flux that empty sky does not have; the difference's own background is
then re-fitted (a Chebyshev plane) over pixels far from every science source.
"""

from __future__ import annotations

import numpy as np

from .spatial import chebyshev_terms, linear_term_map, polynomial_terms, scaled_coords, term_factors
from .stats import robust_sigma_where_device

__all__ = ["QUIET", "BLOCK", "quiet_blocks", "quiet_pixels", "refit_sky_plane"]


QUIET = ((3.0, 4), (30.0, 12), (300.0, 30))  # (S/N, reach in pixels) that empty sky avoids
BLOCK = 4  # empty sky is decided on blocks of this many pixels a side


def quiet_blocks(backend, snr, block: int = BLOCK, quiet: tuple = QUIET):
    """Boolean map of the ``block`` x ``block`` blocks of empty sky (device, the whole blocks
    of ``snr``'s shape): for each (S/N, reach) of ``quiet``, farther than ``reach`` pixels
    from wherever the science's matched-filter S/N ``snr`` reaches that level in either sign
    (symmetric cuts leave the noise unbiased)."""
    xp = backend.xp
    ny, nx = (snr.shape[0] // block) * block, (snr.shape[1] // block) * block
    z = xp.abs(snr[:ny:block, :nx:block])
    sky = None
    for level, reach in quiet:
        near = backend.maximum_filter(xp.astype(z >= level, xp.uint8), 2 * (reach // block) + 1)
        sky = (near == 0) if sky is None else sky & (near == 0)
    return sky


def quiet_pixels(backend, blocks, shape, block: int = BLOCK):
    """:func:`quiet_blocks` at full resolution, over ``shape`` (partial blocks at the far
    edges are not empty sky)."""
    xp = backend.xp
    full = xp.repeat(xp.repeat(blocks, block, axis=0), block, axis=1)
    ny, nx = shape
    pad_y, pad_x = ny - full.shape[0], nx - full.shape[1]
    if pad_y:
        full = xp.concat([full, backend.zeros((pad_y, full.shape[1]), dtype=full.dtype)], axis=0)
    if pad_x:
        full = xp.concat([full, backend.zeros((ny, pad_x), dtype=full.dtype)], axis=1)
    return full


def refit_sky_plane(backend, diff, good, sky, bbox, order: int, block: int = BLOCK,
                    clip: float = 3.0):
    """Background plane of the difference over empty sky, and its value at the centre.

    Empty sky: good pixels within ``clip`` robust sigmas of zero in the blocks ``sky`` marks
    (:func:`quiet_blocks`). Every such pixel counts (the offsets sought are ~1% of the pixel
    noise); the plane is the weighted least-squares fit of the Chebyshev terms to the
    blocks' sums.
    """
    xp = backend.xp
    ny, nx = (diff.shape[0] // block) * block, (diff.shape[1] // block) * block
    d = diff[:ny, :nx]
    sigma = robust_sigma_where_device(backend, d, good[:ny, :nx])
    use = good[:ny, :nx] & (xp.abs(d) < clip * sigma)
    shape = (ny // block, block, nx // block, block)
    w = xp.sum(xp.astype(xp.reshape(use, shape), xp.float64), axis=(1, 3))
    wd = xp.sum(xp.reshape(xp.where(use, xp.astype(d, xp.float64), 0.0), shape), axis=(1, 3))
    w, wd = xp.where(sky, w, 0.0), xp.where(sky, wd, 0.0)
    # the terms at the blocks' centres, from their 1-D factors (host, small)
    tu, tv = term_factors(diff.shape, bbox, order)
    tu, tv = tu[block // 2:nx:block], tv[block // 2:ny:block]
    powers = polynomial_terms(order)
    t = backend.to_device(np.array([np.outer(tv[:, b], tu[:, a]).ravel() for a, b in powers]))
    w, wd = xp.reshape(w, (-1,)), xp.reshape(wd, (-1,))
    total, normal, rhs = backend.to_host_all(  # one device read
        xp.sum(w), xp.matmul(t * w, backend.matrix_transpose(t)), xp.matmul(t, wd))
    if total < 100 * t.shape[0]:
        return 0.0, 0.0
    coeffs = np.linalg.solve(normal, rhs)
    plane = linear_term_map(coeffs, diff.shape, bbox, order, backend)
    u, v = scaled_coords(diff.shape[1] // 2, diff.shape[0] // 2, bbox)
    return plane, float(np.sum(coeffs * chebyshev_terms(np, np.asarray(u), np.asarray(v), order)))
