"""gpudiffim: difference image analysis on GPUs (CuPy) and CPUs (NumPy + pyFFTW)."""

from .backend import get_backend
from .errors import InputError
from .exposure import MASK_PLANES, Exposure, ExposureInfo, mask_bits

__version__ = "0.1.0"
__all__ = ["get_backend", "InputError", "Exposure", "ExposureInfo", "MASK_PLANES", "mask_bits",
           "run", "subtract", "simulate", "__version__"]


def run(*args, **kwargs):
    """Process a repository of exposures (see :func:`gpudiffim.runner.run`)."""
    from .runner import run as _run

    return _run(*args, **kwargs)


def subtract(*args, **kwargs):
    """PSF-match and subtract (see :func:`gpudiffim.subtract.subtract`)."""
    from .subtract import subtract as _subtract

    return _subtract(*args, **kwargs)


def simulate(*args, **kwargs):
    """Write the built-in simulated survey (see :func:`gpudiffim.simulate.simulate`)."""
    from .simulate import simulate as _simulate

    return _simulate(*args, **kwargs)
