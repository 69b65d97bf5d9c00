"""Fakes injected by the runner: reproducible, spread over the S/N that matters, found as
their true S/N says."""

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from gpudiffim.cli import main
from gpudiffim.exposure import DETECTION_EXCLUDED
from gpudiffim.fakes import FakeConfig, inject_fakes
from gpudiffim.io import read_exposure
from gpudiffim.metrics import efficiency_curve, match_fakes
from gpudiffim.runner import RunConfig, exposure_dir, run
from gpudiffim.simulate import simulate


@pytest.fixture(scope="module")
def clean_repo(tmp_path_factory):
    """The ci preset without the simulator's own fakes: the runner's are the only ones."""
    import dataclasses

    from gpudiffim.simulate import PRESETS

    out = tmp_path_factory.mktemp("nofakes")
    cfg = dataclasses.replace(PRESETS["ci"], fakes_per_science=0, fakes_per_template=0,
                              transients_per_visit=0)
    simulate(out, cfg, seed=6, workers=1)
    return out


def test_the_same_seed_gives_the_same_fakes(clean_repo):
    manifest = Table.read(clean_repo / "manifest.ecsv")
    row = manifest[0]
    sci, tmpl = (read_exposure(clean_repo / row[k]) for k in ("science", "template"))
    cfg = FakeConfig(nScience=40, nTemplate=6, seed=3)
    a = inject_fakes(sci, tmpl, cfg, row["visit"], row["detector"])
    b = inject_fakes(sci, tmpl, cfg, row["visit"], row["detector"])
    c = inject_fakes(sci, tmpl, FakeConfig(nScience=40, nTemplate=6, seed=4), row["visit"],
                     row["detector"])
    assert np.array_equal(a[2]["x"], b[2]["x"]) and np.array_equal(a[0].image, b[0].image)
    assert not np.array_equal(a[2]["x"], c[2]["x"])
    truth = a[2]
    assert (truth["image"] == "template").sum() == 6 and (truth["image"] == "science").sum() == 40
    assert np.all(truth["flux"][truth["image"] == "template"] < 0)
    snr = truth["target_snr"][truth["image"] == "science"]
    assert snr.min() >= 2 and snr.max() <= 100 and np.mean((snr > 3) & (snr < 10)) > 0.45
    x, y = truth["x"], truth["y"]
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :]) + np.eye(len(x)) * 1e9
    assert d.min() >= 20
    injected = (a[0].mask & a[0].bit("INJECTED")) != 0
    assert all(injected[int(round(v)), int(round(u))] for u, v in
               zip(x[truth["image"] == "science"], y[truth["image"] == "science"]))


def test_the_runner_finds_its_fakes_as_their_true_snr_says(clean_repo, tmp_path):
    """`run --inject-fakes 60 --template-fakes 8`: every exposure's truth beside its
    outputs, the same again on a rerun elsewhere; science fakes of true S/N > 10 where
    detection can seed (4 of 41 fell on saturated stars' masks or the kernel's edge band)
    found at 90% or more (measured 33 of 33), fakes under S/N 3 at 40% or less; template
    fakes found as negative sources."""
    out = tmp_path / "out"
    assert main(["run", str(clean_repo), "-o", str(out), "--inject-fakes", "60",
                 "--template-fakes", "8", "--fake-seed", "1"]) == 0
    manifest = Table.read(clean_repo / "manifest.ecsv")
    found, snr, negative = [], [], []
    for row in manifest:
        here = exposure_dir(out, row)
        truth = Table.read(here / "fakes.ecsv")
        sources = Table.read(here / "diaSources.parquet")
        sources = sources[~sources["sky_source"]]
        status = json.loads((here / "status.json").read_text())
        assert status["n_fakes"] == 68
        match = match_fakes(np.column_stack([sources["x"], sources["y"]]),
                            np.column_stack([truth["x"], truth["y"]]), 2.0)
        diff = read_exposure(here / "difference.fits")
        blocked = diff.bit(*DETECTION_EXCLUDED)
        seedable = np.array([(diff.mask[int(round(y)), int(round(x))] & blocked) == 0
                             for x, y in zip(truth["x"], truth["y"])])
        sci = (truth["image"] == "science") & seedable
        found += list(match[sci] >= 0)
        snr += list(truth["target_snr"][sci])
        sci = truth["image"] == "science"
        tm = match[~sci]
        negative += list(sources["psfFlux"][tm[tm >= 0]] < 0)
    curve = efficiency_curve(snr, found, [0, 3, 10, 1000])
    assert curve["efficiency"][2] >= 0.9 and curve["efficiency"][0] <= 0.4, curve
    assert len(negative) >= 8 and all(negative)
    again = run(clean_repo, tmp_path / "again",
                RunConfig(fakes=FakeConfig(nScience=60, nTemplate=8, seed=1)), progress=False)
    assert (again["status"] == "done").all()
    for row in manifest:
        t1 = Table.read(exposure_dir(out, row) / "fakes.ecsv")
        t2 = Table.read(exposure_dir(tmp_path / "again", row) / "fakes.ecsv")
        assert np.array_equal(t1["x"], t2["x"]) and np.array_equal(t1["flux"], t2["flux"])


DECAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "decam"


@pytest.mark.skipif(not DECAM.is_dir(), reason=f"no DECam cutouts at {DECAM}")
def test_fakes_go_into_real_files_without_psfs(tmp_path):
    """The real DECam cutouts come without PSFs: the runner measures one before the fakes go
    in (it used to fail every exposure), keeps it for the subtraction, and finds the fakes
    (measured: 5 of 5 above S/N 10, both template fakes, negative)."""
    import os

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("DEC-OBS04b.mini.fits", "DEC-OBS18b.mini.fits"):
        os.symlink(DECAM / name, repo / name)
    Table(rows=[{"visit": 100, "detector": 1, "band": "g", "science": "DEC-OBS04b.mini.fits",
                 "template": "DEC-OBS18b.mini.fits"}]).write(repo / "manifest.ecsv")
    table = run(repo, tmp_path / "out", RunConfig(fakes=FakeConfig(nScience=20, nTemplate=3)),
                progress=False)
    assert list(table["status"]) == ["done"], table["error"]
    here = exposure_dir(tmp_path / "out", Table.read(repo / "manifest.ecsv")[0])
    truth = Table.read(here / "fakes.ecsv")
    sources = Table.read(here / "diaSources.parquet")
    sources = sources[~sources["sky_source"]]
    match = match_fakes(np.column_stack([sources["x"], sources["y"]]),
                        np.column_stack([truth["x"], truth["y"]]), 2.0)
    bright = (truth["image"] == "science") & (truth["target_snr"] > 10)
    assert len(truth) == 23 and bright.sum() >= 3
    assert np.mean(match[bright] >= 0) >= 0.75
    templ = match[truth["image"] == "template"]
    assert (templ >= 0).sum() >= 2 and np.all(sources["psfFlux"][templ[templ >= 0]] < 0)


def test_fakes_survive_a_nan_border_and_no_psf(clean_repo):
    """A science with a NaN border (as resampled mosaics have) and no PSF: its non-finite
    pixels are masked before the PSF is measured, and the fakes land on the finite part
    only."""
    manifest = Table.read(clean_repo / "manifest.ecsv")
    row = manifest[0]
    sci, tmpl = (read_exposure(clean_repo / row[k]) for k in ("science", "template"))
    image = np.array(sci.image, np.float32)
    image[:, :60] = np.nan
    sci = sci.replace(image=image, psf=None)
    out, _, truth = inject_fakes(sci, tmpl, FakeConfig(nScience=30, seed=2), row["visit"],
                                 row["detector"])
    assert out.psf is not None and len(truth) == 30
    assert np.all(np.isfinite(out.image))
    assert np.all((out.mask[:, :60] & out.bit("NO_DATA")) != 0)
    assert truth["x"].min() >= 60  # none where there is no data


@pytest.mark.parametrize("sigma_n,sigma_r", [(2.0, 1.5), (1.5, 2.5)])
def test_each_fake_carries_proper_subtractions_optimal_snr(sigma_n, sigma_r):
    """Gaussian PSFs and flat noise: ``optimal_snr`` is flux / sqrt(var) with var the
    analytic optimum, 1 / int d2k/(2 pi)^2 |P_n|^2 |P_r|^2 / (v_n |P_r|^2 + v_r |P_n|^2); it
    exceeds the target S/N (science PSF, summed variances) with a sharper template and falls
    well below it with a wider one (the target S/N overstates what can be found there)."""
    from scipy.integrate import quad

    from gpudiffim.exposure import Exposure
    from gpudiffim.fakes import draw_fakes, fake_generator
    from gpudiffim.psf import ImagePsf

    from pairs import gaussian_image

    v_n, v_r = 100.0, 25.0
    shape = (256, 256)
    science = Exposure.from_arrays(np.zeros(shape), None, np.full(shape, v_n),
                                   psf=ImagePsf(gaussian_image(41, sigma_n)))
    template = Exposure.from_arrays(np.zeros(shape), None, np.full(shape, v_r),
                                    psf=ImagePsf(gaussian_image(41, sigma_r)))
    cfg = FakeConfig(nScience=20)
    cat = draw_fakes(science, template, 20, cfg, fake_generator(cfg, 1, 1))

    def integrand(k):
        an, ar = np.exp(-(k * sigma_n) ** 2), np.exp(-(k * sigma_r) ** 2)
        return k / (2 * np.pi) * an * ar / (v_n * ar + v_r * an)
    optimum = 1 / quad(integrand, 0, 8 / min(sigma_n, sigma_r), epsrel=1e-10)[0]
    np.testing.assert_allclose(cat["optimal_snr"], cat["flux"] / np.sqrt(optimum), rtol=1e-4)
    ratio = np.asarray(cat["optimal_snr"] / cat["target_snr"])
    # 1.033 with the sharper template (its noise smoothed on the way), 0.770 with the wider
    assert np.all(ratio > 1.02) if sigma_r < sigma_n else np.all(ratio < 0.8)


def test_the_shortfall_from_the_ideal_detector_is_the_worst_bin():
    """Bins of optimal S/N 5-6 (20 fakes, 8 found: ideal 0.5-0.84) and 10-12 (all found),
    and 3-4 (below 5: not counted): the shortfall is the 5-6 bin's mean Phi less 0.4."""
    from scipy.stats import norm

    from gpudiffim.evaluation import ideal_shortfall

    low = np.linspace(5.0, 5.95, 20)
    snr = np.r_[low, np.linspace(10, 11.9, 15), np.linspace(3, 3.9, 12)]
    found = np.r_[np.arange(20) < 8, np.ones(15, bool), np.zeros(12, bool)]
    got = ideal_shortfall(Table({"optimal_snr": snr, "found": found}))
    assert got == pytest.approx(np.mean(norm.cdf(low - 5)) - 0.4, abs=1e-12)
    assert np.isnan(ideal_shortfall(Table({"optimal_snr": [np.nan] * 3, "found": [1, 0, 1]})))


def test_fakes_on_galaxies_are_never_put_on_saturated_stars():
    """A saturated star's flat top measures wider than the PSF; it used to be taken for a
    galaxy host (on the sprint, 24 of 360 fakes on galaxies landed within 3 px of a
    saturated core, none of 840 in the field). Every galaxy fake now goes beside the one
    real galaxy, none on the star."""
    from gpudiffim.exposure import Exposure
    from gpudiffim.fakes import draw_fakes, fake_generator
    from gpudiffim.psf import ImagePsf

    from pairs import gaussian_image

    rng = np.random.default_rng(5)
    shape = (200, 200)
    yy, xx = np.mgrid[:200, :200]
    sky_sigma = 10.0
    image = rng.normal(0.0, sky_sigma, shape)
    galaxy, star = (60.0, 70.0), (140.0, 130.0)
    image += 4000.0 * np.exp(-((xx - galaxy[0]) ** 2 + (yy - galaxy[1]) ** 2) / (2 * 5.0**2))
    image += 5e6 * np.exp(-((xx - star[0]) ** 2 + (yy - star[1]) ** 2) / (2 * 2.0**2))
    saturated = image >= 30000.0
    image = np.minimum(image, 30000.0)
    science = Exposure.from_arrays(image, None, np.full(shape, sky_sigma**2),
                                   psf=ImagePsf(gaussian_image(25, 2.0)))
    science = science.replace(mask=np.where(saturated, science.bit("SAT"), 0).astype(np.int32))
    assert saturated.sum() > 50
    cfg = FakeConfig(nScience=10, minSeparation=1.0)
    cat = draw_fakes(science, science, 10, cfg, fake_generator(cfg, 1, 1), on_galaxies=1.0)
    on = np.asarray(cat["on_galaxy"], bool)
    assert on.sum() == 10
    assert np.all(np.hypot(cat["x"] - galaxy[0], cat["y"] - galaxy[1]) < 25)
    assert np.all(np.hypot(cat["x"] - star[0], cat["y"] - star[1]) > 50)
