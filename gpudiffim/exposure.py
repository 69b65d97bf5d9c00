"""The exposure model: image, mask, variance, PSF, WCS, zero point and metadata."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

#: LSST mask plane names and bit numbers (afw's defaults; INJECTED, SAT_TEMPLATE and TOUCHED
#: added: TOUCHED, a masked input pixel within a convolution's reach but past the bulk of
#: its weight).
MASK_PLANES: Mapping[str, int] = MappingProxyType({
    "BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5,
    "DETECTED_NEGATIVE": 6, "SUSPECT": 7, "NO_DATA": 8, "INJECTED": 9, "SAT_TEMPLATE": 10,
    "TOUCHED": 11,
})


#: pixels with no usable value: zeroed before any filter spreads them
UNUSABLE_PLANES = ("NO_DATA", "BAD", "SAT", "SAT_TEMPLATE")
#: pixels a measurement gives no weight: no value, or a kernel that left the image. An
#: interpolated cosmic ray (CR | INTRP) keeps a value: it is measured, and flagged
MEASUREMENT_EXCLUDED = UNUSABLE_PLANES + ("EDGE",)
#: pixels that cannot seed a detection nor count as empty sky: cosmic rays too
DETECTION_EXCLUDED = MEASUREMENT_EXCLUDED + ("CR",)
#: pixels the kernel fit and PSF measurement give no weight: injected fakes too
KERNEL_FIT_EXCLUDED = DETECTION_EXCLUDED + ("INJECTED",)
#: an interpolated cosmic ray: its pixels (INTRP) hold an estimate, whose error is all a
#: convolution spreads, so their mask does not grow (TOUCHED the kernel's box around them)
INTERPOLATED_PLANES = ("CR", "INTRP")
#: pixels whose true value is unknown and unbounded (no data, a saturated core) or whose
#: convolution left the image: a convolution spreads them as far as its kernel reaches. A
#: pixel holding an estimate (INTRP, or BAD, its value replaced first) stays as it is, any
#: other masked pixel spreads as far as 99% of the kernel's weight, and TOUCHED marks the
#: rest of the kernel's box
UNBOUNDED_PLANES = ("NO_DATA", "SAT", "SAT_TEMPLATE", "EDGE")
#: pixels whose values are wrong in a sound neighbourhood (a hot column): given their
#: neighbours' mean before any convolution spreads them
REPLACED_PLANES = ("BAD",)
#: a saturated core given the model of its star (:mod:`gpudiffim.saturation`): bounded by
#: the model's error, it grows as an ordinary masked pixel does, not as an unbounded one
MODELLED_CORE_PLANES = ("SAT", "INTRP")
#: the planes of saturated pixels, an input's and a template's in a difference: with INTRP
#: too, a modelled core
SATURATED_PLANES = ("SAT", "SAT_TEMPLATE")
#: template planes carried into a difference (its SAT becomes SAT_TEMPLATE)
TEMPLATE_PLANES = ("BAD", "NO_DATA", "EDGE", "CR", "INTRP", "SUSPECT", "INJECTED")

__all__ = ["MASK_PLANES", "UNUSABLE_PLANES", "MEASUREMENT_EXCLUDED", "DETECTION_EXCLUDED",
           "KERNEL_FIT_EXCLUDED", "INTERPOLATED_PLANES", "UNBOUNDED_PLANES", "REPLACED_PLANES",
           "MODELLED_CORE_PLANES", "SATURATED_PLANES",
           "TEMPLATE_PLANES", "mask_bits", "modelled_cores",
           "ExposureInfo", "Exposure"]


def mask_bits(*names: str, planes: Mapping[str, int] = MASK_PLANES) -> int:
    """Integer with the bits of the named planes set."""
    value = 0
    for name in names:
        value |= 1 << planes[name]
    return value



def modelled_cores(mask, planes: Mapping[str, int] = MASK_PLANES):
    """Where ``mask`` (an input's or a difference's, any array namespace) holds a modelled
    saturated core: SAT or SAT_TEMPLATE, with INTRP (:mod:`gpudiffim.saturation`). None
    when ``planes`` lacks INTRP or both saturated planes."""
    sat = [p for p in SATURATED_PLANES if p in planes]
    if not sat or "INTRP" not in planes:
        return None
    return ((mask & mask_bits(*sat, planes=planes)) != 0) & (
        (mask & mask_bits("INTRP", planes=planes)) != 0)

@dataclass(frozen=True)
class ExposureInfo:
    """Metadata carried with an exposure (LSST-like names)."""

    visit: int | None = None
    detector: int | None = None
    band: str | None = None
    exptime: float | None = None
    units: str | None = None  # BUNIT
    mjd: float | None = None  # the exposure's midpoint, MJD TAI
    extra: Mapping[str, Any] = field(default_factory=dict)  # other header values, as text
    path: str | None = None  # the file it was read from (named in errors)

    def describe(self) -> str:
        """How messages name the exposure: its file, else its visit and detector."""
        if self.path is not None:
            return self.path
        if self.visit is not None:
            return f"visit {self.visit} detector {self.detector}"
        return "the exposure"


@dataclass(frozen=True, eq=False)
class Exposure:
    """A calibrated exposure.

    ``image`` and ``variance`` are float32, ``mask`` int32 with bits from
    ``mask_planes``; all three are 2-D arrays of one backend (host NumPy after I/O;
    see :meth:`to_backend`). ``zero_point`` is the AB magnitude of one count.
    """

    image: Any
    mask: Any
    variance: Any
    psf: Any = None
    wcs: Any = None
    zero_point: float | None = None
    info: ExposureInfo = field(default_factory=ExposureInfo)
    mask_planes: Mapping[str, int] = field(default_factory=lambda: MASK_PLANES)

    def __post_init__(self):
        shapes = {tuple(a.shape) for a in (self.image, self.mask, self.variance)}
        if len(shapes) != 1 or len(self.image.shape) != 2:
            raise ValueError("image, mask and variance must be 2-D arrays of one shape, got "
                             f"{[tuple(a.shape) for a in (self.image, self.mask, self.variance)]}")

    @classmethod
    def from_arrays(cls, image, mask=None, variance=None, **kwargs) -> "Exposure":
        """Build a host exposure, casting to float32/int32/float32 and filling defaults."""
        image = np.asarray(image, dtype=np.float32)
        mask = np.zeros(image.shape, np.int32) if mask is None else np.asarray(mask, np.int32)
        variance = (np.ones(image.shape, np.float32) if variance is None
                    else np.asarray(variance, np.float32))
        return cls(image, mask, variance, **kwargs)

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) of the pixel planes."""
        return tuple(self.image.shape)

    def bit(self, *names: str) -> int:
        """Integer with the bits of the named planes of this exposure's mask set."""
        return mask_bits(*names, planes=self.mask_planes)

    def replace(self, **changes) -> "Exposure":
        """A copy with the given fields changed."""
        return replace(self, **changes)

    def to_backend(self, backend) -> "Exposure":
        """The same exposure with its pixel planes on ``backend``'s device."""
        return self.replace(image=backend.asarray(self.image, np.float32),
                            mask=backend.asarray(self.mask, np.int32),
                            variance=backend.asarray(self.variance, np.float32))

    def upload(self, backend) -> "Exposure":
        """:meth:`to_backend` for a host exposure sent ahead of the compute (reader threads;
        on GPU through pinned memory on a non-blocking stream)."""
        return self.replace(image=backend.upload(self.image, np.float32),
                            mask=backend.upload(self.mask, np.int32),
                            variance=backend.upload(self.variance, np.float32))

    def to_host(self, backend) -> "Exposure":
        """The same exposure with NumPy pixel planes."""
        return self.replace(image=backend.to_host(self.image), mask=backend.to_host(self.mask),
                            variance=backend.to_host(self.variance))
