"""Fit a spatially varying PSF-matching kernel and differential background on stamps.

The model, for an image ``source`` to be convolved onto ``target``::

    target(x) ~ sum_i a_i(x) (B_i * source)(x) + b(x)

with ``B_i`` the Alard–Lupton basis, ``a_i`` Chebyshev polynomials of order
``spatialKernelOrder`` over the detector (``a_0``, the kernel sum, optionally constant)
and ``b`` a Chebyshev polynomial of order ``spatialBgOrder``. All stamps are handled
at once: stamps are gathered with one indexing operation, the convolved-basis images by
two batched 1-D passes per Gaussian (matrix products), the inverse-variance-weighted
normal equations by batched matrix products, and the per-stamp and spatial systems are
solved on the backend.

Candidates are rejected as in ``ip_diffim``: by the residual mean and scatter in units
of the noise, and by kernel-sum clipping, for up to ``maxIter`` rounds. With too few
survivors for the spatial model the kernel falls back to a spatially constant one;
with fewer than ``minKernelSources`` the fit fails with :class:`KernelFitError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .backend import get_backend, next_fast_len
from .basis import KernelBasis
from .convolve import fft_convolve_weighted_sum
from .errors import GpuDiffimError
from .exposure import KERNEL_FIT_EXCLUDED
from .options import configclass, option
from .psf import ImagePsf
from .sources import SourceSelectionConfig
from .spatial import chebyshev_terms, linear_term_map, polynomial_terms, scaled_coords
from .stamps import gather_stamps

__all__ = ["KernelFitConfig", "KernelFitError", "KernelSolution", "KernelStamps",
           "build_stamps", "fit_kernel", "roughness_matrix", "centred_on_gaussian",
           "psf_flux_ratio", "aperture_fluxes", "flux_ratio"]

log = logging.getLogger(__name__)


class KernelFitError(GpuDiffimError):
    """The PSF-matching kernel could not be fitted (too few usable sources)."""


@configclass
class KernelFitConfig:
    """Kernel-fit settings (``ip_diffim`` names where it has them)."""

    spatialKernelOrder: int = option(2, "Chebyshev order of the kernel's spatial variation")
    spatialBgOrder: int = option(1, "Chebyshev order of the differential background")
    constantKernelSum: bool = option(True, "one photometric scale per detector, as "
                                           "flat-fielded data have")
    stampSize: int = option(41, "side of the target-image stamp fitted around each source")
    sources: SourceSelectionConfig = option(factory=SourceSelectionConfig,
                                            doc="how kernel sources are chosen")
    minKernelSources: int = option(3, "fewer usable sources than this: the fit fails")
    convolvedScienceSnr: tuple = option((50.0, 2000.0), "convolveScience: kernel sources in "
                                                        "this S/N range only (the noisy "
                                                        "regressors dilute the kernel)")
    minConvolvedScienceSources: int = option(20, "convolveScience: fewer bright sources than "
                                                 "this, the usual S/N range is used")
    convolvedScienceRegularization: float = option(0.003, "convolveScience: the penalty's "
                                                          "weight (the sharp science passes "
                                                          "the kernel's structure)")
    candidateResidualMeanMax: float = option(0.25, "largest mean stamp residual, in sigma")
    candidateResidualStdMax: float = option(1.5, "largest stamp residual scatter, in sigma")
    maxKsumSigma: float = option(3.0, "kernel-sum clipping, in each stamp's own error")
    maxIter: int = option(3, "rounds of spatial-fit rejection")
    badMaskPlanes: tuple = option(KERNEL_FIT_EXCLUDED, "mask planes whose pixels get no "
                                                        "weight in the fit")
    chunk: int = option(128, "stamps per batched block (bounds device memory)")
    regularization: float = option(0.03, "Tikhonov penalty, relative to each stamp's "
                                         "information, on structure the PSF does not pass")
    regularizeTowardsPsfKernel: bool = option(True, "penalise the departure from the Gaussian "
                                                    "the PSF widths predict, not from zero")
    psfKernelShapePenalty: float = option(0.1, "fraction of the penalty on that Gaussian's "
                                               "shifts and changes of width and ellipticity")
    errorsInVariables: bool = option(True, "remove the convolved image's noise from the "
                                           "normal equations")
    maxNoiseShare: float = option(0.8, "errors in variables: largest share of the normal "
                                       "equations, in any direction, taken as noise (bounds "
                                       "the correction's gain at 1 / (1 - share))")
    kernelSumFromZeroPoints: bool = option(False, "impose the kernel sum the exposures' zero "
                                                  "points give (a fallback when the stars "
                                                  "leave it poorly determined)")


@dataclass(frozen=True, eq=False)
class KernelSolution:
    """A fitted kernel: ``kernel_coeffs`` (n_basis, n_kernel_terms) and ``bg_coeffs``.

    Coefficients are host float64; the basis is host; ``bbox`` is (width, height).
    """

    basis: KernelBasis
    kernel_coeffs: np.ndarray
    bg_coeffs: np.ndarray
    kernel_order: int
    bg_order: int
    bbox: tuple
    stats: dict = field(default_factory=dict)

    def _terms(self, x, y, order):
        u, v = scaled_coords(np.asarray(x, float), np.asarray(y, float), self.bbox)
        return chebyshev_terms(np, u, v, order)

    def term_kernels(self) -> np.ndarray:
        """(n_kernel_terms, K, K): the kernel is sum_j T_j(x, y) * term_kernels[j]."""
        return np.tensordot(self.kernel_coeffs.T, self.basis.kernels, axes=1)

    def kernel_at(self, x, y) -> np.ndarray:
        """The kernel image at detector position (x, y)."""
        return np.tensordot(self._terms(x, y, self.kernel_order), self.term_kernels(), axes=1)

    def kernel_sum_at(self, x, y):
        """Kernel sum (the photometric scale source -> target) at (x, y)."""
        return self._terms(x, y, self.kernel_order).T @ self.kernel_coeffs[0]

    def background_at(self, x, y):
        """The differential background at (x, y)."""
        return self._terms(x, y, self.bg_order).T @ self.bg_coeffs

    def background_image(self, shape, backend=None):
        """The differential background over a (ny, nx) image, on the backend."""
        backend = get_backend(backend)
        return linear_term_map(self.bg_coeffs, shape, self.bbox, self.bg_order, backend)

    def kernel_sum_image(self, shape, backend=None):
        """The kernel sum over a (ny, nx) image, on the backend."""
        backend = get_backend(backend)
        return linear_term_map(self.term_kernels().sum(axis=(1, 2)), shape, self.bbox,
                               self.kernel_order, backend)

    def kernel_sum_range(self, n: int = 5) -> tuple[float, float]:
        """Least and greatest kernel sum on an n x n grid spanning the detector."""
        w, h = self.bbox
        xs, ys = np.meshgrid(np.linspace(0, w - 1, n), np.linspace(0, h - 1, n))
        sums = self.kernel_sum_at(xs.ravel(), ys.ravel())
        return float(sums.min()), float(sums.max())

    def convolve(self, image, backend=None):
        """``image`` (device, the detector's shape) convolved with the spatially varying
        kernel: one FFT convolution per spatial term, each weighted by its polynomial."""
        backend = get_backend(backend)
        terms = self.term_kernels()
        unit = np.eye(len(terms))
        return fft_convolve_weighted_sum(
            image, backend.to_device(terms, np.float32),
            lambda j: linear_term_map(unit[j], image.shape, self.bbox, self.kernel_order,
                                      backend), backend)


# ---------------------------------------------------------------------------- fitting
@dataclass
class KernelStamps:
    design: list  # per chunk of stamps (n_c, nb + 1, P): convolved basis images and the
    # background column
    target: object  # (n, P)
    weight: object  # (n, P): inverse variance, 0 where masked
    normal: object  # (n, nb + 1, nb + 1)
    rhs: object  # (n, nb + 1)
    noise: object  # (n, nb + 1, nb + 1) the source noise's share of ``normal``, or None
    rhs_noise: object  # (n, nb + 1) the noise the inputs share, its share of ``rhs``, or None
    pos: np.ndarray  # host (n, 2)
    roughness: np.ndarray | None = None  # host (nb + 1, nb + 1) penalty matrix, or None
    penalty_scale: object = None  # device (n,): its weight in each stamp's ``normal``


def build_stamps(source, target, variance, bad, positions, basis: KernelBasis,
                 config: KernelFitConfig, backend=None, source_psf=None,
                 source_var=None, shared_var=None) -> KernelStamps:
    """Design matrices and normal equations for every stamp, in float64 on the backend.

    With ``source_var`` each stamp also gets the expected contribution of the convolved
    image's noise to its normal matrix (errors in variables), ``sum_i w_i cov(B_j*n,
    B_l*n)(i) = sum_m B_j(m) B_l(m) G(m)`` with ``G`` the correlation of the stamp's weights
    with the source variance; the spatial fit subtracts it, so noise no longer drags the
    kernel towards smoothing. With ``shared_var`` (the covariance of the two inputs' noise
    at each pixel, when they share exposures) the right-hand side gets its expected share,
    ``sum_i w_i B_j(0) c(i)``, removed as well: an image fitted to itself then gives the
    delta kernel.
    """
    backend = get_backend(backend)
    xp = backend.xp
    f64 = xp.float64
    S, K = config.stampSize, basis.size
    L = S + K - 1
    F = next_fast_len(L)  # circular correlation of this size leaves the valid part intact
    positions = np.asarray(positions, np.int64).reshape(-1, 2)
    passes = _separable_passes(backend, basis, S)  # two 1-D passes per Gaussian
    tgt = xp.reshape(xp.astype(gather_stamps(backend, target, positions, S), f64), (-1, S * S))
    var = xp.reshape(xp.astype(gather_stamps(backend, variance, positions, S), f64), (-1, S * S))
    bad_st = xp.reshape(gather_stamps(backend, bad, positions, S), (-1, S * S))
    weight = xp.where(bad_st | (var <= 0), 0.0, 1.0 / xp.where(var > 0, var, 1.0))
    nb = len(basis)
    if source_var is not None:  # every product B_j(m) B_l(m), once for all chunks
        flat = basis.kernels.reshape(nb, K * K)
        products = backend.to_device((flat[:, None, :] * flat[None, :, :]).reshape(nb * nb, K * K))
    designs, normals, rhss, noise = [], [], [], []
    for start in range(0, len(positions), config.chunk):
        stop = min(start + config.chunk, len(positions))
        p = positions[start:stop]
        src = xp.astype(gather_stamps(backend, source, p, L), xp.float32)
        cols = _separable_convolve(backend, src, passes, S)
        ones = backend.ones((cols.shape[0], 1, S * S), dtype=f64)
        # (n, nb + 1, P), contiguous along the pixels, weighted chunk by chunk (a transposed
        # view of all stamps at once is strided access into fresh pages)
        rows = xp.concat([cols, ones], axis=1)
        weighted = rows * weight[start:stop, None, :]
        normals.append(xp.matmul(weighted, backend.matrix_transpose(rows)))
        rhss.append(xp.matmul(weighted, tgt[start:stop, :, None])[..., 0])
        designs.append(rows)
        if source_var is not None:
            noise.append(_noise_normal(backend, source_var, p, weight[start:stop, ...],
                                       products, nb, S, K, F))
    normal = xp.concat(normals, axis=0)
    rhs = xp.concat(rhss, axis=0)
    rhs_noise = None
    if shared_var is not None:  # B_j at the kernel's centre times sum_i w_i c(i); 0 for bg
        c = xp.reshape(xp.astype(gather_stamps(backend, shared_var, positions, S), f64),
                       (-1, S * S))
        centre = np.append(basis.kernels[:, K // 2, K // 2], 0.0)
        rhs_noise = xp.sum(weight * c, axis=1)[:, None] * backend.to_device(centre)[None, :]
    noise_normal = None
    if noise:  # (n, nb, nb), bordered with zeros for the background column
        noise_normal = xp.concat(noise, axis=0)
        zcol = backend.zeros((noise_normal.shape[0], nb, 1), dtype=f64)
        zrow = backend.zeros((noise_normal.shape[0], 1, nb + 1), dtype=f64)
        noise_normal = xp.concat([xp.concat([noise_normal, zcol], axis=2), zrow], axis=1)
    if config.regularization > 0:
        rough = roughness_matrix(basis, source_psf)
        scale = (xp.sum(xp.reshape(normal, (normal.shape[0], -1))[:, ::nb + 2][:, :nb], axis=1)
                 * config.regularization / float(np.trace(rough)))
        if config.regularizeTowardsPsfKernel and not basis.deconvolution:
            sigma = (basis.sigmas[min(1, len(basis.sigmas) - 1)] if basis.expected_sigma is None
                     else basis.expected_sigma)
            rough = centred_on_gaussian(rough, basis, sigma, config.psfKernelShapePenalty)
        normal = normal + scale[:, None, None] * backend.to_device(rough)[None, ...]
    else:
        rough = scale = None
    # a whisper of ridge keeps fully masked or degenerate stamps solvable
    diag = xp.sum(xp.reshape(normal, (normal.shape[0], -1))[:, ::normal.shape[-1] + 1], axis=1)
    eye = xp.astype(xp.reshape(backend.arange(normal.shape[-1] ** 2), normal.shape[1:])
                    % (normal.shape[-1] + 1) == 0, normal.dtype)
    normal = normal + (1e-10 * diag / normal.shape[-1] + 1e-30)[:, None, None] * eye[None, ...]
    return KernelStamps(designs, tgt, weight, normal, rhs, noise_normal, rhs_noise,
                        np.asarray(positions), rough, scale)


def _convolution_matrix(factors: np.ndarray, S: int) -> np.ndarray:
    """(L, n * S) matrix: a row of L = S + K - 1 pixels times it gives the valid part of
    its convolution with each 1-D factor (n, K), ``out[q] = sum_b f[b] row[q + K - 1 - b]``."""
    n, K = factors.shape
    c, q = np.arange(S + K - 1)[:, None], np.arange(S)[None, :]
    b = q + K - 1 - c
    inside = (b >= 0) & (b < K)
    m = np.where(inside[None], factors[:, np.clip(b, 0, K - 1)], 0.0)  # (n, L, S)
    return np.transpose(m, (1, 0, 2)).reshape(S + K - 1, n * S)


def _separable_passes(backend, basis: KernelBasis, S: int):
    """Device matrices for :func:`_separable_convolve`: per Gaussian its 1-D convolution
    matrix and which (x power, y power) products it keeps; and the basis transform."""
    out = []
    for f, degree in zip(basis.factors, basis.degrees):
        m = _convolution_matrix(f, S)  # (L, (d + 1) S)
        keep = [i * (degree + 1) + (n - i) for n in range(degree + 1) for i in range(n, -1, -1)]
        out.append((backend.to_device(m.astype(np.float32)),
                    backend.to_device(np.ascontiguousarray(m.T).astype(np.float32)),
                    backend.to_device(np.asarray(keep, np.int64)), degree + 1))
    return out, backend.to_device(basis.transform)


def _separable_convolve(backend, src, passes, S: int):
    """(n, nb, S * S) float64: the valid part of each (n, L, L) stamp convolved with every
    basis kernel. Each Gaussian's kernels are products of 1-D factors, so a pass along x
    (one matrix product for all its factors) and one along y give every raw kernel's
    image; the basis transform then mixes them. A few GFLOP of matrix products replace
    thousands of small FFTs."""
    xp = backend.xp
    per_gaussian, transform = passes
    n, L = src.shape[0], src.shape[1]
    raw = []
    for mx, my, keep, d in per_gaussian:
        rows = xp.reshape(xp.matmul(src, mx), (n, L, d, S))  # x pass: (n, L, d, S)
        rows = xp.permute_dims(rows, (0, 2, 1, 3))  # (n, d [x power], L, S)
        both = xp.matmul(my, rows)  # y pass: (n, d [x], d * S [y power, row], S)
        both = xp.reshape(both, (n, d * d, S * S))  # index i * d + j
        raw.append(xp.take(both, keep, axis=1))
    raw = xp.astype(xp.concat(raw, axis=1), xp.float64)
    return xp.matmul(transform, raw)


def _noise_normal(backend, source_var, pos, weight, products, nb: int, S: int, K: int, F: int):
    """Expected contribution of the source image's noise to each stamp's normal matrix
    (n, nb, nb): ``sum_m B_j(m) B_l(m) G(m)``, ``G(m) = sum_i w_i var(i - m)`` (the stamp
    convolution reads ``src[K - 1 + i - m]``; ``G`` is a valid-mode correlation by FFT)."""
    xp = backend.xp
    L = S + K - 1
    # float64: this is subtracted from the normal matrix, where float32 rounding would be
    # amplified for noise-dominated stamps
    v = xp.astype(gather_stamps(backend, source_var, pos, L), xp.float64)
    w = xp.astype(xp.reshape(weight, (-1, S, S)), xp.float64)
    corr = backend.irfft2(backend.rfft2(v, s=(F, F)) * xp.conj(backend.rfft2(w, s=(F, F))),
                          s=(F, F))
    g = xp.flip(xp.astype(corr[:, :K, :K], xp.float64), axis=(1, 2))  # G(m), m in kernel grid
    g = xp.reshape(g, (g.shape[0], K * K))
    # one GEMM against all products B_j(m) B_l(m) (``products``, nb^2 x K^2)
    return xp.reshape(xp.matmul(g, backend.matrix_transpose(products)), (g.shape[0], nb, nb))


def centred_on_gaussian(penalty: np.ndarray, basis: KernelBasis, sigma: float,
                        shape_weight: float = 1.0) -> np.ndarray:
    """The quadratic ``penalty`` on coefficients ``a`` moved to act on ``a - a_0 c``, where
    ``c`` are the coefficients of a unit-sum round Gaussian ``g`` of ``sigma`` and ``a_0``
    the kernel sum: zero for that Gaussian at any flux scale.

    With ``shape_weight < 1`` only that fraction of the penalty remains on the Gaussian's
    first-order changes of centre, width and ellipticity, ``g`` times x, y, x^2, xy, y^2:
    the penalty ``R`` becomes ``R - (1 - shape_weight) R D (D^T R D)^-1 D^T R``, ``D`` those
    modes' coefficients (with ``shape_weight = 0``, the least penalty over all additions of
    them).
    """
    k = basis.kernels
    nb, half = len(k), basis.size // 2
    y, x = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
    def gaussian(s):
        g = np.exp(-0.5 * (x * x + y * y) / s**2)
        return g / g.sum()

    g = gaussian(max(sigma, 1e-3))  # sigma -> 0: a delta
    flat = k.reshape(nb, -1).T
    c, *_ = np.linalg.lstsq(flat, g.ravel(), rcond=None)
    if shape_weight < 1:  # a delta has no such modes on the pixel grid: take a 0.5 px one's
        gm = gaussian(max(sigma, 0.5))
        modes = np.stack([gm * p for p in (x, y, x * x, x * y, y * y)]).reshape(5, -1).T
        d = np.vstack([np.linalg.lstsq(flat, modes, rcond=None)[0], np.zeros((1, 5))])
        rd = penalty @ d
        penalty = penalty - (1 - shape_weight) * rd @ np.linalg.solve(d.T @ rd, rd.T)
    m = np.eye(nb + 1)
    m[:nb, 0] -= c  # (m a)_j = a_j - a_0 c_j
    return m.T @ penalty @ m


def roughness_matrix(basis: KernelBasis, source_psf=None) -> np.ndarray:
    """(nb + 1)^2 penalty matrix on kernel structure the data cannot constrain.

    With the convolved image's PSF ``P``, the penalty on a kernel ``k`` is
    ``sum_f |k(f)|^2 (1 / (|P(f)|^2 + eps) - 1)``: nothing where ``P`` passes the signal,
    much where it does not. Without a PSF, the kernel's Laplacian energy. The background
    row and column are zero.
    """
    k = basis.kernels
    nb, size = len(k), basis.size
    if source_psf is None:
        lap = np.zeros_like(k)
        lap[:, 1:-1, 1:-1] = (k[:, 2:, 1:-1] + k[:, :-2, 1:-1] + k[:, 1:-1, 2:]
                              + k[:, 1:-1, :-2] - 4 * k[:, 1:-1, 1:-1])
        flat = lap.reshape(nb, -1)
        gram = flat @ flat.T
    else:
        n = size + np.asarray(source_psf).shape[0]
        spec = np.fft.rfft2(k, s=(n, n))
        p = np.asarray(source_psf, float)
        p2 = np.abs(np.fft.rfft2(p / p.sum(), s=(n, n))) ** 2
        w = 1.0 / (p2 + 1e-4) - 1.0 / (1.0 + 1e-4)
        gram = np.real(np.einsum("iyx,jyx->ij", spec * w, np.conj(spec)))
    out = np.zeros((nb + 1, nb + 1))
    out[:-1, :-1] = gram
    return out


def _residual_stats(backend, stamps: KernelStamps, coeffs, unexplained: bool = False):
    """Per-stamp mean and std of the residual in units of the noise (host arrays); with
    ``unexplained``, also the fraction of each stamp's own variation (weighted, about its
    mean) the model leaves in the residual (near 1 for noise or a source the other image
    lacks, small for a bright source matched to the noise) and the chi^2 the model removes
    (about a source's S/N squared; about its number of parameters for noise alone)."""
    xp = backend.xp
    model, start = [], 0
    for rows in stamps.design:
        stop = start + rows.shape[0]
        model.append(xp.matmul(coeffs[start:stop, None, :], rows)[:, 0, :])
        start = stop
    model = xp.concat(model, axis=0)
    good = stamps.weight > 0
    chi = xp.where(good, (stamps.target - model) * xp.sqrt(stamps.weight), 0.0)
    n = xp.sum(xp.astype(good, xp.float64), axis=1)
    mean = xp.sum(chi, axis=1) / n
    std = xp.sqrt(xp.sum(chi * chi, axis=1) / n - mean * mean)
    if not unexplained:
        return mean, std
    w = stamps.weight
    t_mean = xp.sum(w * stamps.target, axis=1) / xp.sum(w, axis=1)
    spread = xp.sum(w * (stamps.target - t_mean[:, None]) ** 2, axis=1)
    chi2 = xp.sum(chi * chi, axis=1)
    return mean, std, chi2 / spread, spread - chi2


def _residual_ok(mean, std, among, config: KernelFitConfig):
    """Residual clipping: ip_diffim's absolute limits (mean 0.25, std 1.5 sigma), widened to
    the typical stamp's values when every bright star leaves more than the noise (a model
    limit, not a bad stamp): then only stamps far worse than their peers are dropped."""
    if among.sum() >= 3:
        med_s = float(np.median(std[among]))
        med_m = float(np.median(np.abs(mean[among])))
    else:
        med_s = med_m = 0.0
    std_max = max(config.candidateResidualStdMax, 1.5 * med_s)
    mean_max = max(config.candidateResidualMeanMax, 3.0 * med_m)
    return (np.abs(mean) <= mean_max) & (std <= std_max)


def _centre_sum_error(gram: np.ndarray, orders, bbox) -> float:
    """Standard error of the spatial fit's kernel sum at the detector's centre, from the
    inverse of its (host) normal matrix ``gram`` (the sum's terms come first)."""
    m = len(polynomial_terms(orders[0]))
    cov = np.linalg.pinv(gram)[:m, :m]
    w, h = bbox
    u, v = scaled_coords(np.asarray((w - 1) / 2), np.asarray((h - 1) / 2), bbox)
    t = chebyshev_terms(np, u, v, orders[0]).ravel()
    return float(np.sqrt(max(t @ cov @ t, 0.0)))


def _ksum_error(backend, normal):
    """Standard error of each stamp's kernel sum (the first basis coefficient)."""
    xp = backend.xp
    n = normal.shape[-1]
    e0 = backend.zeros((normal.shape[0], n), dtype=normal.dtype) + xp.astype(
        backend.arange(n) == 0, normal.dtype)
    return xp.sqrt(xp.abs(backend.solve(normal, e0)[:, 0]))


def _ksum_inliers(ksum, err, ok, nsigma):
    """Kernel-sum clipping in units of each stamp's own error, so a bright variable star
    (small error, wrong sum) is caught; the scale follows the spread of the pulls."""
    if ok.sum() < 3:
        return ok
    med = np.median(ksum[ok])
    z = (ksum - med) / np.where(err > 0, err, np.inf)
    for _ in range(3):
        scale = max(1.0, 1.4826 * np.median(np.abs(z[ok])))
        keep = ok & (np.abs(z) <= nsigma * scale)
        if keep.sum() < 3:
            break
        w = 1.0 / err[keep] ** 2
        med = np.sum(w * ksum[keep]) / np.sum(w)
        z = (ksum - med) / np.where(err > 0, err, np.inf)
    return ok & (np.abs(z) <= nsigma * scale)


def _term_layout(nb: int, config: KernelFitConfig, kernel_order: int):
    """Spatial order of each per-stamp parameter (nb kernel coefficients, then background)."""
    orders = [0 if config.constantKernelSum else kernel_order] + [kernel_order] * (nb - 1)
    return orders + [config.spatialBgOrder]


def _spatial_design(pos, bbox, orders):
    """Host (n, n_params, n_theta) map from spatial coefficients to per-stamp parameters."""
    u, v = scaled_coords(pos[:, 0].astype(float), pos[:, 1].astype(float), bbox)
    n_theta = sum(len(polynomial_terms(o)) for o in orders)
    phi = np.zeros((len(pos), len(orders), n_theta))
    col = 0
    for p, o in enumerate(orders):
        t = chebyshev_terms(np, u, v, o).T  # (n, terms)
        phi[:, p, col:col + t.shape[1]] = t
        col += t.shape[1]
    return phi


def _penalty_over_detector(penalty, bbox, orders, n: int = 9) -> np.ndarray:
    """The per-stamp ``penalty`` as a penalty on the spatial coefficients, averaged over an
    n x n grid spanning the detector. Applied only at the stamps, it would leave the corners
    (where the spatial polynomial extrapolates past the last star) free to grow noisy
    structure."""
    w, h = bbox
    gx, gy = np.meshgrid(np.linspace(0, w - 1, n), np.linspace(0, h - 1, n))
    phi = _spatial_design(np.column_stack([gx.ravel(), gy.ravel()]), bbox, orders)
    return np.sum(np.transpose(phi, (0, 2, 1)) @ (penalty @ phi), axis=0) / len(phi)


def _unpack(theta, orders, nb):
    """Spatial coefficient vector -> (kernel_coeffs (nb, n_terms), bg_coeffs)."""
    n_terms = len(polynomial_terms(max(orders[:nb])))
    kc = np.zeros((nb, n_terms))
    col = 0
    for p, o in enumerate(orders[:nb]):
        m = len(polynomial_terms(o))
        kc[p, :m] = theta[col:col + m]
        col += m
    return kc, theta[col:]


def aperture_fluxes(source, target, source_psf, target_psf, positions, backend=None,
                    variances=None):
    """Aperture-corrected fluxes of the sources at ``positions`` in two images.

    Each image gets a wide circular aperture (2.5 x the larger FWHM) around each source,
    the stamp's border median removed, and the aperture correction of its own PSF model
    (so differing wings do not bias the ratio, and sub-pixel centring hardly matters).
    Returns host (source fluxes, target fluxes), NaN-free, for the sources clear of the
    edges (empty arrays when none is); with ``variances`` (the source's and the target's
    variance planes), their variances too.
    """
    backend = get_backend(backend)
    xp = backend.xp
    positions = np.asarray(positions, np.int64).reshape(-1, 2)
    fwhm = max(np.mean(ImagePsf(source_psf).fwhm()), np.mean(ImagePsf(target_psf).fwhm()))
    r_ap = 2.5 * fwhm
    c = int(np.ceil(r_ap + 12))
    size = 2 * c + 1
    yy, xx = np.mgrid[-c:c + 1, -c:c + 1]
    r2 = xx * xx + yy * yy
    aperture = r2 <= r_ap**2
    annulus = backend.to_device(np.flatnonzero((r2 > (r_ap + 4) ** 2) & (r2 <= c * c)))
    ny, nx = target.shape
    inside = ((positions[:, 0] >= c) & (positions[:, 0] < nx - c)
              & (positions[:, 1] >= c) & (positions[:, 1] < ny - c))
    if not inside.any():
        return (np.zeros(0),) * (2 if variances is None else 4)
    pos = positions[inside]

    def fluxes(image, psf, var=None):
        st = xp.astype(gather_stamps(backend, image, pos, size), xp.float64)
        ring = xp.take(xp.reshape(st, (st.shape[0], -1)), annulus, axis=1)  # sky past the wings
        sky = xp.sort(ring, axis=1)[:, ring.shape[1] // 2]
        p = np.zeros((size, size))
        h = psf.shape[0] // 2
        m = min(h, c)
        p[c - m:c + m + 1, c - m:c + m + 1] = psf[h - m:h + m + 1, h - m:h + m + 1]
        enclosed = float(np.sum(p[aperture]) / np.sum(psf))
        ap = backend.to_device(aperture.astype(np.float64))
        flux = xp.sum((st - sky[:, None, None]) * ap, axis=(1, 2)) / enclosed
        if var is None:
            return (flux,)
        v = xp.astype(gather_stamps(backend, var, pos, size), xp.float64)
        return flux, xp.sum(v * ap, axis=(1, 2)) / enclosed**2

    vs, vt = (None, None) if variances is None else variances
    fs, *es = fluxes(source, np.asarray(source_psf), vs)
    ft, *et = fluxes(target, np.asarray(target_psf), vt)
    fs, ft, *errors = backend.to_host_all(fs, ft, *es, *et)  # one device read
    ok = np.isfinite(fs) & np.isfinite(ft)
    return (fs[ok], ft[ok], *(e[ok] for e in errors))


def psf_flux_ratio(source, target, source_psf, target_psf, positions,
                   backend=None) -> float | None:
    """Photometric scale target/source from the summed :func:`aperture_fluxes` of the kernel
    sources: no first-order noise bias, unlike a least-squares kernel sum when the
    convolved image is the noisier one. None when no source is usable (too near the edges,
    or none at all): the kernel sum is then left to the fit."""
    fs, ft = aperture_fluxes(source, target, source_psf, target_psf, positions, backend)
    if not len(fs) or np.sum(fs) <= 0:
        return None
    return float(np.sum(ft) / np.sum(fs))


def flux_ratio(source, target, source_psf, target_psf, positions, source_var, target_var,
               backend=None, clip: float = 3.0) -> tuple[float, float] | tuple[None, None]:
    """The photometric ratio target/source of the sources at ``positions`` from their
    :func:`aperture_fluxes`, and its standard error: the weighted mean of each source's
    ratio (errors from the variance planes, to first order), ``clip``-sigma outliers (a
    variable star, a blend) rejected, the error scaled by the scatter when that exceeds the
    noise. (None, None) without a usable source."""
    fs, ft, vs, vt = aperture_fluxes(source, target, source_psf, target_psf, positions,
                                     backend, (source_var, target_var))
    use = (fs > 0) & (vs >= 0) & (vt >= 0)
    if not use.any():
        return None, None
    fs, ft, vs, vt = fs[use], ft[use], vs[use], vt[use]
    r = ft / fs
    var = (vt + r * r * vs) / (fs * fs)
    w = 1.0 / np.where(var > 0, var, np.inf)
    keep = w > 0
    if not keep.any():
        return None, None
    for _ in range(3):
        mean = np.sum(w[keep] * r[keep]) / np.sum(w[keep])
        chi2 = np.sum(w[keep] * (r[keep] - mean) ** 2) / max(keep.sum() - 1, 1)
        scale = max(1.0, chi2)
        new = (w > 0) & ((r - mean) ** 2 * w <= clip**2 * scale)
        if new.sum() == 0 or np.array_equal(new, keep):
            break
        keep = new
    mean = np.sum(w[keep] * r[keep]) / np.sum(w[keep])
    chi2 = np.sum(w[keep] * (r[keep] - mean) ** 2) / max(keep.sum() - 1, 1)
    return float(mean), float(np.sqrt(max(1.0, chi2) / np.sum(w[keep])))


def _over_stamps(backend, phi, phi_ok, per_stamp):
    """Sum over the kept stamps of phi^T M phi for per-stamp matrices M (n, m, m), as one
    product over (stamp, coefficient) rows instead of a stack of per-stamp products;
    ``phi_ok`` is phi (n, m, p) with unkept stamps zeroed, as (p, n * m)."""
    xp = backend.xp
    return phi_ok @ xp.reshape(xp.matmul(per_stamp, phi), (-1, phi.shape[-1]))


def errors_in_variables_solve(backend, normal, noise, rhs, rhs_noise=None,
                              max_share: float = 0.5):
    """Solve the normal equations with their expected noise removed, ``(N - E) x = r - e``,
    the share of ``N`` taken as noise bounded in every direction.

    ``N`` (n, n) holds the regressors' noise, whose expectation is ``E`` (positive
    semi-definite); ``e`` is the noise the regressors share with the target (None: they
    share none). In the basis where ``N`` is the identity, ``E`` has eigenvalues ``mu``
    (the noise's share of each direction): directions where the data barely exceed the
    noise (or, by chance, fall short of it) have ``mu`` near or above 1, where the exact
    correction divides by nearly nothing. There ``mu`` is lowered to ``max_share`` (and
    ``e`` with it, in proportion), so no direction gains more than ``1 / (1 - max_share)``;
    where every ``mu`` is below it the solution is exact. Returns ``(x, N - E)`` with the
    bounded ``E``.
    """
    xp = backend.xp
    lower = xp.linalg.cholesky(normal)
    inv_lower = xp.linalg.inv(lower)
    share = xp.matmul(xp.matmul(inv_lower, noise), backend.matrix_transpose(inv_lower))
    mu, vec = xp.linalg.eigh(0.5 * (share + backend.matrix_transpose(share)))
    bounded = xp.clip(mu, max=max_share)
    to_eigen = xp.matmul(backend.matrix_transpose(vec), inv_lower)  # U^T L^-1
    z = xp.matmul(to_eigen, rhs[:, None])[:, 0]
    if rhs_noise is not None:
        f = xp.matmul(to_eigen, rhs_noise[:, None])[:, 0]
        z = z - f * xp.where(mu > bounded, bounded / xp.where(mu > 0, mu, 1.0), 1.0)
    x = xp.matmul(backend.matrix_transpose(to_eigen), (z / (1.0 - bounded))[:, None])[:, 0]
    back = xp.matmul(lower, vec)  # N - E = L U (1 - mu) U^T L^T
    corrected = xp.matmul(back * (1.0 - bounded)[None, :], backend.matrix_transpose(back))
    return x, corrected


def fit_kernel(source, target, source_var, target_var, bad, basis: KernelBasis,
               positions, config: KernelFitConfig = KernelFitConfig(), backend=None,
               bbox=None, source_psf=None, kernel_sum: float | None = None,
               noise_correlation: float = 0.0) -> KernelSolution:
    """Fit the spatial kernel and background matching ``source`` onto ``target``.

    ``bad`` is a boolean image of pixels to ignore; ``positions`` host (n, 2) integer
    stamp centres (see :func:`select_kernel_sources`). A given ``kernel_sum`` is imposed
    (the first basis coefficient is pinned to it) instead of fitted.
    ``noise_correlation``: of the two images' pixel noise
    (:func:`~gpudiffim.noise.shared_noise_correlation`), 0 for independent exposures.
    """
    backend = get_backend(backend)
    xp = backend.xp
    ny, nx = target.shape
    bbox = bbox or (nx, ny)
    positions = np.asarray(positions)
    if len(positions) < config.minKernelSources:
        raise KernelFitError(f"only {len(positions)} kernel sources found; at least "
                             f"{config.minKernelSources} are needed")
    # the source's noise reaches the model through the kernel, which spreads it over
    # ~4 pi sigma_k^2 pixels: weight with the variance of the model's residual
    sigma_k = basis.sigmas[min(1, len(basis.sigmas) - 1)]  # the middle Alard-Lupton Gaussian
    spread = float(1.0 / (4.0 * np.pi * sigma_k**2))
    eiv = config.errorsInVariables
    shared = (noise_correlation
              * xp.sqrt(xp.clip(source_var, min=0.0) * xp.clip(target_var, min=0.0))
              if eiv and noise_correlation else None)
    stamps = build_stamps(source, target, target_var + spread * source_var, bad, positions,
                          basis, config, backend, source_psf,
                          source_var=source_var if eiv else None, shared_var=shared)
    nb = len(basis)
    if kernel_sum is not None:  # pin coefficient 0 with a stiff quadratic penalty
        stiff = 1e8 * stamps.normal[:, 0, 0]
        pin = xp.astype(backend.arange(nb + 1) == 0, stamps.normal.dtype)
        outer = (pin[:, None] * pin[None, :])[None, ...]
        stamps.normal = stamps.normal + stiff[:, None, None] * outer
        stamps.rhs = stamps.rhs + (stiff * kernel_sum)[:, None] * pin[None, :]
    # 1. each stamp on its own: reject bad residuals and kernel-sum outliers
    single = backend.solve(stamps.normal, stamps.rhs)
    pinned = kernel_sum is not None
    mean, std, ksum, *ksum_err = backend.to_host_all(  # one device read
        *_residual_stats(backend, stamps, single), single[:, 0],
        *(() if pinned else (_ksum_error(backend, stamps.normal),)))
    ok = _residual_ok(mean, std, np.isfinite(std), config)
    ok &= np.isfinite(ksum)
    if not pinned:
        ok &= _ksum_inliers(ksum, ksum_err[0], ok, config.maxKsumSigma)
    if ok.sum() < config.minKernelSources:
        ok = np.isfinite(ksum) & (std < 3 * config.candidateResidualStdMax)  # keep the best
    stats = {"n_candidates": int(len(positions)), "n_single_ok": int(ok.sum())}
    # 2. spatial fit with iterative rejection
    kernel_order = config.spatialKernelOrder
    for iteration in range(config.maxIter + 1):
        n_ok = int(ok.sum())
        if n_ok < config.minKernelSources:
            raise KernelFitError(f"only {n_ok} kernel sources survived rejection; at least "
                                 f"{config.minKernelSources} are needed")
        if kernel_order > 0 and n_ok < 2 * len(polynomial_terms(kernel_order)):
            log.info("%d kernel sources: too few for spatial order %d, fitting a constant kernel",
                     n_ok, kernel_order)
            kernel_order = 0
        orders = _term_layout(nb, config, kernel_order)
        phi = backend.to_device(_spatial_design(positions, bbox, orders))
        okd = backend.to_device(ok.astype(np.float64))
        # the errors-in-variables correction acts on the sum over stamps, bounded
        # (errors_in_variables_solve); single stamps above are screened without it
        normal = stamps.normal
        if stamps.roughness is not None:  # the stamps' penalty, spread over the detector
            rough = backend.to_device(stamps.roughness)
            normal = normal - stamps.penalty_scale[:, None, None] * rough[None, ...]
        phi_ok = backend.matrix_transpose(xp.reshape(phi * okd[:, None, None],
                                                     (-1, phi.shape[-1])))
        gram, rhs = _over_stamps(backend, phi, phi_ok, normal), (phi_ok @ xp.reshape(
            stamps.rhs, (-1, 1)))[:, 0]
        if stamps.roughness is not None:
            gram = gram + xp.sum(stamps.penalty_scale * okd) * backend.to_device(
                _penalty_over_detector(stamps.roughness, bbox, orders))
        if stamps.noise is None:
            theta = backend.solve(gram, rhs)
        else:
            rhs_noise = (None if stamps.rhs_noise is None
                         else (phi_ok @ xp.reshape(stamps.rhs_noise, (-1, 1)))[:, 0])
            try:  # its Cholesky factor raises on NumPy where CuPy gives NaN
                theta, gram = errors_in_variables_solve(
                    backend, gram, _over_stamps(backend, phi, phi_ok, stamps.noise), rhs,
                    rhs_noise, config.maxNoiseShare)
            except np.linalg.LinAlgError:
                theta = backend.full((gram.shape[0],), float("nan"), dtype=rhs.dtype)
        per_stamp = xp.matmul(phi, theta[:, None])[..., 0]
        mean, std, unexplained, explained, theta_h, gram_h = backend.to_host_all(
            *_residual_stats(backend, stamps, per_stamp, True), theta, gram)  # one read
        bad_fit = ok & ~_residual_ok(mean, std, ok, config)
        if not bad_fit.any() or iteration == config.maxIter:
            break
        # drop the worst offenders only, so a globally poor model does not empty the set
        worst = np.argsort(-np.where(bad_fit, std, -np.inf))[:max(1, int(bad_fit.sum() // 2))]
        ok[worst[bad_fit[worst]]] = False
    theta, gram = theta_h, gram_h
    if not np.all(np.isfinite(theta)):  # a singular system: NaN here, on every backend
        raise KernelFitError(f"the kernel fit's normal equations are singular "
                             f"({int(ok.sum())} kernel sources): non-finite coefficients")
    kc, bg = _unpack(theta, orders, nb)
    stats.update({"n_used": int(ok.sum()), "kernel_order": kernel_order,
                  "residual_mean": float(np.median(mean[ok])),
                  "residual_std": float(np.median(std[ok])),
                  "residual_unexplained": float(np.median(unexplained[ok])),
                  "explained_chi2": float(np.median(explained[ok])),
                  "kernel_sum_error": _centre_sum_error(gram, orders, bbox),
                  "iterations": iteration + 1})
    return KernelSolution(basis, kc, bg, kernel_order, config.spatialBgOrder, bbox, stats)
