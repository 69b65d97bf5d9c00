"""The command line."""

import dataclasses
import json
import sys

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import mad_std
from astropy.table import Table

from gpudiffim.cli import main
from gpudiffim.io import read_exposure, write_exposure, write_psf
from gpudiffim.simulate import PRESETS, simulate

from layouts import HEADERS, LAYOUTS, write_layout_pair
from pairs import kernel_pair


def test_info_without_cupy_says_cpu_and_why(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "in use:   cpu" in out
    assert "CuPy is not installed" in out
    assert "pyfftw" in out.lower()
    assert "threads:" in out


def test_cli_writes_dia_sources(tmp_path):
    science, template = kernel_pair(shape=(512, 512), n_stars=300, seed=4,
                                    moved=[(200.0, 300.0, 5e4, 3.0, 0.0)])
    write_exposure(science, tmp_path / "sci.fits")
    write_exposure(template, tmp_path / "tmpl.fits")
    assert main(["subtract", str(tmp_path / "sci.fits"), str(tmp_path / "tmpl.fits"),
                 "-o", str(tmp_path / "out")]) == 0
    table = Table.read(tmp_path / "out" / "diaSources.parquet")
    for col in ("diaSourceId", "visit", "detector", "band", "x", "y", "ra", "dec", "psfFlux",
                "psfFluxErr", "apFlux", "apFluxErr", "snr", "isDipole", "pixelFlags_edge",
                "sky_source", "scienceFlux"):
        assert col in table.colnames
    real = table[~table["sky_source"]]
    assert np.min(np.hypot(real["x"] - 200, real["y"] - 300)) < 4


def test_cli_subtract_writes_difference_and_fit(tmp_path):
    science, template = kernel_pair(shape=(512, 512), n_stars=300, seed=4)
    write_exposure(science, tmp_path / "sci.fits")
    write_exposure(template, tmp_path / "tmpl.fits")
    out = tmp_path / "out"
    assert main(["subtract", str(tmp_path / "sci.fits"), str(tmp_path / "tmpl.fits"),
                 "-o", str(out),
                 "--flavor", "auto", "--backend", "cpu"]) == 0
    diff = read_exposure(out / "difference.fits")
    assert diff.shape == (512, 512) and diff.psf is not None
    fit = json.loads((out / "fit.json").read_text())
    assert fit["flavor"] == "convolveTemplate"
    assert fit["quality"]["kernel_sum_centre"] == pytest.approx(0.9, rel=0.01)
    assert main(["subtract", str(tmp_path / "missing.fits"), str(tmp_path / "tmpl.fits"),
                 "-o", str(out)]) == 2


def _far_from(shape, stars, radius=20):
    far = np.ones(shape, bool)
    for x, y in stars:
        far[max(int(y) - radius, 0):int(y) + radius + 1,
            max(int(x) - radius, 0):int(x) + radius + 1] = False
    return far


@pytest.mark.skipif(not HEADERS.is_dir(), reason=f"no header dumps at {HEADERS}")
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_subtract_real_layouts_with_nothing_given(tmp_path, name):
    """Each real layout (DECam, JWST NIRCam i2d, Liverpool IO:O, an Apogee camera, an afw
    Exposure), two files and nothing else: the difference's noise matches its variance
    within 10%, the reader's noise model needed at most a modest rescaling, and the
    transient is found."""
    sci, tmpl, (tx, ty), stars = write_layout_pair(name, tmp_path)
    out = tmp_path / "out"
    assert main(["subtract", str(sci), str(tmpl), "-o", str(out)]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert 0.7 < fit["quality"]["variance_scale"] < 1.4, fit["quality"]
    d = read_exposure(out / "difference.fits")
    good = (d.mask == 0) & (d.variance > 0) & _far_from(d.shape, stars)
    assert mad_std(d.image[good] / np.sqrt(d.variance[good])) == pytest.approx(1.0, abs=0.1)
    table = Table.read(out / "diaSources.parquet")
    real = table[~table["sky_source"]]
    near = np.hypot(real["x"] - tx, real["y"] - ty) < 3
    assert near.any() and (real["psfFlux"][near] > 0).all(), name


DECAM = HEADERS.parents[1] / "data" / "decam"


@pytest.mark.skipif(not DECAM.is_dir(), reason=f"no DECam cutouts at {DECAM}")
def test_every_decam_epoch_pair_finds_the_transient(tmp_path):
    """The real DECam cutouts (sky subtracted, no variance, no mask, no PSF, a string
    DETECTOR), each epoch-1 exposure against each epoch-2 one with nothing else given: the
    transient near (129, 128) is found in all 16 pairs, the difference's noise away from the
    detections matches its variance plane (robust pull 0.9-1.1), and once the single
    exposures' cosmic rays are found and the template's misregistration (0.04-0.33 px rms
    between these epochs) is in the detection noise, few other sources remain without a
    pixel flag: at most 3 in a pair (measured at most 2, 10 over the 16; before the
    misregistration term 46, dipoles at the same three bright stars)."""
    others = 0
    for a in "bcde":
        for b in "bcde":
            out = tmp_path / f"{a}{b}"
            assert main(["subtract", str(DECAM / f"DEC-OBS04{a}.mini.fits"),
                         str(DECAM / f"DEC-OBS18{b}.mini.fits"), "-o", str(out)]) == 0
            table = Table.read(out / "diaSources.parquet")
            real = table[~table["sky_source"]]
            at_transient = np.hypot(real["x"] - 129, real["y"] - 128) < 3
            assert at_transient.any(), (a, b)
            flags = [c for c in real.colnames if c.startswith("pixelFlags_")]
            flagged = np.any([real[c] for c in flags], axis=0)
            others += int(np.sum(~at_transient & ~flagged))
            assert np.sum(~at_transient & ~flagged) <= 3, (a, b)
            d = read_exposure(out / "difference.fits")
            good = ((d.mask == 0) & (d.variance > 0)
                    & _far_from(d.shape, zip(real["x"], real["y"]), 10))
            pull = mad_std(d.image[good] / np.sqrt(d.variance[good]))
            assert 0.9 < pull < 1.1, (a, b, pull)
    assert others <= 14


def test_cli_resamples_a_template_on_another_grid(tmp_path):
    """The simulator's templates sit a few pixels off each visit's grid (their WCSs say by
    how much): the CLI resamples them, covering what the offset leaves, and the difference
    is noise; --no-warp leaves the template alone."""
    cfg = dataclasses.replace(PRESETS["ci"], visits={"g": (11692,)})
    manifest = simulate(tmp_path / "repo", cfg, seed=2, workers=1)
    row = manifest[0]
    sci, tmpl = tmp_path / "repo" / row["science"], tmp_path / "repo" / row["template"]
    assert main(["subtract", str(sci), str(tmpl), "-o", str(tmp_path / "warp")]) == 0
    fit = json.loads((tmp_path / "warp" / "fit.json").read_text())
    ny, nx = cfg.shape
    expected = (1 - abs(row["offset_x"]) / nx) * (1 - abs(row["offset_y"]) / ny)
    assert fit["template_fraction"] == pytest.approx(expected, abs=2.0 / nx)
    assert fit["template_fraction"] < 1 and abs(fit["quality"]["difference_pull_sigma"] - 1) < 0.05
    assert main(["subtract", str(sci), str(tmpl), "-o", str(tmp_path / "nowarp"),
                 "--no-warp"]) == 0
    assert json.loads((tmp_path / "nowarp" / "fit.json").read_text())["template_fraction"] == 1


def test_cli_reads_separate_noise_and_mask_files(tmp_path):
    """Images alone, their noise as sigma maps in ERR files and a mask with a bad block: the
    variance is the sigma squared and the bad block is BAD."""
    science, template = kernel_pair(shape=(256, 256), n_stars=80, seed=2)
    args = ["subtract"]
    for name, exp in (("sci", science), ("tmpl", template)):
        fits.PrimaryHDU(exp.image).writeto(tmp_path / f"{name}.fits")
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.sqrt(exp.variance), name="ERR")]
                     ).writeto(tmp_path / f"{name}_err.fits")
        args.append(str(tmp_path / f"{name}.fits"))
    bad = np.zeros((256, 256), np.uint8)
    bad[100:110, 40:50] = 1
    fits.PrimaryHDU(bad).writeto(tmp_path / "mask.fits")
    out = tmp_path / "out"
    assert main(args + ["-o", str(out), "--science-noise", str(tmp_path / "sci_err.fits"),
                        "--template-noise", str(tmp_path / "tmpl_err.fits"),
                        "--science-mask", str(tmp_path / "mask.fits"),
                        "--science-psf", _psf_file(tmp_path, science, "sci"),
                        "--template-psf", _psf_file(tmp_path, template, "tmpl")]) == 0
    read = read_exposure(tmp_path / "sci.fits", noise=tmp_path / "sci_err.fits")
    np.testing.assert_allclose(read.variance, science.variance, rtol=1e-6)
    fit = json.loads((out / "fit.json").read_text())
    assert 0.9 < fit["quality"]["variance_scale"] < 1.1  # 1.075, as the pair gives in memory
    d = read_exposure(out / "difference.fits")
    assert np.all(d.mask[100:110, 40:50] & d.bit("BAD"))


def _psf_file(tmp_path, exposure, name):
    return str(write_psf(exposure.psf, tmp_path / f"{name}_psf.fits"))


def test_cli_names_the_file_when_grids_differ_without_a_wcs(tmp_path, capsys):
    rng = np.random.default_rng(1)
    fits.PrimaryHDU(rng.normal(size=(64, 64)).astype(np.float32)).writeto(tmp_path / "a.fits")
    fits.PrimaryHDU(rng.normal(size=(64, 80)).astype(np.float32)).writeto(tmp_path / "b.fits")
    assert main(["subtract", str(tmp_path / "a.fits"), str(tmp_path / "b.fits"),
                 "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "b.fits") in err and "no WCS" in err
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.skipif(not DECAM.is_dir(), reason=f"no DECam cutouts at {DECAM}")
def test_a_misregistered_real_template_is_refused_and_itself_subtracts_to_nothing(tmp_path,
                                                                                  capsys):
    """A DECam template rolled by 100 px: every model fails its gates (convolveScience had
    passed with kernel sum 0.0103, pinned to the flux ratio of stars the template lacks) and
    the command exits 2 naming the file; a cutout minus itself has kernel sum 1 and no
    diaSources."""
    science = DECAM / "DEC-OBS04b.mini.fits"
    with fits.open(DECAM / "DEC-OBS18b.mini.fits") as hdul:
        rolled = fits.HDUList([h.copy() for h in hdul])
    hdu = next(h for h in rolled if h.data is not None and h.data.ndim == 2)
    hdu.data = np.roll(hdu.data, 100, axis=1)
    rolled.writeto(tmp_path / "rolled.fits")
    assert main(["subtract", str(science), str(tmp_path / "rolled.fits"), "-o",
                 str(tmp_path / "out"), "--no-warp"]) == 2
    err = capsys.readouterr().err
    assert f"{science}: no subtraction passed the quality gates" in err
    assert "do not hold the same stars" in err
    assert not (tmp_path / "out" / "difference.fits").exists()
    assert main(["subtract", str(science), str(science), "-o", str(tmp_path / "self")]) == 0
    fit = json.loads((tmp_path / "self" / "fit.json").read_text())
    assert fit["quality"]["kernel_sum_fitted"] == pytest.approx(1.0, abs=1e-3)
    sources = Table.read(tmp_path / "self" / "diaSources.parquet")
    assert (~sources["sky_source"]).sum() == 0


@pytest.mark.skipif(not DECAM.is_dir(), reason=f"no DECam cutouts at {DECAM}")
def test_zogy_on_the_decam_pairs_finds_the_transient_and_little_else(tmp_path):
    """zogy on the real DECam cutouts, nothing given but the files: the transient in all 16
    pairs, at most 3 other unflagged diaSources in a pair and 10 in all (measured 7; 45
    before the template's misregistration, 0.04-0.33 px between these epochs, reached the
    score's noise), the score's noise as its variance plane says (pull 1.01-1.06)."""
    others = 0
    for a in "bcde":
        for b in "bcde":
            out = tmp_path / f"{a}{b}"
            assert main(["subtract", str(DECAM / f"DEC-OBS04{a}.mini.fits"),
                         str(DECAM / f"DEC-OBS18{b}.mini.fits"), "-o", str(out),
                         "--flavor", "zogy"]) == 0
            real = Table.read(out / "diaSources.parquet")
            real = real[~real["sky_source"]]
            at_transient = np.hypot(real["x"] - 129, real["y"] - 128) < 3
            assert at_transient.any(), (a, b)
            flagged = np.any([real[c] for c in real.colnames
                              if c.startswith("pixelFlags_")], axis=0)
            assert np.sum(~at_transient & ~flagged) <= 3, (a, b)
            others += int(np.sum(~at_transient & ~flagged))
            d = read_exposure(out / "difference.fits")
            good = (d.mask == 0) & (d.variance > 0)
            assert 0.9 < mad_std(d.image[good] / np.sqrt(d.variance[good])) < 1.1, (a, b)
    assert others <= 10
