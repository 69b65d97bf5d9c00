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


@pytest.mark.parametrize("fwhm", [1.9, 3.0, 4.7, 8.0])
def test_smoothed_variance_follows_the_exact_convolution(backend, fwhm):
    """The kernel sources' noise map, made of box passes instead of a Fourier transform:
    exact on flat sky, and within 8% of var * psf^2 where a bright star's photon noise
    dominates (Moffat beta 3: 2-7% low, its wings widen the boxes; a kernel source's S/N
    threshold is met on sky-dominated noise), from undersampled to wide PSFs."""
    from scipy.signal import fftconvolve

    from gpudiffim.sources import smoothed_variance

    yy, xx = np.mgrid[-15:16, -15:16]
    psf = moffat(xx, yy, fwhm, 3.0)
    psf /= psf.sum()
    total = float(np.sum(psf**2))
    flat = backend.to_host(smoothed_variance(backend, backend.full((96, 96), 100.0,
                                                                   dtype=backend.xp.float32),
                                             psf, total))
    np.testing.assert_allclose(flat[30:66, 30:66], 100.0 * total, rtol=1e-5)
    var = np.full((128, 160), 100.0)
    rng = np.random.default_rng(1)
    centres = rng.integers(20, 108, size=(12, 2))
    for (y, x), f in zip(centres, 10 ** rng.uniform(4, 5, 12)):
        var[y - 15:y + 16, x + 10 - 15:x + 10 + 16] += f * psf
    exact = fftconvolve(var, psf[::-1, ::-1] ** 2, mode="same")
    got = backend.to_host(smoothed_variance(backend, backend.to_device(var, np.float32), psf,
                                            total))
    ratio = np.array([got[y, x + 10] / exact[y, x + 10] for y, x in centres])
    assert np.all(np.abs(ratio - 1) < 0.08), ratio
