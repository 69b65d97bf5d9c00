"""Figures of merit of a DIA run judged by injected fakes (the DMTN-256 analyses).

Pure functions over catalogues (astropy Tables or arrays), no plotting: the report draws
what these compute. Fakes are matched one to one to diaSources; efficiency is the found
fraction per bin with binomial intervals and a logistic curve fitted to the unbinned
found/lost outcomes; contamination is what no fake explains, per CCD and per square degree;
photometry is judged by pulls with magnitude outliers split out; the spread of detections
over a CCD by the fractional area ``gamma``, uniform on [0, 1] for uniformly placed sources.
"""

from __future__ import annotations

import numpy as np
from astropy.stats import binom_conf_interval
from astropy.table import Table
from scipy import optimize, stats
from scipy.spatial import cKDTree

__all__ = ["match_fakes", "efficiency_curve", "ideal_efficiency", "sigmoid", "fit_sigmoid",
           "contamination", "photometry_pulls", "fractional_area", "uniformity_test",
           "effective_radius"]


def match_fakes(source_xy, fake_xy, radius: float = 1.5) -> np.ndarray:
    """Index of the diaSource matched to each fake (-1: none), one to one: pairs within
    ``radius`` pixels, closest first, each source used once."""
    source_xy, fake_xy = np.asarray(source_xy, float), np.asarray(fake_xy, float)
    out = np.full(len(fake_xy), -1)
    if not len(source_xy) or not len(fake_xy):
        return out
    pairs = cKDTree(fake_xy).sparse_distance_matrix(cKDTree(source_xy), radius,
                                                    output_type="ndarray")
    used = np.zeros(len(source_xy), bool)
    for i, j, _ in sorted(pairs.tolist(), key=lambda p: p[2]):
        i, j = int(i), int(j)
        if out[i] < 0 and not used[j]:
            out[i], used[j] = j, True
    return out


def efficiency_curve(values, found, bins) -> Table:
    """Found fraction of the fakes per bin of ``values`` (true S/N, magnitude...), with
    its 68.3% binomial (Wilson) interval: columns lo, hi, centre, n, k, efficiency,
    err_lo, err_hi (empty bins: NaN)."""
    values, found = np.asarray(values, float), np.asarray(found, bool)
    bins = np.asarray(bins, float)
    n = np.histogram(values, bins)[0]
    k = np.histogram(values[found], bins)[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        eff = np.where(n > 0, k / np.maximum(n, 1), np.nan)
    lo, hi = np.full(len(n), np.nan), np.full(len(n), np.nan)
    has = n > 0
    if has.any():
        lo[has], hi[has] = binom_conf_interval(k[has], n[has], confidence_level=0.6827,
                                               interval="wilson")
    return Table({"lo": bins[:-1], "hi": bins[1:], "centre": 0.5 * (bins[:-1] + bins[1:]),
                  "n": n, "k": k, "efficiency": eff,
                  # >= 0: the interval's ends can round past the estimate at 0 and 1
                  "err_lo": np.maximum(eff - lo, 0.0), "err_hi": np.maximum(hi - eff, 0.0)})


def ideal_efficiency(snr, threshold: float = 5.0):
    """What a perfect detector at ``threshold`` sigma finds: Phi(S/N - threshold)."""
    return stats.norm.cdf(np.asarray(snr, float) - threshold)


def sigmoid(x, a: float, b: float):
    """The logistic curve 1 / (1 + exp(-a (x - b)))."""
    return 1.0 / (1.0 + np.exp(-a * (np.asarray(x, float) - b)))


def fit_sigmoid(values, found) -> dict:
    """Maximum-likelihood logistic fit to unbinned found/lost outcomes.

    Returns
    -------
    dict
        ``a`` (steepness), ``b`` (the 50% point), ``x50``, ``x90`` (``b + ln 9 / a``) and
        their standard errors ``a_err``, ``b_err`` from the Fisher information.
    """
    x, y = np.asarray(values, float), np.asarray(found, bool).astype(float)
    if len(x) < 3 or y.min() == y.max():
        raise ValueError("a sigmoid needs found and lost fakes both")

    def nll(p):
        z = p[0] * (x - p[1])
        return np.sum(np.logaddexp(0.0, -z) * y + np.logaddexp(0.0, z) * (1.0 - y))

    start = (4.0 / max(np.std(x), 1e-9), np.median(x))
    res = optimize.minimize(nll, start, method="Nelder-Mead",
                            options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 20000})
    a, b = res.x
    p = sigmoid(x, a, b)
    w = p * (1.0 - p)
    d = x - b
    fisher = np.array([[np.sum(w * d * d), -a * np.sum(w * d)],
                       [-a * np.sum(w * d), a * a * np.sum(w)]])
    cov = np.linalg.pinv(fisher)
    return {"a": float(a), "b": float(b), "x50": float(b), "x90": float(b + np.log(9.0) / a),
            "a_err": float(np.sqrt(cov[0, 0])), "b_err": float(np.sqrt(cov[1, 1]))}


def contamination(unmatched, flagged, n_ccd: int, area_deg2: float) -> dict:
    """diaSources no fake explains: counts, per CCD and per square degree, all and without
    the flagged ones (``flagged``: the usual flag cuts' verdict per diaSource)."""
    unmatched, flagged = np.asarray(unmatched, bool), np.asarray(flagged, bool)
    all_n, clean_n = int(unmatched.sum()), int((unmatched & ~flagged).sum())
    return {"n": all_n, "n_clean": clean_n, "per_ccd": all_n / n_ccd,
            "per_ccd_clean": clean_n / n_ccd, "per_deg2": all_n / area_deg2,
            "per_deg2_clean": clean_n / area_deg2}


def photometry_pulls(flux, flux_err, true_flux, outlier_mag: float = 0.1) -> dict:
    """Pulls ``(flux - true) / error`` and magnitude errors ``-2.5 log10(flux / true)``;
    ``outlier``: ``|dm| > outlier_mag`` (or a flux <= 0), split out as the note did. Robust
    width (MAD x 1.4826) and median of the pulls without the outliers."""
    flux, err, true = (np.asarray(a, float) for a in (flux, flux_err, true_flux))
    pull = (flux - true) / err
    with np.errstate(invalid="ignore", divide="ignore"):
        dm = np.where(flux > 0, -2.5 * np.log10(flux / true), np.inf)
    outlier = ~(np.abs(dm) <= outlier_mag)
    inl = pull[~outlier]
    width = float(stats.median_abs_deviation(inl, scale="normal")) if len(inl) else np.nan
    return {"pull": pull, "dm": dm, "outlier": outlier,
            "pull_median": float(np.median(inl)) if len(inl) else np.nan, "pull_width": width}


def fractional_area(x, y, width: float, height: float):
    """gamma = l^2 with l = max(|x - x_c| / (W/2), |y - y_c| / (H/2)): the fraction of the
    CCD's area inside the centred rectangle through the source, uniform on [0, 1] for
    uniformly placed sources (edge pile-ups go to 1, centre ones to 0)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    u = np.abs(x - (width - 1) / 2.0) / (width / 2.0)
    v = np.abs(y - (height - 1) / 2.0) / (height / 2.0)
    return np.clip(np.maximum(u, v), 0.0, 1.0) ** 2


def uniformity_test(gamma) -> dict:
    """Kolmogorov-Smirnov test of gamma against U(0, 1): statistic and p-value, and the
    excess of the outermost 5% of the area (1.0 when uniform)."""
    gamma = np.asarray(gamma, float)
    ks = stats.kstest(gamma, "uniform")
    edge = float(np.mean(gamma > 0.95) / 0.05) if len(gamma) else np.nan
    return {"ks": float(ks.statistic), "p": float(ks.pvalue), "edge_excess": edge}


def effective_radius(psf_image) -> float:
    """sqrt(NEA / 2 pi), NEA = 1 / sum(p^2) for the unit-sum PSF: the radius (pixels) the
    note compared between templates and science images (sqrt(2) sigma for a Gaussian)."""
    p = np.asarray(psf_image, float)
    p = p / p.sum()
    return float(np.sqrt(1.0 / np.sum(p * p) / (2.0 * np.pi)))
