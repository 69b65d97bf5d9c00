"""Detection's matched filter where the PSF varies over the detector: optimal S/N at every
point source, unit noise everywhere."""

import numpy as np
import pytest
from astropy.stats import mad_std

from gpudiffim.detect import DetectionConfig, detect
from gpudiffim.exposure import Exposure
from gpudiffim.matched_filter import psf_components
from gpudiffim.psf import PolynomialPsf, gaussian_psf

from pairs import gaussian_image

SHAPE = (384, 640)


def _varying_psf(left=1.3, right=3.0):
    """A PSF that is a Gaussian of sigma ``left`` at the left edge, ``right`` at the right
    one, and their mixture in between (order 1 in x)."""
    g_l, g_r = gaussian_image(31, left), gaussian_image(31, right)
    zero = np.zeros_like(g_l)
    return PolynomialPsf(np.stack([(g_l + g_r) / 2, (g_r - g_l) / 2, zero]), order=1,
                         bbox=(SHAPE[1], SHAPE[0]))


@pytest.fixture(scope="module")
def varying_field():
    """White noise (sigma 1) and 3 x 9 point sources across the detector drawn with the
    PSF where they are, each of optimal S/N 40."""
    rng = np.random.default_rng(3)
    psf = _varying_psf()
    image = rng.normal(size=SHAPE)
    sources = [(x, y) for x in np.linspace(40, SHAPE[1] - 41, 9).astype(int)
               for y in (80, 192, 304)]
    snr = []
    for x, y in sources:
        p = psf.image_at(x, y)
        flux = 40.0 / np.sqrt(np.sum(p * p))
        image[y - 15:y + 16, x - 15:x + 16] += flux * p
        snr.append(flux * np.sqrt(np.sum(p * p)))
    exposure = Exposure.from_arrays(image.astype(np.float32),
                                    variance=np.ones(SHAPE, np.float32), psf=psf)
    return exposure, np.array(sources), np.array(snr)


def _peak_significance(det, sources):
    out = []
    for x, y in sources:
        d = np.hypot(det.x - x, det.y - y)
        out.append(det.significance[np.argmin(d)] if len(d) and d.min() < 3 else 0.0)
    return np.array(out)


def test_a_constant_psf_needs_one_filter():
    assert psf_components(gaussian_psf(2.0)) is None
    almost = _varying_psf(2.0, 2.02)  # 1% wider at one edge: correlation 0.9999
    assert psf_components(almost) is None
    assert psf_components(_varying_psf()).images.shape[0] >= 2


def test_the_filter_follows_the_psf(varying_field):
    """The sources' detection significances are their optimal S/N (40) all across the
    detector (measured 38.5-42.4: a peak of the noise too), where the centre's PSF alone
    falls to 35.9; the significance image is unit noise at both edges, as in the middle."""
    exposure, sources, snr = varying_field
    followed = detect(exposure)
    fixed = detect(exposure, config=DetectionConfig(minFilterCorrelation=0.0))
    got, centre_only = _peak_significance(followed, sources), _peak_significance(fixed, sources)
    assert np.all((got > 0.95 * snr) & (got < 1.08 * snr)), got
    assert np.min(centre_only / snr) < 0.92 and np.mean(got) > np.mean(centre_only) + 0.5
    sig = np.asarray(followed.snr_image)
    blank = np.ones(SHAPE, bool)
    for x, y in sources:
        blank[max(y - 20, 0):y + 21, max(x - 20, 0):x + 21] = False
    blank[:20], blank[-20:], blank[:, :20], blank[:, -20:] = False, False, False, False
    for cols in (slice(0, 150), slice(245, 395), slice(490, 640)):
        assert 0.93 < mad_std(sig[:, cols][blank[:, cols]]) < 1.07
