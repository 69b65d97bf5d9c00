"""Robust statistics of backend images over a mask of good pixels, on a subsample.

Each reads its result back to the host once (:meth:`Backend.scalar`): these feed the
subtraction's control flow and quality figures.
"""

from __future__ import annotations

__all__ = ["good_sample", "median_where", "robust_sigma_where"]


def good_sample(backend, values, good, max_n: int = 200_000):
    """Sorted values where ``good``, every k-th of them so that at most ~``max_n`` remain."""
    xp = backend.xp
    sample = xp.reshape(values, (-1,))[xp.reshape(good, (-1,))]
    return xp.sort(sample[::max(1, int(sample.shape[0] // max_n))])


def median_where(backend, values, good) -> float | None:
    """Median of ``values`` where ``good`` (on a subsample); None when no pixel is good."""
    s = good_sample(backend, values, good)
    if s.shape[0] == 0:
        return None
    return backend.scalar(s[s.shape[0] // 2])


def robust_sigma_where(backend, values, good) -> float:
    """Robust standard deviation (MAD x 1.4826) of ``values`` where ``good``, on a
    subsample; NaN when no pixel is good."""
    xp = backend.xp
    s = good_sample(backend, values, good)
    if s.shape[0] == 0:
        return float("nan")
    dev = xp.sort(xp.abs(s - s[s.shape[0] // 2]))
    return float(backend.scalar(1.4826 * dev[dev.shape[0] // 2]))
