"""Decorrelation kernels."""

import numpy as np
from scipy.signal import fftconvolve

from gpudiffim.convolve import kernel_reach
from gpudiffim.decorrelate import decorrelation_kernel

from pairs import gaussian_image


def test_score_decorrelation_by_matching_is_compact():
    """With a sharper template the score's correction equals convolveTemplate's for the
    fitted kernel wherever the pre-filter passes signal, but has compact support: the
    ratio form rang out to ~100 px and its EDGE band masked 29% of a 2048^2 score (12%
    now, the same false detections on 12 no-change pairs)."""
    psf = gaussian_image(41, 2.2)
    k = 0.9 * gaussian_image(31, 1.1, 1.3)
    pre = np.flip(psf) / psf.sum()
    ratio = decorrelation_kernel(fftconvolve(pre, k), 100.0, 10.0, "preconvolve", psf=psf)
    compact = decorrelation_kernel(k, 100.0, 10.0, "convolveTemplate")
    n = ratio.shape[0]
    # compare what each does to pre-filtered data: the spectra times the pre-filter's
    through = [np.abs(np.fft.fft2(fftconvolve(phi, pre), s=(n + 64, n + 64)))
               for phi in (ratio, compact)]
    assert np.max(np.abs(through[0] - through[1])) < 1e-3 * np.max(through[1])
    reach = kernel_reach(compact), kernel_reach(ratio)
    assert reach[0] <= 12 < reach[1] // 2, reach
