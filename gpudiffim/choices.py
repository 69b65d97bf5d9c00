"""The names a user picks from (subtraction modes, backends), importable without NumPy, so
the command line can offer them before any heavy module loads."""

__all__ = ["MODES", "BACKEND_NAMES"]

#: subtraction flavors: ``auto`` picks convolveTemplate or convolveScience by the PSF widths;
#: ``zogy`` is proper image subtraction (Zackay, Ofek & Gal-Yam 2016)
MODES = ("convolveTemplate", "convolveScience", "auto", "preconvolve", "zogy")
#: array backends (``auto``: the GPU when one works, else the CPU)
BACKEND_NAMES = ("cpu", "gpu", "strict", "auto")
