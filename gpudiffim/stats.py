"""Robust statistics of backend images over a mask of good pixels, on a subsample.

Each reads its result back to the host once (:meth:`Backend.scalar`): these feed the
subtraction's control flow and quality figures; the ``_device`` variants leave theirs on the
device, for arithmetic that stays there.
"""

from __future__ import annotations

import numpy as np

__all__ = ["good_sample", "sorted_subsample", "median_where", "median_where_device",
           "medians_where", "mean_where", "robust_sigma_where", "robust_sigma_where_device",
           "robust_sigma_of_sorted", "weighted_median"]


def good_sample(backend, values, good, max_n: int = 200_000):
    """Sorted values where ``good``, every k-th of them so that at most ~``max_n`` remain."""
    xp = backend.xp
    return sorted_subsample(backend, xp.reshape(values, (-1,))[xp.reshape(good, (-1,))], max_n)


def sorted_subsample(backend, sample, max_n: int = 200_000):
    """A 1-D sample sorted, every k-th of it so that at most ~``max_n`` remain."""
    return backend.xp.sort(sample[::max(1, int(sample.shape[0] // max_n))])


def median_where(backend, values, good) -> float | None:
    """Median of ``values`` where ``good`` (on a subsample); None when no pixel is good."""
    return medians_where(backend, good, values)[0]


def median_where_device(backend, values, good):
    """:func:`median_where` as a 0-d device array (no device read, for arithmetic that
    stays on the device); None when no pixel is good."""
    s = good_sample(backend, values, good)
    return None if s.shape[0] == 0 else s[s.shape[0] // 2]


def medians_where(backend, good, *values) -> tuple:
    """:func:`median_where` of each of ``values`` over the same ``good`` pixels, read back
    in one transfer."""
    meds = [median_where_device(backend, v, good) for v in values]
    got = backend.to_host_all(*[m for m in meds if m is not None])
    it = iter(got)
    return tuple(None if m is None else float(next(it)) for m in meds)


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
    return robust_sigma_of_sorted(backend, good_sample(backend, values, good))


def robust_sigma_where_device(backend, values, good):
    """:func:`robust_sigma_where` as a 0-d device array (no device read; NaN when no pixel
    is good)."""
    s = good_sample(backend, values, good)
    if s.shape[0] == 0:
        return backend.full((), float("nan"), dtype=s.dtype)
    return _mad_sigma(backend, s)


def robust_sigma_of_sorted(backend, s) -> float:
    """Robust standard deviation (MAD x 1.4826) of a sorted 1-D sample (NaN when empty)."""
    if s.shape[0] == 0:
        return float("nan")
    return float(backend.scalar(_mad_sigma(backend, s)))


def _mad_sigma(backend, s):
    """MAD x 1.4826 of a non-empty sorted 1-D sample, as a 0-d device array."""
    dev = backend.xp.sort(backend.xp.abs(s - s[s.shape[0] // 2]))
    return 1.4826 * dev[dev.shape[0] // 2]


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The median of host ``values`` with ``weights`` (the value at half the cumulative
    weight)."""
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])
