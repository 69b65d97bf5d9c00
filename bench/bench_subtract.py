"""Full subtraction (kernel fit, spatially varying convolution, decorrelation) on CPU.

Pairs come from the built-in simulator (stars, galaxies, sky gradient, differing PSF wings,
template on the science grid), made once per session.
"""

import dataclasses

import pytest

from gpudiffim.backend import get_backend
from gpudiffim.io import read_exposure
from gpudiffim.simulate import PRESETS, simulate
from gpudiffim.subtract import SubtractConfig, subtract


def _pair(tmp_path_factory, shape):
    out = tmp_path_factory.mktemp(f"bench{shape[0]}x{shape[1]}")
    cfg = dataclasses.replace(PRESETS["ci"], name="bench", shape=shape, max_offset=0.0,
                              visits={"g": (11692,)})
    manifest = simulate(out, cfg, seed=2, workers=1)
    row = manifest[0]
    return read_exposure(out / row["science"]), read_exposure(out / row["template"])


@pytest.fixture(scope="module")
def pair_2k(tmp_path_factory):
    return _pair(tmp_path_factory, (2048, 2048))


@pytest.fixture(scope="module")
def pair_hsc(tmp_path_factory):
    return _pair(tmp_path_factory, (4176, 2048))


@pytest.mark.parametrize("mode", ["convolveTemplate", "preconvolve", "zogy"])
def test_subtract_2048x2048(benchmark, pair_2k, mode):
    cpu = get_backend("cpu")
    subtract(*pair_2k, SubtractConfig(mode=mode), cpu)  # plans and caches warm, as in a run
    # ... and the heap at its steady size: a process that subtracts exposure after exposure
    # faults fresh pages in on its first ~3 calls only (2048^2: 24 000, 2 500, 1 900, then 0)
    benchmark.pedantic(subtract, args=(*pair_2k, SubtractConfig(mode=mode), cpu), rounds=3,
                       warmup_rounds=2)


def test_subtract_2048x4176(benchmark, pair_hsc):
    cpu = get_backend("cpu")
    subtract(*pair_hsc, SubtractConfig(), cpu)
    benchmark.pedantic(subtract, args=(*pair_hsc, SubtractConfig(), cpu), rounds=3,
                       warmup_rounds=2)


@pytest.mark.parametrize("psfs", ["given", "measured"])
def test_subtract_2048x2048_psfs(benchmark, pair_2k, psfs):
    """The same subtraction with the PSFs the simulator made, and with none (both measured
    by ``measure_psf`` inside ``subtract``): the difference is what measuring costs."""
    cpu = get_backend("cpu")
    pair = pair_2k if psfs == "given" else tuple(e.replace(psf=None) for e in pair_2k)
    subtract(*pair, SubtractConfig(), cpu)
    benchmark.pedantic(subtract, args=(*pair, SubtractConfig(), cpu), rounds=5,
                       warmup_rounds=2)
