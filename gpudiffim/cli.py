"""The ``gpudiffim`` command line: thin wrappers around the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .choices import BACKEND_NAMES, MODES
from .errors import GpuDiffimError, InputError

# each command imports what it uses: `gpudiffim --help` loads no NumPy, SciPy or Astropy

__all__ = ["main", "build_parser"]


def _cmd_info(args) -> int:
    from .backend import get_backend, gpu_unavailable_reason

    print(f"gpudiffim {__version__}")
    gpu_reason = gpu_unavailable_reason()
    found = {"cpu": "available", "gpu": gpu_reason and f"unavailable: {gpu_reason}" or "available"}
    try:
        get_backend("strict")
        found["strict"] = "available (array-api-strict, for tests)"
    except GpuDiffimError as exc:
        found["strict"] = f"unavailable: {exc}"
    print("backends:")
    for name, state in found.items():
        print(f"  {name:7s}{state}")
    backend = get_backend(args.backend)
    d = backend.describe()
    print(f"in use:   {d['backend']}"
          + (f" (auto: {d['reason']})" if d["reason"] and args.backend in (None, "auto") else ""))
    print(f"device:   {d['device']}")
    print(f"FFT:      {d['fft']}")
    print(f"threads:  {d['threads']}")
    return 0


def _cmd_simulate(args) -> int:
    from .simulate import simulate

    start = time.perf_counter()
    manifest = simulate(args.outdir, preset=args.preset, seed=args.seed, workers=args.workers)
    n_det = len(set(zip(manifest["band"], manifest["detector"])))
    print(f"simulated preset {args.preset!r} (seed {args.seed}): {len(manifest)} science "
          "exposures, "
          f"{n_det} templates in {time.perf_counter() - start:.1f} s")
    print(f"manifest: {args.outdir}/manifest.ecsv   truth: {args.outdir}/truth.ecsv")
    return 0


def _cmd_subtract(args) -> int:
    from .backend import get_backend
    from .io import atomic_path, check_output_space, output_bytes, write_exposure
    from .measure import write_dia_sources
    from .pipeline import PipelineConfig, process_pair
    from .subtract import SubtractConfig
    from .warp import template_on_science_grid

    backend = get_backend(args.backend)
    science, template = (_read_input(args, which) for which in ("science", "template"))
    start = time.perf_counter()
    fraction = 1.0
    if not args.no_warp:
        try:
            template, fraction = template_on_science_grid(science, template, backend)
        except GpuDiffimError as exc:  # name the file
            raise InputError(args.template, str(exc)) from exc
    out = Path(args.output)
    check_output_space(out, output_bytes(science.shape))
    config = PipelineConfig(subtract=SubtractConfig(mode=args.flavor))
    result, sources, _ = process_pair(science, template, config, backend)
    elapsed = time.perf_counter() - start
    try:  # the difference and its catalogue as a set
        write_exposure(result.difference.to_host(backend), out / "difference.fits")
        write_dia_sources(sources, out / "diaSources.parquet")
    except BaseException:
        (out / "difference.fits").unlink(missing_ok=True)
        raise
    summary = result.summary()
    summary["seconds"] = elapsed
    summary["backend"] = backend.name
    summary["template_fraction"] = fraction
    summary["detection"] = {k: sources.meta[k] for k in ("residual_scale", "registration_sigma")
                            if k in sources.meta}
    with atomic_path(out / "fit.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=lambda o: o.item()))
    q = result.quality
    if q["rejected_models"]:
        print(f"quality gates: {len(q['rejected_models'])} model(s) rejected, "
              f"{q['model']} kept (fit.json lists why)")
    print(f"{result.flavor}: kernel sum {q['kernel_sum_centre']:.4f} from "
          f"{q['n_kernel_sources']} sources, difference/sigma {q['difference_pull_sigma']:.3f} "
          f"(variance x {q['variance_scale']:.3f}), "
          f"{int((~sources['sky_source']).sum())} diaSources, {elapsed:.2f} s on {backend.name} "
          f"-> {out}/difference.fits, {out}/diaSources.parquet")
    return 0


def _read_input(args, which: str):
    """The science or template exposure with the PSF, noise and mask files given for it."""
    from .io import read_exposure

    return read_exposure(getattr(args, which), psf=getattr(args, f"{which}_psf"),
                         noise=getattr(args, f"{which}_noise"), noise_kind=args.noise_kind,
                         mask=getattr(args, f"{which}_mask"), saturation=args.saturation)


def _cmd_run(args) -> int:
    import numpy as np

    from .fakes import FakeConfig
    from .pipeline import PipelineConfig
    from .runner import RunConfig, run
    from .subtract import SubtractConfig

    config = RunConfig(backend=args.backend, readers=args.workers, dask=args.dask,
                       force=args.force, apdb=args.apdb, alerts=args.alerts,
                       compress=args.compress,
                       pipeline=PipelineConfig(subtract=SubtractConfig(mode=args.flavor)),
                       fakes=FakeConfig(nScience=args.inject_fakes,
                                        nTemplate=args.template_fakes, seed=args.fake_seed))
    table = run(args.repo, args.output, config)
    done = int((table["status"] == "done").sum())
    failed = table[table["status"] == "failed"]
    print(f"{done} of {len(table)} exposures done, {len(failed)} failed; "
          f"{int(np.nansum(table['n_dia_sources']))} diaSources")
    for row in failed:
        print(f"  failed {row['band']} {row['visit']} {row['detector']}: {row['error']}")
    print(f"outputs: {args.output}/<band>/<visit>/<detector>/   run table: {args.output}/run.ecsv")
    return 0 if done == len(table) else 1  # 2 (unusable input) comes from main


def _cmd_study(args) -> int:
    from .fakes import FakeConfig
    from .study import StudyConfig, study

    flavors = tuple(f.strip() for f in args.flavors.split(",") if f.strip())
    config = StudyConfig(flavors=flavors, apdb="" if args.no_apdb else args.apdb,
                         alerts=args.alerts, backend=args.backend, readers=args.workers,
                         dask=args.dask, force=args.force, stamps=args.stamps,
                         compress=args.compress,
                         fakes=FakeConfig(nScience=args.inject_fakes,
                                          nTemplate=args.template_fakes, seed=args.fake_seed))
    start = time.perf_counter()
    page = study(args.repo, args.output, config)
    print(f"study of {', '.join(flavors)} in {time.perf_counter() - start:.0f} s; runs in "
          f"{args.output}/<flavor>/")
    print(f"report: {page}")
    return 0


def _cmd_report(args) -> int:
    from .report import write_report

    page = write_report(args.runs, args.output, stamps=args.stamps, seed=args.seed,
                        truth=args.truth)
    print(f"report: {page}")
    return 0


def _cmd_make_apdb(args) -> int:
    from .apdb import make_apdb

    apdb = make_apdb(args.url)
    meta = dict(apdb.metadata.items())
    print(f"APDB ready at {args.url} (schema {meta.get('version:schema')}, "
          f"ApdbSql {meta.get('version:ApdbSql')})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpudiffim", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gpudiffim {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show the backends found, the device, FFT library, threads")
    info.add_argument("--backend", choices=BACKEND_NAMES, default=None)
    info.set_defaults(func=_cmd_info)
    sim = sub.add_parser("simulate", help="write the built-in simulated survey (with truth)")
    sim.add_argument("outdir")
    sim.add_argument("--preset", choices=("ci", "demo", "sprint"), default="demo")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--workers", type=int, default=None, help="processes (default: 2)")
    sim.set_defaults(func=_cmd_simulate)
    sub_p = sub.add_parser("subtract",
                           help="PSF-match and subtract a template from a science image")
    sub_p.add_argument("science")
    sub_p.add_argument("template", help="resampled onto the science grid when their WCSs differ")
    sub_p.add_argument("-o", "--output", required=True, help="output directory")
    sub_p.add_argument("--flavor", default="convolveTemplate",
                       choices=MODES)
    for which in ("science", "template"):
        sub_p.add_argument(f"--{which}-psf", help=f"FITS PSF model for the {which} (default: "
                                                  "the file's own, else measured)")
        sub_p.add_argument(f"--{which}-noise", help=f"the {which}'s noise: a sigma, variance "
                                                    "or inverse-variance image")
        sub_p.add_argument(f"--{which}-mask", help=f"the {which}'s mask (MP_* planes, or "
                                                   "non-zero = BAD)")
    sub_p.add_argument("--noise-kind", choices=("sigma", "variance", "inverse variance"),
                       help="what the noise files hold, when their HDU names do not say")
    sub_p.add_argument("--saturation", type=float,
                       help="saturation level of both images (default: their headers')")
    sub_p.add_argument("--no-warp", action="store_true",
                       help="do not resample the template (it is on the science grid)")
    sub_p.add_argument("--backend", choices=BACKEND_NAMES, default=None)
    sub_p.set_defaults(func=_cmd_subtract)
    run_p = sub.add_parser("run", help="process every exposure of a repository (resumable); "
                                       "exit 0 when all are done, 1 when some failed, 2 when "
                                       "the input is unusable")
    run_p.add_argument("repo", help="directory with manifest.ecsv (e.g. from gpudiffim simulate)")
    run_p.add_argument("-o", "--output", required=True)
    run_p.add_argument("--flavor", default="convolveTemplate",
                       choices=MODES)
    run_p.add_argument("--backend", choices=BACKEND_NAMES, default=None)
    run_p.add_argument("--workers", type=int, default=2, help="reader threads")
    run_p.add_argument("--dask", default=None, help="scheduler address, local:N, or local-cuda "
                        "(one worker per GPU, dask-cuda)")
    run_p.add_argument("--force", action="store_true", help="redo finished exposures")
    run_p.add_argument("--compress", action="store_true",
                       help="tile-compress the differences (4-6x smaller; noise-level "
                            "quantisation, mask lossless)")
    run_p.add_argument("--apdb", default=None,
                       help="associate and store the diaSources in the APDB at this URL")
    run_p.add_argument("--alerts", default=None,
                       help="write one Avro alert per diaSource here (Rubin's schema; "
                            "needs --apdb)")
    run_p.add_argument("--inject-fakes", type=int, default=0, metavar="N",
                       help="inject N point sources into each science exposure first (true "
                            "S/N 2-100 in the difference, some on galaxies); truth in "
                            "<exposure>/fakes.ecsv")
    run_p.add_argument("--template-fakes", type=int, default=0, metavar="N",
                       help="inject N into each template too (negative in the difference)")
    run_p.add_argument("--fake-seed", type=int, default=0,
                       help="with the visit and detector, fixes the fakes")
    run_p.set_defaults(func=_cmd_run)
    study_p = sub.add_parser("study", help="run every flavor over the same fakes, each into "
                                           "its own APDB, and write the report (resumable)")
    study_p.add_argument("repo", help="directory with manifest.ecsv")
    study_p.add_argument("-o", "--output", required=True,
                         help="runs go to OUTPUT/<flavor>/, the report to OUTPUT/report/")
    study_p.add_argument("--flavors", default="convolveTemplate,auto,preconvolve,zogy",
                         help="comma-separated flavors (default: the note's three and zogy)")
    study_p.add_argument("--inject-fakes", type=int, default=50, metavar="N",
                         help="fakes per science exposure (default 50)")
    study_p.add_argument("--template-fakes", type=int, default=5, metavar="N",
                         help="fakes per template (default 5)")
    study_p.add_argument("--fake-seed", type=int, default=0)
    study_p.add_argument("--apdb", default=None,
                         help="APDB URL with {flavor} in it (default: a SQLite APDB in "
                              "OUTPUT/<flavor>/apdb.db)")
    study_p.add_argument("--no-apdb", action="store_true", help="do not associate")
    study_p.add_argument("--alerts", action="store_true",
                         help="write each flavor's alerts to OUTPUT/<flavor>/alerts")
    study_p.add_argument("--backend", choices=BACKEND_NAMES, default=None)
    study_p.add_argument("--workers", type=int, default=2, help="reader threads")
    study_p.add_argument("--dask", default=None, help="scheduler address, local:N, or local-cuda "
                        "(one worker per GPU, dask-cuda)")
    study_p.add_argument("--force", action="store_true", help="redo finished exposures")
    study_p.add_argument("--compress", action="store_true",
                         help="tile-compress the differences (4-6x smaller; noise-level "
                              "quantisation, mask lossless)")
    study_p.add_argument("--stamps", type=int, default=8,
                         help="triplets of detections and of lost fakes per flavor")
    study_p.set_defaults(func=_cmd_study)
    report_p = sub.add_parser("report", help="one HTML page (and PNG, ECSV, JSON, a "
                                             "Zooniverse manifest) comparing runs")
    report_p.add_argument("runs", nargs="+", help="run directories (gpudiffim run -o ...)")
    report_p.add_argument("-o", "--output", required=True, help="report directory")
    report_p.add_argument("--stamps", type=int, default=8,
                          help="triplets of detections and of lost fakes per run")
    report_p.add_argument("--seed", type=int, default=0, help="seeds the triplets' sample")
    report_p.add_argument("--truth", default=None,
                          help="ECSV of changes known to be in the data besides the fakes "
                               "(band, visit, detector, x, y, flux; e.g. the simulator's "
                               "truth.ecsv): what they explain is not contamination")
    report_p.set_defaults(func=_cmd_report)
    apdb_p = sub.add_parser("make-apdb", help="create a Rubin APDB (lsst-dax-apdb) at an "
                                              "SQLAlchemy URL (sqlite:///path.db, "
                                              "postgresql://...)")
    apdb_p.add_argument("url")
    apdb_p.set_defaults(func=_cmd_make_apdb)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    verbose = args.verbose or args.command in ("run", "study")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except GpuDiffimError as exc:
        print(f"gpudiffim: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
