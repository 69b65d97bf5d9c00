"""Shared benchmark fixtures: the backends (pairs: ``harness.simulated_pair``).

Every benchmark that takes ``bench_backend`` runs on the CPU and, where a CUDA device is
usable, on the GPU; the GPU runs time device work to completion (a stream synchronize before
the clock stops). ``bench/gpu.sh`` runs them all on a GPU machine.
"""

import pytest

from gpudiffim.backend import get_backend, gpu_unavailable_reason

_GPU_REASON = gpu_unavailable_reason()

BACKENDS = [
    "cpu",
    pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
        _GPU_REASON is not None, reason=f"no GPU: {_GPU_REASON}")]),
]


@pytest.fixture(params=BACKENDS)
def bench_backend(request):
    """The backend a benchmark runs on."""
    return get_backend(request.param)
