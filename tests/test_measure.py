"""Photometric errors of sums over a difference whose noise the kernels correlated."""

import numpy as np

from gpudiffim.measure import _filtered_variance

from pairs import gaussian_image


def _gauss(size, sigma, dx=0.0, stretch=1.0):
    g = gaussian_image(size, sigma * stretch, sigma, dx=dx)
    return g / g.sum()


def test_filtered_variance_matches_monte_carlo(backend):
    """Two noise images through their own filters (as a convolveScience difference takes
    the science through phi * k and the template through phi), a bright source's photon
    noise in one of them: the weighted sums' scatter over many noise draws is what
    ``_filtered_variance`` says, and far above the per-pixel variances summed alone."""
    from scipy.signal import fftconvolve

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
    predicted = backend.to_host(_filtered_variance(
        backend, backend.to_device(weights.astype(np.float32)), paths, xs, ys))
    np.testing.assert_allclose(predicted, measured, rtol=0.08)  # 3000 draws: ~2.6% each
    # the per-pixel variance of the difference, summed as if independent
    v_diff = (fftconvolve(v_sci, g_sci**2, mode="same") + fftconvolve(v_tmpl, g_tmpl**2, mode="same"))
    naive = [np.sum(w * w * v_diff[y - h:y + h + 1, x - h:x + h + 1])
             for w, x, y in zip(weights, xs, ys)]
    # measured 24 000 and 112 000 against 1 600 and 5 200
    assert measured[0] > 1.5 * naive[0] and measured[2] > 2 * naive[2], (measured, naive)


def test_residual_term_makes_flux_errors_cover_a_smooth_residual():
    """A difference whose noise is white plus a residual smooth on the PSF's scale (here
    an offset over the whole stamp, of variance ``scale * power``): PSF and aperture
    fluxes of a source scatter by what their errors say once the residual term is in, and
    by several times more without it (measured pulls 1.08 / 1.09 and 5.8 / 11.5)."""
    from astropy.stats import mad_std

    from gpudiffim.detect import DetectionConfig, detect
    from gpudiffim.exposure import Exposure
    from gpudiffim.measure import measure
    from gpudiffim.psf import ImagePsf

    rng = np.random.default_rng(8)
    shape, var, scale, power = (64, 64), 100.0, 0.01, 1e4
    psf = _gauss(21, 1.5)
    source = np.zeros(shape)
    source[32 - 10:32 + 11, 30 - 10:30 + 11] = 2e4 * psf
    power_map = np.full(shape, power, np.float32)
    pulls = {True: [], False: []}
    for _ in range(300):
        img = source + rng.normal(size=shape) * np.sqrt(var) + rng.normal() * np.sqrt(scale * power)
        diff = Exposure.from_arrays(img.astype(np.float32), None,
                                    np.full(shape, var, np.float32), psf=ImagePsf(psf))
        det = detect(diff, config=DetectionConfig(doResidualVariance=False))
        for use in (True, False):
            t = measure(diff, det, residual=(power_map, scale) if use else None)
            t = t[~t["sky_source"]]
            i = np.argmin(np.hypot(t["x"] - 30, t["y"] - 32))
            pulls[use].append([t["psfFlux"][i], t["psfFluxErr"][i], t["apFlux"][i],
                               t["apFluxErr"][i]])
    out = {}
    for use, rows in pulls.items():
        f, ef, a, ea = np.array(rows).T
        out[use] = np.array([(f - 2e4) / ef, (a - np.mean(a)) / ea]).T  # PSF flux: unbiased
    with_term, without = out[True], out[False]
    assert np.all(np.abs(mad_std(with_term, axis=0) - 1) < 0.12), mad_std(with_term, axis=0)
    assert np.all(mad_std(without, axis=0) > 2), mad_std(without, axis=0)
