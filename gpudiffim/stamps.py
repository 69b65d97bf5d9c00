"""Stamps: small square cut-outs of a full frame around many positions, in one gather.

Kernel fitting, kernel-source selection, PSF measurement, detection's calibration and
measurement all work on stacks of stamps (n, size, size) taken from a detector-sized plane
with a single indexing operation on the backend. Stamps may reach past the image: those
pixels take a fill value, so no stage needs a padded copy of the frame.
"""

from __future__ import annotations

import numpy as np

from .warp import lanczos

__all__ = ["gather_stamps", "interpolate_stamps"]


def gather_stamps(backend, image, positions, size: int, fill=0):
    """(n, size, size) stamps of a 2-D backend ``image`` centred on integer positions.

    Parameters
    ----------
    backend : Backend
        The backend ``image`` lives on.
    image : array
        The full frame (any dtype).
    positions : array_like
        (n, 2) integer (x, y) centres, host or device.
    size : int
        Odd side of the stamps.
    fill : scalar
        Value of stamp pixels that fall outside the image.

    Returns
    -------
    array
        The stamps, on the backend, in ``image``'s dtype.
    """
    xp = backend.xp
    ny, nx = image.shape
    half = size // 2
    host = isinstance(positions, np.ndarray)
    if host:
        positions = np.asarray(positions, np.int64).reshape(-1, 2)
        inside = bool(len(positions) == 0 or (
            positions[:, 0].min() >= half and positions[:, 0].max() < nx - half
            and positions[:, 1].min() >= half and positions[:, 1].max() < ny - half))
    else:
        inside = False  # device positions: not known here without a device read
    pos = backend.asarray(positions, np.int64)
    off = backend.arange(size) - half
    ys = xp.reshape(pos[:, 1], (-1, 1, 1)) + xp.reshape(off, (1, size, 1))
    xs = xp.reshape(pos[:, 0], (-1, 1, 1)) + xp.reshape(off, (1, 1, size))
    if inside:
        flat = xp.reshape(ys * nx + xs, (-1,))
        return xp.reshape(xp.take(xp.reshape(image, (-1,)), flat), (-1, size, size))
    ok = (ys >= 0) & (ys < ny) & (xs >= 0) & (xs < nx)
    flat = xp.reshape(xp.clip(ys, 0, ny - 1) * nx + xp.clip(xs, 0, nx - 1), (-1,))
    values = xp.reshape(xp.take(xp.reshape(image, (-1,)), flat), (-1, size, size))
    return xp.where(ok, values, backend.full((), fill, dtype=image.dtype))


def interpolate_stamps(backend, stamps, dx, dy, a: int = 5):
    """Each stamp (n, S, S) interpolated at (centre + dx, centre + dy), host offsets, by a
    Lanczos kernel of ``a`` lobes, the weights normalised (host weights, device sums). A
    smooth peak (a PSF of FWHM >= 3 px convolved with itself) is read to 0.25%."""
    xp = backend.xp
    c = stamps.shape[-1] // 2
    offs = np.arange(-a, a + 1)

    def weights(d):
        w = lanczos(np, np.asarray(d, float)[:, None] - offs[None, :], a)
        return backend.to_device(w / w.sum(axis=1, keepdims=True), np.float32)

    wy, wx = weights(dy), weights(dx)
    window = stamps[:, c - a:c + a + 1, c - a:c + a + 1]
    return xp.sum(wy[:, :, None] * wx[:, None, :] * window, axis=(1, 2))
