"""Rubin's Alert Production DataBase (APDB), through Rubin's own ``lsst-dax-apdb``.

:func:`make_apdb` creates one at an SQLAlchemy URL (``sqlite:///path.db``, the embedded
default; ``postgresql://...`` for many workers) with the schema of ``lsst-sdm-schemas``;
:func:`open_apdb` opens one, refusing a database it cannot reach or whose schema major
version is not the one this code writes. :func:`ingest_exposure` writes one processed
exposure: it loads the diaObjects in the image's footprint (plus a margin), associates the
exposure's diaSources with them (:mod:`gpudiffim.associate`), measures forced PSF fluxes of
every diaObject there on the difference and the science images, recomputes each touched
diaObject from its whole history, and stores it all with one ``store()`` (one transaction:
all of an exposure's rows or none). An exposure the APDB already holds (its visit and
detector) is left as it is, so a rerun never duplicates rows.

Association is serialised per sky region, across threads, processes and machines, so that
concurrent writers of overlapping sky give the objects one writer would: on PostgreSQL by
advisory locks keyed on the coarse HTM pixels (level 7, ~0.6 deg) the footprint touches,
taken in order; on SQLite, which allows one writer at a time anyway, by a lock on a file
beside the database.
"""

from __future__ import annotations

import fcntl
import logging
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .alerts import alert_packets, alert_schema, write_alerts
from .associate import AssociationConfig, match_sources, new_object_sources, summarize_objects
from .errors import GpuDiffimError
from .measure import forced_psf_flux

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["APDB_SCHEMA_MAJOR", "ApdbError", "apdb_url", "make_apdb", "open_apdb",
           "nanojansky_per_count", "dia_source_ids", "dia_source_rows", "exposure_region",
           "region_lock", "ingest_exposure", "redacted_url"]

log = logging.getLogger(__name__)

#: the APDB schema major version these rows are written for (``lsst-sdm-schemas`` apdb.yaml)
APDB_SCHEMA_MAJOR = 10
#: AB magnitude of 1 nJy
AB_NJY_MAGNITUDE = 31.4
#: sources per exposure and detectors per visit the packed diaSourceIds leave room for
SOURCE_BITS, DETECTORS = 20, 1000
#: HTM level of the association locks' sky regions
LOCK_HTM_LEVEL = 7


class ApdbError(GpuDiffimError):
    """The APDB cannot be created, opened or written; the message names it and why."""


def _modules():
    try:
        from lsst.dax.apdb import Apdb, ApdbTables
        from lsst.dax.apdb.sql import ApdbSql, ApdbSqlConfig
    except ImportError as exc:
        raise ApdbError("writing an APDB needs Rubin's lsst-dax-apdb "
                        "(pip install 'gpudiffim[apdb]')") from exc
    return Apdb, ApdbTables, ApdbSql, ApdbSqlConfig


def redacted_url(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _db_error(url: str, exc: Exception, doing: str) -> ApdbError:
    first = str(getattr(exc, "orig", exc) or exc).strip().splitlines()
    return ApdbError(f"{redacted_url(url)}: cannot {doing} ({type(exc).__name__}: "
                     f"{first[0] if first else ''})")


def apdb_url(url: str) -> str:
    """``url`` with the PostgreSQL driver lsst-dax-apdb writes through: ``postgresql://``
    means psycopg2, whose client-side parameters let it store the NULL validity ends it
    adds (psycopg 3, SQLAlchemy 2.1's default, types them as text and PostgreSQL refuses)."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg2://" + url[len(plain):]
    return url


def make_apdb(url: str):
    """Create a Rubin APDB (``lsst-dax-apdb``, the schema of ``lsst-sdm-schemas``).

    Parameters
    ----------
    url : str
        An SQLAlchemy URL: ``sqlite:///path.db`` (its directory is made) or
        ``postgresql://user@host/database``. An existing APDB there is kept as it is.

    Returns
    -------
    lsst.dax.apdb.Apdb
        The opened APDB (:func:`open_apdb`).
    """
    _, _, ApdbSql, _ = _modules()
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        ApdbSql.init_database(db_url=apdb_url(url))
    except Exception as exc:
        raise _db_error(url, exc, "create an APDB there") from exc
    return open_apdb(url)


_OPEN: dict = {}
_OPEN_LOCK = threading.Lock()


def open_apdb(url: str):
    """The APDB at ``url``, opened once per process, after checking that it is an APDB of
    schema major version :data:`APDB_SCHEMA_MAJOR`."""
    with _OPEN_LOCK:
        if url in _OPEN:
            return _OPEN[url]
        Apdb, _, _, ApdbSqlConfig = _modules()
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
            raise ApdbError(f"{redacted_url(url)}: no such database (make one with gpudiffim "
                            "make-apdb)")
        try:
            apdb = Apdb.from_config(ApdbSqlConfig(db_url=apdb_url(url)))
            meta = dict(apdb.metadata.items())
        except Exception as exc:
            if type(exc).__name__ == "IncompatibleVersionError":  # lsst-dax-apdb's own check
                raise ApdbError(f"{redacted_url(url)}: its APDB schema cannot be written here "
                                f"({exc}); this gpudiffim writes version "
                                f"{APDB_SCHEMA_MAJOR}.x") from exc
            raise _db_error(url, exc, "open the APDB") from exc
        version = meta.get("version:schema")
        if version is None:
            raise ApdbError(f"{redacted_url(url)}: not an APDB (no schema version in its metadata; "
                            "make one with gpudiffim make-apdb)")
        if int(str(version).split(".")[0]) != APDB_SCHEMA_MAJOR:
            raise ApdbError(f"{redacted_url(url)}: APDB schema version {version}; this gpudiffim "
                            f"writes version {APDB_SCHEMA_MAJOR}.x")
        _OPEN[url] = apdb
        return apdb


# ---------------------------------------------------------------------------- rows
def nanojansky_per_count(zero_point: float | None, where: str = "") -> float:
    """nJy per count of an exposure whose zero point (AB magnitude of one count) is
    ``zero_point``; an exposure without one cannot be written to an APDB."""
    if zero_point is None or not np.isfinite(zero_point):
        raise ApdbError(f"{where}no zero point: its fluxes cannot be given in nJy (set "
                        "MAGZERO, PHOTZP or FLUXMAG0 in the header)")
    return float(10 ** (-0.4 * (zero_point - AB_NJY_MAGNITUDE)))


def dia_source_ids(visit: int, detector: int, n: int) -> np.ndarray:
    """``n`` diaSourceIds unique to (visit, detector): ``(visit * 1000 + detector) << 20``
    plus the index (an error where a visit or detector does not fit)."""
    if not (isinstance(visit, (int, np.integer)) and isinstance(detector, (int, np.integer))):
        raise ApdbError(f"visit {visit!r} and detector {detector!r} must be integers to be "
                        "written to an APDB")
    if not 0 <= detector < DETECTORS or not 0 <= visit < (2**63 >> SOURCE_BITS) // DETECTORS:
        raise ApdbError(f"visit {visit} or detector {detector} too large for a diaSourceId")
    if n >= 2**SOURCE_BITS:
        raise ApdbError(f"{n} diaSources in one exposure: at most {2**SOURCE_BITS - 1}")
    return (np.int64(visit * DETECTORS + detector) << np.int64(SOURCE_BITS)) + np.arange(
        n, dtype=np.int64)


#: diaSource columns in counts (converted to nJy)
FLUX_COLUMNS = ("psfFlux", "psfFluxErr", "apFlux", "apFluxErr", "scienceFlux",
                "scienceFluxErr", "dipoleMeanFlux", "dipoleFluxDiff")


def _sky_errors(wcs, x, y, x_err, y_err):
    """raErr, decErr (degrees) and their covariance from pixel errors, through the WCS's
    local derivatives."""
    ra0, dec0 = wcs.pixel_to_world_values(x, y)
    ra1, dec1 = wcs.pixel_to_world_values(x + 1.0, y)
    ra2, dec2 = wcs.pixel_to_world_values(x, y + 1.0)
    dra_dx, dra_dy = (ra1 - ra0 + 180) % 360 - 180, (ra2 - ra0 + 180) % 360 - 180
    ddec_dx, ddec_dy = dec1 - dec0, dec2 - dec0
    sx2, sy2 = x_err**2, y_err**2
    return (np.sqrt(dra_dx**2 * sx2 + dra_dy**2 * sy2),
            np.sqrt(ddec_dx**2 * sx2 + ddec_dy**2 * sy2),
            dra_dx * ddec_dx * sx2 + dra_dy * ddec_dy * sy2)


def dia_source_rows(table, difference, mjd: float) -> pd.DataFrame:
    """An exposure's diaSources (the measurement table; sky sources dropped) as APDB
    DiaSource rows: fluxes in nJy, positions and their errors in degrees, the exposure's
    identifiers and midpoint time, packed diaSourceIds."""
    import pandas as pd  # on demand: commands that store nothing start without it

    where = f"{difference.info.describe()}: "
    if difference.wcs is None:
        raise ApdbError(f"{where}no WCS: diaSources have no sky positions")
    scale = nanojansky_per_count(difference.zero_point, where)
    real = table[~np.asarray(table["sky_source"], bool)] if "sky_source" in table.colnames \
        else table
    frame = pd.DataFrame({name: np.asarray(real[name]) for name in real.colnames
                          if real[name].ndim == 1 and name != "sky_source"})
    for name in FLUX_COLUMNS:
        if name in frame:
            frame[name] = frame[name].astype(float) * scale
    info = difference.info
    frame["diaSourceId"] = dia_source_ids(info.visit, info.detector, len(frame))
    if "parentDiaSourceId" in frame:  # a row index in the catalogue (-1: not deblended)
        parent = frame["parentDiaSourceId"].to_numpy()
        ids = frame["diaSourceId"].to_numpy()
        frame["parentDiaSourceId"] = pd.array(
            [ids[p] if p >= 0 else None for p in parent], dtype="Int64")
    frame["visit"], frame["detector"] = info.visit, info.detector
    frame["band"] = info.band or ""
    frame["midpointMjdTai"] = mjd
    frame["exposureTime"] = info.exptime if info.exptime is not None else np.nan
    frame["raErr"] = frame["decErr"] = frame["ra_dec_Cov"] = np.zeros(len(frame))
    if len(frame):
        frame["raErr"], frame["decErr"], frame["ra_dec_Cov"] = _sky_errors(
            difference.wcs, frame["x"].to_numpy(float), frame["y"].to_numpy(float),
            frame["xErr"].to_numpy(float), frame["yErr"].to_numpy(float))
    frame["isNegative"] = frame["psfFlux"] < 0 if "psfFlux" in frame else False
    frame["trailNdata"] = 0  # no trail fit
    return frame


def exposure_region(difference, padding: float):
    """The exposure's footprint on the sky, padded by ``padding`` pixels, as an
    ``lsst.sphgeom.ConvexPolygon``."""
    from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d
    ny, nx = difference.shape
    xs = np.array([-0.5 - padding, nx - 0.5 + padding, nx - 0.5 + padding, -0.5 - padding])
    ys = np.array([-0.5 - padding, -0.5 - padding, ny - 0.5 + padding, ny - 0.5 + padding])
    ra, dec = difference.wcs.pixel_to_world_values(xs, ys)
    return ConvexPolygon([UnitVector3d(LonLat.fromDegrees(float(a), float(d)))
                          for a, d in zip(ra, dec)])


_ENGINES: dict = {}


def _lock_engine(url: str):
    """One SQLAlchemy engine per URL per process for the lock connections."""
    from sqlalchemy import create_engine
    with _OPEN_LOCK:
        if url not in _ENGINES:
            _ENGINES[url] = create_engine(apdb_url(url), pool_pre_ping=True)
        return _ENGINES[url]


@contextmanager
def region_lock(url: str, region):
    """Hold the association lock of ``region`` (see the module's docstring)."""
    if url.startswith("sqlite"):
        path = Path(url.split(":///", 1)[1].split("?", 1)[0] + ".lock")
        with open(path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    from lsst.sphgeom import HtmPixelization
    from sqlalchemy import text
    keys = []
    for lo, hi in HtmPixelization(LOCK_HTM_LEVEL).envelope(region):
        keys.extend(range(lo, hi))
    with _lock_engine(url).connect() as conn, ExitStack() as stack:
        for key in sorted(keys):
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            stack.callback(conn.execute, text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        conn.commit()
        yield


def _forced_rows(objects: pd.DataFrame, difference, science, is_score: bool, mjd: float,
                 now: float, scale: float, backend) -> pd.DataFrame:
    """DiaForcedSource rows: PSF fluxes of ``objects`` on the difference and the science."""
    import pandas as pd  # on demand: commands that store nothing start without it

    if not len(objects):
        return pd.DataFrame()
    x, y = difference.wcs.world_to_pixel_values(objects["ra"].to_numpy(float),
                                                objects["dec"].to_numpy(float))
    flux, err = forced_psf_flux(difference, x, y, is_score, backend)
    s_flux, s_err = (forced_psf_flux(science, x, y, False, backend) if science is not None
                     else (np.full(len(x), np.nan),) * 2)
    info = difference.info
    ids = dia_source_ids(info.visit, info.detector, len(objects))
    return pd.DataFrame({
        "diaForcedSourceId": ids, "diaObjectId": objects["diaObjectId"].to_numpy(np.int64),
        "ra": objects["ra"].to_numpy(float), "dec": objects["dec"].to_numpy(float),
        "visit": info.visit, "detector": info.detector,
        "psfFlux": flux * scale, "psfFluxErr": err * scale, "midpointMjdTai": mjd,
        "scienceFlux": s_flux * scale, "scienceFluxErr": s_err * scale,
        "band": info.band or "", "timeProcessedMjdTai": now})


def _on_image(objects: pd.DataFrame, difference, padding: float) -> pd.DataFrame:
    if not len(objects):
        return objects
    x, y = difference.wcs.world_to_pixel_values(objects["ra"].to_numpy(float),
                                                objects["dec"].to_numpy(float))
    ny, nx = difference.shape
    inside = ((x > -0.5 - padding) & (x < nx - 0.5 + padding) & (y > -0.5 - padding)
              & (y < ny - 0.5 + padding))
    return objects[inside].reset_index(drop=True)


def ingest_exposure(url: str, difference, sources, science=None, is_score: bool = False,
                    mjd: float | None = None, config: AssociationConfig | None = None,
                    backend=None, alerts=None, template=None) -> dict:
    """Associate one exposure's diaSources and store it in the APDB at ``url``.

    Parameters
    ----------
    url : str
        The APDB's SQLAlchemy URL (:func:`make_apdb` made it).
    difference : Exposure
        The difference image (host), with its WCS, zero point and identifiers.
    sources : astropy.table.Table
        Its measured diaSources (:func:`~gpudiffim.measure.dia_sources`).
    science : Exposure, optional
        The science exposure, for forced science fluxes.
    is_score : bool
        True when ``difference`` is a preconvolution score image.
    mjd : float, optional
        The midpoint (MJD TAI); default the difference's own.
    config : AssociationConfig, optional
        Radius, position error floors, footprint margin.
    backend : str or Backend, optional
        Where forced photometry runs.
    alerts : path, optional
        A directory for one Avro alert per diaSource (:mod:`gpudiffim.alerts`), written
        before the rows are stored and removed again if storing fails.
    template : Exposure, optional
        The template on the science grid, for the alerts' template cutouts.

    Returns
    -------
    dict
        Row counts stored (``diaSources``, ``newDiaObjects``, ``diaObjects``,
        ``diaForcedSources``), and ``skipped`` True when the APDB already held the exposure.
    """
    from astropy.time import Time
    config = config or AssociationConfig()
    info = difference.info
    mjd = info.mjd if mjd is None else mjd
    if mjd is None or not np.isfinite(mjd):
        raise ApdbError(f"{info.describe()}: no observation time (MJD-OBS, DATE-OBS, ... in "
                        "the header, or an mjd column in the manifest)")
    new = dia_source_rows(sources, difference, mjd)
    apdb = open_apdb(url)
    visit_time = Time(mjd, format="mjd", scale="tai")
    region = exposure_region(difference, config.imagePaddingPixels)
    t0 = time.perf_counter()
    with region_lock(url, region):
        if apdb.containsVisitDetector(int(info.visit), int(info.detector), region, visit_time):
            log.info("%s: the APDB already holds visit %s detector %s; left as it is",
                     info.describe(), info.visit, info.detector)
            return {"skipped": True, "diaSources": 0, "newDiaObjects": 0, "diaObjects": 0,
                    "diaForcedSources": 0, "alerts": 0}
        known = _on_image(apdb.getDiaObjects(region), difference, config.imagePaddingPixels)
        starts = _associate(new, known, config)
        now = float(Time.now().tai.mjd)
        new["timeProcessedMjdTai"] = now
        touched = np.unique(new.loc[new["diaObjectId"] != 0, "diaObjectId"].to_numpy())
        old_ids = sorted(set(touched.tolist()) & set(known["diaObjectId"].tolist()))
        history = _stored(apdb.getDiaSources, region, old_ids, visit_time)
        old_forced = _stored(apdb.getDiaForcedSources, region, old_ids, visit_time)
        forced = _forced_rows(_positions(known, new[starts]), difference, science, is_score,
                              mjd, now, nanojansky_per_count(difference.zero_point), backend)
        objects = _touched_objects(history, new, old_forced, forced, touched, mjd)
        written = (_write_alerts(alerts, new, objects, history, old_forced, difference,
                                 science, template) if alerts is not None else [])
        _store(apdb, visit_time, objects, new, forced, written)
    counts = {"skipped": False, "diaSources": len(new), "newDiaObjects": int(starts.sum()),
              "diaObjects": len(objects), "diaForcedSources": len(forced),
              "alerts": len(written), "t_apdb": time.perf_counter() - t0}
    log.info("%s: APDB: %d diaSources, %d new of %d diaObjects, %d forced sources",
             info.describe(), counts["diaSources"], counts["newDiaObjects"],
             counts["diaObjects"], counts["diaForcedSources"])
    return counts


def _associate(new: pd.DataFrame, known: pd.DataFrame, config: AssociationConfig):
    """Set each new source's ``diaObjectId`` (a known object's, its own for a new object, 0
    for an orphan); returns which sources start objects."""
    matched = match_sources(new, known, config)
    starts = new_object_sources(new, matched)
    new["diaObjectId"] = 0
    new.loc[matched >= 0, "diaObjectId"] = known["diaObjectId"].to_numpy()[
        matched[matched >= 0]]
    new.loc[starts, "diaObjectId"] = new.loc[starts, "diaSourceId"]
    return starts


def _positions(*frames) -> pd.DataFrame:
    """The ``diaObjectId``, ``ra``, ``dec`` rows of the frames, together."""
    import pandas as pd  # on demand: commands that store nothing start without it
    parts = [f[["diaObjectId", "ra", "dec"]] for f in frames if len(f)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        {"diaObjectId": [], "ra": [], "dec": []})


def _touched_objects(history, new, old_forced, forced, touched, mjd) -> pd.DataFrame:
    """The touched objects recomputed from their whole source and forced histories."""
    import pandas as pd  # on demand: commands that store nothing start without it
    sources = [f for f in (history, new[new["diaObjectId"] != 0]) if len(f)]
    if not sources:
        return pd.DataFrame({"diaObjectId": np.zeros(0, np.int64), "ra": np.zeros(0),
                             "dec": np.zeros(0)})
    measured = [f for f in (old_forced, forced) if len(f)]
    objects = summarize_objects(pd.concat(sources, ignore_index=True),
                                pd.concat(measured, ignore_index=True) if measured else None)
    objects["validityStartMjdTai"] = mjd
    return objects[objects["diaObjectId"].isin(touched)].reset_index(drop=True)


def _write_alerts(directory, new, objects, history, old_forced, difference, science,
                  template) -> list:
    schema = alert_schema()
    return write_alerts(schema, alert_packets(schema, new, objects, history, old_forced,
                                              difference, science, template), directory)


def _store(apdb, visit_time, objects, new, forced, written) -> None:
    """One ``store()``: all of the exposure's rows or none (and then none of its alerts)."""
    try:
        apdb.store(visit_time, objects, _schema_columns(apdb, "DiaSource", new),
                   _schema_columns(apdb, "DiaForcedSource", forced) if len(forced) else None)
    except Exception:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _all_time():
    from astropy.time import Time
    return Time(0.0, format="mjd", scale="tai")


def _stored(getter, region, object_ids, visit_time) -> pd.DataFrame:
    """Every stored row of the given objects (``getter``: the APDB's getDiaSources or
    getDiaForcedSources), all times back."""
    import pandas as pd  # on demand: commands that store nothing start without it
    if not object_ids:
        return pd.DataFrame()
    found = getter(region, object_ids, visit_time, start_time=_all_time())
    return found if found is not None else pd.DataFrame()


def _schema_columns(apdb, table: str, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame``'s columns that the APDB table has (measurement columns it has no place
    for, such as ``significance`` or ``sky_source``, left out)."""
    _, ApdbTables, _, _ = _modules()
    names = {c.name for c in apdb.tableDef(getattr(ApdbTables, table)).columns}
    return frame[[c for c in frame.columns if c in names]].copy()
