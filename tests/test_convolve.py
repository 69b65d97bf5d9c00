"""FFT convolution against scipy.signal.fftconvolve, and mask/variance propagation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import fftconvolve

from gpudiffim.convolve import (
    convolve_exposure,
    fft_convolve,
    fft_convolve_weighted_sum,
    grow_mask,
)
from gpudiffim.exposure import mask_bits


def _relerr(got, ref):
    return np.max(np.abs(got - ref)) / np.max(np.abs(ref))


@pytest.mark.parametrize("kshape", [(21, 21), (19, 23), (8, 5)])
def test_matches_scipy_float64(backend, rng, kshape):
    img = rng.normal(size=(257, 300))
    ker = rng.normal(size=kshape)
    got = backend.to_host(fft_convolve(backend.to_device(img), backend.to_device(ker), backend))
    assert got.dtype == np.float64
    assert _relerr(got, fftconvolve(img, ker, mode="same")) < 1e-10


@pytest.mark.parametrize("kshape", [(21, 21), (35, 35)])
def test_matches_scipy_float32(backend, rng, kshape):
    img = rng.normal(100.0, 10.0, size=(256, 311)).astype(np.float32)
    ker = rng.random(kshape).astype(np.float32)
    got = backend.to_host(fft_convolve(backend.to_device(img), backend.to_device(ker), backend))
    assert got.dtype == np.float32
    ref = fftconvolve(img.astype(np.float64), ker.astype(np.float64), mode="same")
    assert _relerr(got, ref) < 1e-5


def test_batched_equals_one_at_a_time(backend, rng):
    img = rng.normal(size=(128, 96))
    kers = rng.normal(size=(5, 15, 15))
    many = backend.to_host(fft_convolve(backend.to_device(img), backend.to_device(kers),
                                             backend))
    assert many.shape == (5, 128, 96)
    for k in range(5):
        assert _relerr(many[k], fftconvolve(img, kers[k], mode="same")) < 1e-10


def test_weighted_sum_of_convolutions_matches_scipy(backend, rng):
    """sum_j w_j(x, y) (k_j conv image)(x, y), accumulated one inverse FFT at a time, equals
    the weighted sum of scipy's convolutions (the spatially varying kernel's form)."""
    image = rng.normal(size=(70, 90))
    kernels = rng.normal(size=(4, 9, 7))
    yy, xx = np.mgrid[0:70, 0:90] / 50.0
    weights = np.stack([np.ones_like(xx), xx, yy, xx * yy])
    want = sum(w * fftconvolve(image, k, mode="same") for w, k in zip(weights, kernels))
    dev_w = backend.to_device(weights)
    got = fft_convolve_weighted_sum(backend.to_device(image), backend.to_device(kernels),
                                    lambda j: dev_w[j, ...], backend)
    assert np.allclose(backend.to_host(got), want, atol=1e-9 * np.abs(want).max())


@pytest.mark.slow
def test_large_float32_frame_stays_on_device():
    """2048x4096 float32 under `strict`: any implicit host conversion would raise."""
    from gpudiffim.backend import get_backend

    strict = get_backend("strict")
    rng = np.random.default_rng(7)
    img = rng.normal(size=(2048, 4096)).astype(np.float32)
    ker = np.outer(np.hanning(23), np.hanning(23)).astype(np.float32)
    out = fft_convolve(strict.to_device(img), strict.to_device(ker), strict)
    assert out.device == strict.device
    assert tuple(out.shape) == (2048, 4096)
    got = strict.to_host(out[1000:1100, 2000:2100])
    ref = fftconvolve(img[989:1111, 1989:2111].astype(np.float64), ker, mode="valid")
    assert _relerr(got, ref) < 1e-5


def test_variance_propagates_with_squared_kernel(backend, rng):
    """Convolved white noise has variance sigma^2 * sum(k^2) (interior pixels)."""
    sigma2 = 4.0
    img = rng.normal(0.0, np.sqrt(sigma2), size=(512, 512)).astype(np.float32)
    var = np.full(img.shape, sigma2, np.float32)
    ker = np.exp(-0.5 * (np.mgrid[-7:8, -7:8] ** 2).sum(0) / 2.0**2)
    ker = (ker / ker.sum()).astype(np.float32)
    out, mask, outvar = convolve_exposure(backend.to_device(img),
                                          backend.to_device(np.zeros(img.shape, np.int32)),
                                          backend.to_device(var), backend.to_device(ker), backend)
    out, outvar = backend.to_host(out), backend.to_host(outvar)
    expected = sigma2 * np.sum(ker.astype(np.float64) ** 2)
    np.testing.assert_allclose(outvar[20:-20, 20:-20], expected, rtol=1e-4)
    # the pixel noise itself matches the propagated variance (measured, 2% tolerance)
    assert abs(np.var(out[20:-20, 20:-20]) / expected - 1) < 0.05


def test_masks_grow_by_kernel_and_edges_flagged(backend):
    shape, kshape = (100, 90), (9, 7)
    mask = np.zeros(shape, np.int32)
    nodata, bad, edge = mask_bits("NO_DATA"), mask_bits("BAD"), mask_bits("EDGE")
    suspect, touched = mask_bits("SUSPECT"), mask_bits("TOUCHED")
    mask[50, 40] = nodata
    mask[20, 60] = bad  # its value replaced before any convolution: it stays one pixel
    mask[80, 30] = suspect
    img = np.ones(shape, np.float32)
    img[50, 40] = np.nan  # NO_DATA pixels are ignored, so no NaN spreads
    out, m, _ = convolve_exposure(backend.to_device(img), backend.to_device(mask),
                                  backend.to_device(np.ones(shape, np.float32)),
                                  backend.to_device(np.ones(kshape, np.float32)), backend)
    m = backend.to_host(m)
    assert np.all(np.isfinite(backend.to_host(out)))
    ys, xs = np.nonzero(m & nodata)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (46, 54, 37, 43)
    assert np.count_nonzero(m & bad) == 1 and np.count_nonzero(m & suspect) == 63
    assert np.count_nonzero(m & touched) == 2 * 9 * 9  # a square of the larger side
    edges = (m & edge) != 0
    assert edges[:4].all() and edges[-4:].all() and edges[:, :3].all() and edges[:, -3:].all()
    assert not edges[4:-4, 3:-3].any()


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), kh=st.integers(1, 6), kw=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1), top_bit=st.sampled_from([4, 12, 20]))
def test_grow_mask_equals_brute_force(h, w, kh, kw, seed, top_bit):
    """Every output pixel carries the OR of the mask bits inside its kernel footprint
    (masks whose highest bit fits 8, 16 and only 32 bits: the passes narrow the type)."""
    from gpudiffim.backend import get_backend

    cpu = get_backend("cpu")
    mask = np.random.default_rng(seed).integers(0, 1 << top_bit, size=(h, w)).astype(np.int32)
    got = grow_mask(mask, (kh, kw), cpu)
    edge = mask_bits("EDGE")
    sy, sx = (kh - 1) // 2, (kw - 1) // 2
    for i in range(h):
        for j in range(w):
            y0, y1, x0, x1 = i + sy - kh + 1, i + sy, j + sx - kw + 1, j + sx
            want = np.bitwise_or.reduce(
                mask[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1], axis=None)
            if y0 < 0 or x0 < 0 or y1 >= h or x1 >= w:
                want |= edge
            assert got[i, j] == want
