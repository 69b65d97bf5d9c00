"""Proper image subtraction (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27): its filters.

With the template flux-matched to the science (a source gives both the same counts) and the
two images' noise variances ``s_n``, ``s_r``, ZOGY's matched-filter statistic for a new
point source is ``S = k_n * N - k_r * R`` with, in Fourier space,

    k_n = conj(P_n) |P_r|^2 / Den,    k_r = conj(P_r) |P_n|^2 / Den,
    Den = s_n |P_r|^2 + s_r |P_n|^2,

the proper difference ``D = (P_r N - P_n R) / sqrt(Den)`` (white noise) correlated with its
own point-source shape. A static source cancels exactly (``k_n P_n = k_r P_r``). Divided by
``F_S = mean(|P_n|^2 |P_r|^2 / Den)``, its value for a unit point source, ``S`` is the
PSF-photometry image: its value at a source is the source's flux, with variance ``1/F_S`` for
white noise and ``V_n * k_n^2 + V_r * k_r^2`` per pixel from the variance planes.
:func:`proper_filters` returns ``k_n / F_S`` and ``k_r / F_S`` as small real kernels;
:func:`proper_filters_over` makes them where the PSFs vary, at the nodes of a grid whose
tent-shaped weights interpolate between them. ``docs/algorithm.md`` (section 15) says how
the flavor uses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import fftconvolve

from .backend import next_fast_len
from .convolve import kernel_reach

__all__ = ["proper_filters", "proper_flux_variance", "ProperFilters", "proper_filters_over",
           "tent_weights", "proper_correlation", "optimal_snr_at"]

#: share of each filter's absolute weight the returned kernels keep (the rest is cropped)
FILTER_FRACTION = 0.99999


def _spectra(psf_science: np.ndarray, psf_template: np.ndarray, size: int):
    """Both PSFs (unit sum) centred at pixel (0, 0) of a ``size`` square, transformed."""
    out = []
    for psf in (psf_science, psf_template):
        psf = np.asarray(psf, float) / np.sum(psf)
        grid = np.zeros((size, size))
        h, w = psf.shape
        grid[:h, :w] = psf
        out.append(np.fft.fft2(np.roll(grid, (-(h // 2), -(w // 2)), axis=(0, 1))))
    return out


def _grid_size(*psfs) -> int:
    """A square on which the filters do not wrap: four PSF widths."""
    return next_fast_len(4 * max(max(p.shape) for p in psfs))


def proper_filters(psf_science: np.ndarray, psf_template: np.ndarray, science_var: float,
                   template_var: float) -> tuple[np.ndarray, np.ndarray]:
    """ZOGY's filters for the flux-matched science and template, in flux units.

    Parameters
    ----------
    psf_science, psf_template : ndarray
        The two PSF images (odd, centred; normalised here).
    science_var, template_var : float
        Each image's noise variance per pixel (the template's in science units).

    Returns
    -------
    k_n, k_r : ndarray
        Odd square kernels such that ``k_n * N - k_r * R`` (convolutions) is the PSF flux
        of a new point source at its position, cropped to hold all but 1e-5 of their
        absolute weight and scaled so the science's PSF gives exactly 1 at its centre.
    """
    if not (science_var > 0 and template_var >= 0):
        raise ValueError(f"noise variances must be positive, got science {science_var!r} "
                         f"and template {template_var!r}")
    size = _grid_size(psf_science, psf_template)
    pn, pr = _spectra(psf_science, psf_template, size)
    an, ar = np.abs(pn) ** 2, np.abs(pr) ** 2
    den = science_var * ar + template_var * an
    den = np.maximum(den, 1e-12 * den.max())
    kernels = [np.fft.fftshift(np.fft.ifft2(spec).real)
               for spec in (np.conj(pn) * ar / den, np.conj(pr) * an / den)]
    half = min((size - 1) // 2, max(kernel_reach(k, FILTER_FRACTION) for k in kernels))
    c = size // 2
    k_n, k_r = (k[c - half:c + half + 1, c - half:c + half + 1] for k in kernels)
    response = _centre_response(k_n, psf_science)
    return k_n / response, k_r / response


@dataclass(frozen=True)
class ProperFilters:
    """ZOGY's filters over a detector: at each node of a grid, weighted in between by tents.

    Attributes
    ----------
    science, template : ndarray
        (n, S, S) host stacks of ``k_n`` and ``k_r``, node ``j = row * n_x + column``, each
        pair scaled so the science PSF *at its node* gives 1.
    weights_x, weights_y : ndarray
        (n_x, W) and (n_y, H) host tents: node ``j``'s weight is
        ``weights_y[row][:, None] * weights_x[column][None, :]``, summing to 1 everywhere.
    """

    science: np.ndarray
    template: np.ndarray
    weights_x: np.ndarray
    weights_y: np.ndarray

    @property
    def centre(self) -> int:
        """The node nearest the detector's centre."""
        return (len(self.weights_y) // 2) * len(self.weights_x) + len(self.weights_x) // 2

    def weight(self, j: int, backend):
        """Node ``j``'s weight over the detector (device, broadcastable to (H, W))."""
        nx = len(self.weights_x)
        wy, wx = self.weights_y[j // nx], self.weights_x[j % nx]
        return (backend.to_device(wy[:, None].astype(np.float32))
                * backend.to_device(wx[None, :].astype(np.float32)))


def tent_weights(n: int, size: int) -> np.ndarray:
    """(n, size) piecewise-linear weights of ``n`` nodes spread from pixel 0 to ``size - 1``
    (one node: 1 everywhere); they sum to 1 at every pixel."""
    if n == 1:
        return np.ones((1, size))
    nodes, x = np.linspace(0, size - 1, n), np.arange(size)
    step = nodes[1] - nodes[0]
    return np.clip(1 - np.abs(x[None, :] - nodes[:, None]) / step, 0, None)


def proper_filters_over(psfs_at, science_var: float, template_var: float, shape,
                        nodes: int = 3, min_correlation: float = 0.995,
                        samples: int = 5) -> ProperFilters:
    """:func:`proper_filters` over a detector of ``shape`` (H, W).

    ``psfs_at(x, y)`` gives the science's and the template's PSF images there. The filters
    are made at the centre alone when both PSFs, on a ``samples`` x ``samples`` grid,
    everywhere correlate with their centre's to ``min_correlation`` (the matched filter's
    rule, :func:`~gpudiffim.matched_filter.psf_components`), else at each node of a
    ``nodes`` x ``nodes`` grid from corner to corner."""
    ny, nx = shape
    n = nodes if _varies(psfs_at, shape, min_correlation, samples) else 1
    xs = np.linspace(0, nx - 1, n) if n > 1 else [(nx - 1) / 2]
    ys = np.linspace(0, ny - 1, n) if n > 1 else [(ny - 1) / 2]
    pairs = [proper_filters(*psfs_at(x, y), science_var, template_var) for y in ys for x in xs]
    size = max(k.shape[0] for pair in pairs for k in pair)
    science, template = (np.stack([np.pad(pair[i], (size - pair[i].shape[0]) // 2)
                                   for pair in pairs]) for i in (0, 1))
    return ProperFilters(science, template, tent_weights(n, nx), tent_weights(n, ny))


def _varies(psfs_at, shape, min_correlation: float, samples: int) -> bool:
    """Whether either PSF's profile somewhere on a grid over the detector correlates with
    its centre's under ``min_correlation``."""
    ny, nx = shape
    centres = psfs_at((nx - 1) / 2, (ny - 1) / 2)
    for y in np.linspace(0, ny - 1, samples):
        for x in np.linspace(0, nx - 1, samples):
            for p, c in zip(psfs_at(x, y), centres):
                if np.sum(p * c) < min_correlation * np.sqrt(np.sum(p * p) * np.sum(c * c)):
                    return True
    return False


def proper_correlation(k_n: np.ndarray, k_r: np.ndarray, science_var: float,
                       template_var: float, fraction: float = 1e-3) -> np.ndarray:
    """The score's noise autocorrelation (1 at its centre) for white inputs of these
    variances through ``k_n`` and ``k_r``, cropped to the box holding all but ``fraction``
    of its absolute weight."""
    auto = (science_var * fftconvolve(k_n, np.flip(k_n))
            + template_var * fftconvolve(k_r, np.flip(k_r)))
    c = auto.shape[0] // 2
    auto = auto / auto[c, c]
    half = kernel_reach(auto, 1.0 - fraction)
    return auto[c - half:c + half + 1, c - half:c + half + 1]


def optimal_snr_at(flux: float, psf_science: np.ndarray, psf_template: np.ndarray,
                   science_var: np.ndarray, template_var: np.ndarray, x: float, y: float,
                   half: int = 7) -> float:
    """A point source's S/N in proper subtraction: ``|flux| / sqrt(``
    :func:`proper_flux_variance` ``)`` with each image's noise the median positive variance
    in the box of half-side ``half`` around (x, y) (the template's whole plane where it is
    not on the science's grid; both in science units); NaN without flux or variance."""
    ix, iy = int(round(x)), int(round(y))
    box = (slice(max(iy - half, 0), iy + half + 1), slice(max(ix - half, 0), ix + half + 1))
    local = [v[box] if v.shape == science_var.shape else v for v in (science_var, template_var)]
    local = [v[v > 0] for v in local]
    if not flux or not all(len(v) for v in local):
        return np.nan
    variance = proper_flux_variance(psf_science, psf_template, float(np.median(local[0])),
                                    float(np.median(local[1])))
    return abs(flux) / np.sqrt(variance)


def proper_flux_variance(psf_science: np.ndarray, psf_template: np.ndarray,
                         science_var: float, template_var: float) -> float:
    """The variance of the best flux estimate of a new point source from the two images
    (``1/F_S``): what no subtraction of these inputs can beat. ``flux / sqrt()`` of it is
    the optimal S/N (science PSF only and a noiseless template: ``science_var / sum(P_n^2)``)."""
    size = _grid_size(psf_science, psf_template)
    pn, pr = _spectra(psf_science, psf_template, size)
    an, ar = np.abs(pn) ** 2, np.abs(pr) ** 2
    return float(1.0 / np.mean(an * ar / (science_var * ar + template_var * an)))


def _centre_response(kernel: np.ndarray, psf: np.ndarray) -> float:
    """``(kernel * psf)`` at the kernel's centre."""
    c = kernel.shape[0] // 2
    return float(fftconvolve(kernel, np.asarray(psf, float) / np.sum(psf), mode="same")[c, c])
