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
    # chunks of (n_c, nb + 1, S*S), as (n, S*S, nb + 1)
    design = np.concatenate([backend.to_host(d) for d in stamps.design]).transpose(0, 2, 1)
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


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_term_maps_from_one_dimensional_factors(backend, rng, order):
    """The kernel's power over the detector (sum_ij G_ij w_i w_j) and any polynomial
    (sum_i c_i w_i: kernel sum, background), built from the term images' 1-D Chebyshev
    factors, equal the sums over the term images themselves."""
    from gpudiffim.kernel_fit import linear_term_map, quadratic_term_map, spatial_term_images
    from gpudiffim.psf import polynomial_terms

    n = len(polynomial_terms(order))
    a = rng.normal(size=(n, n))
    gram = a @ a.T
    shape, bbox = (37, 53), (60, 40)  # a bbox other than the image: the map follows it
    w = backend.to_host(spatial_term_images(shape, bbox, order, backend)).astype(float)
    want = np.einsum("ij,iyx,jyx->yx", gram, w, w)
    got = backend.to_host(quadratic_term_map(gram, shape, bbox, order, backend))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    c = rng.normal(size=n)
    want = np.tensordot(c, w, axes=1)
    got = backend.to_host(linear_term_map(c, shape, bbox, order, backend))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
