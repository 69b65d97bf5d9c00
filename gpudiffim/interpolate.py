"""Masked pixels given a value from their unmasked neighbours.

A filter spreads whatever a pixel holds: a hot column's counts, a cosmic ray's charge. Pixels
whose value is known to be wrong but whose neighbourhood is fine (a bad column, a cosmic ray)
take the mean of the usable pixels in a small box around them first, so that a convolution
spreads only that estimate's error and their masks need not grow
(:func:`~gpudiffim.convolve.grow_convolved_mask`).
"""

from __future__ import annotations

__all__ = ["interpolate_masked"]


def interpolate_masked(backend, image, masked, usable, box: int, fallback: float = 0.0):
    """``image`` with its ``masked`` pixels replaced by the mean of the ``usable``, unmasked
    pixels in a ``box`` x ``box`` window around each (normalised box filtering: one pass
    over the image whatever the number of masked pixels), ``fallback`` where the window
    holds none.

    Parameters
    ----------
    backend : Backend
        The backend the arrays live on.
    image : array
        The 2-D image.
    masked, usable : array of bool
        Pixels to replace; pixels whose values may be used.
    box : int
        Side of the window (odd).
    fallback : float
        Value where the window holds no usable pixel (the sky, say).

    Returns
    -------
    array
        The image, float32.
    """
    xp = backend.xp
    clean = xp.astype(usable & ~masked, xp.float32)
    total = backend.uniform_filter(xp.where(masked, 0.0, image) * clean, box)
    weight = backend.uniform_filter(clean, box)
    fill = xp.where(weight > 0, total / xp.where(weight > 0, weight, 1.0), fallback)
    return xp.astype(xp.where(masked, fill, image), xp.float32)
