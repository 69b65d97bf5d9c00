"""Robust statistics of backend images over a mask of good pixels, on a subsample.

Each reads its result back to the host once (:meth:`Backend.scalar`): these feed the
subtraction's control flow and quality figures; the ``_device`` variants leave theirs on the
device, for arithmetic that stays there.
"""

from __future__ import annotations

import numpy as np

__all__ = ["good_sample", "median_where", "median_where_device", "sample_median",
           "medians_where", "mean_where", "robust_sigma_where", "robust_sigma_where_device",
           "sample_robust_sigma", "weighted_median"]


def good_sample(backend, values, good, max_n: int = 200_000) -> tuple:
    """A sorted sample of ``values`` where ``good`` (at most ~``max_n``) and how many it
    holds, ``(s, n)``: :meth:`Backend.masked_sample` over the flattened arrays (no device
    read; ``n`` a 0-d device count on a device)."""
    xp = backend.xp
    return backend.masked_sample(xp.reshape(values, (-1,)), xp.reshape(good, (-1,)), max_n)


def median_where(backend, values, good) -> float | None:
    """Median of ``values`` where ``good`` (on a subsample); None when no pixel is good."""
    return medians_where(backend, good, values)[0]


def median_where_device(backend, values, good):
    """:func:`median_where` as a 0-d device array (no device read, for arithmetic that
    stays on the device); NaN when no pixel is good."""
    return sample_median(backend, *good_sample(backend, values, good))


def sample_median(backend, s, n):
    """The median (upper, for an even count) of the sorted sample ``s[:n]`` as a 0-d array;
    NaN when ``n`` is 0."""
    if isinstance(n, int):
        return backend.full((), float("nan"), dtype=s.dtype) if n == 0 else s[n // 2]
    return backend.xp.where(n > 0, backend.take_at(s, n // 2), float("nan"))


def medians_where(backend, good, *values) -> tuple:
    """:func:`median_where` of each of ``values`` over the same ``good`` pixels, read back
    in one transfer."""
    got = backend.to_host_all(*[median_where_device(backend, v, good) for v in values])
    return tuple(None if not np.isfinite(m) else float(m) for m in got)


def mean_where(backend, values, good):
    """Mean of ``values`` where ``good`` as a 0-d device array (no device read; 0 when no
    pixel is good): a level to fill masked pixels with, where a median's read is not
    worth it."""
    xp = backend.xp
    total = xp.sum(xp.where(good, values, 0.0))
    return total / xp.clip(xp.sum(xp.astype(good, total.dtype)), min=1.0)


def robust_sigma_where(backend, values, good) -> float:
    """Robust standard deviation (MAD x 1.4826) of ``values`` where ``good``, on a
    subsample; NaN when no pixel is good."""
    return float(backend.scalar(robust_sigma_where_device(backend, values, good)))


def robust_sigma_where_device(backend, values, good):
    """:func:`robust_sigma_where` as a 0-d device array (no device read; NaN when no pixel
    is good)."""
    return sample_robust_sigma(backend, *good_sample(backend, values, good))


def sample_robust_sigma(backend, s, n):
    """MAD x 1.4826 of the sorted sample ``s[:n]`` (past ``n``: +inf, or nothing) as a 0-d
    array; NaN when ``n`` is 0."""
    median = sample_median(backend, s, n)
    deviation = backend.xp.sort(backend.xp.abs(s - median))  # +inf past n stays there
    return 1.4826 * sample_median(backend, deviation, n)


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The median of host ``values`` with ``weights`` (the value at half the cumulative
    weight)."""
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])
