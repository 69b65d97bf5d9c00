"""Image subtraction: the flavors, one entry point.

``subtract(science, template, config)`` returns the difference (always science minus
template, positive where the science got brighter, in science flux units) with its
mask, variance and PSF, plus the kernel, background, chosen flavor and quality figures.

Flavors (``SubtractConfig.mode``):

* ``convolveTemplate`` — ``D = N - k*R - b``: the template is matched to the science PSF.
* ``convolveScience`` — ``D = (k*N - R - b) / sum(k)``: the science is matched to the
  template PSF (the difference then has the template's PSF).
* ``auto`` — convolve the template unless its PSF is wider than the science PSF in both
  x and y (the reference's rule).
* ``preconvolve`` — the science is first convolved with its own reflected PSF; the
  template is matched to that and subtracted, giving the *score* image (a matched-filtered
  difference: detection thresholds it as it is), with its own variance.

The template must already be on the science pixel grid. Both exposures need PSF models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.signal import fftconvolve

from .backend import get_backend, window_or
from .basis import BasisConfig, alard_lupton_basis
from .convolve import convolve_exposure, fft_convolve, fft_convolve_weighted_sum, grow_mask
from .decorrelate import decorrelation_kernel
from .errors import GpuDiffimError
from .exposure import UNUSABLE_PLANES, Exposure, mask_bits
from .kernel_fit import (KernelFitConfig, KernelSolution, chebyshev_terms, fit_kernel,
                         linear_term_map, psf_flux_ratio, quadratic_term_map, scaled_coords,
                         select_kernel_sources, source_snr_maps, term_factors)
from .psf import (ImagePsf, PolynomialPsf, convolved_psf, kernel_convolved_psf,
                  polynomial_terms)

log = logging.getLogger(__name__)

MODES = ("convolveTemplate", "convolveScience", "auto", "preconvolve")

#: template planes carried into the difference (SAT becomes SAT_TEMPLATE)
TEMPLATE_PLANES = ("BAD", "NO_DATA", "EDGE", "CR", "INTRP", "SUSPECT", "INJECTED")


@dataclass(frozen=True)
class SubtractConfig:
    """Subtraction settings (``ip_diffim`` names where it has them)."""

    mode: str = "convolveTemplate"
    doDecorrelation: bool = True
    doSubtractBackground: bool = True  # our inputs may carry sky; ip_diffim's default is False
    basis: BasisConfig = field(default_factory=BasisConfig)
    kernel: KernelFitConfig = field(default_factory=KernelFitConfig)
    # re-fit the background on the difference over empty sky (ip_diffim's detection does
    # too): the stamps' background, fitted around bright stars, absorbs wing flux that
    # empty sky does not have
    refitBackground: bool = True
    # gpudiffim's own: preconvolution with a sharper template fits the matching kernel
    # template -> science and pre-filters the difference (the same score, see subtract)
    preconvolveByMatching: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


@dataclass(frozen=True, eq=False)
class SubtractionResult:
    """What :func:`subtract` returns."""

    difference: Exposure
    kernel: KernelSolution
    flavor: str
    is_score: bool
    quality: dict
    # how each input's pixel noise reaches the difference: (variance plane, filter) per
    # image, filters host arrays with the difference's units folded in. Photometry sums
    # correlated noise with them (the variance plane alone holds no covariance). Empty for
    # the score, whose flux is one pixel's value
    noise_paths: tuple = ()
    # the matching's own error near bright sources: the image the kernel convolved, less its
    # sky, squared and summed over the kernel's box (device), and the kernel sources (host
    # (n, 2)) where detection calibrates it against the difference (detect.residual_scale)
    residual_power: object = None
    kernel_sources: np.ndarray | None = None

    def summary(self) -> dict:
        """JSON-ready description of the fit."""
        k = self.kernel
        return {"flavor": self.flavor, "is_score": self.is_score, "quality": self.quality,
                "kernel": {"size": k.basis.size, "sigmas": list(k.basis.sigmas),
                           "degrees": list(k.basis.degrees),
                           "deconvolution": k.basis.deconvolution,
                           "spatial_order": k.kernel_order,
                           "coefficients": k.kernel_coeffs.tolist(), **k.stats},
                "background": {"order": k.bg_order, "coefficients": k.bg_coeffs.tolist()}}


def _psf_at_centre(exposure: Exposure) -> np.ndarray:
    if exposure.psf is None:
        raise GpuDiffimError("subtraction needs a PSF model for both exposures "
                             "(give one, or measure it with gpudiffim.psf.measure_psf)")
    ny, nx = exposure.shape
    return exposure.psf.image_at((nx - 1) / 2, (ny - 1) / 2)


def choose_flavor(science: Exposure, template: Exposure, mode: str) -> str:
    """Resolve ``auto``: convolve the science only when the template PSF is wider in x and y."""
    if mode != "auto":
        return mode
    ny, nx = science.shape
    fs = ImagePsf(_psf_at_centre(science)).fwhm()
    ft = ImagePsf(_psf_at_centre(template)).fwhm()
    flavor = "convolveScience" if (ft[0] > fs[0] and ft[1] > fs[1]) else "convolveTemplate"
    log.info("auto mode: science FWHM %.2f x %.2f px, template %.2f x %.2f px -> %s",
             *fs, *ft, flavor)
    return flavor


def convolve_spatial(image, solution: KernelSolution, backend, dtype=None):
    """Convolve with the spatially varying kernel: one FFT convolution per spatial term,
    each weighted by its polynomial over the detector."""
    terms = solution.term_kernels()
    unit = np.eye(len(terms))
    return fft_convolve_weighted_sum(
        image, backend.to_device(terms.astype(np.float32)),
        lambda j: linear_term_map(unit[j], image.shape, solution.bbox, solution.kernel_order,
                                  backend), backend)


def _convolved_variance(variance, kernel, terms, spatial, backend, phi=None):
    """``variance`` convolved with the square of ``kernel`` (after ``phi`` when given),
    scaled by that squared kernel's sum over the detector relative to its value for
    ``kernel``: ``sum (phi * k(x, y))^2`` is a quadratic form in the spatial weights whose
    matrix is the term kernels' inner products, so a kernel that carries more power in one
    corner than at the centre puts more of the convolved image's noise there.
    ``spatial``: the (bbox, order) of the weights that ``terms`` go with."""
    if phi is not None:
        kernel = fftconvolve(phi, kernel)
        terms = None if terms is None else np.array([fftconvolve(phi, t) for t in terms])
    conv = fft_convolve(variance, backend.to_device((kernel**2).astype(np.float32)), backend)
    if terms is None:
        return conv
    gram = np.tensordot(terms, terms, axes=([1, 2], [1, 2]))
    return conv * quadratic_term_map(gram, variance.shape, *spatial, backend) / float(
        np.sum(kernel**2))


def _bad_for_fit(science: Exposure, template: Exposure, planes) -> object:
    bits_s = mask_bits(*[p for p in planes if p in science.mask_planes], planes=science.mask_planes)
    bits_t = mask_bits(*[p for p in planes if p in template.mask_planes], planes=template.mask_planes)
    return ((science.mask & bits_s) != 0) | ((template.mask & bits_t) != 0)


def _template_mask_bits(template: Exposure, backend):
    """Template mask planes carried into the difference; SAT becomes SAT_TEMPLATE."""
    xp = backend.xp
    keep = mask_bits(*TEMPLATE_PLANES, planes=template.mask_planes)
    out = template.mask & keep
    sat = (template.mask & template.bit("SAT")) != 0
    return xp.where(sat, out | mask_bits("SAT_TEMPLATE"), out)


def _good_sample(backend, values, good, max_n: int = 200_000):
    """Sorted values where ``good``, every k-th of them so that at most ~``max_n`` remain."""
    xp = backend.xp
    sample = xp.reshape(values, (-1,))[xp.reshape(good, (-1,))]
    return xp.sort(sample[::max(1, int(sample.shape[0] // max_n))])


def _median(backend, values, good) -> float:
    s = _good_sample(backend, values, good)
    if s.shape[0] == 0:
        raise GpuDiffimError("no pixel is usable in both the science and the template")
    return float(s[s.shape[0] // 2])


def _robust_sigma(backend, values, good) -> float:
    """Robust std (MAD x 1.4826) of ``values`` where ``good``, on a subsample."""
    xp = backend.xp
    s = _good_sample(backend, values, good)
    if s.shape[0] == 0:
        return float("nan")
    dev = xp.sort(xp.abs(s - s[s.shape[0] // 2]))
    return float(1.4826 * dev[dev.shape[0] // 2])


def subtract(science: Exposure, template: Exposure, config: SubtractConfig = SubtractConfig(),
             backend=None) -> SubtractionResult:
    """PSF-match and subtract ``template`` from ``science`` (same pixel grid)."""
    backend = get_backend(backend)
    xp = backend.xp
    if science.shape != template.shape:
        raise GpuDiffimError(f"template shape {template.shape} differs from science "
                             f"{science.shape}: resample the template onto the science grid")
    sci, tmpl = science.to_backend(backend), template.to_backend(backend)
    flavor = choose_flavor(sci, tmpl, config.mode)
    psf_s, psf_t = _psf_at_centre(sci), _psf_at_centre(tmpl)
    fwhm_s_xy, fwhm_t_xy = ImagePsf(psf_s).fwhm(), ImagePsf(psf_t).fwhm()
    fwhm_s, fwhm_t = float(np.mean(fwhm_s_xy)), float(np.mean(fwhm_t_xy))
    ny, nx = sci.shape
    nodata_s = (sci.mask & sci.bit("NO_DATA")) != 0
    nodata_t = (tmpl.mask & tmpl.bit("NO_DATA")) != 0

    by_matching = False
    if flavor == "preconvolve":
        pre = np.flip(psf_s) / psf_s.sum()
        target_psf = _self_convolved(psf_s)
        source, source_var, source_psf, fwhm_src = tmpl.image, tmpl.variance, psf_t, fwhm_t
        # with a sharper template the matching kernel is compact in the science's own
        # space, and pre-filtering the difference gives the same score as fitting the
        # broad kernel (pre * k) to the pre-convolved science, only better determined
        by_matching = config.preconvolveByMatching and fwhm_t < fwhm_s
        if by_matching:  # the science itself is fitted: only its mask is pre-convolved
            n_mask = grow_mask(sci.mask, pre.shape, backend, sci.mask_planes)
            target, target_var, fit_psf, fwhm_tgt = sci.image, sci.variance, psf_s, fwhm_s
        else:
            target, n_mask, target_var = convolve_exposure(
                sci.image, sci.mask, sci.variance, backend.to_device(pre.astype(np.float32)),
                backend, sci.mask_planes)
            fit_psf = target_psf
            fwhm_tgt = float(np.mean(ImagePsf(target_psf).fwhm()))
            if fwhm_t > fwhm_tgt:
                log.warning("preconvolve: the template (FWHM %.2f px) is wider than the "
                            "pre-convolved science (%.2f px); the kernel must deconvolve and "
                            "bright sources will leave residuals (convolveScience suits this "
                            "pair)", fwhm_t, fwhm_tgt)
    elif flavor == "convolveTemplate":
        source, source_var, target, target_var = tmpl.image, tmpl.variance, sci.image, sci.variance
        source_psf, target_psf, fwhm_src, fwhm_tgt = psf_t, psf_s, fwhm_t, fwhm_s
    else:  # convolveScience
        source, source_var, target, target_var = sci.image, sci.variance, tmpl.image, tmpl.variance
        source_psf, target_psf, fwhm_src, fwhm_tgt = psf_s, psf_t, fwhm_s, fwhm_t
    if flavor != "preconvolve":
        fit_psf = target_psf
    nodata = nodata_s | nodata_t
    source = xp.where(nodata, 0.0, source)
    target = xp.where(nodata, 0.0, target)

    basis = alard_lupton_basis(fwhm_src, fwhm_tgt, config.basis)
    bad = _bad_for_fit(sci, tmpl, config.kernel.badMaskPlanes)
    # kernel sources are chosen on the science image, as in ip_diffim (its own S/N)
    # (for preconvolution the science before its pre-filter: the filtered image's noise
    # is correlated, so its per-pixel variance would overstate every source's S/N)
    sel_image, sel_var, sel_psf = ((source, source_var, source_psf) if flavor == "convolveScience"
                                   else (sci.image, sci.variance, psf_s) if flavor == "preconvolve"
                                   else (target, target_var, fit_psf))
    maps = source_snr_maps(sel_image, sel_var, sel_psf, backend)
    positions = select_kernel_sources(sel_image, sel_var, bad, sel_psf, config.kernel,
                                      basis.size, backend, maps)
    if flavor == "convolveScience":  # bright ones only, while enough of them remain
        lo, hi = config.kernel.convolvedScienceSnr
        bright = select_kernel_sources(sel_image, sel_var, bad, sel_psf,
                                       replace(config.kernel, detectionThreshold=lo, maxSnr=hi),
                                       basis.size, backend, maps)
        if len(bright) >= config.kernel.minConvolvedScienceSources:
            positions = bright
    # convolving the noisier image: its noise would bias a fitted kernel sum low (regression
    # dilution), so the photometric scale comes from PSF fluxes and is imposed
    pinned_sum = (psf_flux_ratio(source, target, source_psf, target_psf, positions, backend)
                  if flavor == "convolveScience" else None)
    fit_config = (replace(config.kernel, regularization=config.kernel.convolvedScienceRegularization)
                  if flavor == "convolveScience" else config.kernel)
    solution = fit_kernel(source, target, source_var, target_var, bad, basis, positions,
                          fit_config, backend, bbox=(nx, ny), source_psf=source_psf,
                          kernel_sum=pinned_sum)
    log.info("kernel: %d of %d stamps, size %d, sum %.4f at centre", solution.stats["n_used"],
             solution.stats["n_candidates"], basis.size,
             float(solution.kernel_sum_at((nx - 1) / 2, (ny - 1) / 2)))

    matched = convolve_spatial(source, solution, backend)
    terms = solution.term_kernels()
    spatial = (solution.bbox, solution.kernel_order)
    ksum = linear_term_map(terms.sum(axis=(1, 2)), sci.shape, *spatial, backend)  # over the detector
    k_fit = k_centre = solution.kernel_at((nx - 1) / 2, (ny - 1) / 2)
    background = solution.background_image(sci.shape, backend) if config.doSubtractBackground else 0.0
    if by_matching:  # the score's kernel: the pre-filter after the matching kernel
        k_centre = fftconvolve(pre, k_centre)

    if flavor == "convolveScience":
        diff = (matched + background - target) / ksum  # model: target = k*source + b
        grown = grow_mask(sci.mask, k_centre.shape, backend, sci.mask_planes)
        mask = grown | _template_mask_bits(tmpl, backend)
        # a point source in the science reaches the difference through the fitted kernel:
        # its shape is k(x, y) * P_science(x, y), which the template's PSF model matches only
        # as well as the kernel fits (bright fakes' pulls at SNR > 30: 1.75 with the
        # template's model, 1.33 with this one, 1.13 once errors sum correlated noise)
        out_model = kernel_convolved_psf(sci.psf, solution.kernel_at, solution.kernel_order,
                                         (nx, ny))
    else:
        diff = target - matched - background
        if by_matching:
            diff = fft_convolve(diff, backend.to_device(pre.astype(np.float32)), backend)
        tmask = grow_mask(_template_mask_bits(tmpl, backend), k_centre.shape, backend,
                          tmpl.mask_planes)
        mask = (n_mask if flavor == "preconvolve" else sci.mask) | tmask
        # the score's: the science PSF through the pre-filter, wherever it is on the detector
        out_model = sci.psf if flavor == "convolveTemplate" else convolved_psf(sci.psf, pre)
    mask = mask & ~mask_bits("DETECTED", "DETECTED_NEGATIVE")
    # saturated stars' wings reach past the kernel: grow SAT / SAT_TEMPLATE once more by it
    sat = mask & mask_bits("SAT", "SAT_TEMPLATE")
    if bool(xp.any(sat != 0)):
        h = k_centre.shape[0]
        mask = mask | window_or(backend, sat, (h, h), (-(h // 2), -(h // 2)))
    nodata_out = (mask & mask_bits("NO_DATA")) != 0
    # pixels with no usable value are zeroed so the decorrelation does not spread them
    unusable = (mask & mask_bits(*UNUSABLE_PLANES)) != 0
    diff = xp.where(unusable, 0.0, diff)

    good = (mask & mask_bits("NO_DATA", "BAD", "SAT", "EDGE", "SAT_TEMPLATE", "CR")) == 0
    sky_offset = 0.0
    if config.refitBackground and config.doSubtractBackground:
        plane, sky_offset = _sky_plane(backend, diff, good, maps[1], solution.bbox,
                                       config.kernel.spatialBgOrder)
        diff = xp.where(unusable, 0.0, diff - plane)
    s_var = _median(backend, sci.variance, good)
    t_var = _median(backend, tmpl.variance, good)
    kappa = float(k_centre.sum())
    # each input's variance, NO_DATA zeroed: through the convolutions, and kept with the
    # result for photometry (noise_paths)
    planes = (xp.where(nodata, 0.0, target_var), xp.where(nodata, 0.0, source_var))
    phi_out = None  # the decorrelation applied after the difference, if any
    if config.doDecorrelation:
        if by_matching:
            # the score's correction, sqrt((s + kappa^2 t) |P|^2 / (s |P|^2 + t |P k|^2)),
            # is convolveTemplate's for the fitted kernel wherever the pre-filter P passes
            # anything. Computed as that ratio, its cut-off where |P|^2 vanishes rang out
            # to ~100 px, and the EDGE band it widens covered 29% of a 2048^2 score
            phi = decorrelation_kernel(k_fit, s_var, t_var, "convolveTemplate")
        else:
            phi = decorrelation_kernel(k_centre, s_var, t_var, flavor,
                                       psf=psf_s if flavor == "preconvolve" else None)
        diff = fft_convolve(diff, backend.to_device(phi.astype(np.float32)), backend)
        # the decorrelation kernel carries edge effects inward: widen EDGE by its reach
        reach = _reach(phi)
        if reach > 0:
            edge = mask & mask_bits("EDGE")
            mask = mask | window_or(backend, edge, (2 * reach + 1, 2 * reach + 1), (-reach, -reach))
        out_model = convolved_psf(out_model, phi)
        phi_out = phi
    if flavor == "preconvolve":  # the science through pre (and phi); the template through
        # the fitted kernel (and phi; and pre too when that was fitted in science space)
        phi_sci = pre if phi_out is None else fftconvolve(phi_out, pre)
        sci_var = planes[0] if by_matching else xp.where(nodata, 0.0, sci.variance)
        var = (fft_convolve(sci_var, backend.to_device((phi_sci**2).astype(np.float32)), backend)
               + _convolved_variance(planes[1], k_fit, terms, spatial, backend,
                                     phi_sci if by_matching else phi_out))
    else:  # each pixel's variance through both convolutions (phi, and k then phi)
        var = _decorrelated_variance(backend, *planes, phi_out, k_centre, terms, spatial)
        if flavor == "convolveScience":
            var = var / (ksum * ksum)
    var = xp.where(nodata_out, 0.0, var)
    if flavor == "preconvolve":  # score in flux units: its value at a source is the PSF flux
        norm = _score_norm(backend, sci.psf, psf_s, sci.shape, phi_out)
        diff, var = diff / norm, var / (norm * norm)
    diff = xp.astype(diff, xp.float32)
    var = xp.astype(var, xp.float32)

    pull_sigma = _robust_sigma(backend, diff / xp.sqrt(xp.where(var > 0, var, 1.0)),
                               good & (var > 0))
    quality = {
        "flavor": flavor, "decorrelated": phi_out is not None,
        "preconvolve_by_matching": by_matching,
        "science_fwhm": list(map(float, fwhm_s_xy)),
        "template_fwhm": list(map(float, fwhm_t_xy)),
        "kernel_sum_centre": kappa,
        "kernel_sum_range": [float(v) for v in _corner_range(solution, nx, ny)],
        "background_centre": float(solution.background_at((nx - 1) / 2, (ny - 1) / 2)),
        "sky_refit_centre": sky_offset,
        "n_kernel_sources": solution.stats["n_used"],
        "kernel_residual_std": solution.stats["residual_std"],
        "difference_pull_sigma": pull_sigma,
        "science_variance": s_var, "template_variance": t_var,
    }
    difference = sci.replace(image=diff, mask=mask, variance=var, psf=out_model)
    # (only its shape across the detector matters: detection scales it on the difference)
    bright = xp.astype(xp.where(good, source - _median(backend, source, good), 0.0), xp.float32)
    power = _box_power(backend, bright, basis.size)
    paths = ()
    if flavor != "preconvolve":
        after = np.ones((1, 1)) if phi_out is None else phi_out
        through_k = fftconvolve(after, k_centre)
        filters = ((after / kappa, through_k / kappa) if flavor == "convolveScience"
                   else (after, through_k))
        paths = tuple((plane, _core(f)) for plane, f in zip(planes, filters))  # 7-11 px
    return SubtractionResult(difference, solution, flavor, flavor == "preconvolve", quality,
                             paths, power, np.asarray(positions))


def _box_power(backend, image, size: int, factor: int = 4):
    """``image^2`` summed over a box of about ``size`` pixels around each pixel, on a grid
    of ``factor``-pixel blocks (a smooth map, a third of the cost of the full-resolution
    box filter)."""
    xp = backend.xp
    ny, nx = image.shape
    sq = image * image
    py, px = -ny % factor, -nx % factor
    if py:
        sq = xp.concat([sq, backend.zeros((py, nx), dtype=sq.dtype)], axis=0)
    if px:
        sq = xp.concat([sq, backend.zeros((sq.shape[0], px), dtype=sq.dtype)], axis=1)
    Y, X = sq.shape
    blocks = xp.sum(xp.reshape(sq, (Y // factor, factor, X // factor, factor)), axis=(1, 3))
    box = max(1, size // factor) | 1
    summed = backend.uniform_filter(blocks, box) * float(box * box)
    return xp.repeat(xp.repeat(summed, factor, axis=0), factor, axis=1)[:ny, :nx]


def _core(kernel: np.ndarray, fraction: float = 1e-4) -> np.ndarray:
    """The centred box of ``kernel`` holding all but ``fraction`` of its power."""
    h, keep = kernel.shape[0] // 2, _reach(kernel * kernel, 1.0 - fraction)
    return kernel[h - keep:h + keep + 1, h - keep:h + keep + 1]


def _decorrelated_variance(backend, target_var, source_var, phi, kernel, terms=None,
                           spatial=None):
    """Per-pixel variance of ``phi * (target - kernel * source)`` for independent pixel
    noise: ``phi^2 * V_target + (phi * k)^2 * V_source`` (no ``phi``: none applied). In flat sky it equals the white
    value the decorrelation aims at; around bright sources it follows their photon noise
    as the convolutions spread it (the convolved image's noise spreads over the kernel's
    width, beyond that image's own, sharper, profile). With the spatial ``terms`` and
    ``spatial`` (their bbox and order) the second part follows the kernel's power across
    the detector."""
    through = (target_var if phi is None else
               fft_convolve(target_var, backend.to_device((phi**2).astype(np.float32)), backend))
    return through + _convolved_variance(source_var, kernel, terms, spatial, backend, phi)


def _score_norm(backend, psf_model, psf_centre, shape, phi=None):
    """The score's value per unit flux of a point source: ``sum F P(x, y)`` with the PSF at
    (x, y) and the filter ``F = P_centre * phi~`` that the score applied (the pre-filter
    made from the centre PSF, then the decorrelation ``phi`` when given: it reshapes the
    filtered source, so its peak moves; leaving it out put bright fakes' score fluxes 4%
    low with a template wider than the science). Constant for a constant PSF.
    A :class:`PolynomialPsf` is ``sum_j w_j C_j / sum_j w_j sum(C_j)`` with monomial
    weights ``w_j(x, y)``, so the map is exactly the ratio of two polynomials in position."""
    p_c = psf_centre / psf_centre.sum()
    filt = p_c if phi is None else fftconvolve(p_c, np.flip(phi), mode="same")
    if not isinstance(psf_model, PolynomialPsf):
        return float(np.sum(p_c * filt))
    coeffs = psf_model.image
    h = min(coeffs.shape[1], filt.shape[0]) // 2
    c, k = coeffs.shape[1] // 2, filt.shape[0] // 2
    overlap = np.sum(coeffs[:, c - h:c + h + 1, c - h:c + h + 1]
                     * filt[k - h:k + h + 1, k - h:k + h + 1], axis=(1, 2))
    totals = coeffs.sum(axis=(1, 2))
    xp = backend.xp
    ny, nx = shape
    u, v = scaled_coords(backend.arange(nx, dtype=xp.float32),
                         backend.arange(ny, dtype=xp.float32), psf_model.bbox)
    u, v = xp.reshape(u, (1, nx)), xp.reshape(v, (ny, 1))
    num = backend.zeros((ny, nx), dtype=xp.float32)
    den = backend.zeros((ny, nx), dtype=xp.float32)
    for (i, j), a, b in zip(polynomial_terms(psf_model.order), overlap, totals):
        term = (u**i) * (v**j)
        num, den = num + float(a) * term, den + float(b) * term
    return num / den


def _sky_plane(backend, diff, good, snr, bbox, order: int, block: int = 4,
               quiet: tuple = ((3.0, 4), (30.0, 12), (300.0, 30)), clip: float = 3.0):
    """Background plane of the difference over empty sky, and its value at the centre.

    Empty sky: good pixels within ``clip`` robust sigmas of zero, in ``block`` x ``block``
    blocks away from the science's sources: for each (S/N, reach) of ``quiet``, farther
    than ``reach`` pixels from wherever the science's matched-filter S/N ``snr`` reaches
    that level in either sign (symmetric cuts leave the noise unbiased). Every such pixel
    counts (the offsets sought are ~1% of the pixel noise); the plane is the weighted
    least-squares fit of the Chebyshev terms to the blocks' sums.
    """
    xp = backend.xp
    ny, nx = (diff.shape[0] // block) * block, (diff.shape[1] // block) * block
    z = xp.abs(snr[:ny:block, :nx:block])
    sky = None
    for level, reach in quiet:
        near = backend.maximum_filter(xp.astype(z >= level, xp.uint8), 2 * (reach // block) + 1)
        sky = (near == 0) if sky is None else sky & (near == 0)
    d = diff[:ny, :nx]
    sigma = _robust_sigma(backend, d, good[:ny, :nx])
    use = good[:ny, :nx] & (xp.abs(d) < clip * sigma)
    shape = (ny // block, block, nx // block, block)
    w = xp.sum(xp.astype(xp.reshape(use, shape), xp.float64), axis=(1, 3))
    wd = xp.sum(xp.reshape(xp.where(use, xp.astype(d, xp.float64), 0.0), shape), axis=(1, 3))
    w, wd = xp.where(sky, w, 0.0), xp.where(sky, wd, 0.0)
    # the terms at the blocks' centres, from their 1-D factors (host, small)
    tu, tv = term_factors(diff.shape, bbox, order)
    tu, tv = tu[block // 2:nx:block], tv[block // 2:ny:block]
    powers = polynomial_terms(order)
    t = backend.to_device(np.array([np.outer(tv[:, b], tu[:, a]).ravel() for a, b in powers]))
    w, wd = xp.reshape(w, (-1,)), xp.reshape(wd, (-1,))
    if float(xp.sum(w)) < 100 * t.shape[0]:
        return 0.0, 0.0
    normal = backend.to_host(xp.matmul(t * w, backend.matrix_transpose(t)))
    coeffs = np.linalg.solve(normal, backend.to_host(xp.matmul(t, wd)))
    plane = linear_term_map(coeffs, diff.shape, bbox, order, backend)
    u, v = scaled_coords(diff.shape[1] // 2, diff.shape[0] // 2, bbox)
    return plane, float(np.sum(coeffs * chebyshev_terms(np, np.asarray(u), np.asarray(v), order)))


def _reach(kernel: np.ndarray, fraction: float = 0.999) -> int:
    """Radius (pixels) holding ``fraction`` of a centred kernel's absolute weight."""
    h = kernel.shape[0] // 2
    y, x = np.mgrid[-h:h + 1, -h:h + 1]
    r = np.maximum(np.abs(x), np.abs(y)).ravel()
    w = np.abs(kernel).ravel()
    order = np.argsort(r)
    cum = np.cumsum(w[order]) / w.sum()
    return int(r[order][np.searchsorted(cum, fraction)])


def _corner_range(solution, nx, ny):
    xs, ys = np.meshgrid(np.linspace(0, nx - 1, 5), np.linspace(0, ny - 1, 5))
    sums = solution.kernel_sum_at(xs.ravel(), ys.ravel())
    return float(sums.min()), float(sums.max())


def _self_convolved(psf: np.ndarray) -> np.ndarray:
    """PSF of an image pre-convolved with its own reflected PSF, on a grid large enough
    for the wider profile (sqrt(2) wider)."""
    h = psf.shape[0]
    pad = h // 4 + 1
    p = np.pad(psf, pad)
    out = fftconvolve(p, np.flip(psf), mode="same")
    return out / out.sum()
