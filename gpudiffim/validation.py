"""Input checks before a subtraction: every pixel with no usable value or noise is masked,
and an exposure that cannot be subtracted is refused, each with its cause and its file.

* a non-finite image pixel becomes NO_DATA (its value zeroed);
* a non-finite, zero or negative variance becomes BAD (its noise is unknown) and gets the
  median variance, so that no filter spreads it;
* an exposure with no pixel left, or whose variance plane is nowhere positive, is refused;
* a PSF model whose image is not a PSF (:func:`~gpudiffim.psf.psf_image_problem`) is refused.
"""

from __future__ import annotations

import logging

from .errors import InputError
from .exposure import REPLACED_PLANES, UNUSABLE_PLANES, Exposure
from .interpolate import interpolate_masked
from .psf import psf_image_problem
from .stats import mean_where, median_where

__all__ = ["pixel_counts", "usable_exposure", "checked_psf_model"]

log = logging.getLogger(__name__)


def pixel_counts(exposure: Exposure, backend):
    """The counts :func:`usable_exposure` decides on, as one device vector (read back with
    another input's in one transfer): non-finite image pixels, pixels without a positive
    finite variance, usable pixels, pixels with a variance, pixels whose values are
    replaced, cosmic-ray pixels already flagged (for
    :func:`~gpudiffim.cosmic.repair_cosmic_rays`), all outside the unusable planes where
    it matters, and saturated pixels (for
    :func:`~gpudiffim.saturation.model_saturated_cores`)."""
    xp = backend.xp
    image, var, mask = exposure.image, exposure.variance, exposure.mask
    bad_image = ~xp.isfinite(image)
    bad_var = ~(xp.isfinite(var) & (var > 0))
    unusable = ((mask & exposure.bit(*[p for p in UNUSABLE_PLANES if p in exposure.mask_planes]))
                != 0)
    replaced = (mask & exposure.bit(*[p for p in REPLACED_PLANES
                                      if p in exposure.mask_planes])) != 0
    cr, sat = ((mask & exposure.bit(p)) != 0 if p in exposure.mask_planes
               else backend.zeros(mask.shape, dtype=xp.bool) for p in ("CR", "SAT"))
    return xp.stack([xp.sum(xp.astype(a, xp.int64)) for a in (
        bad_image & ~unusable, bad_var & ~unusable & ~bad_image,
        ~(bad_image | bad_var | unusable), ~bad_var, replaced, cr, sat)])


def usable_exposure(exposure: Exposure, role: str, backend, counts=None) -> Exposure:
    """``exposure`` (on the backend) with its unusable pixels masked and its BAD pixels'
    values replaced by their neighbours' mean, or an InputError naming its file (``role``:
    "science" or "template", for messages) and the cause. ``counts``: its host
    :func:`pixel_counts`, when already read."""
    xp = backend.xp
    where = exposure.info.describe()
    replaced_bits = exposure.bit(*[p for p in REPLACED_PLANES if p in exposure.mask_planes])
    if counts is None:
        counts = backend.to_host(pixel_counts(exposure, backend))
    n_image, n_var, n_good, n_var_ok, n_replaced = (int(c) for c in counts[:5])
    if n_var_ok == 0:
        raise InputError(where, f"the {role}'s variance plane is nowhere positive and finite "
                                "(is it a variance? give the noise with --science-noise or "
                                "--template-noise)")
    if n_good == 0:
        raise InputError(where, f"the {role} has no usable pixel (every one is masked, "
                                "non-finite or without a positive variance)")
    if n_image or n_var:  # the planes pixel_counts looked at, again only where needed
        bad_image = ~xp.isfinite(exposure.image)
        bad_var = ~(xp.isfinite(exposure.variance) & (exposure.variance > 0))
        exposure = _masked(exposure, bad_image, bad_var, backend, where, role, n_image, n_var)
    if n_replaced or (n_var and replaced_bits):  # the variance's BAD pixels too
        exposure = _with_values_replaced(exposure, (exposure.mask & replaced_bits) != 0,
                                         backend)
    return exposure


def _masked(exposure, bad_image, bad_var, backend, where, role, n_image, n_var) -> Exposure:
    """Non-finite pixels NO_DATA (zeroed), pixels without a positive finite variance BAD
    (their variance the typical one), each said in the log."""
    xp = backend.xp
    if n_image:
        log.warning("%s: %d %s pixels are not finite: masked NO_DATA", where, n_image, role)
    if n_var:
        log.warning("%s: %d %s pixels have a zero, negative or non-finite variance: masked BAD",
                    where, n_var, role)
    var, mask = exposure.variance, exposure.mask
    typical = median_where(backend, var, ~bad_var) or 1.0
    nodata = exposure.bit("NO_DATA") if "NO_DATA" in exposure.mask_planes else 0
    badbit = exposure.bit("BAD") if "BAD" in exposure.mask_planes else 0
    mask = xp.where(bad_image, mask | nodata, mask)
    mask = xp.where(bad_var & ~bad_image, mask | badbit, mask)
    return exposure.replace(image=xp.where(bad_image, 0.0, exposure.image),
                            variance=xp.where(bad_var, float(typical), var), mask=mask)


def _with_values_replaced(exposure: Exposure, replaced, backend, box: int = 5) -> Exposure:
    """The exposure with its ``replaced`` pixels (a hot column's counts) given the mean of
    the usable pixels in a ``box`` around them (the usable pixels' mean where none is
    near), so no convolution spreads a wrong value
    (:func:`~gpudiffim.interpolate.interpolate_masked`)."""
    usable = (exposure.mask & exposure.bit(*[p for p in UNUSABLE_PLANES
                                             if p in exposure.mask_planes])) == 0
    image = exposure.image
    return exposure.replace(image=interpolate_masked(backend, image, replaced, usable, box,
                                                     mean_where(backend, image, usable)))


def checked_psf_model(exposure: Exposure, role: str) -> None:
    """Refuse (InputError naming the file) an exposure whose PSF image at its centre is not
    a PSF."""
    ny, nx = exposure.shape
    problem = psf_image_problem(exposure.psf.image_at((nx - 1) / 2, (ny - 1) / 2))
    if problem:
        raise InputError(exposure.info.describe(), f"the {role}'s PSF {problem}")
