"""FFT convolution of images with small kernels, with mask and variance propagation.

The output grid equals the input grid (``scipy.signal.fftconvolve(..., mode="same")``
alignment): ``out[i] = sum_k kernel[k] * image[i + (K - 1) // 2 - k]``. Images are
zero-padded to fast FFT sizes, so nothing wraps around; pixels whose kernel footprint
leaves the image are flagged EDGE and every mask bit inside a footprint is carried to
the output pixel (so NO_DATA, BAD, SAT... grow by the kernel).
"""

from __future__ import annotations

import numpy as np

from .arrayops import window_or
from .backend import get_backend, next_fast_len
from .exposure import (
    MASK_PLANES,
    REPLACED_PLANES,
    SATURATED_PLANES,
    UNBOUNDED_PLANES,
    mask_bits,
    modelled_cores,
)

__all__ = ["padded_shape", "fft_convolve", "fft_convolve_weighted_sum", "edge_mask",
           "grow_mask", "grow_convolved_mask", "convolve_exposure", "kernel_reach", "kernel_core",
           "reach_box", "UNBOUNDED_FRACTION"]


def padded_shape(image_shape, kernel_shape) -> tuple[int, int]:
    """FFT size that holds the full linear convolution without wrap-around."""
    return tuple(next_fast_len(n + k - 1) for n, k in zip(image_shape[-2:], kernel_shape[-2:]))


def _crop(full, image_shape, kernel_shape):
    (h, w), (kh, kw) = image_shape[-2:], kernel_shape[-2:]
    y0, x0 = (kh - 1) // 2, (kw - 1) // 2
    return full[..., y0:y0 + h, x0:x0 + w]


def _like(backend, a, ref):
    """``a`` on the backend, in ``ref``'s dtype."""
    a = backend.asarray(a)
    return a if a.dtype == ref.dtype else backend.xp.astype(a, ref.dtype)


def fft_convolve(image, kernel, backend=None):
    """Convolve ``image`` (..., H, W) with ``kernel`` (..., kh, kw), same-size output.

    Leading axes broadcast, so one image against a stack of kernels (K, kh, kw) costs a
    single forward FFT of the image and returns (K, H, W).
    """
    backend = get_backend(backend)
    xp = backend.xp
    image = backend.asarray(image)
    kernel = _like(backend, kernel, image)
    shape = padded_shape(image.shape, kernel.shape)
    spectrum = backend.rfft2(image, s=shape) * backend.rfft2(kernel, s=shape)
    out = _crop(backend.irfft2(spectrum, s=shape), image.shape, kernel.shape)
    return xp.astype(out, image.dtype)


def fft_convolve_weighted_sum(image, kernels, weight, backend=None):
    """``sum_j weight(j) * (kernels[j] conv image)`` for an image (H, W) and kernels
    (n, kh, kw); ``weight(j)`` is an array broadcastable to (H, W).

    One forward FFT of the image; each kernel's inverse FFT is weighted and added as it
    comes, so the (n, H, W) stack of convolutions is never held.
    """
    backend = get_backend(backend)
    xp = backend.xp
    image = backend.asarray(image)
    kernels = _like(backend, kernels, image)
    shape = padded_shape(image.shape, kernels.shape)
    spec_image = backend.rfft2(image, s=shape)
    spec_kernels = backend.rfft2(kernels, s=shape)
    out = None
    for j in range(kernels.shape[0]):
        conv = _crop(backend.irfft2(spec_image * spec_kernels[j, ...], s=shape), image.shape,
                     kernels.shape)
        part = conv * weight(j)
        out = part if out is None else out + part
    return xp.astype(out, image.dtype)


def edge_mask(shape, kernel_shape, backend=None):
    """Boolean image: True where the kernel footprint reaches outside the image."""
    backend = get_backend(backend)
    xp = backend.xp
    out = None
    for axis, (n, k) in enumerate(zip(shape, kernel_shape)):
        i = backend.arange(n)
        s = (k - 1) // 2
        bad = (i + s - (k - 1) < 0) | (i + s > n - 1)
        bad = xp.reshape(bad, (n, 1) if axis == 0 else (1, n))
        out = bad if out is None else (out | bad)
    return xp.broadcast_to(out, tuple(shape))


def grow_mask(mask, kernel_shape, backend=None, planes=MASK_PLANES, any_set: bool | None = None):
    """Carry every bit within each pixel's kernel footprint; flag EDGE where it leaves.
    ``any_set``: whether any bit is set, when known (else read from the mask: a sync)."""
    backend = get_backend(backend)
    xp = backend.xp
    kh, kw = kernel_shape[-2:]
    start = (-(kh - 1 - (kh - 1) // 2), -(kw - 1 - (kw - 1) // 2))
    if any_set is None:
        any_set = backend.scalar(xp.any(mask != 0))
    # the largest value the mask can hold: read in host memory, on a device its planes'
    top = None if backend.host_memory else mask_bits(*planes, planes=planes)
    grown = window_or(backend, mask, (kh, kw), start, top) if any_set else mask
    edge = mask_bits("EDGE", planes=planes)
    return xp.where(edge_mask(mask.shape, (kh, kw), backend), grown | edge, grown)


#: the share of a kernel's absolute weight inside the box that planes without a bounded
#: value grow by: past it, a pixel gets at most this complement of a masked pixel's value,
#: spread over the whole ring (per pixel ~1e-7 of it for a 41-pixel kernel)
UNBOUNDED_FRACTION = 0.9999


def reach_box(kernel: np.ndarray, fraction: float) -> tuple[int, int]:
    """The odd centred box holding ``fraction`` of ``kernel``'s absolute weight (at most
    the kernel's own shape)."""
    r = kernel_reach(kernel, fraction)
    return min(2 * r + 1, kernel.shape[0]), min(2 * r + 1, kernel.shape[1])


def grow_convolved_mask(mask, kernel, backend=None, planes=MASK_PLANES, core: float = 0.99,
                        unbounded_fraction: float = UNBOUNDED_FRACTION):
    """The mask of an image convolved with ``kernel``. Planes whose pixels hold no bounded
    value (:data:`~gpudiffim.exposure.UNBOUNDED_PLANES`) grow by the box holding
    ``unbounded_fraction`` of the kernel's absolute weight (:func:`grow_mask`, EDGE where it
    leaves the image); pixels given an estimate before the convolution (INTRP: interpolated
    cosmic rays; BAD, :data:`~gpudiffim.exposure.REPLACED_PLANES`: a bad column's values
    replaced) stay where they are, the convolution spreading only the estimate's error, no
    more than a pixel's noise; any other pixel grows by the box holding ``core`` of the
    weight, a saturated core given a model (SAT or SAT_TEMPLATE, with INTRP) among them; the
    kernel's box around all but the unbounded ones is TOUCHED."""
    backend = get_backend(backend)
    xp = backend.xp
    kernel = np.asarray(kernel)

    def bits(names):
        return mask_bits(*[p for p in names if p in planes], planes=planes)

    unbounded = bits(UNBOUNDED_PLANES)
    touched = bits(("TOUCHED",))
    top = bits(tuple(planes))
    # a saturated core given a model (SAT or SAT_TEMPLATE, with INTRP:
    # :mod:`gpudiffim.saturation`) is bounded by the model's error: it grows as the other
    # masked pixels do
    sat = bits(SATURATED_PLANES)
    core_model = modelled_cores(mask, planes)
    rest = mask & ~(unbounded | touched)
    if core_model is None:
        unbounded_px = mask & unbounded
    else:
        unbounded_px = xp.where(core_model, mask & unbounded & ~sat, mask & unbounded)
        rest = xp.where(core_model, rest | (mask & sat), rest)
    # in host memory the growth is skipped for planes with no pixel set; on a device it
    # costs less than the read that would tell (real exposures have some)
    some = (backend.to_host(xp.stack([xp.any(unbounded_px != 0), xp.any(rest != 0)]))
            if backend.host_memory else (True, True))
    out = grow_mask(unbounded_px, reach_box(kernel, unbounded_fraction), backend, planes,
                    bool(some[0]))
    if not some[1]:
        return out | (mask & touched)
    estimated = (mask & bits(("INTRP",) + REPLACED_PLANES)) != 0
    if core_model is not None:
        estimated = estimated & ~core_model
    box = reach_box(kernel, core)
    out = out | xp.where(estimated, rest, 0) | window_or(
        backend, xp.where(estimated, 0, rest), box, (-(box[0] // 2), -(box[1] // 2)), top)
    if touched:  # a box sum of the flags (any box size at one cost), not a bitwise OR
        size = max(kernel.shape)
        near = backend.uniform_filter(xp.astype(rest != 0, xp.float32), size) > 0.5 / size**2
        out = xp.where(near | ((mask & touched) != 0), out | touched, out)
    return out


def convolve_exposure(image, mask, variance, kernel, backend=None, planes=MASK_PLANES):
    """Convolve image, mask and variance planes with one kernel.

    NO_DATA pixels are zeroed first; the variance is convolved with the squared
    kernel (independent pixels in, correlated out). Returns ``(image, mask, variance)``.
    """
    backend = get_backend(backend)
    xp = backend.xp
    image, variance = backend.asarray(image), backend.asarray(variance)
    mask = backend.asarray(mask)
    host_kernel = kernel if isinstance(kernel, np.ndarray) else backend.to_host(kernel)
    kernel = _like(backend, kernel, image)
    good = (mask & mask_bits("NO_DATA", planes=planes)) == 0
    planes_in = xp.stack([xp.where(good, image, 0.0), xp.where(good, variance, 0.0)])
    kernels = xp.stack([kernel, kernel * kernel])
    out = fft_convolve(planes_in, kernels, backend)
    return out[0, ...], grow_convolved_mask(mask, host_kernel, backend, planes), out[1, ...]


def kernel_reach(kernel: np.ndarray, fraction: float = 0.999) -> int:
    """Radius (pixels, the larger axis offset) holding ``fraction`` of a centred kernel's
    absolute weight."""
    hy, hx = kernel.shape[0] // 2, kernel.shape[1] // 2
    y, x = np.mgrid[-hy:kernel.shape[0] - hy, -hx:kernel.shape[1] - hx]
    r = np.maximum(np.abs(x), np.abs(y)).ravel()
    w = np.abs(kernel).ravel()
    order = np.argsort(r)
    cum = np.cumsum(w[order]) / w.sum()
    return int(r[order][np.searchsorted(cum, fraction)])


def kernel_core(kernel: np.ndarray, fraction: float = 1e-4) -> np.ndarray:
    """The centred box of ``kernel`` holding all but ``fraction`` of its power."""
    h, keep = kernel.shape[0] // 2, kernel_reach(kernel * kernel, 1.0 - fraction)
    return kernel[h - keep:h + keep + 1, h - keep:h + keep + 1]
