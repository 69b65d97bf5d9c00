"""The noise model against Monte Carlo truth: correlated noise through the filters, spread
photon noise, and the kernel's own error."""

import numpy as np
from scipy.signal import fftconvolve

from gpudiffim.backend import get_backend
from gpudiffim.decorrelate import decorrelation_kernel
from gpudiffim.detect import detect
from gpudiffim.exposure import Exposure
from gpudiffim.noise import (
    NoiseModel,
    decorrelated_variance,
    filtered_variance,
    registration_scale,
    residual_scale,
)
from gpudiffim.psf import ImagePsf

from pairs import gaussian_image


def _gauss(size, sigma, dx=0.0, stretch=1.0):
    g = gaussian_image(size, sigma * stretch, sigma, dx=dx)
    return g / g.sum()


def test_filtered_variance_matches_monte_carlo(backend):
    """Two noise images through their own filters (as a convolveScience difference takes
    the science through phi * k and the template through phi), a bright source's photon
    noise in one of them: the weighted sums' scatter over many noise draws is what
    ``filtered_variance`` says, and far above the per-pixel variances summed alone."""
    rng = np.random.default_rng(4)
    shape, S = (60, 60), 15
    yy, xx = np.mgrid[:60, :60]
    # a source off the first stamp's centre: the filters' orientation counts
    v_sci = 100.0 + 4000.0 * np.exp(-0.5 * ((xx - 32) ** 2 + (yy - 29) ** 2) / 2.0**2)
    v_tmpl = np.full(shape, 30.0)
    g_sci, g_tmpl = _gauss(11, 1.4, dx=1.5, stretch=1.4), _gauss(5, 0.6)  # g_sci lopsided
    xs, ys = np.array([30, 20, 41]), np.array([28, 35, 22])
    psf = _gauss(S, 1.8)
    weights = np.stack([psf / np.sum(psf * psf)] * 2 + [np.ones((S, S))])  # PSF, PSF, box
    xs, ys = np.r_[xs[:2], xs[0]], np.r_[ys[:2], ys[0]]
    h = S // 2
    sums = []
    for _ in range(3000):
        d = (fftconvolve(rng.normal(size=shape) * np.sqrt(v_sci), g_sci, mode="same")
             + fftconvolve(rng.normal(size=shape) * np.sqrt(v_tmpl), g_tmpl, mode="same"))
        sums.append([np.sum(w * d[y - h:y + h + 1, x - h:x + h + 1])
                     for w, x, y in zip(weights, xs, ys)])
    measured = np.var(np.array(sums), axis=0)
    paths = ((backend.to_device(v_sci), g_sci), (backend.to_device(v_tmpl), g_tmpl))
    predicted = backend.to_host(filtered_variance(
        backend, backend.to_device(weights.astype(np.float32)), paths, xs, ys))
    np.testing.assert_allclose(predicted, measured, rtol=0.08)  # 3000 draws: ~2.6% each
    # the per-pixel variance of the difference, summed as if independent
    v_diff = (fftconvolve(v_sci, g_sci**2, mode="same")
              + fftconvolve(v_tmpl, g_tmpl**2, mode="same"))
    naive = [np.sum(w * w * v_diff[y - h:y + h + 1, x - h:x + h + 1])
             for w, x, y in zip(weights, xs, ys)]
    # measured 24 000 and 112 000 against 1 600 and 5 200
    assert measured[0] > 1.5 * naive[0] and measured[2] > 2 * naive[2], (measured, naive)


def test_decorrelated_variance_follows_spread_photon_noise():
    """Monte Carlo truth: a sharp bright star's photon noise, convolved with the matching
    kernel and then the decorrelation kernel, has the variance the difference plane
    carries, on the star and in its wings, and the white value in empty sky."""
    rng = np.random.default_rng(0)
    n = 65
    star = 4e5 * gaussian_image(n, 1.2)
    v_src, v_tgt = 100.0 + star, np.full((n, n), 80.0)
    k = gaussian_image(21, 2.0)
    phi = decorrelation_kernel(k, 100.0, 80.0, "convolveScience")
    predicted = decorrelated_variance(get_backend("cpu"), v_tgt.astype(np.float32),
                                       v_src.astype(np.float32), phi, k)
    draws = []
    for _ in range(800):
        src = rng.normal(size=(n, n)) * np.sqrt(v_src)
        tgt = rng.normal(size=(n, n)) * np.sqrt(v_tgt)
        draws.append(fftconvolve(fftconvolve(src, k, mode="same") - tgt, phi, mode="same"))
    empirical = np.var(np.array(draws), axis=0)
    c = n // 2
    for r in (0, 2, 4, 6, 9):
        assert abs(predicted[c, c + r] / empirical[c, c + r] - 1) < 0.1, r
    white = 100.0 + 80.0  # kappa = 1 here
    assert abs(predicted[5, 5] / white - 1) < 0.03
    # the images' own variance planes added pixel by pixel would put the sharp star's
    # photon noise, undiluted by the kernel, on its core: 58x too much here
    assert predicted[c, c] < 0.1 * (white + star[c, c])


def test_residual_scale_recovers_the_excess_variance(backend, rng):
    """Pixels whose noise carries ``s2 * power`` beyond the variance plane near a few
    "stars": the scale comes back as ``s2``, and one star far noisier than the rest (a
    variable one among the kernel sources) does not move it."""
    shape, box, s2 = (400, 400), 31, 4e-4
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    stars = np.array([[60 + 70 * i, 60 + 55 * j] for i in range(5) for j in range(6)])
    power = np.zeros(shape)
    for k, (x, y) in enumerate(stars):
        power += (1 + k % 4) * 1e4 * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / 8.0**2)
    var = np.full(shape, 20.0)
    extra = s2 * power
    extra[(np.abs(xx - stars[7, 0]) < 16) & (np.abs(yy - stars[7, 1]) < 16)] *= 100.0
    image = rng.normal(size=shape) * np.sqrt(var + extra)
    dev = [backend.to_device(a.astype(np.float32)) for a in (image, var, power)]
    good = backend.to_device(np.ones(shape, bool))
    got = residual_scale(backend, *dev, good, stars, box)
    assert abs(got / s2 - 1) < 0.1, got  # measured 1.04
    quiet = residual_scale(backend, backend.to_device((rng.normal(size=shape)
                                                       * np.sqrt(var)).astype(np.float32)),
                           dev[1], dev[2], good, stars, box)
    assert quiet < 0.05 * s2, quiet


def _star_field(shape, stars, fluxes, sigma, shifts=None):
    """Gaussian stars (``sigma`` px) at ``stars`` (x, y) plus ``shifts``, on ``shape``."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    out = np.zeros(shape)
    shifts = np.zeros((len(stars), 2)) if shifts is None else shifts
    for (x, y), f, (dx, dy) in zip(stars, fluxes, shifts):
        out += f / (2 * np.pi * sigma**2) * np.exp(
            -0.5 * ((xx - x - dx) ** 2 + (yy - y - dy) ** 2) / sigma**2)
    return out


def _misregistered_pair(rng, sigma_shift, shape=(520, 520), sky=20.0):
    """A template of 49 stars (fluxes 2e4-3e5, PSF sigma 1.8 px, noiseless; widened by the
    shifts' spread, as a kernel fitted on those stars widens it) and a difference whose
    stars moved by Gaussian shifts of ``sigma_shift`` px per axis, with the science's sky
    and photon noise (gain 1) in it and in its variance; one star also 30% brighter (a
    variable among the kernel sources)."""
    stars = np.array([[50 + 70 * i, 50 + 70 * j] for i in range(7) for j in range(7)])
    fluxes = 2e4 * 15 ** rng.uniform(size=len(stars))
    shifts = rng.normal(scale=sigma_shift, size=(len(stars), 2))
    template = _star_field(shape, stars, fluxes, np.hypot(1.8, sigma_shift))
    science_fluxes = fluxes.copy()
    science_fluxes[10] *= 1.3
    science = _star_field(shape, stars, science_fluxes, 1.8, shifts)
    var = sky + science
    diff = science - template + rng.normal(size=shape) * np.sqrt(var)
    return stars, template, diff, var, shifts


def test_registration_scale_recovers_the_shift_spread(backend, rng):
    """Stars moved by shifts drawn from a Gaussian of 0.3 px per axis: the scale measured
    from their residuals in the difference is that spread squared (each star one draw,
    whatever its brightness; a variable star does not count as a shift), and an exact
    registration gives next to nothing."""
    good = backend.to_device(np.ones((520, 520), bool))
    one = np.ones((1, 1))
    for truth in (0.3, 0.0):
        stars, template, diff, var, _ = _misregistered_pair(rng, truth)
        dev = [backend.to_device(a.astype(np.float32)) for a in (diff, var, template)]
        got = registration_scale(backend, dev[0], dev[1], good, dev[2], one, stars, 21)
        if truth:
            assert abs(np.sqrt(got) / truth - 1) < 0.2, np.sqrt(got)  # measured 0.146 px
        else:
            assert np.sqrt(got) < 0.01, np.sqrt(got)  # shift noise ~0.005-0.05 px per star


def test_detection_discounts_misregistered_stars(backend, rng):
    """The same misregistered stars leave dipoles the noise planes alone call significant;
    with the template in the noise model none is detected but for a star shifted beyond
    3 sigma (1.1 px; one of the 49 here), while the variable star and point sources added
    to the difference (S/N 8-30, away from the stars) all are."""
    stars, template, diff, var, shifts = _misregistered_pair(rng, 0.3)
    new = np.array([[85, 85], [225, 155], [365, 435], [435, 295]])
    diff = diff + _star_field(diff.shape, new, [400.0, 700.0, 1000.0, 1500.0], 1.8)
    exposure = Exposure.from_arrays(diff.astype(np.float32), variance=var.astype(np.float32),
                                    psf=ImagePsf(gaussian_image(25, 1.8)))
    noise = NoiseModel(calibrate_at=stars,
                       registration=(backend.to_device(template.astype(np.float32)),
                                     np.ones((1, 1))))
    plain = detect(exposure, backend=backend)
    found = detect(exposure, backend=backend, noise=noise)

    def near(det, points, radius=10):
        return [bool(np.any(np.hypot(det.x - x, det.y - y) < radius)) for x, y in points]

    static = np.ones(len(stars), bool)
    static[10] = False  # star 10 did change: it must be found
    typical = static & (np.hypot(*shifts.T) < 3 * 0.3)
    assert sum(near(plain, stars[static])) >= 5  # measured 7, of S/N up to 12
    assert not any(near(found, stars[typical])), near(found, stars[typical])
    assert all(near(found, np.r_[new, stars[10:11]], 3)), (found.x, found.y)
    assert len(found) <= len(new) + 1 + np.sum(static & ~typical)
    assert abs(np.sqrt(found.registration_scale) / 0.3 - 1) < 0.2
