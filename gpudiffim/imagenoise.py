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

import logging
import warnings

import numpy as np
from astropy.stats import mad_std
from scipy import ndimage

log = logging.getLogger(__name__)

__all__ = ["estimate_variance", "local_sky_noise", "plausible_gain", "gain_noise_model",
           "source_pixels", "robust_sigma"]


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


def plausible_gain(gain: float | None, limits=(1e-6, 1e7), where: str = "") -> float | None:
    """``gain`` (counts per unit of variance) when it can be one (finite, within ``limits``),
    else None, said in the log (``where``: the file)."""
    if gain is not None and not (np.isfinite(gain) and limits[0] <= gain <= limits[1]):
        log.warning("%sthe header's gain %.3g is not a gain: ignored", where, gain)
        return None
    return gain


def gain_noise_model(sky: float, sigma: float, gain: float | None, read_noise: float = 0.0,
                     factor: float = 2.0, where: str = "") -> tuple[float, float] | None:
    """``(gain, read_sigma)`` (read noise in counts) when the header's gain and read noise
    predict the sky's measured scatter ``sigma`` at level ``sky`` within ``factor`` in
    variance, else None, said in the log (a gain for other units than the image's)."""
    gain = plausible_gain(gain, where=where)
    if gain is None:
        return None
    read_sigma = read_noise / gain
    if not read_sigma <= sigma:  # the sky's scatter holds the read noise
        log.warning("%sthe header's read noise %.3g is more than the sky's whole scatter "
                    "(%.3g in its units): ignored", where, read_noise, sigma * gain)
        read_sigma = 0.0
    ratio = (sky / gain + read_sigma**2) / sigma**2
    if not 1 / factor <= ratio <= factor:
        log.warning("%sthe header's gain %.3g predicts %.3g times the sky's measured "
                    "variance: ignored, the sky's own level and scatter set the noise", where,
                    gain, ratio)
        return None
    return gain, read_sigma


def estimate_variance(image: np.ndarray, good: np.ndarray, gain: float | None = None,
                      read_noise: float = 0.0, where: str = "") -> tuple[np.ndarray, str]:
    """A float32 variance plane for ``image`` (``good``: finite, unmasked pixels) and the
    name of the model used (``gain``, ``sky-gain`` or ``empirical``); ``where`` (the file)
    prefixes the log lines on header values it ignores."""
    values = image[good]
    sky = float(np.median(values)) if values.size else 0.0
    sigma = robust_sigma(values)
    positive = np.maximum(np.where(np.isfinite(image), image, 0.0), 0.0)
    if np.isfinite(sigma) and sigma > 0 and sky > 2 * sigma:  # the sky is still in
        model = gain_noise_model(sky, sigma, gain, read_noise, where=where)
        if model is not None:
            gain, read_sigma = model
            return (positive / gain + read_sigma**2).astype(np.float32), "gain"
        level, local = local_sky_noise(image, good)
        g = sky / sigma**2  # effective gain (counts per unit of variance) from the sky
        var = local**2 + np.maximum(positive - level, 0.0) / g
        return var.astype(np.float32), "sky-gain"
    gain = plausible_gain(gain, where=where)
    level, local = local_sky_noise(image, good)
    var = local**2
    if gain is not None:
        var = var + np.maximum(positive - level, 0.0) / gain
    return np.maximum(var, 1e-30).astype(np.float32), "empirical"
