"""Full subtraction (kernel fit, spatially varying convolution, decorrelation) on each backend.

Pairs come from the built-in simulator (stars, galaxies, sky gradient, differing PSF wings,
template on the science grid), made once per session.
"""

import pytest
from harness import simulated_pair, synchronized

from gpudiffim.subtract import SubtractConfig, subtract


@pytest.fixture(scope="module")
def pair_2k(tmp_path_factory):
    return simulated_pair(tmp_path_factory, (2048, 2048))


@pytest.fixture(scope="module")
def pair_hsc(tmp_path_factory):
    return simulated_pair(tmp_path_factory, (4176, 2048))


def _timed(benchmark, backend, pair, config, rounds=3):
    pair = tuple(e.upload(backend) for e in pair)
    run = synchronized(backend, subtract)
    run(*pair, config, backend)  # plans and caches warm, as in a run
    # ... and the heap at its steady size: a process that subtracts exposure after exposure
    # faults fresh pages in on its first ~3 calls only (2048^2: 24 000, 2 500, 1 900, then 0)
    benchmark.pedantic(run, args=(*pair, config, backend), rounds=rounds, warmup_rounds=2)


@pytest.mark.parametrize("mode", ["convolveTemplate", "preconvolve", "zogy"])
def test_subtract_2048x2048(benchmark, pair_2k, mode, bench_backend):
    _timed(benchmark, bench_backend, pair_2k, SubtractConfig(mode=mode))


def test_subtract_2048x4176(benchmark, pair_hsc, bench_backend):
    _timed(benchmark, bench_backend, pair_hsc, SubtractConfig())


@pytest.mark.parametrize("psfs", ["given", "measured"])
def test_subtract_2048x2048_psfs(benchmark, pair_2k, psfs, bench_backend):
    """The same subtraction with the PSFs the simulator made, and with none (both measured
    by ``measure_psf`` inside ``subtract``): the difference is what measuring costs."""
    pair = pair_2k if psfs == "given" else tuple(e.replace(psf=None) for e in pair_2k)
    _timed(benchmark, bench_backend, pair, SubtractConfig(), rounds=5)
