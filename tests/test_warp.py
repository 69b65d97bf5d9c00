"""Resampling the template onto the science grid, against stars rendered there directly."""

import numpy as np
import pytest
from astropy.wcs import WCS

from gpudiffim.backend import get_backend
from gpudiffim.exposure import Exposure
from gpudiffim.warp import warp_exposure

N = 192
SIGMA = 2.0  # px: well sampled, as a resampled template should be
STARS = np.array([[40.3, 50.7], [96.0, 96.0], [150.2, 60.9], [70.8, 140.4], [130.5, 150.1]])


def _wcs(dx=0.0, dy=0.0, angle_deg=0.0):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [N / 2 + 0.5 + dx, N / 2 + 0.5 + dy]
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    w.wcs.cd = rot @ np.diag([-1.0, 1.0]) * 0.168 / 3600.0
    return w


def _render(positions, flux=1e4):
    y, x = np.mgrid[:N, :N].astype(float)
    img = np.zeros((N, N))
    for px, py in positions:
        r2 = (x - px) ** 2 + (y - py) ** 2
        img += flux * np.exp(-0.5 * r2 / SIGMA**2) / (2 * np.pi * SIGMA**2)
    return img


def _case(science_wcs):
    """Template with stars on its own grid, and the same stars drawn on the science grid."""
    tmpl_wcs = _wcs()
    template = Exposure.from_arrays(_render(STARS).astype(np.float32), None,
                                    np.full((N, N), 4.0, np.float32), wcs=tmpl_wcs)
    ra, dec = tmpl_wcs.pixel_to_world_values(STARS[:, 0], STARS[:, 1])
    sx, sy = science_wcs.world_to_pixel_values(ra, dec)
    return template, _render(np.column_stack([sx, sy]))


@pytest.mark.parametrize("science_wcs", [_wcs(2.37, -1.61), _wcs(1.3, 0.4, angle_deg=4.0)],
                         ids=["shift (separable taps)", "rotation (general taps)"])
def test_warped_stars_match_stars_drawn_on_the_science_grid(science_wcs):
    template, truth = _case(science_wcs)
    warped, fraction = warp_exposure(template, science_wcs, (N, N), "cpu")
    covered = (warped.mask & warped.bit("NO_DATA")) == 0
    inner = np.zeros((N, N), bool)
    inner[12:-12, 12:-12] = True
    inner &= covered
    peak = truth.max()
    # measured: 0.45% of the peak for both, flux within 0.03%
    assert np.abs(warped.image - truth)[inner].max() < 0.01 * peak
    assert warped.image[inner].sum() == pytest.approx(truth[inner].sum(), rel=0.003)
    # pixels the template does not reach are NO_DATA, and the fraction says how many
    assert 0.9 < fraction < 1.0 and np.mean(covered) == pytest.approx(fraction, abs=0.01)
    assert np.all(warped.image[~covered] == 0)


@pytest.mark.parametrize("science_wcs", [_wcs(2.5, -1.5), _wcs(1.3, 0.4, angle_deg=4.0)],
                         ids=["shift", "rotation"])
def test_warped_variance_is_the_variance_of_warped_noise(science_wcs):
    """Pure noise of known variance, warped: the variance plane (squared weights) matches
    the empirical variance of the warped pixels (measured: 2.47 vs 2.44 for a half-pixel
    shift, 3.16 vs 3.23 rotated; 4.0 before)."""
    rng = np.random.default_rng(7)
    noise = Exposure.from_arrays(rng.normal(0, 2.0, (N, N)).astype(np.float32), None,
                                 np.full((N, N), 4.0, np.float32), wcs=_wcs())
    warped, _ = warp_exposure(noise, science_wcs, (N, N), "cpu")
    inner = (slice(12, -12), slice(12, -12))
    predicted = float(np.median(warped.variance[inner]))
    assert predicted < 0.9 * 4.0  # interpolation averages neighbouring pixels
    assert np.var(warped.image[inner]) == pytest.approx(predicted, rel=0.05)


@pytest.mark.parametrize("science_wcs", [_wcs(2.37, -1.61), _wcs(1.3, 0.4, angle_deg=4.0)],
                         ids=["shift", "rotation"])
def test_warp_under_strict_backend(science_wcs):
    template, _ = _case(science_wcs)
    strict = get_backend("strict")
    on_device, f_dev = warp_exposure(template.to_backend(strict), science_wcs, (N, N), strict)
    on_host, f_host = warp_exposure(template, science_wcs, (N, N), "cpu")
    assert f_dev == f_host
    np.testing.assert_allclose(strict.to_host(on_device.image), on_host.image, atol=1e-3)
    np.testing.assert_array_equal(strict.to_host(on_device.mask), on_host.mask)
