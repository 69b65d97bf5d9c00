"""gpudiffim: difference image analysis on GPUs (CuPy) and CPUs (NumPy + pyFFTW).

The user-facing API::

    from gpudiffim import read_exposure, subtract, dia_sources
    result = subtract(read_exposure("calexp.fits"), read_exposure("template.fits"))
    sources = dia_sources(result)

Stages live in modules named for what they do (``subtract``, ``detect``, ``measure``,
``warp``, ``kernel_fit``...); each declares its public names in ``__all__``.
"""

__version__ = "0.1.0"

# The function bindings below come after every submodule has been imported, so that
# ``gpudiffim.subtract`` (and ``simulate``, ``inject``) stays the function even after
# ``from gpudiffim.subtract import SubtractConfig``: a submodule already imported is not
# bound onto the package again.
from .apdb import ApdbError, ingest_exposure, make_apdb  # noqa: E402
from .associate import AssociationConfig  # noqa: E402
from .backend import get_backend  # noqa: E402
from .detect import DetectionConfig, detect  # noqa: E402
from .errors import BackendError, GpuDiffimError, InputError  # noqa: E402
from .exposure import MASK_PLANES, Exposure, ExposureInfo, mask_bits  # noqa: E402
from .inject import inject  # noqa: E402
from .io import read_exposure, read_psf, write_exposure, write_psf  # noqa: E402
from .kernel_fit import KernelFitConfig, KernelFitError  # noqa: E402
from .measure import MeasureConfig, dia_sources, measure  # noqa: E402
from .pipeline import PipelineConfig, process_pair  # noqa: E402
from .psf import ImagePsf, PolynomialPsf, gaussian_psf, measure_psf  # noqa: E402
from .quality import QualityConfig, SubtractionQualityError  # noqa: E402
from .runner import RunConfig, run  # noqa: E402
from .simulate import SimConfig, simulate  # noqa: E402
from .subtract import SubtractConfig, SubtractionResult, subtract  # noqa: E402
from .warp import warp_exposure  # noqa: E402

__all__ = [
    "__version__",
    # data
    "Exposure", "ExposureInfo", "MASK_PLANES", "mask_bits", "ImagePsf", "PolynomialPsf",
    "gaussian_psf", "measure_psf",
    # input and output
    "read_exposure", "write_exposure", "read_psf", "write_psf",
    # the stages
    "warp_exposure", "subtract", "SubtractConfig", "SubtractionResult", "KernelFitConfig",
    "QualityConfig",
    "detect", "DetectionConfig", "measure", "MeasureConfig", "dia_sources",
    "process_pair", "PipelineConfig",
    # the batch runner
    "run", "RunConfig",
    # association and the APDB
    "make_apdb", "ingest_exposure", "AssociationConfig",
    # simulation and fakes
    "simulate", "SimConfig", "inject",
    # backends and errors
    "get_backend", "GpuDiffimError", "InputError", "BackendError", "KernelFitError",
    "SubtractionQualityError", "ApdbError",
]
