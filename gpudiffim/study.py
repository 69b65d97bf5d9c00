"""The study in one call: every flavor over the same fakes, each into its own APDB, then
the report (DMTN-256's comparison on any repository).

Each flavor is an ordinary resumable run (:func:`gpudiffim.runner.run`) in
``outdir/<flavor>/``, with the same fakes (same seed: the same fakes in every flavor),
associated into its own APDB (by default ``outdir/<flavor>/apdb.db``); the report of all
of them goes to ``outdir/report/``. Running it again resumes: finished exposures are kept.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .apdb import make_apdb
from .choices import MODES
from .errors import GpuDiffimError
from .evaluation import load_run
from .fakes import FakeConfig
from .options import configclass, option
from .pipeline import PipelineConfig
from .report import write_report
from .runner import RunConfig, run
from .subtract import SubtractConfig

__all__ = ["STUDY_FLAVORS", "StudyConfig", "study", "flavor_apdb"]

log = logging.getLogger(__name__)

#: the flavors the note compared, and proper image subtraction
STUDY_FLAVORS = ("convolveTemplate", "auto", "preconvolve", "zogy")


@configclass
class StudyConfig:
    """What a study runs: flavors, fakes, where the diaObjects go, how it is run."""

    flavors: tuple = option(STUDY_FLAVORS, "subtraction flavors compared")
    fakes: FakeConfig = option(factory=lambda: FakeConfig(nScience=50, nTemplate=5),
                               doc="fakes injected into every exposure (the same in each "
                                   "flavor)")
    apdb: str | None = option(None, "APDB URL with {flavor} (None: outdir/<flavor>/apdb.db; "
                                    "'' : no association)")
    alerts: bool = option(False, "write each flavor's alerts to outdir/<flavor>/alerts")
    backend: str | None = option(None, "cpu, gpu, strict or auto (None: $GPUDIFFIM_BACKEND)")
    readers: int = option(2, "reader threads of each run")
    dask: str | None = option(None, "a Dask scheduler address, or local:N; None: in process")
    force: bool = option(False, "redo exposures already done")
    compress: bool = option(False, "tile-compress the differences written (see RunConfig)")
    stamps: int = option(8, "triplets of detections and of lost fakes shown per flavor")


def flavor_apdb(config: StudyConfig, outdir, flavor: str) -> str | None:
    """The APDB URL of one flavor's run (None: no association)."""
    if config.apdb == "":
        return None
    if config.apdb is None:
        return f"sqlite:///{(Path(outdir) / flavor / 'apdb.db').resolve()}"
    if len(config.flavors) > 1 and "{flavor}" not in config.apdb:
        raise GpuDiffimError(f"--apdb {config.apdb!r}: each flavor needs its own APDB; put "
                             "{flavor} in the URL (e.g. postgresql://host/study_{flavor})")
    return config.apdb.replace("{flavor}", flavor)


def study(repo, outdir, config: StudyConfig | None = None) -> Path:
    """Run every flavor of ``config`` over ``repo`` into ``outdir`` and write the report.

    Parameters
    ----------
    repo : path
        A repository with ``manifest.ecsv`` (as :func:`gpudiffim.runner.run` takes).
    outdir : path
        Where each flavor's run (``<flavor>/``) and the report (``report/``) go.
    config : StudyConfig, optional
        Flavors, fakes, APDBs, backend and scheduler.

    Returns
    -------
    Path
        The report's ``index.html``.
    """
    config = config or StudyConfig()
    unknown = [f for f in config.flavors if f not in MODES]
    if unknown or not config.flavors:
        raise GpuDiffimError(f"unknown flavors {unknown}: choose from {', '.join(MODES)}")
    outdir = Path(outdir)
    runs = []
    for k, flavor in enumerate(config.flavors, 1):
        url = flavor_apdb(config, outdir, flavor)
        if url:
            make_apdb(url)  # an existing APDB is kept: a rerun resumes
        log.info("flavor %d of %d: %s", k, len(config.flavors), flavor)
        pipeline = dataclasses.replace(PipelineConfig(), subtract=SubtractConfig(mode=flavor))
        run(repo, outdir / flavor,
            RunConfig(pipeline=pipeline, backend=config.backend, readers=config.readers,
                      dask=config.dask, force=config.force, apdb=url, fakes=config.fakes,
                      compress=config.compress,
                      alerts=str(outdir / flavor / "alerts") if config.alerts and url
                      else None))
        truth = Path(repo) / "truth.ecsv"  # the simulator's changes: not contamination
        runs.append(load_run(outdir / flavor, name=flavor,
                             truth=truth if truth.is_file() else None))
    log.info("writing the report")
    return write_report(runs, outdir / "report", stamps=config.stamps, seed=config.fakes.seed)

