"""Proper image subtraction (zogy): its filters against the analytic optimum, and the flavor
end to end on pairs whose PSFs, flux scale and changes are known."""

import numpy as np
import pytest
from scipy.integrate import quad

from gpudiffim.backend import get_backend
from gpudiffim.detect import significance_image
from gpudiffim.exposure import Exposure
from gpudiffim.psf import ImagePsf
from gpudiffim.subtract import SubtractConfig, subtract
from gpudiffim.zogy import proper_filters, proper_flux_variance

from pairs import gaussian_image


def _analytic_flux_variance(s_n, s_r, v_n, v_r):
    """1 / F_S for Gaussian PSFs of widths s_n, s_r (continuous Fourier transform
    ``exp(-k^2 s^2 / 2)``): ``F_S = int d^2k / (2 pi)^2 |P_n|^2 |P_r|^2 / Den``."""
    def integrand(k):
        an, ar = np.exp(-(k * s_n) ** 2), np.exp(-(k * s_r) ** 2)
        return k / (2 * np.pi) * an * ar / (v_n * ar + v_r * an)
    return 1.0 / quad(integrand, 0, 8.0 / min(s_n, s_r), limit=200, epsrel=1e-10)[0]


@pytest.mark.parametrize("s_n,s_r,v_n,v_r", [(2.0, 2.0, 1.0, 1.0), (2.0, 3.0, 1.0, 0.3),
                                            (3.0, 1.6, 1.0, 1.0), (1.5, 2.5, 4.0, 0.5)])
def test_filters_reach_the_analytic_optimum(s_n, s_r, v_n, v_r):
    """The flux variance of ZOGY's estimate is the analytic optimum for Gaussian PSFs, the
    cropped filters' own noise is that variance, a static source cancels and a new one
    gives its flux."""
    p_n, p_r = gaussian_image(41, s_n), gaussian_image(41, s_r)
    k_n, k_r = proper_filters(p_n, p_r, v_n, v_r)
    truth = _analytic_flux_variance(s_n, s_r, v_n, v_r)
    assert proper_flux_variance(p_n, p_r, v_n, v_r) == pytest.approx(truth, rel=1e-4)
    assert v_n * np.sum(k_n**2) + v_r * np.sum(k_r**2) == pytest.approx(truth, rel=1e-4)
    from scipy.signal import fftconvolve
    new, old = fftconvolve(p_n / p_n.sum(), k_n), fftconvolve(p_r / p_r.sum(), k_r)
    c = new.shape[0] // 2
    assert new[c, c] == pytest.approx(1.0, abs=1e-9)
    assert np.max(np.abs(new - old)) < 1e-4


def test_optimum_limits_are_psf_photometry():
    """A noiseless template leaves the science's own PSF photometry, 4 pi s^2 var; two equal
    images of equal noise, twice it."""
    p = gaussian_image(41, 2.0)
    assert proper_flux_variance(p, p, 1.0, 1e-12) == pytest.approx(4 * np.pi * 4.0, rel=1e-6)
    assert proper_flux_variance(p, p, 1.0, 1.0) == pytest.approx(8 * np.pi * 4.0, rel=1e-6)


def _add(image, x, y, flux, sigma, half=15):
    ix, iy = int(round(x)), int(round(y))
    stamp = flux * gaussian_image(2 * half + 1, sigma, sigma, x - ix, y - iy)
    image[iy - half:iy + half + 1, ix - half:ix + half + 1] += stamp


def psf_pair(s_n, s_r, shape=(512, 512), n_stars=150, n_new=25, snr=15.0, seed=1,
             scale=0.8, offset=40.0, sky_n=400.0, var_r=30.0):
    """A template (Gaussian PSF ``s_r``, counts ``scale`` times the science's for one flux,
    sky ``offset`` above it) and a science (PSF ``s_n``) of the same stars, plus ``n_new``
    point sources in the science of optimal S/N ``snr``. Returns the pair and the new
    sources' (x, y, flux)."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    sci, tmpl = np.zeros(shape), np.zeros(shape)
    for _ in range(n_stars):
        x, y, f = rng.uniform(24, nx - 24), rng.uniform(24, ny - 24), 10 ** rng.uniform(3.5, 5.3)
        _add(sci, x, y, f, s_n)
        _add(tmpl, x, y, f * scale, s_r)
    v_r_sci = var_r / scale**2  # the template's noise in science units
    flux = snr * np.sqrt(proper_flux_variance(gaussian_image(41, s_n), gaussian_image(41, s_r),
                                              sky_n, v_r_sci))
    grid = np.linspace(40, nx - 40, 5)
    new = np.array([(x + rng.uniform(-3, 3), y + rng.uniform(-3, 3), flux)
                    for x in grid for y in grid])[:n_new]
    for x, y, f in new:
        _add(sci, x, y, f, s_n)
    sci_var = np.full(shape, sky_n)
    t_var = np.full(shape, var_r)
    science = Exposure.from_arrays(sci + 1000.0 + rng.normal(size=shape) * np.sqrt(sky_n), None,
                                   sci_var, psf=ImagePsf(gaussian_image(41, s_n)))
    template = Exposure.from_arrays(tmpl + 1000.0 * scale - offset
                                    + rng.normal(size=shape) * np.sqrt(var_r), None, t_var,
                                    psf=ImagePsf(gaussian_image(41, s_r)))
    return science, template, new


@pytest.mark.parametrize("s_n,s_r", [(2.2, 1.6), (1.6, 2.3)])
def test_zogy_finds_new_sources_at_the_optimal_snr_with_their_flux(s_n, s_r):
    """Sharper and wider templates alike: the score's value at each new source is its flux
    (median within 2%, pulls of unit width), its S/N that of proper subtraction (median
    within 5% of the optimum), the static stars cancel to the noise, and empty sky has
    unit pulls."""
    science, template, new = psf_pair(s_n, s_r)
    res = subtract(science, template, SubtractConfig(mode="zogy"), backend="cpu")
    assert res.flavor == "zogy" and res.is_score
    d = res.difference
    snr = significance_image(d, True, "cpu")
    xs, ys = np.round(new[:, 0]).astype(int), np.round(new[:, 1]).astype(int)
    flux, err = d.image[ys, xs], np.sqrt(d.variance[ys, xs])
    assert np.median(flux / new[:, 2]) == pytest.approx(1.0, abs=0.02)
    pulls = (flux - new[:, 2]) / err
    assert 0.6 < np.std(pulls) < 1.5 and abs(np.mean(pulls)) < 0.6
    assert np.median(snr[ys, xs]) == pytest.approx(15.0, rel=0.05)
    good = (d.mask == 0) & (d.variance > 0)
    quiet = good.copy()
    for x, y, _ in new:
        quiet[int(y) - 12:int(y) + 13, int(x) - 12:int(x) + 13] = False
    z = d.image[quiet] / np.sqrt(d.variance[quiet])
    assert np.std(z) == pytest.approx(1.0, abs=0.1)
    # the static stars: at most 2 false detections (the kernel sum's 0.3% error leaves
    # bright stars at -5 sigma, as it does for every flavor), detection's noise model on
    from scipy import ndimage
    false = ndimage.label(quiet & (np.abs(significance_image(d, True, "cpu", res.noise)) > 5))
    assert false[1] <= 2


def test_zogy_beats_convolving_the_science_when_the_template_is_wider():
    """With a wider template, auto convolves the science and loses S/N; zogy keeps the
    optimum (the note's 0.89-0.94 of the science-only figure is what proper subtraction
    reaches, issue 20)."""
    science, template, new = psf_pair(1.5, 2.4, snr=12.0, seed=2)
    xs, ys = np.round(new[:, 0]).astype(int), np.round(new[:, 1]).astype(int)
    found = {}
    for mode in ("auto", "zogy"):
        res = subtract(science, template, SubtractConfig(mode=mode), backend="cpu")
        found[mode] = np.median(significance_image(res.difference, res.is_score, "cpu")[ys, xs])
    assert found["zogy"] == pytest.approx(12.0, rel=0.05)
    assert found["zogy"] > found["auto"]


def test_zogy_runs_under_the_strict_backend():
    science, template, _ = psf_pair(2.0, 1.6, shape=(256, 256), n_stars=60, n_new=5)
    strict = get_backend("strict")
    res = subtract(science, template, SubtractConfig(mode="zogy"), backend=strict)
    assert res.difference.image.device == strict.device
    cpu = subtract(science, template, SubtractConfig(mode="zogy"), backend="cpu")
    got = strict.to_host(res.difference.image)
    assert np.max(np.abs(got - cpu.difference.image)) < 1e-3 * np.max(np.abs(
        cpu.difference.image))


def _varying_pair(seed=4, shape=(768, 768), snr=20.0, sky_n=400.0, var_r=30.0):
    """A science whose PSF widens from FWHM 3.3 to 5.4 px over the detector, a sharper
    template with a constant one, the same 200 stars, and a 7 x 7 grid of new sources in
    the science each of optimal S/N ``snr`` where it is."""
    from gpudiffim.profiles import PsfField
    rng = np.random.default_rng(seed)
    ny, nx = shape
    field_n = PsfField(fwhm=4.2, beta=3.0, width=nx, height=ny, gx=0.15, gy=-0.1,
                       curvature=0.08)
    field_r = PsfField(fwhm=3.0, beta=3.0, width=nx, height=ny)
    sci, tmpl = np.zeros(shape), np.zeros(shape)

    def add(image, field, x, y, flux):
        stamp, y0, x0 = field.stamp(x, y, 20, flux)
        image[y0:y0 + 41, x0:x0 + 41] += stamp

    for _ in range(200):
        x, y = rng.uniform(30, nx - 30, 2)
        flux = 10 ** rng.uniform(3.5, 5.3)
        add(sci, field_n, x, y, flux)
        add(tmpl, field_r, x, y, flux)
    new = []
    for y in np.linspace(40, ny - 40, 7):
        for x in np.linspace(40, nx - 40, 7):
            optimum = proper_flux_variance(field_n.image_at(x, y, 41),
                                           field_r.image_at(x, y, 41), sky_n, var_r)
            new.append((x, y, snr * np.sqrt(optimum)))
            add(sci, field_n, x, y, new[-1][2])
    science = Exposure.from_arrays(sci + rng.normal(size=shape) * np.sqrt(sky_n), None,
                                   np.full(shape, sky_n), psf=field_n.model(41))
    template = Exposure.from_arrays(tmpl + rng.normal(size=shape) * np.sqrt(var_r), None,
                                    np.full(shape, var_r), psf=field_r.model(41))
    return science, template, np.array(new)


def test_zogy_filters_follow_a_varying_psf():
    """The filters are made at the nodes of a 3 x 3 grid and blended: new sources anywhere
    on a detector whose science PSF widens by 60% come back with their flux (median of
    the 49 within 1%, every one within 4 sigma) at the optimal S/N where they are (the
    median within 3% of 20, each within noise of it), the variance as propagated (the
    pull measured over empty sky reads 0.94 here: see docs/algorithm.md section 15). With
    the centre's filters alone, static stars where the PSF differs most left 7 sigma."""
    science, template, new = _varying_pair()
    res = subtract(science, template, SubtractConfig(mode="zogy", doScaleVariance=False),
                   backend="cpu")
    assert res.quality["zogy_filter_nodes"] == 9
    d = res.difference
    xs, ys = np.round(new[:, 0]).astype(int), np.round(new[:, 1]).astype(int)
    flux, err = d.image[ys, xs], np.sqrt(d.variance[ys, xs])
    assert np.median(flux / new[:, 2]) == pytest.approx(1.0, abs=0.01)
    assert np.all(np.abs(flux - new[:, 2]) < 4 * err)
    snr = significance_image(d, True, "cpu")[ys, xs]
    assert np.median(snr) == pytest.approx(20.0, rel=0.03)
    assert np.all(np.abs(snr / 20.0 - 1) < 0.06 + 3 / 20.0), np.round(snr, 1)


@pytest.mark.parametrize("s_n,s_r", [(2.2, 1.6), (1.6, 2.3)])
def test_zogy_reads_no_misregistration_where_there_is_none(s_n, s_r):
    """The pairs have none: the registration fit, with each shift's noise taken through the
    score's correlated noise (the sandwich covariance), reads under 0.003 px (0.0008 and 0;
    0.0067 and 0.0037 with the pixels' noise taken as independent, and 0.15-0.32 px on the
    demo preset's sharp-template detector)."""
    from gpudiffim.measure import dia_sources
    science, template, _ = psf_pair(s_n, s_r, n_stars=250)
    res = subtract(science, template, SubtractConfig(mode="zogy"), backend="cpu")
    rho = res.noise.correlation
    c = rho.shape[0] // 2
    assert rho[c, c] == pytest.approx(1.0) and rho.shape[0] > 5
    assert dia_sources(res, science, backend="cpu").meta["registration_sigma"] < 0.003
