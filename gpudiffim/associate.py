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


def _weighted(values, errors):
    """Inverse-variance weighted mean and its error (NaN without a usable value)."""
    ok = np.isfinite(values) & np.isfinite(errors) & (errors > 0)
    if not ok.any():
        return np.nan, np.nan
    w = 1.0 / errors[ok] ** 2
    return float(np.sum(w * values[ok]) / w.sum()), float(1.0 / np.sqrt(w.sum()))


def _band_columns(band: str, src: pd.DataFrame, forced: pd.DataFrame | None) -> dict:
    flux, err = src["psfFlux"].to_numpy(float), src["psfFluxErr"].to_numpy(float)
    times = src["midpointMjdTai"].to_numpy(float)
    ok = np.isfinite(flux)
    mean, mean_err = _weighted(flux, err)
    out = {f"{band}_psfFluxMean": mean, f"{band}_psfFluxMeanErr": mean_err,
           f"{band}_psfFluxSigma": float(np.std(flux[ok], ddof=1)) if ok.sum() > 1 else np.nan,
           f"{band}_psfFluxNdata": int(ok.sum()),
           f"{band}_psfFluxMin": float(flux[ok].min()) if ok.any() else np.nan,
           f"{band}_psfFluxMax": float(flux[ok].max()) if ok.any() else np.nan,
           f"{band}_psfFluxErrMean": float(np.nanmean(err)) if np.isfinite(err).any() else np.nan}
    order = np.argsort(times[ok], kind="stable")
    t, f = times[ok][order], flux[ok][order]
    dt = np.diff(t)
    slopes = np.diff(f)[dt > 0] / dt[dt > 0]
    out[f"{band}_psfFluxMaxSlope"] = float(slopes[np.argmax(np.abs(slopes))]) if len(slopes) \
        else np.nan
    if "scienceFlux" in src:
        out[f"{band}_scienceFluxMean"], out[f"{band}_scienceFluxMeanErr"] = _weighted(
            src["scienceFlux"].to_numpy(float), src["scienceFluxErr"].to_numpy(float))
    if forced is not None and len(forced):
        out[f"{band}_fpFluxMean"], out[f"{band}_fpFluxMeanErr"] = _weighted(
            forced["psfFlux"].to_numpy(float), forced["psfFluxErr"].to_numpy(float))
    return out


def summarize_objects(sources: pd.DataFrame, forced: pd.DataFrame | None = None,
                      ) -> pd.DataFrame:
    """One DiaObject row per ``diaObjectId`` of ``sources`` (each object's whole source
    history: ra, dec, raErr, decErr, psfFlux(Err), scienceFlux(Err), midpointMjdTai, band),
    with the forced photometry history ``forced`` (DiaForcedSource rows) when given."""
    import pandas as pd  # on demand: commands that store nothing start without it

    rows = []
    forced_by = dict(tuple(forced.groupby("diaObjectId"))) if forced is not None and len(
        forced) else {}
    for object_id, src in sources.groupby("diaObjectId", sort=True):
        v = unit_vectors(src["ra"], src["dec"])
        cos_dec = np.cos(np.radians(src["dec"].to_numpy(float)))
        sig = np.hypot(src["raErr"].to_numpy(float) * cos_dec, src["decErr"].to_numpy(float))
        w = np.where(np.isfinite(sig) & (sig > 0), 1.0 / np.where(sig > 0, sig, 1.0) ** 2, 0.0)
        w = w if w.sum() > 0 else np.ones(len(src))
        mean = (w[:, None] * v).sum(axis=0)
        ra = float(np.degrees(np.arctan2(mean[1], mean[0])) % 360.0)
        dec = float(np.degrees(np.arcsin(mean[2] / np.linalg.norm(mean))))
        row = {"diaObjectId": int(object_id), "ra": ra, "dec": dec,
               "raErr": _mean_error(src["raErr"].to_numpy(float)),
               "decErr": _mean_error(src["decErr"].to_numpy(float)), "ra_dec_Cov": 0.0,
               "nDiaSources": len(src),
               "firstDiaSourceMjdTai": float(src["midpointMjdTai"].min()),
               "lastDiaSourceMjdTai": float(src["midpointMjdTai"].max()),
               **{f"{b}_psfFluxNdata": 0 for b in BANDS}}
        obj_forced = forced_by.get(object_id)
        for band, in_band in src.groupby("band"):
            if band in BANDS:
                fb = obj_forced[obj_forced["band"] == band] if obj_forced is not None else None
                row.update(_band_columns(band, in_band, fb))
        rows.append(row)
    return pd.DataFrame(rows)


def _mean_error(errors: np.ndarray) -> float:
    """The error of an inverse-variance weighted mean of values with these errors."""
    ok = np.isfinite(errors) & (errors > 0)
    return float(1.0 / np.sqrt(np.sum(1.0 / errors[ok] ** 2))) if ok.any() else np.nan
