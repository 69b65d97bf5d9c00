"""The Alard–Lupton basis: ip_diffim's sizing, and the wing Gaussians gpudiffim adds."""

import numpy as np
import pytest
from scipy.signal import fftconvolve

from gpudiffim.basis import BasisConfig, alard_lupton_basis, basis_sigmas
from gpudiffim.profiles import moffat
from gpudiffim.psf import FWHM_PER_SIGMA


def test_reference_sigmas_degrees_and_sums():
    s_src, s_tgt = 1.5, 2.5
    basis = alard_lupton_basis(s_src * FWHM_PER_SIGMA, s_tgt * FWHM_PER_SIGMA)
    middle = np.sqrt(s_tgt**2 - s_src**2)
    assert basis.sigmas[:3] == pytest.approx((middle / 2, middle, 2 * middle))
    assert basis.degrees[:3] == (4, 2, 2) and not basis.deconvolution
    sums = basis.kernels.sum(axis=(1, 2))
    assert sums[0] == pytest.approx(1.0) and np.abs(sums[1:]).max() < 1e-12
    assert basis.size % 2 == 1 and 41 <= basis.size <= 51


def test_deconvolution_variant_for_a_wider_source():
    sigmas, degrees, deconv = basis_sigmas(3.0 * FWHM_PER_SIGMA, 2.0 * FWHM_PER_SIGMA)
    assert deconv and degrees[:3] == (3, 3, 3)
    assert sigmas[1] == pytest.approx(np.sqrt(3.0**2 - 2.0**2))
    nearly = basis_sigmas(2.0 * FWHM_PER_SIGMA, 1.9 * FWHM_PER_SIGMA)[0]
    assert nearly[0] == pytest.approx(0.4)  # alardMinSigDeconv


def _moffat(size, fwhm, beta):
    h = size // 2
    y, x = np.mgrid[-h:h + 1, -h:h + 1].astype(float)
    p = moffat(x, y, fwhm, beta)
    return p / p.sum()


def _best_residual(basis, p_src, p_tgt):
    """Largest |k * P_source - P_target| beyond the core (r > 2 FWHM), over the target's
    peak, for the best kernel the basis can make (least squares on the PSFs themselves)."""
    cols = np.array([fftconvolve(p_src, k) for k in basis.kernels])
    n = cols.shape[-1]
    c = (n - p_tgt.shape[0]) // 2
    target = np.zeros((n, n))
    target[c:c + p_tgt.shape[0], c:c + p_tgt.shape[0]] = p_tgt
    a, *_ = np.linalg.lstsq(cols.reshape(len(basis), -1).T, target.ravel(), rcond=None)
    resid = np.tensordot(a, cols, axes=1) - target
    y, x = np.mgrid[:n, :n] - n // 2
    return np.abs(resid[np.hypot(x, y) > 15]).max() / p_tgt.max()


def test_nearly_equal_seeing_gets_a_second_wing_that_reaches_the_psf_wings():
    """Moffat PSFs as the simulator draws them (science beta 2.5-4.5, template 3.0) of 7.0
    and 7.6 px: the kernel is narrow, and one wing Gaussian stops short of where the wings
    differ; the second reaches 2 sigma of the target PSF and cuts the best kernel's residual
    there to 0.24-0.32 of what it was. A broad kernel gets no second wing."""
    f_src, f_tgt = 7.0, 7.6
    one = alard_lupton_basis(f_src, f_tgt, BasisConfig(wingGaussians=1))
    auto = alard_lupton_basis(f_src, f_tgt)
    assert len(auto.sigmas) == len(one.sigmas) + 1
    assert auto.sigmas[-1] >= 2.0 * f_tgt / FWHM_PER_SIGMA > one.sigmas[-1]
    p_tgt = _moffat(61, f_tgt, 3.0)
    for beta in (2.5, 4.5):
        p_src = _moffat(61, f_src, beta)
        r_one, r_auto = _best_residual(one, p_src, p_tgt), _best_residual(auto, p_src, p_tgt)
        assert r_auto < 0.4 * r_one, (beta, r_one, r_auto)
    broad = alard_lupton_basis(3.7, 7.1)  # a sharp template matched to a 7.1 px science
    assert len(broad.sigmas) == 4
