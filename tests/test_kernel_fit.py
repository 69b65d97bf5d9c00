"""The kernel fit's stamp convolutions."""

import numpy as np
import pytest
from scipy.signal import fftconvolve

from gpudiffim.basis import alard_lupton_basis
from gpudiffim.kernel_fit import KernelFitConfig, build_stamps


@pytest.mark.parametrize("fwhms", [(3.0, 4.5), (4.5, 3.0), (4.0, 4.1)],
                         ids=["convolution", "deconvolution", "equal-with-wings"])
def test_separable_stamp_convolution_matches_direct_convolution(backend, rng, fwhms):
    """The fit convolves each stamp with the basis in two 1-D passes per Gaussian, then
    mixes the raw products into the zero-sum basis. Every column of the design must equal
    the stamp convolved with that basis kernel (scipy, float64)."""
    basis = alard_lupton_basis(*fwhms)
    assert basis.factors is not None
    config = KernelFitConfig(stampSize=21)
    S, K = config.stampSize, basis.size
    image = rng.normal(100.0, 10.0, (160, 160))
    image[70:90, 60:100] += 5000.0 * rng.random((20, 40))  # structure, on a sky
    positions = np.array([[60, 60], [100, 80], [85, 110]])
    stamps = build_stamps(backend.to_device(image.astype(np.float32)),
                          backend.to_device(image.astype(np.float32)),
                          backend.to_device(np.ones_like(image, np.float32)),
                          backend.to_device(np.zeros(image.shape, bool)),
                          positions, basis, config, backend)
    design = backend.to_host(stamps.design)  # (n, S*S, nb + 1)
    L = S + K - 1
    worst = 0.0
    for s, (x, y) in enumerate(positions):
        src = image[y - L // 2:y + L // 2 + 1, x - L // 2:x + L // 2 + 1]
        for j, k in enumerate(basis.kernels):
            want = fftconvolve(src, k, mode="valid").ravel()
            worst = max(worst, np.abs(design[s, :, j] - want).max() / np.abs(want).max())
    assert np.allclose(design[..., -1], 1.0)  # the background column
    assert worst < 2e-5, worst  # float32 passes


def test_local_peaks_match_a_running_maximum(backend, rng):
    """Kernel-source peaks are read from each candidate's 5x5 box only; they must be the
    pixels a full-image running maximum (outside the image ignored) calls peaks."""
    from scipy import ndimage

    from gpudiffim.kernel_fit import _local_peaks

    snr = ndimage.gaussian_filter(rng.normal(size=(64, 70)), 1.5) * 12.0
    snr[0, 3] = snr[63, 69] = 50.0  # peaks on the border and in a corner
    want = (snr == ndimage.maximum_filter(snr, 5, mode="constant", cval=-np.inf)) & (snr >= 2.0)
    ys, xs = _local_peaks(backend, backend.to_device(snr), 2.0)
    got = np.zeros_like(want)
    got[backend.to_host(ys), backend.to_host(xs)] = True
    assert want.sum() > 10
    np.testing.assert_array_equal(got, want)
