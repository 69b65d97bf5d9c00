"""Image subtraction: the flavors, one entry point.

``subtract(science, template, config)`` returns the difference (always science minus
template, positive where the science got brighter, in science flux units) with its
mask, variance and PSF, plus the kernel, chosen flavor, noise model and quality figures.

Flavors (``SubtractConfig.mode``):

* ``convolveTemplate`` — ``D = N - k*R - b``: the template is matched to the science PSF.
* ``convolveScience`` — ``D = (k*N - R - b) / sum(k)``: the science is matched to the
  template PSF (the difference then has the science PSF through the kernel).
* ``auto`` — convolve the template unless its PSF is wider than the science PSF in both
  x and y (the reference's rule).
* ``preconvolve`` — the science is first convolved with its own reflected PSF; the
  template is matched to that and subtracted, giving the *score* image (a matched-filtered
  difference: detection thresholds it as it is), with its own variance. With a sharper
  template the kernel is instead fitted template -> science and the difference pre-filtered
  (the same score, better determined).
* ``zogy`` — proper image subtraction (Zackay, Ofek & Gal-Yam 2016): the kernel fit (in
  the direction ``auto`` picks) only puts the template on the science's flux scale and
  background; filters made from the two PSFs and noise levels (:mod:`gpudiffim.zogy`) give
  the optimal score for any pair of PSFs, a score image in flux units as preconvolve's.

Each flavor is set up as one :class:`MatchingProblem` (``target ~ k * source + b``), and
the same stages then run on it; ``docs/algorithm.md`` gives the reasons for each.
The template must already be on the science pixel grid. Both exposures need PSF models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
from scipy.signal import fftconvolve

from .arrayops import window_or
from .backend import get_backend
from .background import quiet_blocks, quiet_pixels, refit_sky_plane
from .basis import BasisConfig, KernelBasis, alard_lupton_basis
from .choices import MODES
from .convolve import (
    UNBOUNDED_FRACTION,
    convolve_exposure,
    fft_convolve,
    fft_convolve_weighted_sum,
    grow_convolved_mask,
    kernel_core,
    kernel_reach,
    reach_box,
)
from .cosmic import CosmicRayConfig, repair_cosmic_rays
from .decorrelate import decorrelation_kernel
from .errors import GpuDiffimError, InputError
from .exposure import (
    DETECTION_EXCLUDED,
    KERNEL_FIT_EXCLUDED,
    SATURATED_PLANES,
    TEMPLATE_PLANES,
    UNUSABLE_PLANES,
    Exposure,
    mask_bits,
    modelled_cores,
)
from .kernel_fit import (
    KernelFitConfig,
    KernelFitError,
    KernelSolution,
    fit_kernel,
    flux_ratio,
    psf_flux_ratio,
)
from .noise import (
    NoiseModel,
    decorrelated_variance,
    residual_power,
    score_variance,
    shared_noise_correlation,
)
from .options import configclass, option
from .psf import ImagePsf, PsfMeasurementError, convolved_psf, kernel_convolved_psf, measure_psf
from .quality import QualityConfig, SubtractionQualityError, quality_failures
from .saturation import (
    SaturatedCoreConfig,
    added_at,
    difference_stars,
    halo_rings,
    model_saturated_cores,
    wing_variance,
)
from .score import filter_response, prefilter, score_norm, self_convolved
from .sources import select_kernel_sources, source_snr_maps
from .stats import (
    mean_where,
    median_where_device,
    medians_where,
    robust_sigma_where_device,
)
from .validation import checked_psf_model, pixel_counts, usable_exposure
from .zogy import proper_correlation, proper_filters_over

__all__ = ["MODES", "SubtractConfig", "SubtractionResult", "MatchingProblem", "subtract",
           "subtract_prepared", "simpler_models", "photometric_ratios",
           "psf_centre", "choose_flavor", "matching_problem", "kernel_sources",
           "fit_matching_kernel", "matched_difference", "difference_mask", "difference_psf",
           "empty_sky_background", "decorrelation", "decorrelate", "input_variances",
           "difference_variance", "noise_model", "noise_correlation", "with_psf",
           "difference_pull", "variance_scale", "MatchingFit", "matching_fit",
           "subtract_proper", "flux_matched_template", "proper_mask",
           "saturated_star_light"]

log = logging.getLogger(__name__)



@configclass
class SubtractConfig:
    """Subtraction settings (``ip_diffim`` names where it has them)."""

    mode: str = option("convolveTemplate", f"the flavor, one of {', '.join(MODES)}")
    doDecorrelation: bool = option(True, "whiten the difference's noise (Reiss & Lupton)")
    doSubtractBackground: bool = option(True, "fit and subtract a differential background "
                                              "(ip_diffim's default is False)")
    basis: BasisConfig = option(factory=BasisConfig, doc="the Alard-Lupton kernel basis")
    kernel: KernelFitConfig = option(factory=KernelFitConfig, doc="the kernel fit")
    cosmicRays: CosmicRayConfig = option(factory=CosmicRayConfig,
                                         doc="cosmic rays in inputs that have none masked")
    saturatedCores: SaturatedCoreConfig = option(factory=SaturatedCoreConfig,
                                                 doc="saturated cores given the model of "
                                                     "their stars before any convolution")
    quality: QualityConfig = option(factory=QualityConfig, doc="the quality gates every "
                                                                "subtraction must pass")
    refitBackground: bool = option(True, "re-fit the difference's background over empty sky")
    preconvolveByMatching: bool = option(True, "preconvolve with a sharper template: fit "
                                               "template -> science, then pre-filter")
    doScaleVariance: bool = option(True, "rescale the difference's variance to its own "
                                         "pixels' noise (ip_diffim)")
    varianceScaleLimit: float = option(10.0, "largest variance rescaling applied, either way")

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


@dataclass(frozen=True, eq=False)
class MatchingProblem:
    """One flavor's matching, ``target ~ k * source + b``, and what goes with it.

    Pixel planes are on the backend, NO_DATA pixels (of either input) zeroed in ``source``
    and ``target``; PSFs are host images at the detector's centre.
    """

    flavor: str
    source: object  # the image the kernel convolves
    source_var: object
    source_psf: np.ndarray
    target: object  # the image it is matched to
    target_var: object
    target_psf: np.ndarray
    target_mask: object  # the mask of the unconvolved side (pre-filtered for the score)
    nodata: object  # NO_DATA in either input
    selection: tuple  # (image, variance, PSF) kernel sources are chosen on
    bad: object  # pixels the kernel fit gives no weight (either input)
    science_psf: np.ndarray  # the science PSF at the centre
    fwhm: dict  # (x, y) FWHM of the science, template, source and target PSFs (pixels)
    prefilter: np.ndarray | None = None  # the score's pre-filter
    by_matching: bool = False  # the score fitted template -> science, then pre-filtered
    selection_from: str = "the science"  # the exposure kernel sources are chosen on

    @property
    def science_is_convolved(self) -> bool:
        return self.flavor == "convolveScience"


@dataclass(frozen=True, eq=False)
class SubtractionResult:
    """What :func:`subtract` returns.

    Attributes
    ----------
    difference : Exposure
        Science minus matched template (or the score), with mask, variance and PSF.
    kernel : KernelSolution
        The fitted kernel and differential background.
    flavor : str
        The flavor used (``auto`` resolved).
    is_score : bool
        True for a score image (preconvolve, zogy: detection thresholds it as it is, its
        value at a source is the PSF flux).
    quality : dict
        Figures of the fit and the difference (JSON-ready).
    noise : NoiseModel
        How the inputs' noise and the kernel's error reach the difference.
    science_psf, template_psf : PSF models
        The inputs' PSFs, as given or as measured.
    """

    difference: Exposure
    kernel: KernelSolution
    flavor: str
    is_score: bool
    quality: dict
    noise: NoiseModel
    science_psf: object = None
    template_psf: object = None

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


def subtract(science: Exposure, template: Exposure, config: SubtractConfig | None = None,
             backend=None) -> SubtractionResult:
    """PSF-match ``template`` to ``science`` (or the reverse) and subtract.

    Parameters
    ----------
    science, template : Exposure
        The new exposure and the template, on one pixel grid, each with a PSF model.
    config : SubtractConfig, optional
        The flavor and the fit's settings (default: ``SubtractConfig()``).
    backend : str or Backend, optional
        Where the arrays live (default: ``auto``).

    Returns
    -------
    SubtractionResult
        The difference exposure, the kernel, the flavor, its noise model and quality.
    """
    config = config or SubtractConfig()
    backend = get_backend(backend)
    science, template = _on_backend(science, template, backend)
    counts = backend.to_host_all(pixel_counts(science, backend), pixel_counts(template, backend))
    (sci, sci_stars), (tmpl, tmpl_stars) = (
        _prepared(e, role, config, backend, c)
        for e, role, c in zip((science, template), ("science", "template"), counts))
    config = replace(config, mode=choose_flavor(sci, tmpl, config.mode))
    rejected, last = [], None
    zero_points = sci.zero_point is not None and tmpl.zero_point is not None
    for model, attempt in simpler_models(config, zero_points):
        if last is not None and _same_model(attempt, last):
            continue  # the fit already fell back to a constant kernel
        try:
            prepared = subtract_proper if attempt.mode == "zogy" else subtract_prepared
            result = prepared(sci, tmpl, attempt, backend, saturated=(sci_stars, tmpl_stars))
        except KernelFitError as err:
            failures, figures = [str(err)], {}
        else:
            failures, figures = quality_failures(result.quality, config.quality), result.quality
            if not failures:
                return _accepted(result, model, rejected)
            last = result
        rejected.append({"model": model, "failures": failures, "figures": figures})
        log.warning("%s: the %s subtraction fails its quality gates: %s", sci.info.describe(),
                    model, "; ".join(failures))
        if not config.quality.doRetry:
            break
    raise SubtractionQualityError(
        f"{sci.info.describe()}: no subtraction passed the quality gates ("
        + "; ".join(f"{r['model']}: {', '.join(r['failures'])}" for r in rejected) + ")",
        rejected)


@dataclass(frozen=True, eq=False)
class MatchingFit:
    """A flavor's fitted matching kernel and what its fit found on the way."""

    problem: MatchingProblem
    solution: KernelSolution
    positions: np.ndarray  # host (n, 2) kernel sources
    quiet: object  # the empty-sky blocks (:func:`~gpudiffim.background.quiet_blocks`)
    rho: float  # the inputs' shared noise correlation
    ratios: dict  # :func:`photometric_ratios`
    pinned: float | None  # the kernel sum the zero points fixed, if any


def matching_fit(sci: Exposure, tmpl: Exposure, config: SubtractConfig, flavor: str,
                 backend) -> MatchingFit:
    """Set up ``flavor``'s matching, choose its kernel sources and fit its kernel."""
    problem = matching_problem(sci, tmpl, flavor, config.preconvolveByMatching,
                               config.kernel.badMaskPlanes, backend)
    basis = alard_lupton_basis(_mean(problem.fwhm["source"]), _mean(problem.fwhm["target"]),
                               config.basis)
    snr_maps = source_snr_maps(*problem.selection, backend)
    quiet = quiet_blocks(backend, snr_maps[1])
    positions = kernel_sources(problem, basis, snr_maps, config.kernel, backend)
    rho = noise_correlation(problem, quiet, backend)
    ratios = photometric_ratios(problem, sci, tmpl, positions, backend)
    pinned = ratios["zero_point_ratio"] if config.kernel.kernelSumFromZeroPoints else None
    solution = fit_matching_kernel(problem, basis, positions, config.kernel, backend, rho,
                                   pinned)
    return MatchingFit(problem, solution, positions, quiet, rho, ratios, pinned)


def subtract_prepared(sci: Exposure, tmpl: Exposure, config: SubtractConfig, backend,
                      saturated: tuple | None = None) -> SubtractionResult:
    """One subtraction of inputs on the backend with PSF models, by one model (the flavor
    of ``config.mode``, not ``auto`` or ``zogy``), without the quality gates: the stages in
    order. ``saturated``: the inputs' modelled saturated stars
    (:func:`~gpudiffim.saturation.model_saturated_cores`), whose light adds its error to
    the variance."""
    flavor = config.mode
    fit = matching_fit(sci, tmpl, config, flavor, backend)
    problem, solution, positions, quiet = fit.problem, fit.solution, fit.positions, fit.quiet
    kernel = _centre_kernel(problem, solution)
    diff = matched_difference(problem, solution, config.doSubtractBackground, backend)
    mask = difference_mask(problem, sci, tmpl, kernel, backend)
    good = (mask & mask_bits(*DETECTION_EXCLUDED)) == 0
    psf = difference_psf(problem, sci, solution)
    diff, sky = empty_sky_background(diff, mask, good, quiet, solution, config, backend)
    s_var, t_var = _median_variances(sci, tmpl, good, backend)
    phi = (decorrelation(problem, solution, kernel, s_var, t_var)
           if config.doDecorrelation else None)
    diff, mask, psf = decorrelate(diff, mask, psf, phi, backend)
    variances = input_variances(problem, backend)
    var = difference_variance(problem, sci, solution, kernel, phi, mask, variances, backend)
    diff, var = _in_flux_units(problem, sci, diff, var, phi, backend)
    pull = difference_pull(diff, var, good, quiet, backend)
    scale = variance_scale(pull, config) if config.doScaleVariance else 1.0
    var, variances = var * scale, tuple(v * scale for v in variances)
    diff, var, mask = saturated_star_light(diff, var, mask, problem, kernel, psf, saturated,
                                           config, backend)
    noise = noise_model(problem, solution, kernel, phi, good, positions, variances, backend)
    quality = _quality(fit, kernel, phi, sky, s_var, t_var, pull, scale)
    difference = sci.replace(image=diff, mask=mask, variance=var, psf=psf)
    return SubtractionResult(difference, solution, flavor, flavor == "preconvolve", quality,
                             noise, sci.psf, tmpl.psf)


def subtract_proper(sci: Exposure, tmpl: Exposure, config: SubtractConfig, backend,
                    saturated: tuple | None = None) -> SubtractionResult:
    """:func:`subtract_prepared` for ``zogy``: the kernel, fitted in the direction ``auto``
    picks, puts the template on the science's flux scale and background; ZOGY's filters
    from the two PSFs and noise levels make the score, in flux units."""
    xp = backend.xp
    fit = matching_fit(sci, tmpl, config, choose_flavor(sci, tmpl, "auto"), backend)
    problem, solution = fit.problem, fit.solution
    science, science_var = (xp.where(problem.nodata, 0.0, a) for a in (sci.image, sci.variance))
    template, template_var = flux_matched_template(problem, solution, tmpl,
                                                   config.doSubtractBackground, backend)
    # both filters sum to 1/(s_n + s_r): a level common to both images cancels in the score,
    # so taking the science's off both leaves masked pixels (zeroed) at the sky's level
    level = mean_where(backend, science, ~problem.bad & ~problem.nodata)
    science, template = (xp.where(problem.nodata, 0.0, a - level) for a in (science, template))
    s_var, t_var = medians_where(backend, ~problem.bad & ~problem.nodata, science_var,
                                 template_var)
    filters = proper_filters_over(matched_psfs(problem, solution, sci, tmpl), s_var, t_var,
                                  sci.shape)
    k_n, k_r = filters.science[filters.centre], filters.template[filters.centre]
    score = (_proper_filtered(science, filters.science, filters, backend)
             - _proper_filtered(template, filters.template, filters, backend))
    mask = proper_mask(sci, tmpl, k_n, k_r, backend)
    good = (mask & mask_bits(*DETECTION_EXCLUDED)) == 0
    score, sky = empty_sky_background(score, mask, good, fit.quiet, solution, config, backend)
    var = (_proper_filtered(science_var, filters.science**2, filters, backend)
           + _proper_filtered(template_var, filters.template**2, filters, backend))
    var = xp.where((mask & mask_bits("NO_DATA")) != 0, 0.0, var)
    norm = _proper_norm(filters, sci, backend)
    score, var = (xp.astype(a, xp.float32) for a in (score / norm, var / (norm * norm)))
    pull = difference_pull(score, var, good, fit.quiet, backend)
    scale = variance_scale(pull, config) if config.doScaleVariance else 1.0
    power = residual_power(backend, _less_sky(template, good, backend), solution.basis.size,
                           variance=xp.where(good, template_var * scale, 0.0))
    noise = NoiseModel((), power, np.asarray(fit.positions), solution.basis.size,
                       registration=(_less_mean(template, good, backend), kernel_core(k_r)),
                       correlation=proper_correlation(k_n, k_r, s_var, t_var))
    quality = {**_quality(fit, _centre_kernel(problem, solution), None, sky, s_var, t_var,
                          pull, scale), "flavor": "zogy", "zogy_fitted_as": problem.flavor,
               "zogy_filter_size": int(k_n.shape[0]),
               "zogy_filter_nodes": int(len(filters.science))}
    psf = convolved_psf(sci.psf, k_n)
    score, var, mask = saturated_star_light(score, var * scale, mask, problem,
                                            _centre_kernel(problem, solution), psf, saturated,
                                            config, backend, score=True)
    difference = sci.replace(image=score, mask=mask, variance=var, psf=psf)
    return SubtractionResult(difference, solution, "zogy", True, quality, noise, sci.psf,
                             tmpl.psf)


def simpler_models(config: SubtractConfig, zero_points: bool = False):
    """(name, config) of the models a subtraction tries in turn until one passes its
    quality gates: as configured; a constant kernel; with ``zero_points`` (both exposures
    have one), a constant kernel whose sum they give; the other flavor (convolveTemplate
    and convolveScience trade places; the score toggles ``preconvolveByMatching``)."""
    k = config.kernel
    yield f"{config.mode} (kernel order {k.spatialKernelOrder})", config
    constant = replace(k, spatialKernelOrder=0)
    if k.spatialKernelOrder > 0:
        yield f"{config.mode} (constant kernel)", replace(config, kernel=constant)
    if zero_points and not k.kernelSumFromZeroPoints:
        yield (f"{config.mode} (constant kernel, sum from the zero points)",
               replace(config, kernel=replace(constant, kernelSumFromZeroPoints=True)))
    other = {"convolveTemplate": "convolveScience",
             "convolveScience": "convolveTemplate"}.get(config.mode)
    if other is not None:
        yield f"{other} (kernel order {k.spatialKernelOrder})", replace(config, mode=other)
    elif config.mode == "preconvolve":
        by = not config.preconvolveByMatching
        yield (f"preconvolve ({'by' if by else 'not by'} matching)",
               replace(config, preconvolveByMatching=by))


def _same_model(config: SubtractConfig, result: SubtractionResult) -> bool:
    """Would ``config`` refit what ``result`` already is (a constant kernel the fit fell
    back to)?"""
    return (config.mode == result.flavor and config.kernel.spatialKernelOrder == 0
            and result.kernel.kernel_order == 0
            and config.kernel.kernelSumFromZeroPoints
            == result.quality["kernel_sum_from_zero_points"])


def _accepted(result: SubtractionResult, model: str, rejected: list) -> SubtractionResult:
    """``result`` with the model that passed, and those that did not, in its figures."""
    if rejected:
        log.warning("%s passed the quality gates after %d rejected model%s", model,
                    len(rejected), "s" * (len(rejected) > 1))
    quality = {**result.quality, "model": model,
               "rejected_models": [{"model": r["model"], "failures": r["failures"]}
                                   for r in rejected]}
    return replace(result, quality=quality)


# ---------------------------------------------------------------------------- set-up
def _on_backend(science: Exposure, template: Exposure, backend):
    if science.shape != template.shape:
        raise GpuDiffimError(f"template shape {template.shape} differs from science "
                             f"{science.shape}: resample the template onto the science grid")
    return science.to_backend(backend), template.to_backend(backend)


def _prepared(exposure: Exposure, role: str, config: SubtractConfig, backend,
              counts: np.ndarray) -> tuple:
    """An input with its unusable pixels masked, a PSF model and, when configured, its
    cosmic rays repaired and its saturated cores modelled (:mod:`gpudiffim.validation`
    refuses what cannot be used; ``counts``: its
    :func:`~gpudiffim.validation.pixel_counts`), and its saturated stars."""
    exposure = with_psf(usable_exposure(exposure, role, backend, counts), backend)
    checked_psf_model(exposure, role)
    if config.cosmicRays.doFindCosmicRays:
        exposure = repair_cosmic_rays(exposure, psf_centre(exposure), config.cosmicRays,
                                      backend, bool(counts[5]))
    return model_saturated_cores(exposure, backend, config.saturatedCores, int(counts[6]))


def saturated_star_light(diff, var, mask, problem: MatchingProblem, kernel: np.ndarray, psf,
                         saturated, config: SubtractConfig, backend,
                         score: bool | None = None) -> tuple:
    """The difference, variance and mask with what the kernel left of the modelled
    saturated stars' light: each star's ring out to ``haloRadius`` FWHM taken out
    (:func:`~gpudiffim.saturation.halo_rings`) and its square added to the variance (what
    the median leaves, the ring's uneven part, is as large), the star's light's own error
    added too (:func:`~gpudiffim.saturation.wing_variance`). ``saturated``: the science's
    and the template's stars, the template's put in the science's flux units by the
    kernel's sum; ``psf``: the difference's."""
    if saturated is None:
        return diff, var, mask
    ksum = float(kernel.sum())
    stars = difference_stars(*saturated, 1.0 / ksum if problem.science_is_convolved else ksum)
    if not len(stars):
        return diff, var, mask
    score = problem.flavor == "preconvolve" if score is None else score
    ny, nx = diff.shape
    cfg = config.saturatedCores
    radius = int(np.ceil(cfg.haloRadius * _mean(psf.fwhm((nx - 1) / 2, (ny - 1) / 2))))
    index, ring = halo_rings(diff, mask, stars, radius, backend)
    diff = added_at(diff, index, -ring, backend)
    var = added_at(var, index, ring * ring, backend)  # the ring's uneven part: as large
    var, mask = wing_variance(var, mask, stars, psf, cfg, backend, score)
    return diff, var, mask


def with_psf(exposure: Exposure, backend) -> Exposure:
    """The exposure with a PSF model: its own, else one measured from its stars."""
    if exposure.psf is not None:
        return exposure
    where = exposure.info.describe()
    log.info("no PSF model given for %s: measuring one from its stars", where)
    try:
        return exposure.replace(psf=measure_psf(exposure, backend=backend))
    except PsfMeasurementError as err:
        raise InputError(where, f"no PSF model given, and none can be measured: {err}") from err


def psf_centre(exposure: Exposure) -> np.ndarray:
    """The exposure's PSF image at the detector's centre."""
    if exposure.psf is None:
        raise GpuDiffimError("subtraction needs a PSF model for both exposures "
                             "(give one, or measure it with gpudiffim.psf.measure_psf)")
    ny, nx = exposure.shape
    return exposure.psf.image_at((nx - 1) / 2, (ny - 1) / 2)


def _mean(fwhm_xy) -> float:
    return float(np.mean(fwhm_xy))


def choose_flavor(science: Exposure, template: Exposure, mode: str) -> str:
    """Resolve ``auto``: convolve the science only when the template PSF is wider in x and y."""
    if mode != "auto":
        return mode
    fs = ImagePsf(psf_centre(science)).fwhm()
    ft = ImagePsf(psf_centre(template)).fwhm()
    flavor = "convolveScience" if (ft[0] > fs[0] and ft[1] > fs[1]) else "convolveTemplate"
    log.info("auto mode: science FWHM %.2f x %.2f px, template %.2f x %.2f px -> %s",
             *fs, *ft, flavor)
    return flavor


def matching_problem(sci: Exposure, tmpl: Exposure, flavor: str, by_matching: bool = True,
                     bad_planes=KERNEL_FIT_EXCLUDED, backend=None) -> MatchingProblem:
    """The :class:`MatchingProblem` of ``flavor`` (not ``auto``) for exposures on the
    backend. ``by_matching``: a preconvolution with a sharper template fits template ->
    science and pre-filters the difference. ``bad_planes``: mask planes (of either input)
    the kernel fit gives no weight."""
    backend = get_backend(backend)
    xp = backend.xp
    psf_s, psf_t = psf_centre(sci), psf_centre(tmpl)
    fwhm = {"science": ImagePsf(psf_s).fwhm(), "template": ImagePsf(psf_t).fwhm()}
    wide_s, wide_t = _mean(fwhm["science"]), _mean(fwhm["template"])
    nodata = ((sci.mask & sci.bit("NO_DATA")) != 0) | ((tmpl.mask & tmpl.bit("NO_DATA")) != 0)
    pre = None
    if flavor == "convolveTemplate":
        parts = (tmpl.image, tmpl.variance, psf_t, sci.image, sci.variance, psf_s, sci.mask)
    elif flavor == "convolveScience":
        parts = (sci.image, sci.variance, psf_s, tmpl.image, tmpl.variance, psf_t, tmpl.mask)
    elif flavor == "preconvolve":
        pre = prefilter(psf_s)
        by_matching = by_matching and wide_t < wide_s
        if by_matching:  # the science itself is fitted: only its mask is pre-convolved
            n_mask = grow_convolved_mask(sci.mask, pre, backend, sci.mask_planes)
            parts = (tmpl.image, tmpl.variance, psf_t, sci.image, sci.variance, psf_s, n_mask)
        else:
            image, n_mask, var = convolve_exposure(sci.image, sci.mask, sci.variance,
                                                   pre.astype(np.float32), backend,
                                                   sci.mask_planes)
            target_psf = self_convolved(psf_s)
            fwhm["target"] = ImagePsf(target_psf).fwhm()
            if wide_t > _mean(fwhm["target"]):
                log.warning("preconvolve: the template (FWHM %.2f px) is wider than the "
                            "pre-convolved science (%.2f px); the kernel must deconvolve and "
                            "bright sources will leave residuals (convolveScience suits this "
                            "pair)", wide_t, _mean(fwhm["target"]))
            parts = (tmpl.image, tmpl.variance, psf_t, image, var, target_psf, n_mask)
    else:
        raise ValueError(f"no matching problem for flavor {flavor!r}")
    source, source_var, source_psf, target, target_var, target_psf, target_mask = parts
    convolved_science = flavor == "convolveScience"
    fwhm["source"] = fwhm["science" if convolved_science else "template"]
    fwhm.setdefault("target", fwhm["template" if convolved_science else "science"])
    bad = ((sci.mask & sci.bit(*[p for p in bad_planes if p in sci.mask_planes])) != 0) | (
        (tmpl.mask & tmpl.bit(*[p for p in bad_planes if p in tmpl.mask_planes])) != 0)
    source = xp.where(nodata, 0.0, source)
    target = xp.where(nodata, 0.0, target)
    # kernel sources are chosen on the science image, as in ip_diffim (its own S/N); for
    # the score before its pre-filter (the filtered image's per-pixel variance would
    # overstate every source's S/N)
    selection = ((source, source_var, source_psf) if flavor == "convolveScience"
                 else (sci.image, sci.variance, psf_s) if flavor == "preconvolve"
                 else (target, target_var, target_psf))
    return MatchingProblem(flavor, source, source_var, source_psf, target, target_var,
                           target_psf, target_mask, nodata, selection, bad, psf_s, fwhm, pre,
                           flavor == "preconvolve" and by_matching,
                           (tmpl if flavor == "convolveScience" else sci).info.describe())


# ---------------------------------------------------------------------------- the kernel
def kernel_sources(problem: MatchingProblem, basis: KernelBasis, snr_maps,
                   config: KernelFitConfig, backend) -> np.ndarray:
    """Host (n, 2) kernel-source positions; when the science is convolved, only bright ones
    while enough of them remain (its noise sits in the fit's regressors)."""
    image, var, psf = problem.selection
    bad = problem.bad
    positions = select_kernel_sources(image, var, bad, psf, config.sources, config.stampSize,
                                      basis.size, backend, snr_maps)
    if problem.science_is_convolved:
        lo, hi = config.convolvedScienceSnr
        bright = select_kernel_sources(image, var, bad, psf,
                                       replace(config.sources, detectionThreshold=lo, maxSnr=hi),
                                       config.stampSize, basis.size, backend, snr_maps)
        if len(bright) >= config.minConvolvedScienceSources:
            positions = bright
    if len(positions) < config.minKernelSources:
        sel = config.sources
        raise InputError(problem.selection_from,
                         f"{'no' if not len(positions) else len(positions)} star"
                         f"{'s' * (len(positions) != 1)} between S/N {sel.detectionThreshold:g} "
                         f"and {sel.maxSnr:g} clear of masked pixels and the edges, where the "
                         f"kernel fit needs {config.minKernelSources}")
    return positions


def noise_correlation(problem: MatchingProblem, quiet, backend) -> float:
    """Correlation of the matched images' pixel noise over empty sky
    (:func:`~gpudiffim.noise.shared_noise_correlation`): 0 unless they share exposures."""
    usable = quiet_pixels(backend, quiet, problem.target.shape) & ~problem.bad & ~problem.nodata
    rho = shared_noise_correlation(backend, problem.source, problem.target, usable)
    if rho:
        log.warning("the science and the template share noise (correlation %.3f over empty "
                    "sky): the template holds the science's own exposure%s", rho,
                    " (it is the science itself)" if rho > 0.99 else "")
    return rho


def fit_matching_kernel(problem: MatchingProblem, basis: KernelBasis, positions,
                        config: KernelFitConfig, backend,
                        noise_correlation: float = 0.0,
                        kernel_sum: float | None = None) -> KernelSolution:
    """Fit the spatially varying kernel and background. When the science is convolved, its
    noise would bias a fitted kernel sum low (regression dilution): the photometric scale
    then comes from aperture-corrected fluxes and is imposed, with a lighter penalty.
    ``noise_correlation``: of the two images' noise (:func:`noise_correlation`);
    ``kernel_sum``: a photometric scale to impose instead."""
    p = problem
    ny, nx = p.target.shape
    pinned, fit_config = kernel_sum, config
    if p.science_is_convolved:
        if pinned is None:
            pinned = psf_flux_ratio(p.source, p.target, p.source_psf, p.target_psf,
                                    positions, backend)
        fit_config = replace(config, regularization=config.convolvedScienceRegularization)
    solution = fit_kernel(p.source, p.target, p.source_var, p.target_var, p.bad, basis,
                          positions, fit_config, backend, bbox=(nx, ny), source_psf=p.source_psf,
                          kernel_sum=pinned, noise_correlation=noise_correlation)
    ksum = float(solution.kernel_sum_at((nx - 1) / 2, (ny - 1) / 2))
    log.info("kernel: %d of %d stamps, size %d, sum %.4f at centre", solution.stats["n_used"],
             solution.stats["n_candidates"], basis.size, ksum)
    low = min(solution.kernel_sum_range())
    if not (np.isfinite(ksum) and low > 0):
        raise KernelFitError(f"the kernel sum is {ksum:.3g} at the centre and {low:.3g} at "
                             "its least: not a photometric scale (do the images match?)")
    return solution


def _centre_kernel(problem: MatchingProblem, solution: KernelSolution) -> np.ndarray:
    """The kernel at the detector's centre as the difference sees it (the score's: the
    pre-filter after the matching kernel)."""
    w, h = solution.bbox
    k = solution.kernel_at((w - 1) / 2, (h - 1) / 2)
    return fftconvolve(problem.prefilter, k) if problem.by_matching else k


# ---------------------------------------------------------------------------- the difference
def matched_difference(problem: MatchingProblem, solution: KernelSolution,
                       subtract_background: bool, backend):
    """Science minus matched template, in science units (the score pre-filtered)."""
    p = problem
    matched = solution.convolve(p.source, backend)
    background = (solution.background_image(p.target.shape, backend) if subtract_background
                  else 0.0)
    if p.science_is_convolved:  # model: target = k * source + b
        return (matched + background - p.target) / solution.kernel_sum_image(p.target.shape,
                                                                             backend)
    diff = p.target - matched - background
    if p.by_matching:
        diff = fft_convolve(diff, backend.to_device(p.prefilter, np.float32), backend)
    return diff


def matched_psfs(problem: MatchingProblem, solution: KernelSolution, sci: Exposure,
                 tmpl: Exposure):
    """``(x, y) -> (science PSF, template PSF)`` images for ZOGY's filters, the convolved
    side's through the fitted kernel there: the kernel fitted to the data makes static
    sources cancel whatever the PSF models' errors (the filters' S/N weighting still comes
    from the models)."""
    if problem.science_is_convolved:  # template ~ k * science
        def psfs_at(x, y):
            p_n = sci.psf.image_at(x, y)
            return p_n, fftconvolve(p_n, solution.kernel_at(x, y))
    else:  # science ~ k * template
        def psfs_at(x, y):
            p_r = tmpl.psf.image_at(x, y)
            return fftconvolve(p_r, solution.kernel_at(x, y)), p_r
    return psfs_at


def _proper_norm(filters, sci: Exposure, backend):
    """The score's flux normalisation: each node's filters are scaled there already; one
    pair's response follows the science PSF model's variation relative to the centre
    (:func:`~gpudiffim.score.filter_response`)."""
    if len(filters.science) > 1:
        return 1.0
    k_n = np.flip(filters.science[0])
    ny, nx = sci.shape
    centre = filter_response(backend, ImagePsf(sci.psf.image_at((nx - 1) / 2, (ny - 1) / 2)),
                             k_n, sci.shape)
    return filter_response(backend, sci.psf, k_n, sci.shape) / centre


def _proper_filtered(image, kernels, filters, backend):
    """``image`` through each node's kernel, weighted by its tent."""
    return fft_convolve_weighted_sum(image, kernels.astype(np.float32),
                                     lambda j: filters.weight(j, backend), backend)


def flux_matched_template(problem: MatchingProblem, solution: KernelSolution, tmpl: Exposure,
                          subtract_background: bool, backend):
    """The template and its variance in the science's flux units (NO_DATA zeroed), with
    the science's background: ``sum(k) R + b`` from a fit template -> science, ``(R - b) /
    sum(k)`` from one science -> template (``b`` only when ``subtract_background``)."""
    xp = backend.xp
    ksum = solution.kernel_sum_image(tmpl.shape, backend)
    b = solution.background_image(tmpl.shape, backend) if subtract_background else 0.0
    var = xp.where(problem.nodata, 0.0, tmpl.variance)
    if problem.science_is_convolved:
        return xp.where(problem.nodata, 0.0, (tmpl.image - b) / ksum), var / (ksum * ksum)
    return xp.where(problem.nodata, 0.0, ksum * tmpl.image + b), var * ksum * ksum


def _template_mask_bits(template: Exposure, backend):
    """Template mask planes carried into the difference; SAT becomes SAT_TEMPLATE."""
    xp = backend.xp
    out = template.mask & mask_bits(*TEMPLATE_PLANES, planes=template.mask_planes)
    sat = (template.mask & template.bit("SAT")) != 0
    return xp.where(sat, out | mask_bits("SAT_TEMPLATE"), out)


def difference_mask(problem: MatchingProblem, sci, tmpl, kernel: np.ndarray, backend):
    """The difference's mask: the convolved side's planes grown by the kernel
    (:func:`~gpudiffim.convolve.grow_convolved_mask`), the other's as they are (the score's
    pre-filtered); saturated stars' wings reach past the kernel, so SAT and SAT_TEMPLATE
    grow once more by its effective box; detections are not carried."""
    if problem.science_is_convolved:
        mask = (grow_convolved_mask(sci.mask, kernel, backend, sci.mask_planes)
                | _template_mask_bits(tmpl, backend))
    else:
        mask = problem.target_mask | grow_convolved_mask(_template_mask_bits(tmpl, backend),
                                                         kernel, backend, tmpl.mask_planes)
    return _saturated_wings(mask & ~mask_bits("DETECTED", "DETECTED_NEGATIVE"), kernel,
                            backend)


def proper_mask(sci: Exposure, tmpl: Exposure, k_n: np.ndarray, k_r: np.ndarray, backend):
    """The zogy score's mask: each input's planes grown by the filter it went through
    (:func:`~gpudiffim.convolve.grow_convolved_mask`), SAT and SAT_TEMPLATE once more;
    detections are not carried."""
    mask = (grow_convolved_mask(sci.mask, k_n, backend, sci.mask_planes,
                                unbounded_fraction=PROPER_UNBOUNDED_FRACTION)
            | grow_convolved_mask(_template_mask_bits(tmpl, backend), k_r, backend,
                                  tmpl.mask_planes, unbounded_fraction=PROPER_UNBOUNDED_FRACTION))
    wider = k_n if k_n.shape[0] >= k_r.shape[0] else k_r
    return _saturated_wings(mask & ~mask_bits("DETECTED", "DETECTED_NEGATIVE"), wider, backend,
                            PROPER_UNBOUNDED_FRACTION)


#: the share of ZOGY's filters' absolute weight planes without a bounded value grow by:
#: the score is taken with the sky level off both images, so a masked pixel's error is its
#: departure from the sky, and a deep, wider template's filter spreads 0.1% of its weight
#: over 60-180 px (the 99.99% box of :data:`~gpudiffim.convolve.UNBOUNDED_FRACTION` is 185
#: px wide on the demo's wider-template detector)
PROPER_UNBOUNDED_FRACTION = 0.999


def _saturated_wings(mask, kernel: np.ndarray, backend, fraction: float = UNBOUNDED_FRACTION):
    """``mask`` with SAT and SAT_TEMPLATE grown once more by the box holding ``fraction`` of
    ``kernel``'s absolute weight (saturated stars' wings reach past it), but for the
    modelled cores."""
    xp = backend.xp
    # a modelled core has no deficit to leak
    sat = xp.where(modelled_cores(mask), 0, mask & mask_bits(*SATURATED_PLANES))
    if backend.host_memory and not backend.scalar(xp.any(sat != 0)):
        return mask  # on a device the growth costs less than the read
    box = reach_box(kernel, fraction)
    top = mask_bits("SAT", "SAT_TEMPLATE")
    return mask | window_or(backend, sat, box, (-(box[0] // 2), -(box[1] // 2)), top)


def difference_psf(problem: MatchingProblem, sci: Exposure, solution: KernelSolution):
    """The shape a new point source of the science takes in the difference, over the
    detector: the science PSF; through the fitted kernel when the science is convolved;
    through the pre-filter for the score."""
    if problem.science_is_convolved:
        return kernel_convolved_psf(sci.psf, solution.kernel_at, solution.kernel_order,
                                    solution.bbox)
    return sci.psf if problem.prefilter is None else convolved_psf(sci.psf, problem.prefilter)


def empty_sky_background(diff, mask, good, sky, solution: KernelSolution,
                         config: SubtractConfig, backend):
    """Zero the pixels with no value, then re-fit and subtract the background over the
    empty-sky blocks ``sky`` (when configured). Returns the difference and the re-fit's
    value at the centre."""
    xp = backend.xp
    unusable = (mask & mask_bits(*UNUSABLE_PLANES)) != 0
    diff = xp.where(unusable, 0.0, diff)
    if not (config.refitBackground and config.doSubtractBackground):
        return diff, 0.0
    plane, offset = refit_sky_plane(backend, diff, good, sky, solution.bbox,
                                    config.kernel.spatialBgOrder)
    return xp.where(unusable, 0.0, diff - plane), offset


def _median_variances(sci, tmpl, good, backend):
    s_var, t_var = medians_where(backend, good, sci.variance, tmpl.variance)  # one read
    if s_var is None or t_var is None:
        raise GpuDiffimError("no pixel is usable in both the science and the template")
    return s_var, t_var


# ---------------------------------------------------------------------------- decorrelation
def decorrelation(problem: MatchingProblem, solution: KernelSolution, kernel: np.ndarray,
                  s_var: float, t_var: float) -> np.ndarray:
    """The decorrelation kernel. The score fitted by matching takes convolveTemplate's for
    the fitted kernel (compact, so the EDGE band it widens stays narrow)."""
    if problem.by_matching:
        w, h = solution.bbox
        return decorrelation_kernel(solution.kernel_at((w - 1) / 2, (h - 1) / 2), s_var, t_var,
                                    "convolveTemplate")
    return decorrelation_kernel(kernel, s_var, t_var, problem.flavor,
                                psf=problem.science_psf if problem.flavor == "preconvolve"
                                else None)


def decorrelate(diff, mask, psf, phi, backend):
    """Apply ``phi`` (None: nothing) to the difference and its PSF; EDGE widens by its reach."""
    if phi is None:
        return diff, mask, psf
    diff = fft_convolve(diff, backend.to_device(phi, np.float32), backend)
    reach = kernel_reach(phi)
    if reach > 0:
        edge = mask & mask_bits("EDGE")
        box = (2 * reach + 1, 2 * reach + 1)
        mask = mask | window_or(backend, edge, box, (-reach, -reach), mask_bits("EDGE"))
    return diff, mask, convolved_psf(psf, phi)


# ---------------------------------------------------------------------------- noise
def input_variances(problem: MatchingProblem, backend):
    """The target's and the source's variance planes, NO_DATA zeroed: what the noise model
    propagates."""
    xp = backend.xp
    return (xp.where(problem.nodata, 0.0, problem.target_var),
            xp.where(problem.nodata, 0.0, problem.source_var))


def difference_variance(problem: MatchingProblem, sci, solution: KernelSolution,
                        kernel: np.ndarray, phi, mask, variances, backend):
    """Each pixel's variance through the difference's convolutions (:mod:`gpudiffim.noise`),
    zero where NO_DATA; ``variances``: :func:`input_variances`."""
    xp = backend.xp
    target_var, source_var = variances
    terms, spatial = solution.term_kernels(), (solution.bbox, solution.kernel_order)
    if problem.flavor == "preconvolve":
        w, h = solution.bbox
        k_fit = solution.kernel_at((w - 1) / 2, (h - 1) / 2)
        science_var = (target_var if problem.by_matching
                       else xp.where(problem.nodata, 0.0, sci.variance))
        var = score_variance(backend, science_var, source_var, problem.prefilter, phi, k_fit,
                             terms, spatial, problem.by_matching)
    else:
        var = decorrelated_variance(backend, target_var, source_var, phi, kernel, terms,
                                    spatial)
        if problem.science_is_convolved:
            ksum = solution.kernel_sum_image(sci.shape, backend)
            var = var / (ksum * ksum)
    return xp.where((mask & mask_bits("NO_DATA")) != 0, 0.0, var)


def _in_flux_units(problem: MatchingProblem, sci, diff, var, phi, backend):
    """float32 planes; the score divided by its response to a unit point source, so its
    value at a source is the PSF flux."""
    xp = backend.xp
    if problem.flavor == "preconvolve":
        norm = score_norm(backend, sci.psf, problem.science_psf, sci.shape, phi)
        diff, var = diff / norm, var / (norm * norm)
    return xp.astype(diff, xp.float32), xp.astype(var, xp.float32)


def noise_model(problem: MatchingProblem, solution: KernelSolution, kernel: np.ndarray, phi,
                good, positions, variances, backend) -> NoiseModel:
    """The difference's :class:`~gpudiffim.noise.NoiseModel`: each input's variance and the
    filter it reaches the difference through (none for the score), the residual power
    of the image the kernel convolved (only its shape matters: detection scales it), and
    the template with its filter (for the misregistration term; none for the score)."""
    xp = backend.xp
    source = problem.source
    bright = _less_sky(source, good, backend)
    power = residual_power(backend, bright, solution.basis.size,
                           variance=xp.where(good, problem.source_var, 0.0))
    paths, registration = (), ()
    if problem.flavor != "preconvolve":
        kappa = float(kernel.sum())
        after = np.ones((1, 1)) if phi is None else phi
        through_k = fftconvolve(after, kernel)
        filters = ((after / kappa, through_k / kappa) if problem.science_is_convolved
                   else (after, through_k))
        paths = tuple((plane, kernel_core(f))
                      for plane, f in zip(variances, filters))
        registration = ((_less_mean(problem.target, good, backend), paths[0][1])
                        if problem.science_is_convolved else (bright, paths[1][1]))
    return NoiseModel(paths, power, np.asarray(positions), solution.basis.size,
                      registration=registration)


def _less_sky(image, good, backend):
    """float32 ``image`` less its median where ``good``, 0 elsewhere (no device read)."""
    xp = backend.xp
    sky = median_where_device(backend, image, good)  # NaN only where no pixel is good
    return xp.astype(xp.where(good, image - sky, 0.0), xp.float32)


def _less_mean(image, good, backend):
    """float32 ``image`` less its mean where ``good``, 0 elsewhere (no device read: for
    a gradient, where only the masked pixels' level counts)."""
    xp = backend.xp
    return xp.astype(xp.where(good, image - mean_where(backend, image, good), 0.0),
                     xp.float32)


def difference_pull(diff, var, good, quiet, backend, min_fraction: float = 0.05) -> float:
    """Robust standard deviation of difference / sqrt(variance) over the empty-sky blocks
    ``quiet`` (:func:`~gpudiffim.background.quiet_blocks`, as ip_diffim leaves the DETECTED
    pixels out), or over all good pixels when empty sky is under ``min_fraction`` of the
    detector (a crowded field): 1 when the variance plane describes the noise."""
    xp = backend.xp
    z = diff / xp.sqrt(xp.where(var > 0, var, 1.0))
    use = good & (var > 0)
    empty = use & quiet_pixels(backend, quiet, diff.shape)
    pull = backend.choose(xp.mean(xp.astype(empty, xp.float32)) >= min_fraction,
                          lambda: robust_sigma_where_device(backend, z, empty),
                          lambda: robust_sigma_where_device(backend, z, use))
    return float(backend.scalar(pull))


def variance_scale(pull: float, config: SubtractConfig) -> float:
    """The factor that makes the variance plane match the difference's pixels: the square
    of their robust pull, within ``varianceScaleLimit`` either way (ip_diffim's
    ``doScaleVariance``)."""
    if not np.isfinite(pull) or pull <= 0:
        log.warning("difference noise not measurable: variance left as it is")
        return 1.0
    scale = pull * pull
    limit = config.varianceScaleLimit
    if not 1.0 / limit <= scale <= limit:
        log.warning("variance scale %.3g outside [1/%g, %g]: clipped", scale, limit, limit)
    return float(np.clip(scale, 1.0 / limit, limit))


def photometric_ratios(problem: MatchingProblem, sci: Exposure, tmpl: Exposure, positions,
                       backend) -> dict:
    """The photometric scale source -> target the kernel sum should match: the kernel
    sources' aperture-flux ratio and its error (None without a usable source) and the zero
    points' (None unless both exposures have one)."""
    ratio, error = flux_ratio(problem.source, problem.target, problem.source_psf,
                              problem.target_psf, positions, problem.source_var,
                              problem.target_var, backend)
    zp = None
    if sci.zero_point is not None and tmpl.zero_point is not None:
        sign = -1.0 if problem.science_is_convolved else 1.0
        zp = float(10 ** (0.4 * sign * (sci.zero_point - tmpl.zero_point)))
    return {"aperture_flux_ratio": ratio, "aperture_flux_ratio_error": error,
            "zero_point_ratio": zp}


def _quality(fit: MatchingFit, kernel, phi, sky_offset, s_var, t_var, pull, scale) -> dict:
    problem, solution = fit.problem, fit.solution
    w, h = solution.bbox
    return {**fit.ratios, "kernel_sum_from_zero_points": fit.pinned is not None,
        "flavor": problem.flavor, "decorrelated": phi is not None,
        "preconvolve_by_matching": problem.by_matching,
        "science_fwhm": list(map(float, problem.fwhm["science"])),
        "template_fwhm": list(map(float, problem.fwhm["template"])),
        "kernel_sum_centre": float(kernel.sum()),
        "kernel_sum_fitted": float(solution.kernel_sum_at((w - 1) / 2, (h - 1) / 2)),
        "kernel_sum_error": solution.stats["kernel_sum_error"],
        "kernel_sum_range": list(solution.kernel_sum_range()),
        "background_centre": float(solution.background_at((w - 1) / 2, (h - 1) / 2)),
        "sky_refit_centre": sky_offset,
        "n_kernel_sources": solution.stats["n_used"],
        "n_kernel_candidates": solution.stats["n_candidates"],
        "kernel_residual_std": solution.stats["residual_std"],
        "kernel_residual_unexplained": solution.stats["residual_unexplained"],
        "kernel_explained_chi2": solution.stats["explained_chi2"],
        "difference_pull_sigma": pull, "variance_scale": scale, "noise_correlation": fit.rho,
        "science_variance": s_var, "template_variance": t_var,
    }
