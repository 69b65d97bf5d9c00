"""The batch runner: every (visit, detector) of a repository through the engine.

``run(repo, outdir, ...)`` reads a manifest (``manifest.ecsv``: visit, detector, band,
science, template; optional science_psf, template_psf, science_noise, template_noise,
science_mask, template_mask; paths relative to the repo),
and for each exposure: reads it (a reader thread pool works ahead of the device, at most
``prefetch`` exposures in flight, so memory stays flat, and uploads them to the device —
on GPU through pinned memory on a non-blocking stream, overlapping the compute; a
template shared by several visits is decoded once), resamples the template onto
the science grid when their WCSs differ (refusing pairs with < 10% coverage), subtracts,
detects and measures, and hands the outputs to a writer pool. Outputs land atomically
in ``outdir/<band>/<visit>/<detector>/`` (difference.fits, diaSources.parquet and a
``status.json`` row); the run table ``outdir/run.ecsv`` is rebuilt from those rows, so a
rerun skips finished exposures (``force`` redoes them), an interrupted run leaves only
complete outputs, and runs on Dask (``dask="local:N"`` or a scheduler address) share
the same files and semantics. A failing exposure (bad file, failed kernel fit, device
out of memory — retried once on the CPU) is recorded with its reason and the run goes on.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
from astropy.io import fits
from astropy.table import Table
from tqdm import tqdm

from .apdb import ingest_exposure, open_apdb
from .backend import get_backend
from .cutouts import choose_cutouts, triplet_cutouts, write_cutouts
from .errors import GpuDiffimError, InputError
from .fakes import FakeConfig, fake_generator, inject_fakes
from .hostmem import release_freed_memory
from .io import atomic_path, check_output_space, output_bytes, read_exposure, write_exposure
from .measure import write_dia_sources
from .metrics import effective_radius
from .options import configclass, option
from .pipeline import PipelineConfig, process_pair
from .subtract import SubtractConfig
from .warp import template_on_science_grid

__all__ = ["RunConfig", "ExposureOutputs", "run", "read_manifest", "exposure_dir",
           "run_table", "status_table", "process_exposure", "compute_exposure", "write_outputs",
           "TemplateCache", "config_key", "output_lock", "remove_stale_temporaries"]

log = logging.getLogger(__name__)

@configclass
class RunConfig:
    """How a repository is run: the pipeline's settings and the runner's own."""

    pipeline: PipelineConfig = option(factory=PipelineConfig, doc="what is done to each exposure")
    backend: str | None = option(None, "cpu, gpu, strict or auto (None: $GPUDIFFIM_BACKEND)")
    prefetch: int = option(2, "exposures read ahead of the device")
    readers: int = option(2, "reader threads")
    writers: int = option(2, "writer threads")
    template_cache: int = option(4, "decoded templates kept for the visits that share them")
    force: bool = option(False, "redo exposures already done")
    compress: bool = option(False, "tile-compress the differences written (image and variance "
                                   "quantised at 1/16 of the noise, mask lossless): 4-6x "
                                   "smaller, ~0.5 s more per million pixels on a CPU")
    dask: str | None = option(None, "a Dask scheduler address, local:N or local-cuda (a worker "
                              "per GPU); None: in process")
    apdb: str | None = option(None, "an APDB's SQLAlchemy URL: each exposure's diaSources are "
                                    "associated and stored there (gpudiffim make-apdb)")
    alerts: str | None = option(None, "a directory for one Avro alert per diaSource (with apdb)")
    fakes: FakeConfig = option(factory=FakeConfig, doc="fakes injected into each exposure "
                                                      "before it is processed (none by "
                                                      "default), their truth in fakes.ecsv")
    cutouts: int = option(12, "science/template/difference cutouts of this many random "
                              "diaSources and as many fakes per exposure (cutouts.fits)")
    cutoutSize: int = option(31, "side of those cutouts (pixels, odd)")


KEYS = ("band", "visit", "detector")  # one exposure; each a directory level of the outputs


class ExposureOutputs(NamedTuple):
    """What one exposure's compute hands to the writers (host data)."""

    difference: object  # Exposure
    sources: Table
    science: object  # the science Exposure, for forced photometry in the APDB (else None)
    is_score: bool
    template: object = None  # the template on the science grid, for alert cutouts
    fakes: object = None  # the truth Table of the fakes injected (None: none)
    cutouts: tuple | None = None  # (cube, table) of triplet cutouts (None: none)


def read_manifest(repo) -> Table:
    """The repository's manifest, checked before anything runs: a readable table with rows,
    the columns the runner needs, identifiers that are safe as directory names, and no
    (band, visit, detector) twice. Any problem is an InputError naming the manifest."""
    repo = Path(repo)
    path = repo / "manifest.ecsv"
    if not path.is_file():
        raise InputError(path, "no manifest.ecsv in the repository")
    try:
        manifest = Table.read(path, format="ascii.ecsv")
    except Exception as exc:
        raise InputError(path, f"not a readable ECSV table ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    missing = {"visit", "detector", "band", "science", "template"} - set(manifest.colnames)
    if missing:
        raise InputError(path, f"manifest lacks columns {sorted(missing)}")
    if len(manifest) == 0:
        raise InputError(path, "manifest has no rows")
    seen = {}
    for i, row in enumerate(manifest):
        key = tuple(_path_component(path, i, name, row[name]) for name in KEYS)
        if key in seen:
            raise InputError(path, f"rows {seen[key]} and {i} are both band {key[0]}, visit "
                                   f"{key[1]}, detector {key[2]}")
        seen[key] = i
    return manifest


def _path_component(path, index: int, column: str, value) -> str:
    """An identifier as a directory name: text, not empty, no separator, not . or .."""
    text = str(value).strip()
    if not text or text in (".", "..") or any(c in text for c in "/\\\0"):
        raise InputError(path, f"row {index}: {column} {value!r} cannot name a directory")
    return text


def _identifier(value):
    """A manifest identifier as an int when it is one, else as text."""
    try:
        as_int = int(value)
    except (TypeError, ValueError):
        return str(value).strip()
    return as_int if str(as_int) == str(value).strip() else str(value).strip()


def exposure_dir(outdir, row) -> Path:
    """``outdir/<band>/<visit>/<detector>`` (a numeric detector as three digits)."""
    detector = _identifier(row["detector"])
    detector = f"{detector:03d}" if isinstance(detector, int) else detector
    return Path(outdir) / str(row["band"]).strip() / str(_identifier(row["visit"])) / detector


def _status(outdir, row) -> dict | None:
    path = exposure_dir(outdir, row) / "status.json"
    return json.loads(path.read_text()) if path.is_file() else None


class TemplateCache:
    """The last ``size`` decoded templates, shared by the reader threads (a night's visits
    of one detector all use the same template). Keyed by path, PSF path, size and mtime, so
    a file replaced on disk is read again; cached pixel planes are read-only, so no stage
    can change what the next visit gets."""

    def __init__(self, size: int = 4):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict = {}
        self.hits = self.misses = 0

    def get(self, path: Path, *others):
        """The exposure at ``path`` read with its PSF, noise and mask files (``others``)."""
        if self.size <= 0:
            return _read_input(path, *others)
        st = path.stat() if path.exists() else None
        key = (str(path.resolve()), *map(str, others), st and (st.st_size, st.st_mtime_ns))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            lock = self._loading.setdefault(key, threading.Lock())
        with lock:  # one reader decodes a template; the others wait for it
            with self._lock:
                if key in self._items:
                    self.hits += 1
                    return self._items[key]
            exposure = _read_input(path, *others)
            for plane in (exposure.image, exposure.mask, exposure.variance):
                plane.flags.writeable = False
            with self._lock:
                self.misses += 1
                self._items[key] = exposure
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
                self._loading.pop(key, None)
        return exposure


#: optional manifest columns of each input, beside ``science`` and ``template`` themselves
INPUT_COLUMNS = ("psf", "noise", "mask")


def _inputs(repo: Path, row, which: str) -> tuple:
    """(path, psf, noise, mask) of the science or template: repo-relative paths, None where
    the manifest has no such column or leaves it empty."""
    extra = []
    for kind in INPUT_COLUMNS:
        key = f"{which}_{kind}"
        value = row[key] if key in row.colnames else None
        extra.append(repo / str(value) if value is not None and str(value).strip() else None)
    return (repo / row[which], *extra)


def _read_input(path: Path, psf: Path | None = None, noise: Path | None = None,
                mask: Path | None = None):
    return read_exposure(path, psf=psf, noise=noise, mask=mask)


def _read_pair(repo, row, templates: TemplateCache | None = None,
               fakes: FakeConfig | None = None):
    """``(science, template, seconds, fakes' truth or None)``, the fakes injected."""
    repo = Path(repo)
    t0 = time.perf_counter()
    science = _read_input(*_inputs(repo, row, "science"))
    template_inputs = _inputs(repo, row, "template")
    template = (templates.get(*template_inputs) if templates is not None
                else _read_input(*template_inputs))
    truth = None
    if fakes is not None and (fakes.nScience or fakes.nTemplate):
        science, template, truth = inject_fakes(science, template, fakes,
                                                _identifier(row["visit"]),
                                                _identifier(row["detector"]))
    return science, template, time.perf_counter() - t0, truth


def _process(science, template, config: RunConfig, backend, pick=None):
    """Warp, subtract, detect and measure one exposure; returns outputs, timings, the
    template's coverage, the warped template (host; only when alerts need it) and the
    triplet cutouts at the rows ``pick(sources)`` chooses (None without ``pick``)."""
    t = time.perf_counter()
    template, fraction = template_on_science_grid(science, template, backend)
    timings = {"warp": time.perf_counter() - t}
    result, sources, stage_timings = process_pair(science, template, config.pipeline, backend)
    timings.update(stage_timings)
    warped = template.to_host(backend) if config.alerts else None
    cutouts = None
    if pick is not None:
        chosen = pick(sources)
        images = (science.image, template.image, result.difference.image)
        cutouts = (triplet_cutouts(backend, [backend.asarray(i) for i in images], chosen["x"],
                                   chosen["y"], config.cutoutSize), chosen)
    return result, sources, timings, fraction, warped, cutouts


def _is_device_error(exc) -> bool:
    """Whether an exception is the device's, not the exposure's: out of memory, or any
    error CuPy or CUDA raised (a driver fault, a missing CUDA library, a kernel that failed
    to compile): the exposure is worth another try on the CPU."""
    if isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__:
        return True
    return any(c.__module__.split(".")[0] in ("cupy", "cupy_backends", "cupyx")
               for c in type(exc).__mro__)


def process_exposure(repo, outdir, row, config: RunConfig, pair=None) -> dict:
    """Everything for one manifest row, outputs written atomically; returns its status row.

    Never raises for a bad exposure: the reason goes into the status row.
    """
    status, outputs = compute_exposure(repo, row, config, pair)
    return write_outputs(outdir, row, status, outputs, config.apdb, config.alerts,
                         config.compress)


def compute_exposure(repo, row, config: RunConfig, pair=None, on_device=None):
    """Read (unless ``pair`` is given), warp, subtract, detect, measure: ``(status, outputs)``
    with host outputs ``(difference, diaSources)``, or ``None`` when the exposure failed.
    ``on_device``: the pair already uploaded to the backend's device (the host ``pair`` is
    still needed for the CPU retry)."""
    status = _status_row(row)
    status["config"] = config_key(config)
    start = time.perf_counter()
    outputs = None
    try:
        science, template, t_read, truth = (pair if pair is not None
                                            else _read_pair(repo, row, None, config.fakes))
        status["t_read"] = t_read
        backend = get_backend(config.backend)
        pick = _cutout_picker(config, row, truth)
        try:
            dev_science, dev_template = on_device or (science, template)
            result, sources, timings, fraction, warped, cutouts = _process(
                dev_science, dev_template, config, backend, pick)
        except Exception as exc:
            if not _is_device_error(exc) or backend.name == "cpu":
                raise
            why = f"{type(exc).__name__}: {exc}"
            log.warning("%s/%s/%s: the %s device failed (%s); retrying on the CPU",
                        row["band"], row["visit"], row["detector"], backend.name, why)
            backend = get_backend("cpu")
            on_device = dev_science = dev_template = None  # free the device copies first
            result, sources, timings, fraction, warped, cutouts = _process(
                science, template, config, backend, pick)
            status["retried_on_cpu"] = True
            status["device_error"] = why
        # the science rides along to the writers only when the APDB needs it (forced
        # photometry): otherwise it would be held until written, for nothing
        outputs = ExposureOutputs(result.difference.to_host(backend), sources,
                                  science if config.apdb else None, result.is_score, warped,
                                  truth, cutouts)
        q = result.quality
        ny, nx = science.shape
        status.update({f"t_{k}": v for k, v in timings.items()})
        status.update({"status": "done", "flavor": result.flavor, "backend": backend.name,
                       "template_fraction": fraction,
                       "n_dia_sources": int((~sources["sky_source"]).sum()),
                       "n_fakes": 0 if truth is None else len(truth),
                       "mode": config.pipeline.subtract.mode,
                       # seeing: the PSFs' effective radii at the centre (pixels)
                       "science_psf_radius": _radius(result.science_psf, nx, ny),
                       "template_psf_radius": _radius(result.template_psf, nx, ny),
                       "model": q["model"], "n_rejected_models": len(q["rejected_models"]),
                       "kernel_sum": q["kernel_sum_centre"],
                       "kernel_sum_error": q["kernel_sum_error"],
                       "aperture_flux_ratio": (np.nan if q["aperture_flux_ratio"] is None
                                               else q["aperture_flux_ratio"]),
                       "n_kernel_sources": q["n_kernel_sources"],
                       "kernel_residual_std": q["kernel_residual_std"],
                       "kernel_residual_unexplained": q["kernel_residual_unexplained"],
                       "difference_pull_sigma": q["difference_pull_sigma"],
                       "variance_scale": q["variance_scale"],
                       # the kernel's own error that detection added near bright sources
                       "residual_scale": float(sources.meta.get("residual_scale", 0.0)),
                       # the template's misregistration, rms pixels per axis
                       "registration_sigma": float(sources.meta.get("registration_sigma",
                                                                    0.0))})
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # recorded, not raised: the run goes on
        status["error"] = f"{type(exc).__name__}: {exc}"
        log.error("%s/%s/%s failed: %s", row["band"], row["visit"], row["detector"],
                  status["error"])
    status["t_compute"] = time.perf_counter() - start
    return status, outputs


def _cutout_picker(config: RunConfig, row, truth):
    """The chooser of an exposure's cutout rows (None when none are asked for): the same
    rows for the same fake seed, visit and detector."""
    if config.cutouts <= 0:
        return None
    rng = fake_generator(config.fakes, _identifier(row["visit"]), _identifier(row["detector"]))
    rng = np.random.default_rng(rng.integers(2**63))  # not the fakes' own draws
    return lambda sources: choose_cutouts(sources, truth, config.cutouts, rng)


def _radius(psf, nx: int, ny: int) -> float:
    """A PSF model's effective radius at the detector's centre (NaN without one)."""
    if psf is None:
        return np.nan
    return effective_radius(psf.image_at((nx - 1) / 2.0, (ny - 1) / 2.0))


def _json_value(o):
    """NumPy scalars as their values, anything else as text."""
    return o.item() if hasattr(o, "item") else str(o)


def write_outputs(outdir, row, status: dict, outputs: ExposureOutputs | None,
                  apdb: str | None = None, alerts=None, compress: bool = False) -> dict:
    """Write an exposure's outputs atomically (the difference tile-compressed with
    ``compress``), store it in the APDB at ``apdb`` (when given, with its alerts in
    ``alerts``), then write its status row (the resume marker)."""
    here = exposure_dir(outdir, row)
    if outputs is not None:
        t = time.perf_counter()
        try:
            write_exposure(outputs.difference, here / "difference.fits", compress)
            if outputs.fakes is not None:
                with atomic_path(here / "fakes.ecsv") as tmp:
                    outputs.fakes.write(tmp, format="ascii.ecsv", overwrite=True)
            if outputs.cutouts is not None:
                with atomic_path(here / "cutouts.fits") as tmp:
                    write_cutouts(tmp, *outputs.cutouts)
            write_dia_sources(outputs.sources, here / "diaSources.parquet")
        except Exception as exc:  # outputs as a set: no difference without its catalogue
            for name in ("difference.fits", "fakes.ecsv", "cutouts.fits"):
                (here / name).unlink(missing_ok=True)
            status.update({"status": "failed", "error": f"writing: {type(exc).__name__}: {exc}"})
        status["t_write"] = time.perf_counter() - t
        if apdb and status["status"] == "done":
            _store_in_apdb(apdb, row, status, outputs, alerts)
    with atomic_path(here / "status.json") as tmp:
        tmp.write_text(json.dumps(status, default=_json_value))
    return status


def _store_in_apdb(url: str, row, status: dict, outputs: ExposureOutputs, alerts) -> None:
    """Associate and store one exposure (one transaction) and write its alerts; a failure
    fails the exposure."""
    mjd = row["mjd"] if "mjd" in row.colnames and np.isfinite(row["mjd"]) else None
    try:
        counts = ingest_exposure(url, outputs.difference, outputs.sources, outputs.science,
                                 outputs.is_score, mjd, alerts=alerts,
                                 template=outputs.template)
    except Exception as exc:
        status.update({"status": "failed", "error": f"APDB: {type(exc).__name__}: {exc}"})
        log.error("%s/%s/%s: %s", row["band"], row["visit"], row["detector"], status["error"])
        return
    status["apdb"] = url
    status.update({f"apdb_{k}": v for k, v in counts.items()})


class _Progress:
    """A progress bar (tqdm: exposures/s, ETA, the last exposure) on a terminal; a log line
    per exposure otherwise."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.start = total, 0, time.perf_counter()
        stream = stream or sys.stderr
        tty = hasattr(stream, "isatty") and stream.isatty()
        self.bar = (tqdm(total=total, unit="exposure", file=stream, dynamic_ncols=True,
                         smoothing=0.1) if tty else None)

    def update(self, status: dict):
        self.done += 1
        last = f"{status['band']} {status['visit']} {status['detector']} {status['status']}"
        if self.bar is not None:
            self.bar.set_postfix_str(f"last: {last}", refresh=False)
            self.bar.update(1)
            if self.done == self.total:
                self.bar.close()
            return
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        log.info("%d/%d exposures, %.2f/s, ETA %.0f s (last: %s)", self.done, self.total, rate,
                 eta, last)


def run_table(outdir, manifest) -> Table:
    """The run table from the status rows on disk (one row per manifest row)."""
    rows = []
    for row in manifest:
        st = _status(outdir, row) or {"visit": _identifier(row["visit"]),
                                      "detector": _identifier(row["detector"]),
                                      "band": str(row["band"]), "status": "pending"}
        rows.append(st)
    return status_table(rows)


def status_table(rows: list[dict]) -> Table:
    """Status rows (dicts) as a Table: a column per key any row has, numeric where every
    value given is a number (NaN where missing), text otherwise."""
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    table = Table()
    for k in keys:
        values = [r.get(k) for r in rows]
        if all(isinstance(v, (int, float, bool, np.number)) or v is None for v in values) and \
                any(v is not None for v in values):
            table[k] = [np.nan if v is None else v for v in values]
        else:
            table[k] = ["" if v is None else str(v) for v in values]
    return table


def run(repo, outdir, config: RunConfig | None = None, *, flavor: str | None = None,
        backend: str | None = None, workers: int | None = None, dask: str | None = None,
        force: bool | None = None, progress: bool = True) -> Table:
    """Process every exposure of a repository; resumable.

    Parameters
    ----------
    repo : path
        Directory with ``manifest.ecsv`` (visit, detector, band, science, template[,
        science_psf, template_psf]; paths relative to it).
    outdir : path
        Where ``<band>/<visit>/<detector>/`` outputs and ``run.ecsv`` go.
    config : RunConfig, optional
        Everything at once. Give either this or the keyword settings, not both.
    flavor, backend, workers, dask, force : optional
        Shortcuts for a default :class:`RunConfig` with that subtraction flavor, backend,
        number of reader threads, Dask scheduler (``local:N`` or an address) and redo.
    progress : bool
        Show a progress line.

    Returns
    -------
    astropy.table.Table
        The run table: one row per manifest row, its status, timings and quality.
    """
    config = _run_config(config, flavor=flavor, backend=backend, readers=workers, dask=dask,
                         force=force)
    repo, outdir = Path(repo), Path(outdir)
    manifest = read_manifest(repo)
    if config.alerts and not config.apdb:
        raise GpuDiffimError("alerts need an APDB (--apdb): they carry each diaSource's "
                             "diaObject and history")
    if config.apdb:
        open_apdb(config.apdb)  # reachable, and an APDB of our schema, before any compute
    check_output_space(outdir, 0)  # writable, before the lock file is made there
    with output_lock(outdir):
        removed = remove_stale_temporaries(outdir)
        if removed:
            log.info("removed %d temporary files an interrupted run left", removed)
        key = config_key(config)
        todo = [r for r in manifest
                if config.force or not _done_with(_status(outdir, r), key, config.apdb)]
        log.info("%d of %d exposures to process (%d already done)", len(todo), len(manifest),
                 len(manifest) - len(todo))
        check_output_space(outdir, len(todo) * _exposure_output_bytes(repo, todo,
                                                                      config.compress))
        bar = _Progress(len(todo)) if progress else None
        try:
            if config.dask:
                _run_dask(repo, outdir, todo, config, config.dask, bar)
            else:
                _run_local(repo, outdir, todo, config, bar)
        finally:
            table = run_table(outdir, manifest)
            with atomic_path(outdir / "run.ecsv") as tmp:
                table.write(tmp, format="ascii.ecsv", overwrite=True)
    return table


def _exposure_output_bytes(repo: Path, todo, compressed: bool = False) -> int:
    """About what one exposure's outputs take: from the first science file's image size
    (its header only), else from its size on disk."""
    if not todo:
        return 0
    path = repo / str(todo[0]["science"])
    try:
        with fits.open(path, memmap=True) as hdul:
            hdu = next(h for h in hdul if h.header.get("NAXIS", 0) == 2)
            return output_bytes((hdu.header["NAXIS2"], hdu.header["NAXIS1"]), compressed)
    except Exception:  # unreadable files fail on their own, named, when processed
        return path.stat().st_size if path.is_file() else 0


LOCK_NAME = ".gpudiffim.lock"


@contextmanager
def output_lock(outdir: Path):
    """Hold the output directory for one run at a time: an exclusive ``flock`` on
    ``outdir/.gpudiffim.lock``, which the system releases when the process ends, however it
    ends (a crashed run leaves nothing stuck). Another run there is a named error."""
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / LOCK_NAME
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise GpuDiffimError(f"{outdir}: another run is writing there ({holder}); wait "
                                 "for it, or give another output directory") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale_temporaries(outdir: Path) -> int:
    """Delete the temporary files (``.<name>.<random>.tmp``, :func:`~gpudiffim.io.atomic_path`)
    an interrupted run left under ``outdir``; call it holding :func:`output_lock`."""
    removed = 0
    for path in outdir.rglob(".*.tmp"):
        if path.is_file():
            path.unlink()
            removed += 1
    return removed


def config_key(config: RunConfig) -> str:
    """A short digest of everything that shapes an exposure's outputs (the pipeline's
    settings and the fakes'; not the backend, whose results are the same)."""
    fakes = config.fakes
    text = repr(config.pipeline) + (repr(fakes) if fakes.nScience or fakes.nTemplate else "")
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _done_with(status: dict | None, key: str, apdb: str | None = None) -> bool:
    """Whether an exposure's status row says it was done with the settings of ``key``
    (outputs of other settings are recomputed, never reused) and, when ``apdb`` is given,
    stored there."""
    return (bool(status) and status.get("status") == "done" and status.get("config") == key
            and (apdb is None or status.get("apdb") == apdb))


def _run_config(config: RunConfig | None, **settings) -> RunConfig:
    """``config``, or a default one with the given settings (None: left at the default)."""
    given = {k: v for k, v in settings.items() if v is not None}
    if config is not None:
        if given:
            raise TypeError(f"run() takes a RunConfig or keyword settings, not both "
                            f"(got config and {sorted(given)})")
        return config
    flavor = given.pop("flavor", None)
    config = RunConfig(**given)
    if flavor is not None:
        pipeline = dataclasses.replace(
            config.pipeline, subtract=SubtractConfig(mode=flavor))
        config = dataclasses.replace(config, pipeline=pipeline)
    return config


def _run_local(repo, outdir, todo, config: RunConfig, bar):
    """Readers decode and upload ahead (bounded), the device works in order, writers drain
    outputs."""
    templates = TemplateCache(config.template_cache)
    with ThreadPoolExecutor(config.readers, thread_name_prefix="read") as readers, \
            ThreadPoolExecutor(config.writers, thread_name_prefix="write") as writers:
        pending, writing = deque(), deque()
        rows = iter(todo)

        def refill():
            while len(pending) < max(1, config.prefetch):
                row = next(rows, None)
                if row is None:
                    return
                pending.append((row, readers.submit(_read_or_error, repo, row, config, templates)))

        def drain(limit):
            while len(writing) > limit:
                status = writing.popleft().result()
                if bar:
                    bar.update(status)

        refill()
        try:
            while pending:
                row, fut = pending.popleft()
                refill()
                read = fut.result()
                if isinstance(read, Exception):
                    status, outputs = _failure(row, read), None
                else:
                    pair, on_device = read
                    status, outputs = compute_exposure(repo, row, config, pair, on_device)
                    del pair, on_device, read
                writing.append(writers.submit(write_outputs, outdir, row, status, outputs,
                                              config.apdb, config.alerts, config.compress))
                drain(config.writers)  # bounded: memory stays flat
                release_freed_memory()
        finally:
            drain(0)  # on Ctrl-C too: what was computed is written completely


def _read_or_error(repo, row, config: RunConfig, templates: TemplateCache):
    """``(host pair, pair on the device)`` read ahead of the compute, or the exception."""
    try:
        science, template, t_read, truth = _read_pair(repo, row, templates, config.fakes)
    except Exception as exc:  # handed to the main loop, recorded there
        return exc
    on_device = None
    try:
        backend = get_backend(config.backend)
        if backend.name != "cpu":
            on_device = (science.upload(backend), template.upload(backend))
    except Exception as exc:  # out of device memory, say: the compute uploads it itself
        log.debug("upload ahead failed (%s); uploading at compute time", exc)
    return (science, template, t_read, truth), on_device


def _status_row(row, error: str = "") -> dict:
    """A manifest row's status, failed until proven done."""
    return {"visit": _identifier(row["visit"]), "detector": _identifier(row["detector"]),
            "band": str(row["band"]),
            "status": "failed", "flavor": "", "error": error, "n_dia_sources": 0,
            "template_fraction": 0.0}


def _failure(row, exc) -> dict:
    status = _status_row(row, f"{type(exc).__name__}: {exc}")
    log.error("%s/%s/%s failed: %s", row["band"], row["visit"], row["detector"], status["error"])
    return status


def _run_dask(repo, outdir, todo, config: RunConfig, address: str, bar):
    """Each exposure is a task on a Dask cluster; workers write their own outputs."""
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError as exc:
        raise GpuDiffimError("--dask needs dask.distributed "
                             "(pip install 'gpudiffim[dist]')") from exc
    cluster = _local_cluster(address, LocalCluster)
    client = Client(cluster if cluster is not None else address)
    try:
        rows = [dict(zip(r.colnames, r.as_void().tolist())) for r in todo]
        futures = [client.submit(_dask_task, str(repo), str(outdir), r, config, pure=False)
                   for r in rows]
        for fut in as_completed(futures):
            status = fut.result()
            if bar:
                bar.update(status)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _local_cluster(address: str, local_cluster):
    """``local:N``: N single-threaded worker processes; ``local-cuda``: one worker per GPU
    (dask-cuda's LocalCUDACluster, each pinned to its device); anything else is a scheduler
    address (None)."""
    if address == "local-cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:
            raise GpuDiffimError("--dask local-cuda needs dask-cuda "
                                 "(pip install 'gpudiffim[dist-gpu]')") from exc
        return LocalCUDACluster(threads_per_worker=1, dashboard_address=None)
    if address.startswith("local:"):
        n = address.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise GpuDiffimError(f"--dask {address}: local:N needs a worker count N >= 1")
        return local_cluster(n_workers=int(n), threads_per_worker=1, processes=True,
                             dashboard_address=None)
    return None


def _dask_task(repo, outdir, row: dict, config: RunConfig) -> dict:
    return process_exposure(repo, outdir, Table(rows=[row])[0], config)
