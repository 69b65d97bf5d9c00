"""Association of diaSources into diaObjects, as Rubin's ``ap_association`` does it.

Each new diaSource is matched to at most one known diaObject, and each diaObject to at most
one diaSource of the exposure, within ``maxDistArcSeconds`` (1.0", the AP default). Pairs are
scored by their positional likelihood (the separation in units of both position errors,
and the normalisation of that Gaussian), and the set of pairs with the least total cost is
chosen by a minimum-weight full bipartite matching in which every source may also take a
"no match" option (scipy's ``min_weight_full_bipartite_matching``). Sources left unmatched
start new diaObjects, unless their centre is flagged (cosmic ray, no data, interpolated,
saturated, suspect, streak): those stay orphans.

A diaObject's summary is recomputed from its whole source history at each update (as
``ap_association``'s DiaObject calculation plugins do): its inverse-variance weighted mean
position and the error of that mean, and per band the weighted mean PSF flux on the
difference, its error, scatter, count, extremes, fastest change and mean error, the forced
difference and science fluxes' weighted means, the first and last source times and
``nDiaSources``. Pure functions over pandas DataFrames of APDB columns; the database side
is :mod:`gpudiffim.apdb`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy.sparse import csr_array
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from scipy.spatial import cKDTree

from .options import configclass, option

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["AssociationConfig", "BANDS", "NO_NEW_OBJECT_FLAGS", "unit_vectors",
           "match_sources", "new_object_sources", "summarize_objects"]

#: Rubin's bands, each with its own DiaObject flux columns
BANDS = ("u", "g", "r", "i", "z", "y")
#: a source whose centre carries any of these flags starts no new diaObject
NO_NEW_OBJECT_FLAGS = ("pixelFlags_crCenter", "pixelFlags_nodataCenter",
                       "pixelFlags_interpolatedCenter", "pixelFlags_saturatedCenter",
                       "pixelFlags_suspectCenter", "pixelFlags_streakCenter")


@configclass
class AssociationConfig:
    """Association (``ap_association`` names where it has them)."""

    maxDistArcSeconds: float = option(1.0, "largest source-object separation matched (arcsec)")
    minPositionError: float = option(0.05, "floor of a position error per axis (arcsec)")
    missingPositionError: float = option(0.2, "position error taken where none is known "
                                               "(arcsec)")
    imagePaddingPixels: int = option(10, "diaObjects this far outside the image are loaded "
                                         "and forced-measured too (pixels)")


def unit_vectors(ra, dec) -> np.ndarray:
    """(n, 3) unit vectors of positions in degrees."""
    ra, dec = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    return np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])


def _position_sigma(frame: pd.DataFrame, config: AssociationConfig) -> np.ndarray:
    """Each row's position error (radians, one axis): the larger of its ra (on the sky)
    and dec errors, floored; the configured value where none is known."""
    cos_dec = np.cos(np.radians(frame["dec"].to_numpy(float)))
    ra_err = frame["raErr"].to_numpy(float) * cos_dec if "raErr" in frame else np.nan
    dec_err = frame["decErr"].to_numpy(float) if "decErr" in frame else np.nan
    err = np.fmax(ra_err, dec_err) * 3600.0 * np.ones(len(frame))
    err = np.where(np.isfinite(err) & (err > 0), err, config.missingPositionError)
    return np.radians(np.maximum(err, config.minPositionError) / 3600.0)


def match_sources(sources: pd.DataFrame, objects: pd.DataFrame,
                  config: AssociationConfig | None = None) -> np.ndarray:
    """The index (row position in ``objects``) of the diaObject each source matches, or -1.

    Both frames need ``ra``, ``dec`` (degrees) and should have ``raErr``, ``decErr``.
    """
    config = config or AssociationConfig()
    n_src, n_obj = len(sources), len(objects)
    out = np.full(n_src, -1, np.int64)
    if not n_src or not n_obj:
        return out
    vs = unit_vectors(sources["ra"], sources["dec"])
    vo = unit_vectors(objects["ra"], objects["dec"])
    radius = np.radians(config.maxDistArcSeconds / 3600.0)
    pairs = cKDTree(vs).sparse_distance_matrix(cKDTree(vo), 2 * np.sin(radius / 2),
                                               output_type="coo_matrix")
    if not pairs.nnz:
        return out
    i, j = pairs.row, pairs.col
    sep = 2 * np.arcsin(np.clip(pairs.data / 2, 0, 1))
    var = _position_sigma(sources, config)[i] ** 2 + _position_sigma(objects, config)[j] ** 2
    floor = 2 * np.radians(config.minPositionError / 3600.0) ** 2
    # -ln of the 2-D Gaussian likelihood of the separation, less its best value: >= 0
    cost = 0.5 * sep**2 / var + np.log(var / floor)
    # "no match" for each source: dearer than any pair the radius admits for it
    no_match = 0.5 * radius**2 / floor + np.log(var.max() / floor + 1.0)
    matched_rows = np.unique(i)
    local = np.full(n_src, -1)
    local[matched_rows] = np.arange(len(matched_rows))
    cols, col_index = np.unique(j, return_inverse=True)
    n_rows = len(matched_rows)
    rows = np.concatenate([local[i], np.arange(n_rows)])
    columns = np.concatenate([col_index, len(cols) + np.arange(n_rows)])
    weights = np.concatenate([cost, np.full(n_rows, no_match)]) + 1.0  # no zero weights
    graph = csr_array((weights, (rows, columns)), shape=(n_rows, len(cols) + n_rows))
    row, chosen = min_weight_full_bipartite_matching(graph)
    is_object = chosen < len(cols)
    out[matched_rows[row[is_object]]] = cols[chosen[is_object]]
    return out


def new_object_sources(sources: pd.DataFrame, matched: np.ndarray) -> np.ndarray:
    """Which unmatched sources start a new diaObject: those whose centre carries none of
    :data:`NO_NEW_OBJECT_FLAGS`."""
    flagged = np.zeros(len(sources), bool)
    for flag in NO_NEW_OBJECT_FLAGS:
        if flag in sources:
            flagged |= sources[flag].fillna(False).to_numpy(bool)
    return (matched < 0) & ~flagged


def _grouped_weighted(group, n: int, values, errors):
    """Per group of ``group`` (0..n-1): the inverse-variance weighted mean of ``values`` and
    its error (NaN where the group has no finite value with a positive error)."""
    ok = np.isfinite(values) & np.isfinite(errors) & (errors > 0)
    w = np.where(ok, 1.0 / np.where(ok, errors, 1.0) ** 2, 0.0)
    total = np.bincount(group, w, n)
    summed = np.bincount(group, w * np.where(ok, values, 0.0), n)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.where(total > 0, summed / total, np.nan),
                np.where(total > 0, 1.0 / np.sqrt(total), np.nan))


def _grouped_extremes(group, n: int, values, ok):
    """Per group: (min, max) of ``values`` where ``ok`` (NaN for a group with none)."""
    lo, hi = np.full(n, np.inf), np.full(n, -np.inf)
    np.minimum.at(lo, group[ok], values[ok])
    np.maximum.at(hi, group[ok], values[ok])
    return np.where(np.isfinite(lo), lo, np.nan), np.where(np.isfinite(hi), hi, np.nan)


def _grouped_max_slope(group, n: int, flux, times, ok):
    """Per group: of the flux changes per day between time-ordered neighbours (finite
    fluxes, distinct times), the one of largest size, the earliest on a tie (NaN: none)."""
    rows = np.flatnonzero(ok)
    order = rows[np.lexsort((rows, times[rows], group[rows]))]
    g, t, f = group[order], times[order], flux[order]
    dt = np.diff(t)
    pair = (g[1:] == g[:-1]) & (dt > 0)
    out = np.full(n, np.nan)
    if not pair.any():
        return out
    slope = np.diff(f)[pair] / dt[pair]
    pg, at = g[1:][pair], np.arange(len(dt))[pair]
    best = np.lexsort((at, -np.abs(slope), pg))
    first = np.r_[True, pg[best][1:] != pg[best][:-1]]
    out[pg[best][first]] = slope[best][first]
    return out


def _band_columns(band: str, group, n: int, src: pd.DataFrame, forced_group,
                  forced: pd.DataFrame | None) -> dict:
    """One band's DiaObject columns for the ``n`` objects (``group``: each of ``src``'s
    sources' object; ``forced_group``: each of ``forced``'s rows' object, -1 for another
    band's, None without forced rows):
    NaN, and a count of 0, for objects with no source in the band."""
    flux, err = src["psfFlux"].to_numpy(float), src["psfFluxErr"].to_numpy(float)
    has = np.bincount(group, minlength=n) > 0
    ok = np.isfinite(flux)
    count = np.bincount(group[ok], minlength=n)
    mean, mean_err = _grouped_weighted(group, n, flux, err)
    centre = np.bincount(group[ok], flux[ok], n) / np.maximum(count, 1)
    spread = np.bincount(group[ok], (flux[ok] - centre[group[ok]]) ** 2, n)
    finite_err = np.isfinite(err)
    n_err = np.bincount(group[finite_err], minlength=n)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.where(count > 1, np.sqrt(spread / (count - 1)), np.nan)
        err_mean = np.where(n_err > 0, np.bincount(group[finite_err], err[finite_err], n)
                            / n_err, np.nan)
    low, high = _grouped_extremes(group, n, flux, ok)
    out = {f"{band}_psfFluxMean": mean, f"{band}_psfFluxMeanErr": mean_err,
           f"{band}_psfFluxSigma": sigma, f"{band}_psfFluxNdata": count,
           f"{band}_psfFluxMin": low, f"{band}_psfFluxMax": high,
           f"{band}_psfFluxErrMean": err_mean,
           f"{band}_psfFluxMaxSlope": _grouped_max_slope(
               group, n, flux, src["midpointMjdTai"].to_numpy(float), ok)}
    if "scienceFlux" in src:
        out[f"{band}_scienceFluxMean"], out[f"{band}_scienceFluxMeanErr"] = _grouped_weighted(
            group, n, src["scienceFlux"].to_numpy(float), src["scienceFluxErr"].to_numpy(float))
    if forced_group is not None and (forced_group >= 0).any():
        mine = forced_group >= 0
        out[f"{band}_fpFluxMean"], out[f"{band}_fpFluxMeanErr"] = _grouped_weighted(
            forced_group[mine], n, forced["psfFlux"].to_numpy(float)[mine],
            forced["psfFluxErr"].to_numpy(float)[mine])
    return {k: v if k.endswith("Ndata") else np.where(has, v, np.nan) for k, v in out.items()}


def summarize_objects(sources: pd.DataFrame, forced: pd.DataFrame | None = None,
                      ) -> pd.DataFrame:
    """One DiaObject row per ``diaObjectId`` of ``sources`` (each object's whole source
    history: ra, dec, raErr, decErr, psfFlux(Err), scienceFlux(Err), midpointMjdTai, band),
    with the forced photometry history ``forced`` (DiaForcedSource rows) when given.
    Grouped sums over all objects at once, in ``diaObjectId`` order."""
    import pandas as pd  # on demand: commands that store nothing start without it

    object_ids = sources["diaObjectId"].to_numpy(np.int64)
    ids, group = np.unique(object_ids, return_inverse=True)
    group, n = group.ravel(), len(ids)
    v = unit_vectors(sources["ra"], sources["dec"])
    ra_err, dec_err = sources["raErr"].to_numpy(float), sources["decErr"].to_numpy(float)
    sig = np.hypot(ra_err * np.cos(np.radians(sources["dec"].to_numpy(float))), dec_err)
    w = np.where(np.isfinite(sig) & (sig > 0), 1.0 / np.where(sig > 0, sig, 1.0) ** 2, 0.0)
    w = np.where(np.bincount(group, w, n)[group] > 0, w, 1.0)  # none weighted: all equal
    mean = np.stack([np.bincount(group, w * v[:, k], n) for k in range(3)], axis=1)
    times = sources["midpointMjdTai"].to_numpy(float)
    first, last = _grouped_extremes(group, n, times, np.ones(len(times), bool))
    columns = {"diaObjectId": ids,
               "ra": np.degrees(np.arctan2(mean[:, 1], mean[:, 0])) % 360.0,
               "dec": np.degrees(np.arcsin(mean[:, 2] / np.linalg.norm(mean, axis=1))),
               "raErr": _grouped_weighted(group, n, ra_err, ra_err)[1],
               "decErr": _grouped_weighted(group, n, dec_err, dec_err)[1],
               "ra_dec_Cov": np.zeros(n), "nDiaSources": np.bincount(group, minlength=n),
               "firstDiaSourceMjdTai": first, "lastDiaSourceMjdTai": last,
               **{f"{b}_psfFluxNdata": np.zeros(n, np.int64) for b in BANDS}}
    bands = sources["band"].to_numpy()
    forced_object = forced_bands = None
    if forced is not None and len(forced):
        fid = forced["diaObjectId"].to_numpy(np.int64)
        forced_object = np.full(len(fid), -1)
        if n:
            at = np.minimum(np.searchsorted(ids, fid), n - 1)
            forced_object = np.where(ids[at] == fid, at, -1)
        forced_bands = forced["band"].to_numpy()
    for band in BANDS:
        in_band = bands == band
        if in_band.any():
            forced_group = (None if forced_object is None
                            else np.where(forced_bands == band, forced_object, -1))
            columns.update(_band_columns(band, group[in_band], n, sources[in_band],
                                         forced_group, forced))
    return pd.DataFrame(columns)
