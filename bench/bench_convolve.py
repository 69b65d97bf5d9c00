"""FFT convolution throughput on each backend (the CPU: pyFFTW, all cores)."""

import numpy as np
import pytest
from harness import synchronized

from gpudiffim.convolve import convolve_exposure, fft_convolve


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(2048, 4096)).astype(np.float32),
            np.zeros((2048, 4096), np.int32), np.ones((2048, 4096), np.float32))


def test_convolve_exposure_2048x4096(benchmark, frame, bench_backend):
    planes = [bench_backend.to_device(a) for a in frame]
    kernel = np.ones((21, 21), np.float32) / 441
    benchmark(synchronized(bench_backend, convolve_exposure), *planes, kernel, bench_backend)


def test_convolve_six_kernels_2048x4096(benchmark, frame, bench_backend):
    image = bench_backend.to_device(frame[0])
    kernels = np.ones((6, 21, 21), np.float32) / 441
    benchmark(synchronized(bench_backend, fft_convolve), image, kernels, bench_backend)
