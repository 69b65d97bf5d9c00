"""The kernel fit: its stamp convolutions, its penalty, its errors-in-variables correction."""

import numpy as np
import pytest
from scipy.signal import fftconvolve

from gpudiffim.basis import alard_lupton_basis
from gpudiffim.kernel_fit import KernelFitConfig, build_stamps, errors_in_variables_solve
from gpudiffim.subtract import SubtractConfig, subtract

from pairs import gaussian_image, kernel_pair, true_kernel


@pytest.mark.parametrize("fwhms", [(3.0, 4.5), (4.5, 3.0), (4.0, 4.1)],
                         ids=["convolution", "deconvolution", "equal-with-wings"])
def test_separable_stamp_convolution_matches_direct_convolution(backend, rng, fwhms):
    """The fit convolves each stamp with the basis in two 1-D passes per Gaussian, then
    mixes the raw products into the zero-sum basis. Every column of the design must equal
    the stamp convolved with that basis kernel (scipy, float64)."""
    basis = alard_lupton_basis(*fwhms)
    assert basis.factors is not None
    config = KernelFitConfig(stampSize=21)
    S, K = config.stampSize, basis.size
    image = rng.normal(100.0, 10.0, (160, 160))
    image[70:90, 60:100] += 5000.0 * rng.random((20, 40))  # structure, on a sky
    positions = np.array([[60, 60], [100, 80], [85, 110]])
    stamps = build_stamps(backend.to_device(image.astype(np.float32)),
                          backend.to_device(image.astype(np.float32)),
                          backend.to_device(np.ones_like(image, np.float32)),
                          backend.to_device(np.zeros(image.shape, bool)),
                          positions, basis, config, backend)
    # chunks of (n_c, nb + 1, S*S), as (n, S*S, nb + 1)
    design = np.concatenate([backend.to_host(d) for d in stamps.design]).transpose(0, 2, 1)
    L = S + K - 1
    worst = 0.0
    for s, (x, y) in enumerate(positions):
        src = image[y - L // 2:y + L // 2 + 1, x - L // 2:x + L // 2 + 1]
        for j, k in enumerate(basis.kernels):
            want = fftconvolve(src, k, mode="valid").ravel()
            worst = max(worst, np.abs(design[s, :, j] - want).max() / np.abs(want).max())
    assert np.allclose(design[..., -1], 1.0)  # the background column
    assert worst < 2e-5, worst  # float32 passes


def test_penalty_spares_the_kernel_the_psf_widths_predict():
    """The roughness penalty acts on the departure from the basis's middle Gaussian at the
    fitted sum, so that Gaussian costs nothing at any flux scale; with a shape weight, only
    that fraction of it acts on the Gaussian's small shifts and changes of width and
    ellipticity; kernels of other shapes still pay."""
    from gpudiffim.basis import alard_lupton_basis
    from gpudiffim.kernel_fit import centred_on_gaussian, roughness_matrix

    basis = alard_lupton_basis(3.0, 5.0)
    psf = gaussian_image(31, 3.0 / 2.3548)
    rough = roughness_matrix(basis, psf)
    s = basis.sigmas[1]
    penalties = (rough, centred_on_gaussian(rough, basis, s),
                 centred_on_gaussian(rough, basis, s, shape_weight=0.1))
    flat = basis.kernels.reshape(len(basis), -1).T
    kernels = {"psf": gaussian_image(basis.size, s),
               "shifted": gaussian_image(basis.size, s, s, 0.3, -0.2),
               "reshaped": gaussian_image(basis.size, 1.1 * s, 0.92 * s),
               "other": gaussian_image(basis.size, 1.3 * s, 0.8 * s)}
    cost = {}
    for name, k in kernels.items():
        a = np.r_[np.linalg.lstsq(flat, 0.9 * (k / k.sum()).ravel(), rcond=None)[0], 0.0]
        cost[name] = [a @ p @ a for p in penalties]
    assert max(cost["psf"][1:]) < 1e-6 * cost["psf"][0]
    assert cost["other"][1] > 0.3 * cost["other"][0]  # measured 0.59
    # shape weight 0.1: measured 0.11 of the centred cost for the shift, 0.33 for the
    # reshaped Gaussian (its second-order change is still paid), 0.72 for the other shape
    assert cost["shifted"][2] < 0.15 * cost["shifted"][1]
    assert cost["reshaped"][2] < 0.45 * cost["reshaped"][1]
    assert cost["other"][2] > 0.6 * cost["other"][1]


def test_errors_in_variables_correction_unbiases_a_noisy_template_fit():
    """A template far noisier than the science (pixel variance 1000 against 125): its noise
    in the fit's regressors smooths the kernel (regression dilution) unless the normal
    equations are corrected for it."""
    science, template = kernel_pair(n_stars=1500, sky=100.0, template_var=1000.0)
    shape = science.shape
    errors = {}
    for eiv in (False, True):
        cfg = SubtractConfig(kernel=KernelFitConfig(constantKernelSum=False, errorsInVariables=eiv))
        k = subtract(science, template, cfg).kernel
        errors[eiv] = max(np.abs(k.kernel_at(x, y) - true_kernel(x, y, shape, k.basis.size)).max()
                          / true_kernel(x, y, shape, k.basis.size).max()
                          for x in (200, 512, 800) for y in (200, 512, 800))
    # measured: 1.26% of the peak without the correction, 0.80% with it (with variance 300,
    # 0.79% and 0.81%: the 300 brightest-of-cell stamps dilute little once the penalty
    # spares the Gaussian's shape; with the 160 more isolated ones and the full penalty,
    # 1.51% and 1.06%)
    assert errors[True] < 0.01 and errors[True] < 0.8 * errors[False], errors


def _noise_problem(rng, n=12, weak=()):
    """Normal equations N = S + E of regressors with noise: signal S, noise expectation E
    (positive definite); the ``weak`` directions' signal is a millionth of their noise."""
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    signal = np.full(n, 50.0)
    signal[list(weak)] = 1e-6
    root = q * np.sqrt(signal)[None, :]
    s = root @ root.T
    a = rng.normal(size=(n, n))
    e = a @ a.T / n + 0.1 * np.eye(n)
    return s, e


def test_errors_in_variables_solve_is_exact_where_the_data_exceed_their_noise(backend, rng):
    """(N - E) x = r - e, as solved directly, wherever the noise's share of N stays below
    maxNoiseShare."""
    s, e = _noise_problem(rng)
    x_true, d = rng.normal(size=12), rng.normal(size=12)
    normal, rhs, rhs_noise = s + e, s @ x_true + e @ d, e @ d
    x, corrected = errors_in_variables_solve(
        backend, *(backend.to_device(a) for a in (normal, e, rhs, rhs_noise)), max_share=0.8)
    np.testing.assert_allclose(backend.to_host(x), x_true, rtol=1e-8)
    np.testing.assert_allclose(backend.to_host(corrected), s, rtol=1e-8, atol=1e-8)


def test_errors_in_variables_solve_bounds_directions_the_noise_fills(backend, rng):
    """A few faint kernel sources leave directions whose expected noise matches (or, by
    chance, exceeds) what the data hold: there the exact correction divides by nearly
    nothing (coefficients 10^5 times too large; a kernel sum of 0.99 with residuals 3.8
    sigma on a simulated pair). Bounded, no direction gains more than 1 / (1 - share); the
    delta an image fitted to itself gives stays exact."""
    s, e = _noise_problem(rng, weak=(3, 7))
    normal = s + 0.99 * e  # the noise drawn fell 1% short of its expectation
    rhs = rng.normal(size=12)
    exact = np.linalg.solve(normal - e, rhs)
    dev = [backend.to_device(a) for a in (normal, e, rhs)]
    x = backend.to_host(errors_in_variables_solve(backend, *dev, max_share=0.8)[0])
    plain = np.linalg.solve(normal, rhs)
    # whitened by N, the correction's gain over the plain solution is at most 1 / 0.2
    lower = np.linalg.cholesky(normal)
    gain = np.linalg.norm(lower.T @ x) / np.linalg.norm(lower.T @ plain)
    assert gain <= 5.0 + 1e-9 and np.linalg.norm(lower.T @ exact) > 20 * np.linalg.norm(
        lower.T @ plain)
    # an image fitted to itself: r = N delta and e = E delta give delta, bounded or not
    delta = np.zeros(12)
    delta[0] = 1.0
    same = errors_in_variables_solve(backend, dev[0], dev[1], backend.to_device(normal @ delta),
                                     backend.to_device(e @ delta), max_share=0.8)[0]
    np.testing.assert_allclose(backend.to_host(same), delta, atol=1e-9)


def test_non_finite_coefficients_are_an_error(monkeypatch):
    """A singular system that a backend solves to NaN without a word (CuPy does) is a
    KernelFitError, so no model built on it passes: every model fails, by name."""
    import sys

    from gpudiffim.quality import SubtractionQualityError

    fit = sys.modules["gpudiffim.kernel_fit"]
    solve = fit.errors_in_variables_solve

    def silent_nan(backend, normal, *args, **kwargs):
        theta, gram = solve(backend, normal, *args, **kwargs)
        return theta * float("nan"), gram

    monkeypatch.setattr(fit, "errors_in_variables_solve", silent_nan)
    science, template = kernel_pair(shape=(256, 256), n_stars=120, seed=2)
    with pytest.raises(SubtractionQualityError, match="non-finite coefficients"):
        subtract(science, template, SubtractConfig())
