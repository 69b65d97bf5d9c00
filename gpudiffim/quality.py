"""Quality gates: a subtraction's own figures decide whether it can be trusted.

Every fit reports figures (:attr:`~gpudiffim.subtract.SubtractionResult.quality`); the gates
here read them, as ``ip_diffim``'s bad-subtraction metrics do:

* the kernel sources kept by the fit, against ``minKernelSourceFraction`` of those tried;
* the chi^2 the kernel model removes from each stamp (about the star's S/N squared when
  the other image holds the same star; about nothing when it does not, as with a
  misregistered template, whatever the kernel sum was pinned to);
* the kernel stamps' residual after the spatial fit: its scatter in units of their noise
  together with the fraction of the stamps' own signal it leaves unexplained (a bright
  star matched to 0.2% leaves a residual of several sigma, and is a good fit);
* the kernel sum's own error, as a fraction of it (a few faint stars leave the photometric
  scale undetermined, and every static source then leaves that fraction of its flux);
* the kernel sum against the photometric ratio of the kernel sources' aperture fluxes,
  in units of their combined error and as a factor (a wrong kernel, a misregistered or
  swapped template, or a large unmasked defect leaves them far apart);
* the difference's noise over empty sky against the noise its variance plane predicts,
  before any rescaling.

:func:`quality_failures` names each figure that fails, its value and its limit; the
subtraction then retries with a simpler model or fails with :class:`SubtractionQualityError`.
"""

from __future__ import annotations

import math

from .errors import GpuDiffimError
from .options import configclass, option

__all__ = ["QualityConfig", "SubtractionQualityError", "quality_failures"]


@configclass
class QualityConfig:
    """Limits on a subtraction's figures (``doQualityGates=False`` trusts every fit)."""

    doQualityGates: bool = option(True, "judge every subtraction by its figures: retry with a "
                                        "simpler model, then fail")
    minKernelSourceFraction: float = option(0.3, "least fraction of the kernel sources tried "
                                                 "that the fit keeps")
    minExplainedChi2: float = option(25.0, "least median chi^2 the kernel model removes from a "
                                           "stamp (a matched S/N 5 star's)")
    maxKernelResidualStd: float = option(3.0, "largest median residual scatter of the kernel "
                                              "stamps, in units of their noise, ...")
    maxKernelResidualFraction: float = option(0.05, "... unless the residual leaves less than "
                                                    "this fraction of the stamps' signal")
    maxKernelSumError: float = option(0.1, "largest error of the fitted kernel sum, as a "
                                           "fraction of it")
    maxKernelSumRatio: float = option(1.5, "largest factor, either way, between the kernel "
                                           "sum and the sources' aperture-flux ratio, ...")
    maxKernelSumSigma: float = option(5.0, "... unless within this many of their combined "
                                           "errors")
    maxNoiseRatio: float = option(3.0, "largest factor, either way, between the difference's "
                                       "noise over empty sky and its prediction (before "
                                       "rescaling)")
    doRetry: bool = option(True, "on failure, retry with a constant kernel, then the other "
                                 "flavor")


class SubtractionQualityError(GpuDiffimError):
    """No subtraction of a pair passed the quality gates; ``attempts`` holds, per model
    tried, its name, its failures and its figures."""

    def __init__(self, message: str, attempts=()):
        self.attempts = list(attempts)
        super().__init__(message)


def quality_failures(quality: dict, config: QualityConfig = QualityConfig()) -> list[str]:
    """The gates ``quality`` (a subtraction's figures) fails, one sentence each naming the
    figure, its value and the limit; empty when it passes (or the gates are off)."""
    if not config.doQualityGates:
        return []
    out = []
    tried, kept = quality["n_kernel_candidates"], quality["n_kernel_sources"]
    if tried and kept < config.minKernelSourceFraction * tried:
        out.append(f"the kernel fit kept {kept} of {tried} kernel sources (fewer than "
                   f"{config.minKernelSourceFraction:.0%})")
    explained = quality["kernel_explained_chi2"]
    if not explained >= config.minExplainedChi2:
        out.append(f"the kernel model removes {explained:.3g} chi^2 from the median stamp "
                   f"(limit {config.minExplainedChi2:g}): the images do not hold the same "
                   "stars there")
    resid, left = quality["kernel_residual_std"], quality["kernel_residual_unexplained"]
    if not (resid <= config.maxKernelResidualStd or left <= config.maxKernelResidualFraction):
        out.append(f"the kernel stamps' residual is {resid:.3g} sigma (limit "
                   f"{config.maxKernelResidualStd:g}) and leaves {left:.0%} of their signal "
                   f"(limit {config.maxKernelResidualFraction:.0%})")
    ksum, ratio = quality["kernel_sum_fitted"], quality["aperture_flux_ratio"]
    error = quality["kernel_sum_error"]
    if not error <= config.maxKernelSumError * abs(ksum):
        out.append(f"the kernel sum {ksum:.4g} has an error of {error:.3g} "
                   f"({error / abs(ksum) if ksum else math.inf:.0%}; limit "
                   f"{config.maxKernelSumError:.0%}): the kernel sources do not fix the "
                   "photometric scale")
    if ratio is not None:
        error = math.hypot(quality["kernel_sum_error"], quality["aperture_flux_ratio_error"])
        sigmas = abs(ksum - ratio) / error if error > 0 else math.inf
        limit = config.maxKernelSumRatio
        factor = ksum / ratio if ksum > 0 and ratio > 0 else math.inf
        if sigmas > config.maxKernelSumSigma and not 1 / limit <= factor <= limit:
            out.append(f"the kernel sum {ksum:.4g} differs from the kernel sources' "
                       f"aperture-flux ratio {ratio:.4g} by {sigmas:.1f} sigma and a factor "
                       + (f"{factor:.3g}" if math.isfinite(factor) else "of another sign")
                       + f" (limits {config.maxKernelSumSigma:g} sigma, {limit:g}x)")
    pull, limit = quality["difference_pull_sigma"], config.maxNoiseRatio
    low = 0.0 if quality.get("noise_correlation") else 1.0 / limit  # shared noise cancels
    if math.isfinite(pull) and pull > 0 and not low <= pull <= limit:
        out.append(f"the difference's noise over empty sky is {pull:.3g} times its "
                   f"prediction (limit {limit:g}x either way)")
    return out
