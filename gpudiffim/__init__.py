"""gpudiffim: difference image analysis on GPUs (CuPy) and CPUs (NumPy + pyFFTW)."""

from .backend import get_backend
from .errors import InputError
from .exposure import MASK_PLANES, Exposure, ExposureInfo, mask_bits

__version__ = "0.1.0"
__all__ = ["get_backend", "InputError", "Exposure", "ExposureInfo", "MASK_PLANES", "mask_bits",
           "__version__"]
