"""PSF measurement from stars, against the simulator's true PSF."""

import dataclasses

import numpy as np
import pytest

from gpudiffim.exposure import Exposure
from gpudiffim.io import read_exposure
from gpudiffim.profiles import moffat
from gpudiffim.psf import ImagePsf, PsfMeasurementError, gaussian_psf, measure_psf
from gpudiffim.simulate import PRESETS, simulate

FWHM, BETA = 4.5, 3.0


def _moffat_field(rng, positions, shape=(256, 256), sky_sigma=5.0):
    """Sky-subtracted noise with Moffat stars (FWHM 4.5 px, beta 3) of flux 2e4-1e5 at
    ``positions`` (x, y); stars past the edges are drawn as far as they reach."""
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    image = rng.normal(0.0, sky_sigma, shape)
    for (x, y), flux in zip(positions, rng.uniform(2e4, 1e5, len(positions))):
        image += flux * moffat(xx - x, yy - y, FWHM, BETA)
    var = np.full(shape, sky_sigma**2) + np.maximum(image, 0) / 4.0
    return Exposure.from_arrays(image, None, var)


def _fwhm(psf, x=128, y=128):
    return float(np.mean(psf.fwhm(x, y)))


def test_fwhm_of_a_gaussian():
    fx, fy = gaussian_psf(2.0, e1=0.1).fwhm()
    assert fx == pytest.approx(2 * 2.3548 * np.sqrt(1.1), rel=0.02)
    assert fy == pytest.approx(2 * 2.3548 * np.sqrt(0.9), rel=0.02)


def test_measured_psf_matches_the_true_one(tmp_path):
    cfg = dataclasses.replace(PRESETS["ci"], name="psf", shape=(1024, 1024), star_density=300.0,
                              visits={"g": (11692,)})
    manifest = simulate(tmp_path, cfg, seed=4, workers=1)
    exp = read_exposure(tmp_path / manifest[0]["science"])
    truth = exp.psf
    measured = measure_psf(exp.replace(psf=None))
    # measured (seed 4): 2% of the peak at the centre, 7-8% near the corners; FWHM within
    # 0.7% (before star finding took the sky's mean inside the image only, stars near the
    # edges looked brighter than they are, and the corners were off by 11-19% and 1-7%)
    for (x, y), tol in [((512, 512), 0.05), ((100, 100), 0.12), ((900, 150), 0.12),
                        ((200, 900), 0.12)]:
        t, m = truth.image_at(x, y), measured.image_at(x, y)
        h, c = t.shape[0] // 2, m.shape[0] // 2
        r = min(h, c)
        t, m = t[h - r:h + r + 1, h - r:h + r + 1], m[c - r:c + r + 1, c - r:c + r + 1]
        assert np.abs(m / m.sum() - t / t.sum()).max() < tol * t.max() / t.sum(), (x, y)
        assert np.mean(ImagePsf(m).fwhm()) == pytest.approx(np.mean(truth.fwhm(x, y)), rel=0.03)


def test_measure_psf_under_strict_backend(tmp_path):
    from gpudiffim.backend import get_backend

    cfg = dataclasses.replace(PRESETS["ci"], name="psf", shape=(512, 512), star_density=300.0,
                              visits={"g": (11692,)})
    manifest = simulate(tmp_path, cfg, seed=4, workers=1)
    exp = read_exposure(tmp_path / manifest[0]["science"]).replace(psf=None)
    strict = get_backend("strict")
    on_device = measure_psf(exp.to_backend(strict), backend=strict).image_at(256, 256)
    on_host = measure_psf(exp, backend="cpu").image_at(256, 256)
    np.testing.assert_allclose(on_device, on_host, atol=1e-6 * on_host.max())


def test_kernel_convolved_psf_is_the_psf_through_the_kernel_everywhere():
    """A PSF varying as a quadratic, through a kernel varying as a quadratic: the product
    model is the convolution of the two at every position, not only on its fitting grid."""
    from scipy.signal import fftconvolve

    from gpudiffim.profiles import PsfField
    from gpudiffim.psf import kernel_convolved_psf

    from pairs import gaussian_image

    field = PsfField(fwhm=4.0, beta=3.0, width=500, height=300, gx=0.04, gy=-0.03,
                     curvature=0.02, e1_0=0.03, e1_u=0.02)
    psf = field.model(25)  # a PolynomialPsf of order 2

    shapes = [gaussian_image(15, 1.2, 1.0), gaussian_image(15, 1.5, 0.8),
              gaussian_image(15, 0.8, 1.3), gaussian_image(15, 2.0, 2.0)]

    def kernel_at(x, y):  # a quadratic in position, as a fitted kernel is
        u, v = 2 * x / 499 - 1, 2 * y / 299 - 1
        return shapes[0] + 0.2 * u * shapes[1] + 0.1 * u * v * shapes[2] + 0.15 * v * v * shapes[3]

    model = kernel_convolved_psf(psf, kernel_at, 2, (500, 300))
    assert model.order == 4 and model.shape == (25, 25)
    for x, y in np.random.default_rng(2).uniform((0, 0), (499, 299), (6, 2)):
        full = fftconvolve(psf.image_at(x, y), kernel_at(x, y), mode="full")
        c = full.shape[0] // 2
        want = full[c - 12:c + 13, c - 12:c + 13]
        np.testing.assert_allclose(model.image_at(x, y), want / want.sum(), rtol=1e-8, atol=1e-12)


def test_measured_fwhm_with_stars_touching_every_edge(rng):
    """Stars centred on, just inside and just outside every edge and corner (their stamps
    reach past the image) besides a few inside: the PSF's FWHM comes back to 3%."""
    edge = [(0.3, 60.2), (2.6, 190.7), (255.4, 100.1), (253.2, 30.6), (80.5, 0.4), (170.2, 2.3),
            (120.7, 255.2), (30.1, 253.6), (0.6, 0.2), (255.5, 255.3), (-1.5, 140.0),
            (200.0, 257.0)]
    inside = [(60.3, 70.6), (190.4, 60.2), (128.6, 128.1), (70.2, 190.7), (200.5, 180.4),
              (120.2, 40.3), (40.4, 120.8), (160.6, 110.5)]
    psf = measure_psf(_moffat_field(rng, edge + inside))
    assert _fwhm(psf) == pytest.approx(FWHM, rel=0.03)


def test_measured_fwhm_from_only_eight_stars(rng):
    stars = [(50.3, 60.6), (190.4, 50.2), (128.6, 128.1), (60.2, 200.7), (210.5, 190.4),
             (100.2, 90.3), (160.4, 170.8), (200.6, 110.5)]
    psf = measure_psf(_moffat_field(rng, stars))
    assert _fwhm(psf) == pytest.approx(FWHM, rel=0.03)


def test_three_stars_give_a_gaussian_of_their_fwhm_and_none_an_error(rng, caplog):
    psf = measure_psf(_moffat_field(rng, [(60.3, 70.6), (190.4, 60.2), (128.6, 180.1)]))
    assert "Gaussian of their FWHM" in caplog.text
    assert _fwhm(psf) == pytest.approx(FWHM, rel=0.05)
    with pytest.raises(PsfMeasurementError, match="no star usable"):
        measure_psf(_moffat_field(rng, []))
