"""The simulator: determinism and the physics it promises (variance, PSF flux, SNR)."""

import filecmp

import numpy as np
import pytest
from astropy.stats import mad_std
from astropy.table import Table

from gpudiffim.cli import main
from gpudiffim.exposure import Exposure, mask_bits
from gpudiffim.inject import inject, psf_stamp
from gpudiffim.io import read_exposure
from gpudiffim.profiles import PsfField
from gpudiffim.simulate import PRESETS, simulate


@pytest.fixture(scope="module")
def ci_repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("ci")
    simulate(out, "ci", seed=3, workers=1)
    return out


def test_same_seed_gives_identical_files(ci_repo, tmp_path):
    assert main(["simulate", str(tmp_path), "--preset", "ci", "--seed", "3", "--workers", "1"]) == 0
    files = sorted(p.relative_to(ci_repo) for p in ci_repo.rglob("*") if p.is_file())
    assert len(files) == 6  # 2 science, 1 template, manifest, truth, scene
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for f in files:
        assert filecmp.cmp(ci_repo / f, tmp_path / f, shallow=False), f


def test_layout_and_manifest(ci_repo):
    manifest = Table.read(ci_repo / "manifest.ecsv")
    cfg = PRESETS["ci"]
    assert len(manifest) == 2 and set(manifest["detector"]) == set(cfg.detectors)
    for row in manifest:
        sci = read_exposure(ci_repo / row["science"])
        tmpl = read_exposure(ci_repo / row["template"])
        assert sci.shape == tmpl.shape == cfg.shape
        assert sci.info.visit == row["visit"] and sci.psf is not None and sci.wcs is not None
        fwhm = np.mean(sci.psf.fwhm()) * 0.168
        assert abs(fwhm / row["science_fwhm"] - 1) < 0.05  # model FWHM matches the record
        # deep template: at least 3x lower noise in the sky
        assert np.sqrt(np.median(sci.variance) / np.median(tmpl.variance)) >= 3
        # the WCS offset is recorded: the same sky position lands offset pixels apart
        ra, dec = tmpl.wcs.pixel_to_world_values(100.0, 200.0)
        x, y = sci.wcs.world_to_pixel_values(ra, dec)
        assert abs(x - 100 - row["offset_x"]) < 1e-6 and abs(y - 200 - row["offset_y"]) < 1e-6
        for plane in ("SAT", "CR", "BAD", "INJECTED"):
            assert np.any(sci.mask & sci.bit(plane)), plane


def _empty_sky(exp, scene, offset):
    """Pixels far from every catalogued source and unmasked."""
    ny, nx = exp.shape
    keep = exp.mask == 0
    yy, xx = np.mgrid[:ny, :nx]
    for row in scene:
        r = 6 + max(0.0, 24.0 - row["mag"]) * 6
        x, y = row["x"] + offset[0], row["y"] + offset[1]
        y0, y1 = int(max(y - r, 0)), int(min(y + r + 1, ny))
        x0, x1 = int(max(x - r, 0)), int(min(x + r + 1, nx))
        keep[y0:y1, x0:x1] = False
    return keep


@pytest.mark.parametrize("which", ["science", "template"])
def test_variance_plane_matches_sky_noise(ci_repo, which):
    manifest = Table.read(ci_repo / "manifest.ecsv")
    scene = Table.read(ci_repo / "scene.ecsv")
    row = manifest[0]
    exp = read_exposure(ci_repo / row[which])
    offset = (row["offset_x"], row["offset_y"]) if which == "science" else (0.0, 0.0)
    keep = _empty_sky(exp, scene, offset)
    both = keep[:, 1:] & keep[:, :-1]  # neighbour differences cancel the smooth sky
    diff = (exp.image[:, 1:] - exp.image[:, :-1])[both]
    sigma = np.sqrt(exp.variance[:, 1:] + exp.variance[:, :-1])[both]
    assert both.sum() > 20000
    ratio = mad_std(diff / sigma)
    assert abs(ratio - 1) < 0.02, ratio


def _psf_fit(exp, x, y):
    """Weighted linear fit of PSF flux plus a sky plane over the whole PSF stamp at (x, y),
    with the exposure's PSF model; masked pixels (but INJECTED) are left out.
    Returns (flux, its standard error)."""
    stamp, y0, x0 = psf_stamp(exp.psf, x, y)
    h, w = stamp.shape
    img = exp.image[y0:y0 + h, x0:x0 + w].astype(float)
    var = exp.variance[y0:y0 + h, x0:x0 + w].astype(float)
    good = (exp.mask[y0:y0 + h, x0:x0 + w] & ~mask_bits("INJECTED")) == 0
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    a = np.column_stack([stamp[good], np.ones(good.sum()), xx[good], yy[good]])
    a /= np.sqrt(var[good])[:, None]
    cov = np.linalg.inv(a.T @ a)
    flux = (cov @ a.T @ (img[good] / np.sqrt(var[good])))[0]
    return flux, np.sqrt(cov[0, 0])


def _fake_pulls(ci_repo):
    """(pulls, measured SNR, expected SNR) of the isolated science fakes.

    The static scene's light under each fake (faint neighbours) is measured the same way
    on the deep template at the same sky position and removed, as a difference would.
    """
    truth = Table.read(ci_repo / "truth.ecsv")
    manifest = Table.read(ci_repo / "manifest.ecsv")
    scene = Table.read(ci_repo / "scene.ecsv")
    pulls, measured, expected = [], [], []
    for row in manifest:
        exp = read_exposure(ci_repo / row["science"])
        tmpl = read_exposure(ci_repo / row["template"])
        scale = 10 ** (0.4 * (row["zero_point"] - row["template_zero_point"]))
        fakes = truth[(truth["visit"] == row["visit"]) & (truth["kind"] == "fake")
                      & (truth["image"] == "science")]
        sx = np.asarray(scene["x"]) + row["offset_x"]
        sy = np.asarray(scene["y"]) + row["offset_y"]
        mag = np.asarray(scene["mag"])
        reach = 20 + 25 * np.clip(20 - mag, 0, None)  # bright stars' wings reach far
        for f in fakes:
            if np.any((np.hypot(sx - f["x"], sy - f["y"]) < reach) & (mag < 24)):
                continue  # blended with a catalogued source
            flux, err = _psf_fit(exp, f["x"], f["y"])
            scene_flux, scene_err = _psf_fit(tmpl, f["x"] - row["offset_x"],
                                             f["y"] - row["offset_y"])
            pulls.append((flux - scene_flux * scale - f["flux"]) / np.hypot(err, scene_err * scale))
            measured.append(flux / err)
            expected.append(f["snr_image"])
    return np.array(pulls), np.array(measured), np.array(expected)


def test_injected_fakes_psf_flux_and_snr(ci_repo):
    """Fakes measured with their PSF: pulls are unit normal; SNR column within 10%."""
    pulls, measured, expected = _fake_pulls(ci_repo)
    assert len(pulls) >= 40
    assert abs(np.median(pulls)) < 0.35
    assert abs(mad_std(pulls) - 1) < 0.25
    assert abs(np.mean(measured) / np.mean(expected) - 1) < 0.10


def test_inject_into_blank_exposure_pins_flux_and_snr():
    """Many stars into pure noise with a known PSF: measured flux/SNR match the truth rows."""
    rng = np.random.default_rng(11)
    shape, var = (600, 600), 400.0
    psf = PsfField(fwhm=4.5, beta=3.0, width=600, height=600, gx=0.05, e1_0=0.05).model(33)
    exp = Exposure.from_arrays(rng.normal(0, np.sqrt(var), shape), None,
                               np.full(shape, var), psf=psf, zero_point=30.0)
    gx, gy = np.meshgrid(np.arange(40, 580, 45.0), np.arange(40, 580, 45.0))
    n = gx.size
    cat = Table({"x": gx.ravel() + rng.uniform(-0.5, 0.5, n),
                 "y": gy.ravel() + rng.uniform(-0.5, 0.5, n),
                 "mag": rng.uniform(20.0, 23.5, n)})
    out, truth = inject(exp, cat, rng=rng)
    assert np.all(exp.mask == 0) and np.all(exp.variance == var)  # the input is left alone
    pulls, snr_ratio = [], []
    for t in truth:
        flux, err = _psf_fit(out, t["x"], t["y"])
        pulls.append((flux - t["flux"]) / err)
        snr_ratio.append((flux / err) / t["snr"])
    assert abs(np.mean(pulls)) < 0.3 and abs(np.std(pulls) - 1) < 0.2
    assert abs(np.mean(snr_ratio) - 1) < 0.10
    assert np.all(truth["inside"]) and np.all(out.mask[out.mask != 0] == mask_bits("INJECTED"))


def test_truth_carries_the_optimal_snr_of_each_change(tmp_path):
    """Every change's ``optimal_snr`` (proper subtraction's, both PSFs): above its ``snr``
    (science PSF over both variances) where the template is sharp (median 1.029), below it
    where the template's seeing is worse than the science's (1.15-1.3" against 0.5-1.0":
    median 0.974, the template's 12x depth making up most of it)."""
    import dataclasses
    cfg = dataclasses.replace(PRESETS["ci"], name="opt", shape=(384, 384), detectors=(49, 50),
                              bad_template_detectors=(50,), seeing=(0.5, 1.0))
    simulate(tmp_path, cfg, seed=1, workers=1)
    truth = Table.read(tmp_path / "truth.ecsv")
    assert np.isfinite(truth["optimal_snr"]).all()
    ratio = np.asarray(truth["optimal_snr"] / truth["snr"])
    good, bad = np.asarray(truth["detector"]) == 49, np.asarray(truth["detector"]) == 50
    assert np.median(ratio[good]) > 1.01 and np.median(ratio[bad]) < 0.99


def test_demo_fakes_blend_and_detectors_carry_bad_columns_and_cosmic_rays(tmp_path):
    """The demo preset's physics on one 1024^2 visit: a fifth of the science fakes sit 1-3
    FWHM from another (the rest 30 px apart), four bad columns (the first whole, the others
    whole or partial, one or two pixels wide), cosmic rays at 30 per million pixels."""
    import dataclasses

    from scipy import ndimage

    cfg = dataclasses.replace(PRESETS["demo"], name="honest", visits={"g": (11690,)},
                              detectors=(49,), shape=(1024, 1024))
    simulate(tmp_path, cfg, seed=2, workers=1)
    manifest = Table.read(tmp_path / "manifest.ecsv")
    truth = Table.read(tmp_path / "truth.ecsv")
    fakes = truth[(truth["kind"] == "fake") & (truth["image"] == "science")]
    assert len(fakes) == cfg.fakes_per_science
    xy = np.column_stack([fakes["x"], fakes["y"]])
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).T)
    np.fill_diagonal(d, np.inf)
    fwhm = manifest["science_fwhm"][0] / 0.168
    close = d.min(axis=0) < 3.05 * fwhm
    assert np.sum(close) >= round(0.2 * cfg.fakes_per_science)
    assert d.min() > 0.95 * fwhm
    sci = read_exposure(tmp_path / manifest["science"][0])
    bad = (sci.mask & mask_bits("BAD")) != 0
    columns, n = ndimage.label(bad.any(axis=0))
    assert n == 4 and bad.sum(axis=0).max() == 1024
    assert set(np.bincount(columns)[1:]) <= {1, 2}
    cr = (sci.mask & mask_bits("CR")) != 0
    tracks = ndimage.label(cr, structure=np.ones((3, 3)))[1]
    expected = cfg.cr_density * 1024 * 1024 / 1e6
    assert abs(tracks - expected) < 4 * np.sqrt(expected)
