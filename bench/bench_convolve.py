"""FFT convolution throughput on the CPU backend (pyFFTW, all cores)."""

import numpy as np
import pytest

from gpudiffim.backend import get_backend
from gpudiffim.convolve import convolve_exposure, fft_convolve


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(2048, 4096)).astype(np.float32),
            np.zeros((2048, 4096), np.int32), np.ones((2048, 4096), np.float32))


def test_convolve_exposure_2048x4096(benchmark, frame):
    cpu = get_backend("cpu")
    kernel = np.ones((21, 21), np.float32) / 441
    benchmark(convolve_exposure, *frame, kernel, cpu)


def test_convolve_six_kernels_2048x4096(benchmark, frame):
    cpu = get_backend("cpu")
    kernels = np.ones((6, 21, 21), np.float32) / 441
    benchmark(fft_convolve, frame[0], kernels, cpu)
