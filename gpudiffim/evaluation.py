"""A run judged by its fakes: the outputs read back, fakes matched, the study's numbers.

:func:`load_run` reads what the runner wrote for every finished exposure (run table,
diaSources, fakes' truth, the difference's header, the diaObjects from the run's APDB)
into one :class:`RunCatalogues`, fakes matched one to one to diaSources of their sign;
the other functions turn it into the tables the report draws (DMTN-256's analyses), with
the arithmetic in :mod:`gpudiffim.metrics`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.wcs import WCS
from scipy import stats

from .apdb import apdb_url, dia_source_ids, redacted_url
from .cutouts import read_cutouts
from .errors import GpuDiffimError, InputError
from .metrics import (
    contamination,
    efficiency_curve,
    fit_sigmoid,
    fractional_area,
    ideal_efficiency,
    match_fakes,
    photometry_pulls,
    uniformity_test,
)
from .runner import exposure_dir, status_table

__all__ = ["FLAG_CUTS", "RunCatalogues", "load_run", "cutout_sample", "flagged",
           "exposure_counts",
           "flag_counts", "efficiency_tables", "sigmoid_fits", "photometry_table",
           "snr_table", "illumination", "object_table", "summary", "SNR_BINS",
           "SNR_COLUMNS", "ideal_shortfall"]

#: the usual flag cuts of the note: a diaSource with any of these set is cut
FLAG_CUTS = ("pixelFlags_bad", "pixelFlags_suspect", "pixelFlags_saturatedCenter",
             "pixelFlags_interpolated", "pixelFlags_interpolatedCenter", "pixelFlags_edge")

#: true S/N bins of the efficiency curves
SNR_BINS = np.array([2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 30, 50, 100], float)
#: the fakes' S/N columns: the model's in the difference, and proper subtraction's optimum
SNR_COLUMNS = ("true_snr", "optimal_snr")

_SOURCE_COLUMNS = ("x", "y", "ra", "dec", "psfFlux", "psfFluxErr", "snr", "significance",
                   "sky_source", "parentDiaSourceId", "isDipole")


@dataclasses.dataclass(frozen=True)
class RunCatalogues:
    """One run's outputs, read back.

    Attributes
    ----------
    name : str
        The run's label (its flavor, as asked for).
    run_dir : Path
        Where the run wrote.
    exposures : Table
        One row per finished exposure: its status row, the detector's size, sky area
        (deg², NaN without a WCS) and zero point.
    sources : Table
        Every diaSource (sky sources dropped): band, visit, detector, the measured columns,
        every pixel flag, ``flagged`` (the flag cuts), ``fake`` (the matched fake's row,
        -1: none), ``known`` (a known change explains it) and ``diaObjectId`` (0 without
        an APDB).
    fakes : Table
        Every fake's truth with band, ``true_snr`` (S/N in the difference), ``mag``,
        ``usable`` (its centre on difference pixels with data: the efficiency counts only
        these), ``found``, ``found_clean`` (found and not cut) and ``source`` (row in
        sources, -1).
    apdb : str or None
        The APDB the run stored into.
    """

    name: str
    run_dir: Path
    exposures: Table
    sources: Table
    fakes: Table
    apdb: str | None


def load_run(run_dir, name: str | None = None, truth=None) -> RunCatalogues:
    """Read a run directory (``gpudiffim run``'s output): every exposure with status
    'done'. An unreadable run table or output is an InputError naming the file.

    ``truth``: changes known to be in the data besides the fakes (a Table or an ECSV path
    with band, visit, detector, x, y, flux; the simulator's ``truth.ecsv``): diaSources
    they explain are marked ``known`` and are not contamination."""
    run_dir = Path(run_dir)
    table_path = run_dir / "run.ecsv"
    if not table_path.is_file():
        raise InputError(table_path, "no run table: not a gpudiffim run directory")
    table = Table.read(table_path, format="ascii.ecsv")
    done = table[table["status"] == "done"] if "status" in table.colnames else table[:0]
    known = _known_changes(truth)
    rows, sources, fakes = [], [], []
    for i, row in enumerate(done):
        here = exposure_dir(run_dir, row)
        status = json.loads((here / "status.json").read_text())
        status.update(_detector(here / "difference.fits"))
        cat = _read_sources(here / "diaSources.parquet", status)
        truth = _read_fakes(here / "fakes.ecsv", status)
        if len(truth):
            truth["usable"] = _usable(here / "difference.fits", truth)
        cat["exposure"], truth["exposure"] = np.full(len(cat), i), np.full(len(truth), i)
        _match(cat, truth, status, offset=sum(len(s) for s in sources))
        _match_known(cat, known, status)
        rows.append(status)
        sources.append(cat)
        fakes.append(truth)
    if not rows:
        raise InputError(table_path, "no finished exposure in the run")
    exposures = status_table(rows)
    sources = vstack(sources, metadata_conflicts="silent")
    fakes = vstack(fakes, metadata_conflicts="silent") if any(len(f) for f in fakes) else \
        _no_fakes()
    apdb = next((s for s in exposures["apdb"] if s), None) if "apdb" in exposures.colnames \
        else None
    sources["diaObjectId"] = _object_ids(apdb, sources) if apdb else np.zeros(len(sources), int)
    modes = [m for m in exposures["mode"] if m] if "mode" in exposures.colnames else []
    label = name or (modes[0] if modes else run_dir.name)
    return RunCatalogues(label, run_dir, exposures, sources, fakes, apdb)


def _detector(path: Path) -> dict:
    """Size, sky area and zero point of an exposure from its difference's headers."""
    try:
        primary = fits.getheader(path, 0)
        header = fits.getheader(path, "IMAGE")
    except Exception as exc:
        raise InputError(path, f"unreadable difference ({type(exc).__name__}: {exc})") from exc
    nx, ny = int(header["NAXIS1"]), int(header["NAXIS2"])
    area = np.nan
    try:
        wcs = WCS(header)
        if wcs.has_celestial:
            area = float(wcs.celestial.proj_plane_pixel_area().to_value("deg2")) * nx * ny
    except Exception:  # a broken WCS leaves the area unknown
        pass
    zp = primary.get("MAGZERO")
    return {"width": nx, "height": ny, "area_deg2": area,
            "zero_point": float(zp) if isinstance(zp, (int, float)) else np.nan}


def _read_sources(path: Path, status: dict) -> Table:
    try:
        table = Table.read(path)
    except Exception as exc:
        raise InputError(path, f"unreadable diaSources ({type(exc).__name__}: {exc})") from exc
    keep = ~np.asarray(table["sky_source"], bool)
    cat = table[keep]
    cat["row"] = np.flatnonzero(keep)  # the catalogue row: the APDB id's index
    names = [c for c in cat.colnames
             if c in _SOURCE_COLUMNS or c.startswith("pixelFlags_") or c == "row"]
    cat = cat[names]
    for key in ("band", "visit", "detector"):
        cat[key] = np.full(len(cat), status[key])
    cat["diaSourceId"] = _packed_ids(status, len(table))[cat["row"]]
    cat["flagged"] = flagged(cat)
    cat["fake"] = np.full(len(cat), -1)
    return cat


#: difference mask planes where no subtraction can find anything: a fake centred there is
#: not counted (one on a saturated core is, and is a miss; not
#: :data:`gpudiffim.exposure.UNUSABLE_PLANES`, the pixels without a value)
NO_FAKE_PLANES = ("NO_DATA", "EDGE")


def _usable(path: Path, truth: Table) -> np.ndarray:
    """Whether each fake's centre is on a difference pixel with data (not NO_DATA, EDGE)."""
    with fits.open(path) as hdus:
        header, mask = hdus["MASK"].header, hdus["MASK"].data
        bits = 0
        for key, value in header.items():
            if key.startswith("MP_") and key[3:] in NO_FAKE_PLANES:
                bits |= 1 << int(value)
        ny, nx = mask.shape
        ix = np.clip(np.round(np.asarray(truth["x"], float)).astype(int), 0, nx - 1)
        iy = np.clip(np.round(np.asarray(truth["y"], float)).astype(int), 0, ny - 1)
        return (np.asarray(mask[iy, ix]).astype(np.int64) & bits) == 0


def _packed_ids(status: dict, n: int) -> np.ndarray:
    """The APDB's diaSourceIds of an exposure's catalogue rows (0: ids it cannot have)."""
    try:
        return dia_source_ids(status["visit"], status["detector"], n)
    except GpuDiffimError:
        return np.zeros(n, np.int64)


def _no_fakes() -> Table:
    return Table({name: np.zeros(0, dtype) for name, dtype in
                  (("x", float), ("y", float), ("flux", float), ("true_snr", float),
                   ("optimal_snr", float),
                   ("mag", float), ("image", "U8"), ("on_galaxy", bool), ("band", "U8"),
                   ("visit", int), ("detector", int), ("found", bool),
                   ("found_clean", bool), ("source", int), ("exposure", int),
                   ("usable", bool))})


def _read_fakes(path: Path, status: dict) -> Table:
    if not path.is_file():
        return _no_fakes()
    try:
        truth = Table.read(path, format="ascii.ecsv")
    except Exception as exc:
        raise InputError(path, f"unreadable fakes' truth ({type(exc).__name__}: {exc})") \
            from exc
    out = Table({"x": np.asarray(truth["x"], float), "y": np.asarray(truth["y"], float),
                 "flux": np.asarray(truth["flux"], float),
                 "true_snr": np.abs(np.asarray(truth["target_snr"], float)),
                 "optimal_snr": (np.abs(np.asarray(truth["optimal_snr"], float))
                                 if "optimal_snr" in truth.colnames
                                 else np.full(len(truth), np.nan)),
                 "image": np.asarray(truth["image"], str),
                 "on_galaxy": np.asarray(truth["on_galaxy"], bool)})
    with np.errstate(invalid="ignore", divide="ignore"):
        out["mag"] = status["zero_point"] - 2.5 * np.log10(np.abs(out["flux"]))
    for key in ("band", "visit", "detector"):
        out[key] = np.full(len(out), status[key])
    out["usable"] = np.ones(len(out), bool)
    out["found"] = np.zeros(len(out), bool)
    out["found_clean"] = np.zeros(len(out), bool)
    out["source"] = np.full(len(out), -1)
    return out


def _match(cat: Table, truth: Table, status: dict, offset: int) -> None:
    """Match an exposure's fakes to its diaSources of the same sign (within the science
    PSF's effective radius, at least 1.5 px), one to one; marks both tables in place."""
    if not len(truth) or not len(cat):
        return
    radius = max(1.5, float(status.get("science_psf_radius") or 0.0))
    sign = np.sign(np.asarray(cat["significance"], float))
    for s in (1.0, -1.0):
        fk = np.flatnonzero(np.sign(truth["flux"]) == s)
        sr = np.flatnonzero(sign == s)
        if not len(fk) or not len(sr):
            continue
        hit = match_fakes(np.column_stack([cat["x"][sr], cat["y"][sr]]),
                          np.column_stack([truth["x"][fk], truth["y"][fk]]), radius)
        ok = hit >= 0
        truth["source"][fk[ok]] = offset + sr[hit[ok]]
        truth["found"][fk[ok]] = True
        truth["found_clean"][fk[ok]] = ~np.asarray(cat["flagged"])[sr[hit[ok]]]
        cat["fake"][sr[hit[ok]]] = fk[ok]


def _known_changes(truth) -> Table | None:
    """The known changes' table (None: none given); a bad one is an InputError."""
    if truth is None:
        return None
    where = "the truth table" if isinstance(truth, Table) else truth
    if not isinstance(truth, Table):
        try:
            truth = Table.read(truth, format="ascii.ecsv")
        except Exception as exc:
            raise InputError(where, f"unreadable truth table ({type(exc).__name__})") from exc
    missing = {"band", "visit", "detector", "x", "y", "flux"} - set(truth.colnames)
    if missing:
        raise InputError(where, f"lacks columns {sorted(missing)}")
    return truth


def _match_known(cat: Table, known: Table | None, status: dict) -> None:
    """Mark the diaSources no fake explains that a known change of their sign does."""
    cat["known"] = np.zeros(len(cat), bool)
    if known is None or not len(cat):
        return
    here = known[(np.asarray(known["band"]).astype(str) == str(status["band"]))
                 & (np.asarray(known["visit"]).astype(str) == str(status["visit"]))
                 & (np.asarray(known["detector"]).astype(str) == str(status["detector"]))]
    radius = max(1.5, float(status.get("science_psf_radius") or 0.0))
    sign = np.sign(np.asarray(cat["significance"], float))
    free = np.asarray(cat["fake"]) < 0
    for s in (1.0, -1.0):
        kn = np.flatnonzero(np.sign(np.asarray(here["flux"], float)) == s)
        sr = np.flatnonzero(free & (sign == s))
        if not len(kn) or not len(sr):
            continue
        hit = match_fakes(np.column_stack([cat["x"][sr], cat["y"][sr]]),
                          np.column_stack([here["x"][kn], here["y"][kn]]), radius)
        cat["known"][sr[hit[hit >= 0]]] = True


def _object_ids(url: str, sources: Table) -> np.ndarray:
    """Each diaSource's diaObjectId in the APDB at ``url`` (0: not stored there)."""
    import sqlalchemy  # with the apdb extra; runs without an APDB need none

    engine = sqlalchemy.create_engine(apdb_url(url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(sqlalchemy.text(
                'SELECT "diaSourceId", "diaObjectId" FROM "DiaSource"')).all()
    except Exception as exc:
        raise InputError(redacted_url(url), "cannot read its DiaSource table "
                                            f"({type(exc).__name__})") from exc
    finally:
        engine.dispose()
    if not rows:
        return np.zeros(len(sources), np.int64)
    stored = np.array(rows, np.int64)
    order = np.argsort(stored[:, 0])
    keys, values = stored[order, 0], stored[order, 1]
    ids = np.asarray(sources["diaSourceId"], np.int64)
    at = np.clip(np.searchsorted(keys, ids), 0, len(keys) - 1)
    return np.where((keys[at] == ids) & (ids != 0), values[at], 0)


def cutout_sample(run: RunCatalogues, n: int, rng: np.random.Generator) -> list[dict]:
    """Up to ``n`` triplet cutouts of detections and ``n`` of lost fakes, drawn at random
    from the ``cutouts.fits`` the runner wrote: dicts with ``kind`` ('detection' or
    'lost fake'), band, visit, detector, x, y, the true S/N (fakes) or significance, and
    ``cube`` (3, size, size)."""
    pools = {"detection": [], "lost fake": []}
    for i, e in enumerate(run.exposures):
        path = exposure_dir(run.run_dir, e) / "cutouts.fits"
        if not path.is_file():
            continue
        cube, table = read_cutouts(path)
        here = np.flatnonzero(np.asarray(run.fakes["exposure"]) == i)
        for k, row in enumerate(table):
            item = {"band": e["band"], "visit": e["visit"], "detector": e["detector"],
                    "x": float(row["x"]), "y": float(row["y"]), "cube": cube[k]}
            if row["kind"] == "fake":
                fake = run.fakes[here[int(row["index"])]] if len(here) > row["index"] else None
                if fake is None or fake["found"]:
                    continue
                pools["lost fake"].append({**item, "kind": "lost fake",
                                           "snr": float(fake["true_snr"]),
                                           "image": str(fake["image"])})
            else:
                match = np.flatnonzero((np.asarray(run.sources["exposure"]) == i)
                                       & (np.asarray(run.sources["row"]) == row["index"]))
                sig = float(run.sources["significance"][match[0]]) if len(match) else np.nan
                pools["detection"].append({**item, "kind": "detection", "snr": sig,
                                           "image": ""})
    out = []
    for items in pools.values():
        for j in (rng.choice(len(items), min(n, len(items)), replace=False) if items else []):
            out.append(items[int(j)])
    return out


# ---------------------------------------------------------------------------- analyses
def flagged(sources: Table) -> np.ndarray:
    """Whether each diaSource falls to the usual flag cuts (:data:`FLAG_CUTS`)."""
    out = np.zeros(len(sources), bool)
    for name in FLAG_CUTS:
        if name in sources.colnames:
            out |= np.asarray(sources[name], bool)
    return out


def exposure_counts(run: RunCatalogues) -> Table:
    """Per CCD: diaSources before and after the flag cuts, fakes found, the unmatched
    (contamination) before and after the cuts, and the seeing of both images."""
    n = len(run.exposures)
    out = Table()
    for key in ("band", "visit", "detector"):
        out[key] = run.exposures[key]
    at, fat = np.asarray(run.sources["exposure"], int), np.asarray(run.fakes["exposure"], int)
    clean = ~np.asarray(run.sources["flagged"], bool)
    unmatched = (np.asarray(run.sources["fake"]) < 0) & ~np.asarray(run.sources["known"], bool)
    for name, weight in (("n_sources", None), ("n_clean", clean), ("n_unmatched", unmatched),
                         ("n_unmatched_clean", unmatched & clean)):
        out[name] = np.bincount(at, weight, n).astype(int)
    out["n_fakes"] = np.bincount(fat, None, n).astype(int)
    out["n_found"] = np.bincount(fat, np.asarray(run.fakes["found"], bool), n).astype(int)
    for key in ("science_psf_radius", "template_psf_radius", "area_deg2"):
        out[key] = (np.asarray(run.exposures[key], float) if key in run.exposures.colnames
                    else np.full(n, np.nan))
    out["radius_difference"] = out["template_psf_radius"] - out["science_psf_radius"]
    return out


def flag_counts(run: RunCatalogues) -> Table:
    """How many diaSources carry each pixel flag (and which the cuts use)."""
    names = [c for c in run.sources.colnames if c.startswith("pixelFlags_")]
    n = [int(np.asarray(run.sources[c], bool).sum()) for c in names]
    total = max(len(run.sources), 1)
    return Table({"flag": names, "n": n, "fraction": np.array(n) / total,
                  "cut": [c in FLAG_CUTS for c in names]})


def efficiency_tables(run: RunCatalogues, column: str = "true_snr", bins=None) -> Table:
    """Efficiency of the science fakes (and, apart, the template fakes) against
    ``column`` ('true_snr' or 'mag') per band and over all bands, found and found after
    the flag cuts."""
    if bins is None:
        bins = SNR_BINS if column in SNR_COLUMNS else _mag_bins(run.fakes)
    parts = []
    for image in ("science", "template"):
        fk = run.fakes[(run.fakes["image"] == image) & run.fakes["usable"]]
        for band in [*sorted(set(fk["band"])), "all"]:
            sel = fk if band == "all" else fk[fk["band"] == band]
            sel = sel[np.isfinite(np.asarray(sel[column], float))]
            if not len(sel):
                continue
            t = efficiency_curve(sel[column], sel["found"], bins)
            clean = efficiency_curve(sel[column], sel["found_clean"], bins)
            t["efficiency_clean"] = clean["efficiency"]
            t["band"], t["image"], t["flavor"] = band, image, run.name
            parts.append(t)
    return vstack(parts) if parts else Table()


def _mag_bins(fakes: Table) -> np.ndarray:
    mags = np.asarray(fakes["mag"], float)
    mags = mags[np.isfinite(mags)]
    if not len(mags):
        return np.linspace(20, 26, 13)
    lo, hi = np.floor(mags.min() * 2) / 2, np.ceil(mags.max() * 2) / 2
    return np.arange(lo, hi + 0.25, 0.25)


def sigmoid_fits(run: RunCatalogues) -> Table:
    """Logistic fits of found/lost science fakes against true S/N and magnitude per band
    and over all: the 50% and 90% points (magnitudes: where efficiency falls to them)."""
    rows = []
    fk = run.fakes[(run.fakes["image"] == "science") & run.fakes["usable"]]
    for band in [*sorted(set(fk["band"])), "all"]:
        sel = fk if band == "all" else fk[fk["band"] == band]
        row = {"flavor": run.name, "band": band, "n": len(sel)}
        for column, sign in (("true_snr", 1.0), ("optimal_snr", 1.0), ("mag", -1.0)):
            x = sign * np.asarray(sel[column], float)
            ok = np.isfinite(x)
            try:
                fit = fit_sigmoid(x[ok], np.asarray(sel["found"])[ok])
            except ValueError:
                fit = {"x50": np.nan, "x90": np.nan, "b_err": np.nan}
            row[f"{column}_50"] = sign * fit["x50"]
            row[f"{column}_90"] = sign * fit["x90"]
            row[f"{column}_50_err"] = fit["b_err"]
        rows.append(row)
    return Table(rows=rows)


def photometry_table(run: RunCatalogues) -> Table:
    """Matched fakes with their measured PSF flux: pulls and magnitude errors (of |flux|
    for the template's negative fakes), outliers (|dm| > 0.1 mag) marked."""
    fk = run.fakes[run.fakes["found"]]
    src = run.sources[np.asarray(fk["source"], int)] if len(fk) else run.sources[:0]
    sign = np.sign(np.asarray(fk["flux"], float))  # template fakes are negative
    p = photometry_pulls(sign * np.asarray(src["psfFlux"], float), src["psfFluxErr"],
                         sign * np.asarray(fk["flux"], float))
    return Table({"band": fk["band"], "image": fk["image"], "true_snr": fk["true_snr"],
                  "true_flux": fk["flux"], "psfFlux": src["psfFlux"],
                  "psfFluxErr": src["psfFluxErr"], "pull": p["pull"], "dm": p["dm"],
                  "outlier": p["outlier"], "flagged": src["flagged"]},
                 meta={"pull_median": p["pull_median"], "pull_width": p["pull_width"],
                       "pull_width_all": _robust_width(p["pull"])})


def _robust_width(values) -> float:
    """MAD x 1.4826 of the finite values (NaN: none)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return float(stats.median_abs_deviation(v, scale="normal")) if len(v) else np.nan


def snr_table(run: RunCatalogues) -> Table:
    """Three S/N of every matched fake: the model's (truth: flux over the inputs' noise
    through the PSF), the variance plane's (PSF flux over its error) and the pipeline's
    (detection significance, every noise term included)."""
    fk = run.fakes[run.fakes["found"]]
    src = run.sources[np.asarray(fk["source"], int)] if len(fk) else run.sources[:0]
    sign = np.sign(np.asarray(fk["flux"], float))
    return Table({"band": fk["band"], "image": fk["image"], "model_snr": fk["true_snr"],
                  "variance_snr": sign * np.asarray(src["snr"], float),
                  "pipeline_snr": sign * np.asarray(src["significance"], float)})


def ideal_shortfall(fakes: Table, low: float = 5.0, min_count: int = 10) -> float:
    """How far efficiency falls short of a perfect detector on proper subtraction's S/N:
    the largest, over the :data:`SNR_BINS` from ``low`` up holding ``min_count`` fakes or
    more, of the mean ``Phi(optimal_snr - 5)`` less the fraction found (issue 20 asks it
    to be at most 0.05); NaN without fakes that have an optimal S/N."""
    snr = np.asarray(fakes["optimal_snr"], float)
    found = np.asarray(fakes["found"], bool)
    worst = np.nan
    for lo, hi in zip(SNR_BINS[:-1], SNR_BINS[1:]):
        sel = (snr >= max(lo, low)) & (snr < hi)
        if lo < low or sel.sum() < min_count:
            continue
        gap = float(np.mean(ideal_efficiency(snr[sel])) - np.mean(found[sel]))
        worst = gap if not np.isfinite(worst) else max(worst, gap)
    return worst


def illumination(run: RunCatalogues) -> tuple[np.ndarray, dict]:
    """The fractional area gamma of every diaSource on its CCD and the uniformity test of
    their gammas (:func:`~gpudiffim.metrics.uniformity_test`)."""
    s = run.sources
    at = np.asarray(s["exposure"], int)
    width = np.asarray(run.exposures["width"], float)[at]
    height = np.asarray(run.exposures["height"], float)[at]
    gamma = fractional_area(s["x"], s["y"], width, height)
    test = uniformity_test(gamma) if len(gamma) else {"ks": np.nan, "p": np.nan,
                                                       "edge_excess": np.nan}
    return gamma, test


def object_table(run: RunCatalogues) -> Table:
    """One row per diaObject the run's diaSources associated into: its number of
    diaSources (all and clean), median S/N and the rms of its sources' positions about
    their mean (arcsec; NaN with one source). Empty without an APDB."""
    s = run.sources[np.asarray(run.sources["diaObjectId"]) != 0]
    if not len(s):
        return Table({"diaObjectId": np.zeros(0, np.int64), "n": np.zeros(0, int),
                      "n_clean": np.zeros(0, int), "snr": np.zeros(0),
                      "rms_arcsec": np.zeros(0)})
    ids, inverse, counts = np.unique(np.asarray(s["diaObjectId"]), return_inverse=True,
                                     return_counts=True)
    ra, dec = np.asarray(s["ra"], float), np.asarray(s["dec"], float)
    n_clean = np.bincount(inverse, ~np.asarray(s["flagged"], bool), len(ids)).astype(int)
    mra = np.bincount(inverse, ra, len(ids)) / counts
    mdec = np.bincount(inverse, dec, len(ids)) / counts
    dx = (ra - mra[inverse]) * np.cos(np.radians(dec)) * 3600.0
    dy = (dec - mdec[inverse]) * 3600.0
    msq = np.bincount(inverse, dx * dx + dy * dy, len(ids)) / counts
    rms = np.where(counts > 1, np.sqrt(msq * counts / np.maximum(counts - 1, 1)), np.nan)
    snr = np.array([np.median(np.abs(np.asarray(s["snr"], float)[inverse == i]))
                    for i in range(len(ids))])
    return Table({"diaObjectId": ids, "n": counts, "n_clean": n_clean, "snr": snr,
                  "rms_arcsec": rms})


def summary(run: RunCatalogues) -> dict:
    """The note's counts table for one run, and the figures issue 19 asks of a flavor."""
    s, fk = run.sources, run.fakes
    sci = fk[(fk["image"] == "science") & fk["usable"]]
    n_ccd = len(run.exposures)
    area = float(np.nansum(np.asarray(run.exposures["area_deg2"], float)))
    cont = contamination((np.asarray(s["fake"]) < 0) & ~np.asarray(s["known"], bool),
                         s["flagged"], n_ccd, area if area > 0 else np.nan)
    objects = object_table(run)
    fits_ = sigmoid_fits(run)
    everything = fits_[fits_["band"] == "all"][0] if len(fits_) else None
    bright = sci[sci["true_snr"] > 7]
    optimal = sci[np.asarray(sci["optimal_snr"], float) > 8]
    phot = photometry_table(run)
    found = int(np.sum(fk["found"]))
    return {
        "flavor": run.name, "n_ccd": n_ccd, "area_deg2": area,
        "n_dia_sources": len(s), "n_dia_objects": len(objects),
        "n_dia_sources_clean": int((~np.asarray(s["flagged"], bool)).sum()),
        "n_dia_objects_clean": int((np.asarray(objects["n_clean"]) > 0).sum()),
        "n_fakes": len(fk), "n_fakes_science": len(sci),
        "n_fakes_unusable": int((~np.asarray(fk["usable"], bool)).sum()),
        "fakes_matched": found, "fakes_matched_clean": int(np.sum(fk["found_clean"])),
        "fraction_lost_to_cuts": (1.0 - np.sum(fk["found_clean"]) / found) if found
        else np.nan,
        "known_changes_found": int(np.sum(s["known"])),
        "unmatched": cont["n"], "unmatched_clean": cont["n_clean"],
        "contamination_per_ccd": cont["per_ccd"],
        "contamination_per_ccd_clean": cont["per_ccd_clean"],
        "contamination_per_deg2": cont["per_deg2"],
        "contamination_per_deg2_clean": cont["per_deg2_clean"],
        "snr_50": float(everything["true_snr_50"]) if everything is not None else np.nan,
        "snr_90": float(everything["true_snr_90"]) if everything is not None else np.nan,
        "mag_50": float(everything["mag_50"]) if everything is not None else np.nan,
        "efficiency_above_snr7": float(np.mean(bright["found"])) if len(bright) else np.nan,
        "optimal_snr_50": (float(everything["optimal_snr_50"]) if everything is not None
                           else np.nan),
        "efficiency_above_optimal_snr8": (float(np.mean(optimal["found"])) if len(optimal)
                                          else np.nan),
        "ideal_shortfall_optimal": ideal_shortfall(sci),
        "efficiency_above_snr7_clean": (float(np.mean(bright["found_clean"])) if len(bright)
                                        else np.nan),
        "pull_median": phot.meta["pull_median"], "pull_width": phot.meta["pull_width"],
        "pull_width_all": phot.meta["pull_width_all"],
        "illumination_ks_p": illumination(run)[1]["p"],
    }
