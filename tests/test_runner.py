"""The batch runner: outputs, resume, failure isolation, interruption, Dask."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table, vstack

from gpudiffim.cli import main
from gpudiffim.io import atomic_path, read_exposure
from gpudiffim.runner import TemplateCache, exposure_dir, run
from gpudiffim.simulate import PRESETS, simulate


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    simulate(out, "demo", seed=0)
    return out


@pytest.fixture(scope="module")
def demo_run(demo_repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_run")
    table = run(demo_repo, out, progress=False)
    return out, table


def _catalogues(outdir, manifest):
    return {(r["band"], int(r["visit"]), int(r["detector"])):
            Table.read(exposure_dir(outdir, r) / "diaSources.parquet") for r in manifest}


@pytest.mark.slow
def test_demo_run_writes_everything_and_resumes(demo_repo, demo_run):
    outdir, table = demo_run
    manifest = Table.read(demo_repo / "manifest.ecsv")
    assert len(table) == len(manifest) == 16
    assert np.all(table["status"] == "done"), table["error"]
    for row in manifest:
        here = exposure_dir(outdir, row)
        assert (here / "difference.fits").is_file() and (here / "diaSources.parquet").is_file()
    assert (outdir / "run.ecsv").is_file()
    # the QA row carries the residual scale detection used, as the catalogue records it
    for st in table:
        here = exposure_dir(outdir, {k: st[k] for k in ("band", "visit", "detector")})
        meta = Table.read(here / "diaSources.parquet").meta
        assert st["residual_scale"] == meta["residual_scale"] >= 0
        assert st["registration_sigma"] == meta["registration_sigma"] >= 0
    stamps = {p: p.stat().st_mtime_ns for p in outdir.rglob("difference.fits")}
    start = time.perf_counter()
    again = run(demo_repo, outdir, progress=False)
    assert time.perf_counter() - start < 10  # nothing redone
    assert np.all(again["status"] == "done")
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_corrupt_file_and_non_overlapping_template_are_recorded(tmp_path):
    repo = tmp_path / "repo"
    simulate(repo, "ci", seed=1, workers=1)
    manifest = Table.read(repo / "manifest.ecsv")
    bad_sci = repo / manifest[0]["science"]
    bad_sci.write_bytes(bad_sci.read_bytes()[:5000])  # truncated
    # a third exposure whose template lies elsewhere on the sky
    far = repo / "templates" / "far.fits"
    shutil.copy(repo / manifest[1]["template"], far)
    with fits.open(far, mode="update") as hdul:
        hdul["IMAGE"].header["CRVAL1"] += 1.0
    extra = Table(manifest[1:2], copy=True)
    extra["visit"] = [99999]
    extra["template"] = ["templates/far.fits"]
    from astropy.table import vstack

    vstack([manifest, extra]).write(repo / "manifest.ecsv", overwrite=True)
    table = run(repo, tmp_path / "out", progress=False)
    status = {int(r["visit"]): (r["status"], r["error"]) for r in table}
    assert status[int(manifest[0]["visit"])][0] == "failed"
    assert str(bad_sci) in status[int(manifest[0]["visit"])][1]
    assert status[99999][0] == "failed" and "covers 0.0%" in status[99999][1]
    assert status[int(manifest[1]["visit"])][0] == "done"
    assert not (exposure_dir(tmp_path / "out", manifest[0]) / "difference.fits").exists()


def test_interrupted_run_resumes_to_the_same_outputs(tmp_path):
    repo = tmp_path / "repo"
    manifest = simulate(repo, "ci", seed=2, workers=1)
    reference = tmp_path / "ref"
    run(repo, reference, progress=False)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "gpudiffim.cli", "run", str(repo),
                             "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = exposure_dir(out, manifest[0]) / "status.json"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers
    table = run(repo, out, progress=False)
    assert np.all(table["status"] == "done")
    got, want = _catalogues(out, manifest), _catalogues(reference, manifest)
    for key in want:
        assert len(got[key]) == len(want[key])
        # a process of its own: float32 sums may differ in their last digits (seen once in a
        # clean clone: sky sources, whose fluxes are ~0, by 0.01 counts): a thousandth of a sigma
        diff = np.abs(np.asarray(got[key]["psfFlux"]) - np.asarray(want[key]["psfFlux"]))
        allowed = 1e-5 * np.abs(np.asarray(want[key]["psfFlux"])) \
            + 1e-3 * np.asarray(want[key]["psfFluxErr"])
        assert np.all(diff <= allowed), (key, np.max(diff / want[key]["psfFluxErr"]))


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_catalogues(demo_repo, demo_run, tmp_path):
    pytest.importorskip("dask.distributed")
    outdir, _ = demo_run
    table = run(demo_repo, tmp_path / "dask", dask="local:2", progress=False)
    assert np.all(table["status"] == "done")
    manifest = Table.read(demo_repo / "manifest.ecsv")
    got, want = _catalogues(tmp_path / "dask", manifest), _catalogues(outdir, manifest)
    for key in want:
        assert len(got[key]) == len(want[key]), key
        # Dask workers run BLAS single-threaded: float32 sums differ in the last digits
        np.testing.assert_allclose(got[key]["psfFlux"], want[key]["psfFlux"], rtol=3e-3, atol=0.5)
    status = json.loads((exposure_dir(tmp_path / "dask", manifest[0]) / "status.json").read_text())
    assert status["status"] == "done"


def test_template_cache_decodes_a_shared_template_once(demo_repo, tmp_path):
    manifest = Table.read(demo_repo / "manifest.ecsv")
    cache = TemplateCache(size=4)
    for row in manifest:
        template = cache.get(demo_repo / row["template"], None)
        with pytest.raises(ValueError):  # cached planes are read-only: no stage may change them
            template.image[0, 0] = 1.0
    n_templates = len(set(manifest["template"]))
    assert n_templates < len(manifest)
    assert (cache.misses, cache.hits) == (n_templates, len(manifest) - n_templates)
    # a template replaced on disk is read again
    copy = tmp_path / "template.fits"
    shutil.copy(demo_repo / manifest[0]["template"], copy)
    first = cache.get(copy, None)
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert cache.get(copy, None) is not first


def test_strict_device_run_matches_the_cpu_run(tmp_path):
    """The runner's read-ahead uploads to the device (array-api-strict's "device1"):
    the same catalogues as the CPU run, with no hidden host round trip."""
    repo = tmp_path / "repo"
    simulate(repo, "ci", seed=2, workers=1)
    cpu = run(repo, tmp_path / "cpu", backend="cpu", progress=False)
    strict = run(repo, tmp_path / "strict", backend="strict", progress=False)
    assert np.all(cpu["status"] == "done") and np.all(strict["status"] == "done"), strict["error"]
    assert list(strict["backend"]) == ["strict"] * len(strict)
    manifest = Table.read(repo / "manifest.ecsv")
    a, b = _catalogues(tmp_path / "cpu", manifest), _catalogues(tmp_path / "strict", manifest)
    for key in a:
        assert len(a[key]) == len(b[key]) > 0
        np.testing.assert_allclose(b[key]["psfFlux"], a[key]["psfFlux"], rtol=1e-3, atol=0.5)


def test_manifest_noise_and_mask_columns_reach_the_readers(tmp_path):
    """``science_mask`` and ``template_noise`` columns: the science's bad block is BAD in
    the difference, and the template's variance read from a separate VAR file describes the
    difference's noise as its own plane did."""
    repo = tmp_path / "repo"
    manifest = simulate(repo, dataclasses.replace(PRESETS["ci"], visits={"g": (11692,)}),
                        seed=3, workers=1)
    row = manifest[0]
    mask = np.zeros(PRESETS["ci"].shape, np.uint8)
    mask[200:220, 300:320] = 1
    fits.PrimaryHDU(mask).writeto(repo / "bad.fits")
    template = read_exposure(repo / row["template"])
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(template.variance, name="VAR")]).writeto(
        repo / "tvar.fits")
    manifest["science_mask"] = ["bad.fits"]
    manifest["template_noise"] = ["tvar.fits"]
    manifest.write(repo / "manifest.ecsv", overwrite=True)
    table = run(repo, tmp_path / "out", progress=False)
    assert list(table["status"]) == ["done"], table["error"]
    assert abs(table["variance_scale"][0] - 1) < 0.1
    diff = read_exposure(exposure_dir(tmp_path / "out", row) / "difference.fits")
    assert np.all(diff.mask[200:220, 300:320] & diff.bit("BAD"))


def _repo_with(tmp_path, edit):
    """The ci preset's repository with its manifest changed by ``edit(table) -> table``."""
    repo = tmp_path / "repo"
    manifest = simulate(repo, "ci", seed=4, workers=1)
    edit(manifest).write(repo / "manifest.ecsv", format="ascii.ecsv", overwrite=True)
    return repo


@pytest.mark.parametrize("case,fragment", [
    ("no rows", "manifest has no rows"),
    ("duplicate", "are both band g"),
    ("unsafe band", "cannot name a directory"),
    ("not a table", "not a readable ECSV table"),
])
def test_unusable_manifests_are_named_errors_before_anything_runs(tmp_path, case, fragment,
                                                                  capsys):
    def edit(m):
        if case == "no rows":
            return m[:0]
        if case == "duplicate":
            return vstack([m, m[:1]])
        if case == "unsafe band":
            m["band"] = m["band"].astype("U8")
            m["band"][0] = "../../x"
        return m

    repo = _repo_with(tmp_path, edit)
    if case == "not a table":
        (repo / "manifest.ecsv").write_text("visit,detector,band\n1,2,g\n")
    out = tmp_path / "out"
    assert main(["run", str(repo), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(repo / "manifest.ecsv") in err and fragment in err, err
    assert not out.exists()  # nothing ran, nothing written (outside the output least of all)
    assert not (tmp_path / "x").exists()


def test_run_exit_codes_and_string_detectors(tmp_path):
    """Exit 0 when every exposure is done, 1 when some failed; a detector named by a string
    (as DECam's DETECTOR is) names its output directory as it is."""
    def edit(m):
        m["detector"] = m["detector"].astype(str)
        m["detector"][1] = "S3-177"
        return m

    repo = _repo_with(tmp_path, edit)
    manifest = Table.read(repo / "manifest.ecsv")
    assert main(["run", str(repo), "-o", str(tmp_path / "ok")]) == 0
    assert (exposure_dir(tmp_path / "ok", manifest[1]) / "status.json").is_file()
    assert exposure_dir(tmp_path / "ok", manifest[1]).name == "S3-177"
    assert exposure_dir(tmp_path / "ok", manifest[0]).name == "049"
    bad = repo / manifest[0]["science"]
    bad.write_bytes(bad.read_bytes()[:4000])
    assert main(["run", str(repo), "-o", str(tmp_path / "some"), "--force"]) == 1


def test_outputs_take_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "x.json"
        with atomic_path(path) as tmp:
            tmp.write_text("{}")
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_a_changed_config_recomputes_instead_of_reusing(tmp_path, caplog):
    """Outputs are keyed by the settings that made them: a rerun with another flavor redoes
    every exposure (it once said '0 to process' and kept the old outputs); the same
    settings again redo none."""
    repo = tmp_path / "repo"
    simulate(repo, "ci", seed=6, workers=1)  # both pairs pass their gates
    out = tmp_path / "out"
    first = run(repo, out, flavor="convolveTemplate", progress=False)
    assert set(first["flavor"]) == {"convolveTemplate"}
    again = run(repo, out, flavor="preconvolve", progress=False)
    assert set(again["flavor"]) == {"preconvolve"}
    assert len(set(first["config"]) | set(again["config"])) == 2
    caplog.clear()
    with caplog.at_level("INFO", logger="gpudiffim.runner"):
        run(repo, out, flavor="preconvolve", progress=False)
    assert "0 of 2 exposures to process" in caplog.text


def test_one_run_per_output_directory_and_no_stale_temporaries(tmp_path):
    """A second run on an output directory that a run holds is a named error (the lock is
    the system's, so a killed run leaves nothing stuck); a run removes the temporary files an
    interrupted one left."""
    import fcntl

    from gpudiffim.errors import GpuDiffimError
    from gpudiffim.runner import LOCK_NAME

    repo = tmp_path / "repo"
    simulate(repo, "ci", seed=6, workers=1)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / LOCK_NAME, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(GpuDiffimError, match="another run is writing there"):
            run(repo, out, progress=False)
    stale = out / "g" / "11690" / "049" / ".difference.fits.x1y2z3.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\0" * 1000)
    table = run(repo, out, progress=False)
    assert list(table["status"]) == ["done", "done"] and not stale.exists()


def test_unwritable_or_full_output_is_refused_before_any_compute(tmp_path, monkeypatch,
                                                                 capsys):
    """A non-writable or full output directory was found only after the compute (and
    `subtract` then left difference.fits without its catalogue): both commands now refuse
    it up front, exit 2, naming the directory, and write nothing."""
    import gpudiffim.io as io_module
    import gpudiffim.pipeline as pipeline_module

    repo = _repo_with(tmp_path, lambda m: m)
    manifest = Table.read(repo / "manifest.ecsv")
    science, template = (str(repo / manifest[0][k]) for k in ("science", "template"))
    computed = []
    real = pipeline_module.subtract
    monkeypatch.setattr(pipeline_module, "subtract",
                        lambda *a, **k: computed.append(1) or real(*a, **k))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert main(["run", str(repo), "-o", str(blocker / "out")]) == 2
    assert main(["subtract", science, template, "-o", str(blocker / "out")]) == 2
    assert "output directory not writable" in capsys.readouterr().err
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(io_module.shutil, "disk_usage",
                        lambda p: usage._replace(free=1_000_000))
    assert main(["run", str(repo), "-o", str(tmp_path / "full")]) == 2
    assert main(["subtract", science, template, "-o", str(tmp_path / "full2")]) == 2
    err = capsys.readouterr().err
    assert "full: output directory has 0.00 GB free; the outputs need about 0.01 GB" in err
    assert computed == [] and not list((tmp_path / "full").rglob("*.fits"))


def test_a_device_error_retries_the_exposure_on_the_cpu(tmp_path, monkeypatch):
    """Any error CuPy raises (here a stand-in CUDARuntimeError from cupy_backends) fails the
    device, not the exposure: it is computed again on the CPU, the status says so and why;
    an ordinary error still fails the exposure."""
    import sys

    runner = sys.modules["gpudiffim.runner"]
    cuda_error = type("CUDARuntimeError", (RuntimeError,),
                      {"__module__": "cupy_backends.cuda.api.runtime"})
    process = runner._process

    def faulty(science, template, config, backend, pick=None, error=cuda_error):
        if backend.name != "cpu":
            raise error("cudaErrorIllegalAddress: an illegal memory access was encountered")
        return process(science, template, config, backend, pick)

    repo = tmp_path / "repo"
    simulate(repo, dataclasses.replace(PRESETS["ci"], visits={"g": (11692,)}), seed=6,
             workers=1)
    monkeypatch.setattr(runner, "_process", faulty)
    table = run(repo, tmp_path / "out", backend="strict", progress=False)
    assert list(table["status"]) == ["done"] and list(table["backend"]) == ["cpu"]
    assert "cudaErrorIllegalAddress" in table["device_error"][0]
    monkeypatch.setattr(runner, "_process",
                        lambda *a: faulty(*a, error=ValueError))
    table = run(repo, tmp_path / "out2", backend="strict", progress=False)
    assert list(table["status"]) == ["failed"] and "ValueError" in table["error"][0]


def test_progress_is_a_bar_on_a_terminal_and_log_lines_otherwise(caplog):
    """On a terminal the runner shows a tqdm bar (count, rate, the last exposure); piped,
    one log line per exposure."""
    import io
    import sys

    runner = sys.modules["gpudiffim.runner"]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    rows = [{"band": "g", "visit": v, "detector": 49, "status": "done"} for v in (1, 2)]
    term = Terminal()
    bar = runner._Progress(2, term)
    for r in rows:
        bar.update(r)
    shown = term.getvalue()
    assert "2/2" in shown and "exposure" in shown and "last: g 2 49 done" in shown
    with caplog.at_level("INFO", logger="gpudiffim.runner"):
        piped = runner._Progress(2, io.StringIO())
        for r in rows:
            piped.update(r)
    lines = [m for m in caplog.messages if "exposures" in m]
    assert len(lines) == 2 and lines[-1].startswith("2/2 exposures")


def test_compressed_differences_are_what_the_study_reads(tmp_path):
    """``run --compress`` writes tile-compressed differences (their planes about 3 bytes a
    pixel, under 4, where plain ones take 12) whose mask is the uncompressed run's bit for
    bit and whose image differs from it by under 0.03 of its noise; the evaluation reads
    them as it reads plain ones (the same fakes found)."""
    from gpudiffim.evaluation import load_run

    repo = tmp_path / "repo"
    simulate(repo, "ci", seed=2, workers=1)
    args = ["run", str(repo), "--inject-fakes", "20", "--template-fakes", "0"]
    assert main(args + ["-o", str(tmp_path / "plain")]) == 0
    assert main(args + ["-o", str(tmp_path / "packed"), "--compress"]) == 0
    manifest = Table.read(repo / "manifest.ecsv")
    for row in manifest:
        plain = read_exposure(exposure_dir(tmp_path / "plain", row) / "difference.fits")
        path = exposure_dir(tmp_path / "packed", row) / "difference.fits"
        packed = read_exposure(path)
        plain_size = (exposure_dir(tmp_path / "plain", row) / "difference.fits").stat().st_size
        assert plain_size - path.stat().st_size > 8 * plain.image.size  # the PSF aside
        with fits.open(path) as hdul:
            assert isinstance(hdul["IMAGE"], fits.CompImageHDU)
        assert packed.mask.tobytes() == plain.mask.tobytes()
        good = (plain.mask == 0) & (plain.variance > 0)
        error = (packed.image - plain.image)[good] / np.sqrt(plain.variance[good])
        assert np.std(error) < 0.03
    a, b = load_run(tmp_path / "plain"), load_run(tmp_path / "packed")
    assert np.array_equal(a.fakes["found"], b.fakes["found"]) and a.fakes["found"].sum() > 10


def test_dask_addresses_that_cannot_start_say_why(demo_repo, tmp_path):
    from gpudiffim.errors import GpuDiffimError
    with pytest.raises(GpuDiffimError, match="worker count"):
        run(demo_repo, tmp_path / "none", dask="local:0", progress=False)
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        with pytest.raises(GpuDiffimError, match=r"dask-cuda .*gpudiffim\[dist-gpu\]"):
            run(demo_repo, tmp_path / "cuda", dask="local-cuda", progress=False)
    assert not list((tmp_path).rglob("status.json"))
