"""The Alard–Lupton kernel basis: Gaussians times polynomials, sized from the PSFs.

Follows ``ip_diffim``'s ``makeKernelBasisList``: with ``scaleByFwhm`` the middle
Gaussian's sigma solves ``sigma_target**2 = sigma_source**2 + sigma_k**2`` and the others
are that divided and multiplied by ``alardGaussBeta``; the kernel size is
``kernelSizeFwhmScaling`` times the largest sigma, odd, clamped to
[``kernelSizeMin``, ``kernelSizeMax``]. When the image to convolve has the wider PSF
(deconvolution), the minimum sigma drops and every degree becomes
``alardDegGaussDeconv``. The first kernel has unit sum; every other kernel has zero
sum, so the kernel sum (the photometric scale) is one coefficient.

Basis kernels are small, fixed parameters: they are built on the host and sent to the
device by the fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .options import configclass, option
from .psf import FWHM_PER_SIGMA

__all__ = ["BasisConfig", "KernelBasis", "basis_sigmas", "kernel_size", "alard_lupton_basis"]


@configclass
class BasisConfig:
    """Alard–Lupton basis settings (names as in ``ip_diffim``).

    Beyond ``ip_diffim``: broad degree-0 "wing" Gaussians past the widest, at least
    ``minWingGaussians`` and up to ``wingGaussians`` while the widest sigma is under
    ``wingReach`` times the target PSF's, so that PSF wings that differ are matched.
    """

    alardNGauss: int = option(3, "number of Alard-Lupton Gaussians")
    alardSigGauss: tuple = option((0.7, 1.5, 3.0), "their sigmas (pixels) without scaleByFwhm")
    alardDegGauss: tuple = option((4, 2, 2), "polynomial degree of each Gaussian")
    alardGaussBeta: float = option(2.0, "ratio of successive sigmas")
    alardMinSig: float = option(0.7, "smallest sigma (pixels)")
    alardDegGaussDeconv: int = option(3, "degree of every Gaussian when deconvolving")
    alardMinSigDeconv: float = option(0.4, "smallest sigma when deconvolving")
    scaleByFwhm: bool = option(True, "size the sigmas from the two PSFs' widths")
    kernelSizeFwhmScaling: float = option(6.0, "kernel size in units of the largest sigma")
    kernelSizeMin: int = option(21, "smallest kernel size without wing Gaussians")
    kernelSizeMax: int = option(35, "largest kernel size without wing Gaussians")
    wingGaussians: int = option(2, "at most this many broad wing Gaussians (0: none)")
    minWingGaussians: int = option(1, "at least this many wing Gaussians")
    wingReach: float = option(2.0, "add wings until the widest sigma reaches this times the "
                                   "target PSF's")
    wingSizeMin: int = option(41, "smallest kernel size with wing Gaussians")
    wingSizeMax: int = option(51, "largest kernel size with wing Gaussians")


@dataclass(frozen=True, eq=False)
class KernelBasis:
    """Basis kernels ``kernels`` (n, size, size), host float64, and how they were made.

    Every Alard–Lupton kernel is a fixed combination of separable ones: ``kernels =
    transform @ raw``, where the raw kernels are ``outer(f_j, f_i)`` for each Gaussian's
    1-D factors ``factors[g][p] = exp(-t^2 / 2 sigma_g^2) (t / half)^p`` (x power ``i``, y
    power ``j``, ``i + j <= degrees[g]``, in the order of ``kernels``). The fit convolves
    with them in two 1-D passes.
    """

    kernels: np.ndarray
    sigmas: tuple
    degrees: tuple
    deconvolution: bool
    factors: tuple  # per Gaussian: (degree + 1, size) host float64
    transform: np.ndarray  # (n, n): raw separable kernels -> kernels
    expected_sigma: float | None = None  # the Gaussian kernel the PSF widths predict (pixels;
    # near 0 for equal PSFs: a delta); None when the basis is not sized from the PSFs

    @property
    def size(self) -> int:
        return self.kernels.shape[-1]

    def __len__(self) -> int:
        return self.kernels.shape[0]


def basis_sigmas(fwhm_source: float | None, fwhm_target: float | None,
                 config: BasisConfig = BasisConfig()) -> tuple[tuple, tuple, bool]:
    """Gaussian sigmas and polynomial degrees for matching a PSF of ``fwhm_source``
    (the image that gets convolved) to ``fwhm_target``. Returns (sigmas, degrees, deconv)."""
    c = config
    if not c.scaleByFwhm or fwhm_source is None or fwhm_target is None:
        return tuple(c.alardSigGauss), tuple(c.alardDegGauss), False
    s_src, s_tgt = fwhm_source / FWHM_PER_SIGMA, fwhm_target / FWHM_PER_SIGMA
    deconv = bool(s_src > s_tgt)
    needed = np.sqrt(abs(s_tgt**2 - s_src**2))
    # nearly equal PSFs need a nearly delta kernel: allow the deconvolution minimum then too
    min_sig = c.alardMinSigDeconv if (deconv or needed < c.alardMinSig) else c.alardMinSig
    middle = max(needed, min_sig)
    n = c.alardNGauss
    sigmas = [max(middle * c.alardGaussBeta ** (i - n // 2), min_sig) for i in range(n)]
    for i in range(1, n):  # clamping may merge the narrow ones: keep them distinct
        sigmas[i] = max(sigmas[i], sigmas[i - 1] * np.sqrt(c.alardGaussBeta))
    sigmas = tuple(float(s) for s in sigmas)
    degrees = (c.alardDegGaussDeconv,) * n if deconv else tuple(c.alardDegGauss[:n])
    for k in range(c.wingGaussians):
        if k >= c.minWingGaussians and sigmas[-1] >= c.wingReach * s_tgt:
            break
        sigmas += (sigmas[-1] * c.alardGaussBeta,)
        degrees += (0,)
    return sigmas, degrees, deconv


def kernel_size(sigmas, config: BasisConfig = BasisConfig()) -> int:
    """Odd kernel size: ``kernelSizeFwhmScaling`` x the largest sigma, clamped (to
    [``wingSizeMin``, ``wingSizeMax``] when wing Gaussians are on: differing PSF wings
    need room, or they leave rings around bright stars)."""
    size = int(np.ceil(config.kernelSizeFwhmScaling * max(sigmas)))
    size += 1 - size % 2
    if config.wingGaussians:
        return int(np.clip(size, config.wingSizeMin, config.wingSizeMax))
    return int(np.clip(size, config.kernelSizeMin, config.kernelSizeMax))


def alard_lupton_basis(fwhm_source: float | None = None, fwhm_target: float | None = None,
                       config: BasisConfig = BasisConfig(), size: int | None = None) -> KernelBasis:
    """Build the basis for matching ``fwhm_source`` (convolved image) to ``fwhm_target``."""
    sigmas, degrees, deconv = basis_sigmas(fwhm_source, fwhm_target, config)
    size = size or kernel_size(sigmas, config)
    half = size // 2
    t = np.arange(-half, half + 1, dtype=float)
    factors, kernels = [], []
    for sigma, degree in zip(sigmas, degrees):
        # polynomials on [-1, 1] keep the numbers tame
        f = np.exp(-0.5 * t * t / sigma**2) * (t / half) ** np.arange(degree + 1)[:, None]
        factors.append(f)
        for n in range(degree + 1):
            for i in range(n, -1, -1):  # x power i, y power n - i
                kernels.append(np.outer(f[n - i], f[i]))
    kernels = np.array(kernels)
    transform = np.eye(len(kernels))  # follows every row operation on the kernels
    s0 = kernels[0].sum()
    kernels[0] /= s0
    transform[0] /= s0
    for k in range(1, len(kernels)):
        c = kernels[k].sum()
        kernels[k] -= c * kernels[0]
        transform[k] -= c * transform[0]
        norm = np.sqrt(np.sum(kernels[k] ** 2))
        kernels[k] /= norm
        transform[k] /= norm
    expected = None
    if config.scaleByFwhm and fwhm_source is not None and fwhm_target is not None:
        expected = float(np.sqrt(abs(fwhm_target**2 - fwhm_source**2)) / FWHM_PER_SIGMA)
    return KernelBasis(kernels, sigmas, degrees, deconv, tuple(factors), transform, expected)
