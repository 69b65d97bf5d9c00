"""Never silently wrong: quality gates, retries, input checks with named causes."""

import logging

import numpy as np
import pytest
from astropy.io import fits

from gpudiffim.errors import InputError
from gpudiffim.io import read_exposure, read_psf, write_exposure
from gpudiffim.measure import dia_sources
from gpudiffim.psf import ImagePsf
from gpudiffim.quality import QualityConfig, SubtractionQualityError, quality_failures
from gpudiffim.subtract import SubtractConfig, simpler_models, subtract

from pairs import kernel_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 512^2 known-kernel pair, written and read back (so that errors can name files)."""
    out = tmp_path_factory.mktemp("quality")
    science, template = kernel_pair(shape=(512, 512), n_stars=300, seed=4)
    return (read_exposure(write_exposure(science, out / "science.fits")),
            read_exposure(write_exposure(template, out / "template.fits")))


def test_an_image_minus_itself_is_empty(pair):
    """Kernel sums were 7.71, 4.48, 2.05, 0.86 for images subtracted from themselves: the
    errors-in-variables correction took the shared noise for independent noise, and the
    penalty pulled towards a Gaussian instead of the delta equal PSFs call for. Now the
    shared noise is measured (correlation 1) and the fit gives the delta kernel."""
    for image in pair:
        result = subtract(image, image)
        q = result.quality
        assert q["noise_correlation"] == pytest.approx(1.0, abs=1e-3)
        assert q["kernel_sum_fitted"] == pytest.approx(1.0, abs=1e-3)
        # float32 rounding of the brightest stars only: 0.2% of the noise at most
        assert np.max(np.abs(result.difference.image)) < 1e-2 * np.sqrt(
            np.median(image.variance))
        sources = dia_sources(result, image)
        assert (~sources["sky_source"]).sum() == 0


def test_independent_exposures_share_no_noise(pair):
    assert subtract(*pair).quality["noise_correlation"] == 0.0


def test_good_fits_pass_and_record_their_figures(pair):
    q = subtract(*pair).quality
    assert quality_failures(q) == [] and q["rejected_models"] == []
    # the truth: kernel sum 0.9 at the centre (pairs.kernel_params)
    assert q["kernel_sum_fitted"] == pytest.approx(0.9, abs=5 * q["kernel_sum_error"])
    # the gates' reference, to 1% here (aperture corrections from 31 px PSF images)
    assert q["aperture_flux_ratio"] == pytest.approx(0.9, abs=0.015)
    assert 0 < q["kernel_sum_error"] < 0.01


def test_a_misregistered_template_fails_naming_the_figures(pair):
    """A template shifted by 200 px subtracted 'successfully' (kernel sum 11.8, exit 0)."""
    science, template = pair
    shifted = template.replace(image=np.roll(template.image, 200, axis=1))
    with pytest.raises(SubtractionQualityError, match="science.fits: no subtraction passed") as e:
        subtract(science, shifted)
    attempts = e.value.attempts
    assert [a["model"] for a in attempts] == [m for m, _ in simpler_models(SubtractConfig(), True)]
    assert any("residual" in f for f in attempts[0]["failures"])


def test_a_failed_model_is_retried_with_a_simpler_one(pair, caplog):
    """convolveScience on a pair whose template is the sharper one (a deconvolution) leaves
    residuals of 12 sigma, 22% of the stars' signal: each simpler model is tried, and the
    other flavor passes; the result says which model it is and which were rejected."""
    with caplog.at_level(logging.WARNING):
        result = subtract(*pair, SubtractConfig(mode="convolveScience"))
    q = result.quality
    assert result.flavor == "convolveTemplate" and q["model"].startswith("convolveTemplate")
    assert [r["model"].split()[0] for r in q["rejected_models"]] == ["convolveScience"] * 3
    assert "fails its quality gates" in caplog.text


def test_gates_off_trust_every_fit(pair):
    off = SubtractConfig(mode="convolveScience", quality=QualityConfig(doQualityGates=False))
    result = subtract(*pair, off)
    assert result.flavor == "convolveScience" and quality_failures(result.quality) != []


def test_a_nan_block_is_masked_and_the_fit_survives(pair):
    """A 100x100 NaN block in the science gave kernel sum 71.5 from 3 stamps."""
    science, template = pair
    image = science.image.copy()
    image[200:300, 200:300] = np.nan
    result = subtract(science.replace(image=image), template)
    q = result.quality
    assert q["kernel_sum_fitted"] == pytest.approx(0.9, abs=0.02)
    nodata = (result.difference.mask & result.difference.bit("NO_DATA")) != 0
    assert nodata[200:300, 200:300].all() and np.isfinite(result.difference.image).all()


def test_bad_variances_are_masked_and_said(pair, caplog):
    science, template = pair
    var = science.variance.copy()
    var[10:20, 10:20] = 0.0
    var[30:40, 30:40] = -5.0
    var[50, 50] = np.inf
    with caplog.at_level(logging.WARNING):
        result = subtract(science.replace(variance=var), template)
    assert "201 science pixels have a zero, negative or non-finite variance: masked BAD" in (
        caplog.text)
    d = result.difference
    assert (d.variance >= 0).all() and np.isfinite(d.variance).all()
    assert ((d.mask[10:20, 10:20] & d.bit("BAD")) != 0).all()


@pytest.mark.parametrize("variance", [0.0, -1.0, np.nan])
def test_a_variance_plane_that_is_nowhere_positive_is_refused(pair, variance):
    science, template = pair
    bad = science.replace(variance=np.full(science.shape, variance, np.float32))
    with pytest.raises(InputError, match="science.fits: the science's variance plane is "
                                         "nowhere positive"):
        subtract(bad, template)


def test_images_with_no_usable_stars_name_the_file(pair):
    science, template = pair
    for image in (np.zeros(science.shape, np.float32),
                  np.full(science.shape, 1e30, np.float32)):
        with pytest.raises(InputError, match="science.fits: no stars between S/N 10 and 2000"):
            subtract(science.replace(image=image), template)
    every = science.replace(mask=science.mask | science.bit("BAD"))
    with pytest.raises(InputError, match="science.fits: the science has no usable pixel"):
        subtract(every, template)


@pytest.mark.parametrize("name, data, problem", [
    ("off_centre", "delta_at_3_20", "is not centred"),
    ("flat", "ones", "is flat"),
    ("empty", "zeros", "positive"),
])
def test_psf_files_that_are_not_psfs_are_refused(tmp_path, name, data, problem):
    image = np.zeros((25, 25))
    if data == "delta_at_3_20":
        image[3, 20] = 1.0
    elif data == "ones":
        image = np.ones((201, 201))
    path = tmp_path / f"{name}.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image, name="PSF")]).writeto(path)
    with pytest.raises(InputError, match=f"{name}.fits: .*{problem}"):
        read_psf(path)


def test_a_psf_model_that_is_not_a_psf_is_refused(pair):
    science, template = pair
    flat = science.replace(psf=ImagePsf(np.full((201, 201), 1.0)))
    with pytest.raises(InputError, match="science.fits: the science's PSF is flat"):
        subtract(flat, template)


def test_a_kernel_sum_the_stars_leave_undetermined_takes_the_zero_points(tmp_path):
    """On a simulated 512^2 pair whose science is twice as wide as the template (FWHM 7.4
    against 3.75 px), the five kernel sources left fit a kernel sum of 0.88 +- 0.16, where
    the true scale is 0.960. The sum's own error fails the fit, and the constant kernel
    with the zero points' sum passes; the fakes of S/N > 10 clear of saturated stars and
    edges (two) come out right. (Seed 5's pair, used until the tenth session, kept only
    three faint kernel sources once star finding stopped counting a cold column in the
    local sky, and then fails every model's gates.)"""
    from astropy.table import Table

    from gpudiffim.simulate import simulate
    from gpudiffim.warp import template_on_science_grid

    manifest = simulate(tmp_path, "ci", seed=9, workers=1)
    row = manifest[manifest["visit"] == 11692][0]
    science, template = (read_exposure(tmp_path / row[k]) for k in ("science", "template"))
    template, _ = template_on_science_grid(science, template, "cpu")
    result = subtract(science, template)
    q = result.quality
    assert "sum from the zero points" in q["model"]
    failures = q["rejected_models"][0]["failures"]
    assert any("the kernel sources do not fix the photometric scale" in f for f in failures)
    truth_scale = 10 ** (0.4 * (row["zero_point"] - row["template_zero_point"]))
    assert q["kernel_sum_fitted"] == pytest.approx(truth_scale, rel=1e-3)
    sources = dia_sources(result, science)
    truth = Table.read(tmp_path / "truth.ecsv")
    fakes = truth[(truth["visit"] == 11692) & (truth["image"] == "science") & (truth["snr"] > 10)]
    d = result.difference
    blocked = d.bit("SAT", "SAT_TEMPLATE", "EDGE", "NO_DATA")
    fakes = fakes[[(d.mask[int(round(f["y"])), int(round(f["x"]))] & blocked) == 0
                   for f in fakes]]
    assert len(fakes) >= 2
    for fake in fakes:
        near = np.hypot(sources["x"] - fake["x"], sources["y"] - fake["y"]) < 1.5
        assert near.sum() == 1
        row = sources[near][0]
        assert abs(row["psfFlux"] - fake["flux"]) < 3 * row["psfFluxErr"]
