"""Shared fixtures: every engine test runs on each backend that exists here."""

import numpy as np
import pytest

from gpudiffim.backend import get_backend, gpu_unavailable_reason

_GPU_REASON = gpu_unavailable_reason()

BACKENDS = [
    "cpu",
    "strict",
    pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
        _GPU_REASON is not None, reason=f"no GPU: {_GPU_REASON}")]),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend under test (cpu, strict, and gpu where a device exists)."""
    return get_backend(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(20261124)
