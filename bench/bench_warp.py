"""Template resampling onto the science grid (Lanczos-3) on each backend."""

import numpy as np
import pytest
from astropy.wcs import WCS
from harness import synchronized

from gpudiffim.exposure import Exposure
from gpudiffim.warp import warp_exposure

SHAPE = (2048, 1024)


def _wcs(angle_deg=0.0, shift=(0.0, 0.0)):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [SHAPE[1] / 2 + shift[0], SHAPE[0] / 2 + shift[1]]
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    w.wcs.cd = rot @ np.diag([-1.0, 1.0]) * 0.168 / 3600.0
    return w


@pytest.fixture(scope="module")
def template():
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 10.0, SHAPE).astype(np.float32)
    return Exposure.from_arrays(image, None, np.full(SHAPE, 100.0, np.float32), wcs=_wcs())


@pytest.mark.parametrize("angle", [0.0, 0.3], ids=["shift (separable taps)", "rotation 0.3 deg"])
def test_warp_1024x2048(benchmark, template, angle, bench_backend):
    science_wcs = _wcs(angle, shift=(3.3, -2.7))
    benchmark.pedantic(synchronized(bench_backend, warp_exposure),
                       args=(template.upload(bench_backend), science_wcs, SHAPE, bench_backend),
                       rounds=3, warmup_rounds=1)
