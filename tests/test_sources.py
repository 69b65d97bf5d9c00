"""Kernel-source selection: peaks, centres, isolation."""

import numpy as np
import pytest

from gpudiffim.profiles import moffat
from gpudiffim.sources import SourceSelectionConfig, local_peaks, select_kernel_sources


def test_local_peaks_match_a_running_maximum(backend, rng):
    """Kernel-source peaks are read from each candidate's 5x5 box only; they must be the
    pixels a full-image running maximum (outside the image ignored) calls peaks."""
    from scipy import ndimage

    snr = ndimage.gaussian_filter(rng.normal(size=(64, 70)), 1.5) * 12.0
    snr[0, 3] = snr[63, 69] = 50.0  # peaks on the border and in a corner
    want = (snr == ndimage.maximum_filter(snr, 5, mode="constant", cval=-np.inf)) & (snr >= 2.0)
    ys, xs = local_peaks(backend, backend.to_device(snr), 2.0)
    got = np.zeros_like(want)
    got[backend.to_host(ys), backend.to_host(xs)] = True
    assert want.sum() > 10
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_bright_isolated_star_is_a_kernel_source(seed):
    """Kernel sources sit at their stars' centres. With each pixel's own variance as the
    noise, a bright Moffat star's S/N has a ring of maxima around its core (signal and photon
    noise both follow the profile), its "peak" landed pixels off centre, and its own other
    maxima made it look blended, so the bright stars never became kernel sources."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-20:21, -20:21]
    psf = moffat(xx, yy, 7.0, 2.5)
    psf /= psf.sum()
    image = np.zeros((256, 256))
    stars = [(128, 128, 3e6), (60, 60, 3e4), (190, 70, 2e4), (70, 190, 3e4)]
    for x, y, f in stars:
        image[y - 20:y + 21, x - 20:x + 21] += f * psf
    var = image + 100.0
    image = image + rng.normal(size=image.shape) * np.sqrt(var)
    cfg = SourceSelectionConfig(maxSnr=1e5, sizeCellX=64, sizeCellY=64)
    pos = select_kernel_sources(image, var, np.zeros(image.shape, bool), psf, cfg, 41, 21)
    assert len(pos) == len(stars), pos
    for x, y, _ in stars:
        assert np.abs(pos - [x, y]).max(axis=1).min() <= 1, (x, y, pos)
