"""The study and its report: fakes matched by sign on a hand-made run with known answers,
every flavor run over the same fakes into its own APDB, and the page opened in a real
headless Chromium (every figure loaded, no console error)."""

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.wcs import WCS

from gpudiffim import evaluation as ev
from gpudiffim.cutouts import read_cutouts
from gpudiffim.errors import GpuDiffimError, InputError
from gpudiffim.fakes import FakeConfig
from gpudiffim.report import FIGURES, write_report
from gpudiffim.simulate import simulate
from gpudiffim.study import StudyConfig, flavor_apdb, study

FLAVORS = ("convolveTemplate", "auto", "preconvolve", "zogy")  # the default study


# ------------------------------------------------------------ a run with known answers
def _handmade_run(root: Path) -> Path:
    """One 200 x 100 exposure: a science fake found (+), a template fake found (-), a
    science fake with only a negative source beside it (lost: wrong sign), a fake on the
    EDGE band (unusable), a source no fake explains (flagged edge) and one clean."""
    run = root / "run"
    here = run / "g" / "7" / "003"
    here.mkdir(parents=True)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [100.0, 50.0]
    wcs.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    mask = np.zeros((100, 200), np.int32)
    mask[:, :5] = 1 << 4  # EDGE
    mask_header = fits.Header({"MP_EDGE": 4, "HIERARCH MP_NO_DATA": 8, "MP_BAD": 0})
    fits.HDUList([fits.PrimaryHDU(header=fits.Header({"MAGZERO": 27.0})),
                  fits.ImageHDU(np.zeros((100, 200), np.float32), wcs.to_header(), "IMAGE"),
                  fits.ImageHDU(mask, mask_header, "MASK"),
                  fits.ImageHDU(np.ones((100, 200), np.float32), name="VARIANCE")]
                 ).writeto(here / "difference.fits")
    n = 5
    flags = {name: np.zeros(n, bool) for name in
             ("pixelFlags_edge", "pixelFlags_bad", "pixelFlags_suspect",
              "pixelFlags_saturatedCenter", "pixelFlags_interpolated",
              "pixelFlags_interpolatedCenter", "pixelFlags_injected")}
    flags["pixelFlags_edge"][3] = True
    sources = Table({
        "x": [50.4, 120.0, 150.5, 30.0, 80.0, 160.0][:n],
        "y": [40.3, 60.0, 20.0, 80.0, 10.0, 0.0][:n],
        "psfFlux": [1000.0, -480.0, -300.0, 200.0, 150.0],
        "psfFluxErr": [100.0, 60.0, 50.0, 40.0, 30.0],
        "snr": [10.0, -8.0, -6.0, 5.0, 5.0], "significance": [10.2, -8.1, -6.2, 5.1, 5.0],
        "ra": np.full(n, 150.0), "dec": np.full(n, 2.0), "sky_source": np.zeros(n, bool),
        **flags})
    # a sky source last: dropped on reading, it must not shift the rows
    sky = sources[:1].copy()
    sky["sky_source"] = True
    vstack([sources, sky]).write(here / "diaSources.parquet")
    Table({"x": [50.0, 120.3, 150.0, 2.0], "y": [40.0, 60.2, 20.4, 50.0],
           "flux": [1100.0, -500.0, 400.0, 900.0], "target_snr": [11.0, 8.5, 7.0, 9.0],
           "on_galaxy": [False, False, True, False],
           "image": ["science", "template", "science", "science"]}
          ).write(here / "fakes.ecsv", format="ascii.ecsv")
    status = {"band": "g", "visit": 7, "detector": 3, "status": "done", "mode": "auto",
              "flavor": "convolveTemplate", "science_psf_radius": 2.0,
              "template_psf_radius": 2.5}
    (here / "status.json").write_text(json.dumps(status))
    Table(rows=[{k: status[k] for k in ("band", "visit", "detector", "status")}]).write(
        run / "run.ecsv", format="ascii.ecsv")
    return run


def test_fakes_are_matched_by_sign_and_counted_as_the_note_counts(tmp_path):
    run = ev.load_run(_handmade_run(tmp_path))
    assert run.name == "auto" and len(run.sources) == 5
    f = run.fakes
    assert list(f["found"]) == [True, True, False, False]
    assert list(f["usable"]) == [True, True, True, False]
    assert list(f["source"][:2]) == [0, 1]
    assert list(run.sources["fake"]) == [0, 1, -1, -1, -1]
    np.testing.assert_allclose(f["mag"], 27.0 - 2.5 * np.log10([1100, 500, 400, 900]))
    s = ev.summary(run)
    assert (s["fakes_matched"], s["fakes_matched_clean"], s["unmatched"],
            s["unmatched_clean"], s["n_fakes_unusable"]) == (2, 2, 3, 2, 1)
    # 200 x 100 pixels of 0.2": 40" x 20"
    assert s["area_deg2"] == pytest.approx(40 * 20 / 3600**2, rel=1e-6)
    assert s["contamination_per_deg2"] == pytest.approx(3 / (40 * 20 / 3600**2), rel=1e-6)
    counts = ev.exposure_counts(run)
    assert (counts["n_sources"][0], counts["n_clean"][0], counts["n_found"][0]) == (5, 4, 2)
    assert counts["radius_difference"][0] == pytest.approx(0.5)
    phot = ev.photometry_table(run)  # the template fake's pull is taken on |flux|
    np.testing.assert_allclose(phot["pull"], [(1000 - 1100) / 100, (480 - 500) / 60])
    eff = ev.efficiency_tables(run)
    sci = eff[(eff["image"] == "science") & (eff["band"] == "g")]
    assert sci["n"].sum() == 2 and sci["k"].sum() == 1  # the EDGE fake is not counted


def test_known_changes_are_not_contamination(tmp_path):
    """With the data's own truth (the simulator's), the diaSource a known change of its
    sign explains is not counted as contamination; one of the other sign is."""
    truth = Table({"band": ["g", "g", "g"], "visit": [7, 7, 8], "detector": [3, 3, 3],
                   "x": [80.3, 30.0, 50.0], "y": [10.2, 80.0, 40.0],
                   "flux": [90.0, -50.0, 1.0]})
    path = tmp_path / "truth.ecsv"
    truth.write(path, format="ascii.ecsv")
    run = ev.load_run(_handmade_run(tmp_path), truth=path)
    assert list(run.sources["known"]) == [False, False, False, False, True]
    s = ev.summary(run)
    assert (s["known_changes_found"], s["unmatched"], s["unmatched_clean"]) == (1, 2, 1)
    with pytest.raises(InputError, match="lacks columns"):
        ev.load_run(tmp_path / "run", truth=truth["x", "y"])


def test_a_report_of_the_handmade_run_has_every_figure_and_table(tmp_path):
    page = write_report([_handmade_run(tmp_path)], tmp_path / "report")
    text = page.read_text()
    assert text.count("<img ") == len(FIGURES) + 1
    for key, _, _ in FIGURES:
        assert (tmp_path / "report" / "figures" / f"{key}.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary[0]["fakes_matched"] == 2
    assert Table.read(tmp_path / "report" / "tables" / "photometry.ecsv")["pull"][0] == -1.0


def test_one_apdb_per_flavor(tmp_path):
    config = StudyConfig(apdb="postgresql://host/db")
    with pytest.raises(GpuDiffimError, match="flavor"):
        flavor_apdb(config, tmp_path, "auto")
    config = StudyConfig(apdb="postgresql://host/study_{flavor}")
    assert flavor_apdb(config, tmp_path, "auto") == "postgresql://host/study_auto"
    assert flavor_apdb(StudyConfig(apdb=""), tmp_path, "auto") is None
    assert flavor_apdb(StudyConfig(), tmp_path, "auto").endswith("/auto/apdb.db")


# ------------------------------------------------------------------- the whole study
@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    simulate(root / "repo", preset="ci", seed=0, workers=1)
    config = StudyConfig(fakes=FakeConfig(nScience=30, nTemplate=4, seed=3), backend="cpu",
                         stamps=4)
    page = study(root / "repo", root / "out", config)
    return root, page


@pytest.mark.slow
def test_every_flavor_sees_the_same_fakes_in_its_own_apdb(study_dir):
    root, page = study_dir
    truths = []
    for flavor in FLAVORS:
        run = ev.load_run(root / "out" / flavor)
        assert set(run.exposures["mode"]) == {flavor}
        assert run.apdb == f"sqlite:///{(root / 'out' / flavor / 'apdb.db').resolve()}"
        assert (np.asarray(run.sources["diaObjectId"]) != 0).all()  # every one stored
        truths.append(run.fakes["x", "y", "flux"])
        # a fake found is matched to a diaSource of its sign, within the matching radius
        for fake in run.fakes[run.fakes["found"]]:
            src = run.sources[fake["source"]]
            assert np.sign(src["significance"]) == np.sign(fake["flux"])
            assert np.hypot(src["x"] - fake["x"], src["y"] - fake["y"]) <= max(
                1.5, run.exposures["science_psf_radius"][fake["exposure"]])
        cube, table = read_cutouts(root / "out" / flavor / "g" / "11690" / "049"
                                   / "cutouts.fits")
        assert cube.shape == (len(table), 3, 31, 31)
        assert set(table["kind"]) == {"diaSource", "fake"}
    for t in truths[1:]:
        np.testing.assert_array_equal(np.asarray(t["flux"]), np.asarray(truths[0]["flux"]))
    summary = json.loads((page.parent / "summary.json").read_text())
    assert [s["flavor"] for s in summary] == list(FLAVORS)
    assert all(s["n_fakes"] == 2 * 34 for s in summary)
    with open(page.parent / "zooniverse_manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all((page.parent / "subjects" / r["image_name_1"]).is_file() for r in rows)
    assert {r["#kind"] for r in rows} <= {"detection", "lost fake"}


@pytest.mark.slow
def test_a_rerun_resumes_and_rewrites_the_report(study_dir):
    root, page = study_dir
    status = root / "out" / "auto" / "g" / "11690" / "049" / "status.json"
    before = status.stat().st_mtime_ns
    config = StudyConfig(fakes=FakeConfig(nScience=30, nTemplate=4, seed=3), backend="cpu",
                         stamps=4)
    again = study(root / "repo", root / "out", config)
    assert again == page and status.stat().st_mtime_ns == before


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_the_page_loads_in_headless_chromium_without_errors(study_dir):
    """Every figure decodes and the console stays clean (Chromium from Debian's packages,
    which .ci/run installs; skipped elsewhere when missing)."""
    browser_path = _chromium()
    if browser_path is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium under CI: .ci/run should have installed it")
        pytest.skip("no chromium here (apt-get install chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    _, page_path = study_dir
    messages = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
            page.goto(page_path.as_uri(), wait_until="load")
            total, loaded = page.evaluate(
                "[document.images.length, Array.from(document.images)"
                ".filter(i => i.complete && i.naturalWidth > 0).length]")
            title = page.title()
        finally:
            browser.close()
    assert total == len(FIGURES) + len(FLAVORS)
    assert loaded == total
    assert not [m for m in messages if m.startswith(("error", "pageerror"))], messages
    assert all(f in title for f in FLAVORS)
