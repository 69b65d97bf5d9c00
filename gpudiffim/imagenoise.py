"""Variance planes for images that come without one.

Real files often carry no variance: a reduced frame with its sky still in (a Poisson model
from the gain fits it), or a sky-subtracted one (nothing in the header says its noise).
:func:`estimate_variance` chooses:

* **sky still in the image** (its median above twice the robust noise): the sky's Poisson
  and read noise, ``max(image, 0) / gain + (read_noise / gain)^2``, with the header's gain,
  or, without one, an effective gain from the sky itself (``gain = sky / sigma_sky^2``);
* **sky subtracted**: an empirical map of the local sky noise (robust sigmas in blocks,
  median-smoothed and interpolated), plus the sources' own Poisson noise when the gain is
  known.

Either way the difference's variance is later rescaled against its own pixels
(``SubtractConfig.doScaleVariance``), as ``ip_diffim`` does; this only has to be right in
shape. Host-side NumPy: it runs while reading.
"""

from __future__ import annotations

import warnings

import numpy as np
from astropy.stats import mad_std
from scipy import ndimage

__all__ = ["estimate_variance", "local_sky_noise", "source_pixels", "robust_sigma"]


def robust_sigma(values: np.ndarray) -> float:
    """MAD standard deviation of finite values (the plain one if the MAD is 0)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    sigma = float(mad_std(values))
    return sigma if sigma > 0 else float(np.std(values))


def source_pixels(image: np.ndarray, good: np.ndarray, smoothing: float = 2.0,
                  threshold: float = 3.0, grow: int = 4) -> np.ndarray:
    """Pixels on or near a source: where the image smoothed by a Gaussian of ``smoothing``
    pixels rises ``threshold`` times its own (white-noise) scatter above the median, grown
    by ``grow`` pixels (star wings would otherwise inflate a local noise estimate)."""
    values = image[good]
    level, sigma = float(np.median(values)), robust_sigma(values)
    smooth = ndimage.gaussian_filter(np.where(good, image - level, 0.0), smoothing)
    smooth_sigma = sigma / (2.0 * np.sqrt(np.pi) * smoothing)
    return ndimage.binary_dilation(smooth > threshold * smooth_sigma, iterations=grow)


def local_sky_noise(image: np.ndarray, good: np.ndarray, block: int = 32):
    """Maps of the local sky level and its noise (robust, sources left out: see
    :func:`source_pixels`), per ``block`` x ``block`` block, median-smoothed over 3 x 3
    blocks and interpolated bilinearly onto the image. Returns ``(level, sigma)`` float64
    arrays of the image's shape."""
    good = good & ~source_pixels(image, good)
    with warnings.catch_warnings():  # blocks with no usable pixel are filled below
        warnings.simplefilter("ignore", RuntimeWarning)
        return _block_maps(image, good, block)


def _block_maps(image, good, block):
    ny, nx = image.shape
    block = int(max(8, min(block, ny // 4 or 1, nx // 4 or 1)))
    by, bx = -(-ny // block), -(-nx // block)
    data = np.full((by * block, bx * block), np.nan)
    data[:ny, :nx] = np.where(good, image, np.nan)
    tiles = data.reshape(by, block, bx, block).transpose(0, 2, 1, 3).reshape(by, bx, -1)
    level = np.nanmedian(tiles, axis=2) if np.isfinite(tiles).any() else np.zeros((by, bx))
    dev = np.abs(tiles - level[..., None])
    sigma = 1.4826 * np.nanmedian(dev, axis=2)
    # clip the sources once: pixels beyond 4 sigma of their block's level
    clipped = np.where(dev <= 4 * sigma[..., None], tiles, np.nan)
    level = np.nanmedian(clipped, axis=2)
    sigma = 1.4826 * np.nanmedian(np.abs(clipped - level[..., None]), axis=2)
    enough = np.sum(np.isfinite(clipped), axis=2) >= max(16, block * block // 8)
    maps = []
    for grid in (level, sigma):
        grid = np.where(enough & np.isfinite(grid), grid, np.nan)
        fill = np.nanmedian(grid) if np.isfinite(grid).any() else 0.0
        grid = np.where(np.isfinite(grid), grid, fill)
        grid = ndimage.median_filter(grid, size=3, mode="nearest")
        # block centres -> pixels, bilinear, clamped at the border
        yc = (np.arange(ny) + 0.5) / block - 0.5
        xc = (np.arange(nx) + 0.5) / block - 0.5
        yy = np.clip(yc, 0, by - 1)[:, None] * np.ones((1, nx))
        xx = np.clip(xc, 0, bx - 1)[None, :] * np.ones((ny, 1))
        maps.append(ndimage.map_coordinates(grid, [yy, xx], order=1, mode="nearest"))
    return maps[0], maps[1]


def estimate_variance(image: np.ndarray, good: np.ndarray, gain: float | None = None,
                      read_noise: float = 0.0) -> tuple[np.ndarray, str]:
    """A float32 variance plane for ``image`` (``good``: finite, unmasked pixels) and the
    name of the model used (``gain``, ``sky-gain`` or ``empirical``)."""
    values = image[good]
    sky = float(np.median(values)) if values.size else 0.0
    sigma = robust_sigma(values)
    positive = np.maximum(np.where(np.isfinite(image), image, 0.0), 0.0)
    if np.isfinite(sigma) and sigma > 0 and sky > 2 * sigma:  # the sky is still in
        if gain is not None and gain > 0:
            var = positive / gain + (read_noise / gain) ** 2
            return var.astype(np.float32), "gain"
        level, local = local_sky_noise(image, good)
        g = sky / sigma**2  # effective gain (counts per unit of variance) from the sky
        var = local**2 + np.maximum(positive - level, 0.0) / g
        return var.astype(np.float32), "sky-gain"
    level, local = local_sky_noise(image, good)
    var = local**2
    if gain is not None and gain > 0:
        var = var + np.maximum(positive - level, 0.0) / gain
    return np.maximum(var, 1e-30).astype(np.float32), "empirical"
