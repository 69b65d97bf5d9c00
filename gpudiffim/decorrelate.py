"""Decorrelation "afterburner" (Reiss & Lupton 2016, DMTN-021) and the score correction.

Convolving one image with the matching kernel ``k`` correlates the difference's noise.
In Fourier space, with ``s`` and ``t`` the mean pixel variances of the science and
template (in the units each enters the difference) and ``kappa = sum(k)``:

* convolveTemplate, ``D = N - k*R``:
  ``phi(f) = sqrt((s + kappa^2 t) / (s + t |k(f)|^2))``;
* convolveScience, ``D = (k*N - R) / kappa``:
  ``phi(f) = sqrt((kappa^2 s + t) / (s |k(f)|^2 + t))``;
* preconvolution score, ``S = P~*N - k*R``:
  ``phi(f) = sqrt((s + kappa^2 t) |P(f)|^2 / (s |P(f)|^2 + t |k(f)|^2))``,
  which turns the score into the PSF-matched filter of a white-noise difference.

``phi(0) = 1``, so fluxes are kept; the decorrelated difference has white noise of
variance ``s + kappa^2 t`` (``s + t / kappa^2`` for convolveScience). These kernels are
small parameters computed on the host; the image convolution runs on the backend.
"""

from __future__ import annotations

import numpy as np

__all__ = ["decorrelation_kernel"]


def _spectrum(image: np.ndarray, size: int) -> np.ndarray:
    """Fourier transform of a centred odd image, zero-padded to ``size``, centre at 0."""
    pad = np.zeros((size, size))
    h, w = image.shape
    y0, x0 = size // 2 - h // 2, size // 2 - w // 2
    pad[y0:y0 + h, x0:x0 + w] = image
    return np.fft.fft2(np.fft.ifftshift(pad))


def decorrelation_kernel(kernel: np.ndarray, science_var: float, template_var: float,
                         mode: str, psf: np.ndarray | None = None, size: int | None = None
                         ) -> np.ndarray:
    """Real-space decorrelation kernel (odd ``size``, unit sum) for ``mode``:
    ``convolveTemplate``, ``convolveScience`` or ``preconvolve`` (needs the science
    ``psf``, the one the science image was pre-convolved with)."""
    size = size or 2 * max(kernel.shape[0], 0 if psf is None else psf.shape[0]) + 1
    size += 1 - size % 2
    kappa = float(kernel.sum())
    k2 = np.abs(_spectrum(kernel, size)) ** 2
    s, t = float(science_var), float(template_var)
    if mode == "convolveTemplate":
        phi = np.sqrt((s + kappa**2 * t) / (s + t * k2))
    elif mode == "convolveScience":
        phi = np.sqrt((kappa**2 * s + t) / (s * k2 + t))
    elif mode == "preconvolve":
        p2 = np.abs(_spectrum(psf / psf.sum(), size)) ** 2
        tiny = 1e-12 * (s + kappa**2 * t)
        phi = np.sqrt((s + kappa**2 * t) * p2 / (s * p2 + t * k2 + tiny))
        phi /= phi[0, 0]
    else:
        raise ValueError(f"no decorrelation for mode {mode!r}")
    out = np.fft.fftshift(np.real(np.fft.ifft2(phi)))
    return out / out.sum()
