"""gpudiffim: difference image analysis on GPUs (CuPy) and CPUs (NumPy + pyFFTW).

The user-facing API::

    from gpudiffim import read_exposure, subtract, dia_sources
    result = subtract(read_exposure("calexp.fits"), read_exposure("template.fits"))
    sources = dia_sources(result)

Stages live in modules named for what they do (``subtract``, ``detect``, ``measure``,
``warp``, ``kernel_fit``...); each declares its public names in ``__all__``. The names here
load on first use, so the command line starts without NumPy.
"""

__version__ = "0.1.0"

import importlib
import sys
import types

#: where each public name lives; loaded on first use, so that the command line (and any
#: ``import gpudiffim``) starts without NumPy, SciPy, Astropy or the APDB stack
_EXPORTS = {
    "ApdbError": "apdb", "ingest_exposure": "apdb", "make_apdb": "apdb",
    "AssociationConfig": "associate", "get_backend": "backend",
    "DetectionConfig": "detect", "detect": "detect",
    "BackendError": "errors", "GpuDiffimError": "errors", "InputError": "errors",
    "MASK_PLANES": "exposure", "Exposure": "exposure", "ExposureInfo": "exposure",
    "mask_bits": "exposure", "inject": "inject",
    "read_exposure": "io", "read_psf": "io", "write_exposure": "io", "write_psf": "io",
    "KernelFitConfig": "kernel_fit", "KernelFitError": "kernel_fit",
    "MeasureConfig": "measure", "dia_sources": "measure", "measure": "measure",
    "PipelineConfig": "pipeline", "process_pair": "pipeline",
    "ImagePsf": "psf", "PolynomialPsf": "psf", "gaussian_psf": "psf", "measure_psf": "psf",
    "QualityConfig": "quality", "SubtractionQualityError": "quality",
    "RunConfig": "runner", "run": "runner", "SimConfig": "simulate", "simulate": "simulate",
    "SubtractConfig": "subtract", "SubtractionResult": "subtract", "subtract": "subtract",
    "warp_exposure": "warp",
}
#: functions named like their modules: ``gpudiffim.subtract`` is the function, even after
#: ``from gpudiffim.subtract import SubtractConfig`` (which would bind the module there)
_SHADOWED = frozenset(n for n, m in _EXPORTS.items() if n == m)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gpudiffim' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """The package module, refusing to let a submodule import rebind a public function of
    the same name (the import system sets each submodule as an attribute of its parent)."""

    def __setattr__(self, name, value):
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

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
