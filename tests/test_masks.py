"""Masks through a convolution: a bad input pixel spoils the difference only where the kernel
carries its weight, and detection sees everything else."""

import numpy as np
import pytest
from astropy.stats import mad_std
from astropy.table import Table

from gpudiffim.backend import get_backend
from gpudiffim.convolve import grow_convolved_mask
from gpudiffim.exposure import DETECTION_EXCLUDED, mask_bits
from gpudiffim.measure import dia_sources
from gpudiffim.subtract import SubtractConfig, subtract

from pairs import gaussian_image, kernel_pair


def _reach(kernel, fraction):
    """Smallest Chebyshev radius holding ``fraction`` of |kernel| (brute force)."""
    h = kernel.shape[0] // 2
    total = np.abs(kernel).sum()
    for r in range(h + 1):
        if np.abs(kernel[h - r:h + r + 1, h - r:h + r + 1]).sum() >= fraction * total:
            return r
    return h


def _extent(plane):
    ys, xs = np.nonzero(plane)
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


def test_planes_grow_as_far_as_their_values_matter(backend):
    """A 41 x 41 Gaussian kernel (sigma 2 px): no data and a saturated core spread over the
    box holding 99.99% of its weight (beyond it a pixel gets at most 1e-4 of theirs, spread
    over the whole ring); a bad pixel (its value replaced before any convolution) and an
    interpolated cosmic ray (CR | INTRP) stay where they are, the convolution spreading only
    their estimates' error; a cosmic ray nobody interpolated (CR alone) grows by the box
    holding 99%; TOUCHED marks the kernel's box around the last three."""
    kernel = gaussian_image(41, 2.0)
    shape = (200, 300)
    mask = np.zeros(shape, np.int32)
    planes = {"BAD": (50, 50), "CR": (50, 140), "SAT": (140, 50), "NO_DATA": (140, 140)}
    for name, (y, x) in planes.items():
        mask[y, x] = mask_bits(name) | (mask_bits("INTRP") if name == "CR" else 0)
    mask[100, 250] = mask_bits("CR")  # charge still there
    grown = backend.to_host(grow_convolved_mask(backend.to_device(mask), kernel, backend))
    r9999, r99 = _reach(kernel, 0.9999), _reach(kernel, 0.99)
    # sigma 2: 4.1 and 2.6 sigma per axis, Chebyshev
    assert (r9999, r99) == (8, 6)
    assert _extent(grown & mask_bits("NO_DATA")) == (2 * r9999 + 1,) * 2
    assert _extent(grown & mask_bits("SAT")) == (2 * r9999 + 1,) * 2
    assert np.sum((grown & mask_bits("BAD")) != 0) == 1
    assert np.sum((grown[:, :200] & mask_bits("CR")) != 0) == 1
    assert _extent(grown[:, 200:] & mask_bits("CR")) == (2 * r99 + 1,) * 2
    touched = (grown & mask_bits("TOUCHED")) != 0
    assert touched.sum() == 3 * 41 * 41  # around the bad pixel and the cosmic rays only
    assert not touched[121:, :].any()


@pytest.fixture(scope="module")
def masked_science_pair():
    """A sharp science (the deep template's PSF, sigma 1.3 px) and a template 1.8x wider, so
    the science is the image convolved. The science has a hot column (BAD, 60 000 counts),
    15 interpolated cosmic rays (CR | INTRP, 2 x 2 px) and 16 new point sources 10-18 px from
    the column or 8-12 px from a cosmic ray (true S/N ~25 in the difference)."""
    rng = np.random.default_rng(7)
    wide, sharp = kernel_pair(shape=(512, 512), n_stars=80, seed=3)  # (convolved, unconvolved)
    science, template = sharp, wide
    image, mask = np.array(science.image, np.float64), np.zeros((512, 512), np.int32)
    image[:, 256] = 6e4
    mask[:, 256] = mask_bits("BAD")
    crs = np.column_stack([rng.choice(np.r_[40:220, 290:470], 15), rng.integers(40, 470, 15)])
    for x, y in crs:
        image[y:y + 2, x:x + 2] = 0.0  # interpolated: the sky (0 in this science)
        mask[y:y + 2, x:x + 2] = mask_bits("CR", "INTRP")
    side = rng.choice([-1, 1], 8)
    new = [(256 + s * d, y) for s, d, y in zip(side, rng.integers(10, 19, 8),
                                                 np.linspace(40, 470, 8))]
    new += [(x + d, y + 1) for (x, y), d in zip(crs[:8], rng.integers(8, 13, 8))]
    psf = gaussian_image(31, 1.3)
    for x, y in new:
        ix, iy = int(x), int(y)
        image[iy - 15:iy + 16, ix - 15:ix + 16] += 5000.0 * psf
    science = science.replace(image=image.astype(np.float32), mask=mask)
    return science, template, np.array(new, float)


def test_a_convolved_science_keeps_its_detector(masked_science_pair):
    """With the science convolved (what `auto` picks for a wider template), its 0.22%
    masked pixels (a hot column, replaced by its neighbours' mean, and interpolated cosmic
    rays) leave 0.25% of the difference where detection cannot seed (2.9% with the column
    grown by the box holding 99% of the fitted kernel, 10.0% by the kernel's 43-px box),
    every new source beside the column and the cosmic rays is found (16 of 16; 8 with the
    43-px box), each TOUCHED, and nothing else; the hot column's counts are not in the
    difference: beside it, 1-3 and 4-18 px away, its noise is what its variance says (pull
    1.03 and 1.01)."""
    science, template, new = masked_science_pair
    backend = get_backend("cpu")
    result = subtract(science, template, SubtractConfig(mode="auto"), backend)
    assert result.flavor == "convolveScience"
    d = result.difference.to_host(backend)
    excluded = (d.mask & d.bit(*[p for p in DETECTION_EXCLUDED if p not in ("EDGE", "NO_DATA")])
                ) != 0
    inner = (slice(30, -30), slice(30, -30))
    assert excluded[inner].mean() < 1.5 * (science.mask != 0).mean(), excluded[inner].mean()
    table = dia_sources(result, science, backend=backend)
    real = table[~table["sky_source"]]
    found = [np.hypot(real["x"] - x, real["y"] - y).min() < 2 for x, y in new]
    assert all(found) and len(real) == len(new), (np.flatnonzero(~np.array(found)), len(real))
    near_column = Table(real[np.abs(real["x"] - 256) < 20])
    assert near_column["pixelFlags_touched"].all()
    for near, far in ((1, 4), (4, 19)):
        beside = np.zeros(d.shape, bool)
        beside[40:-40, 257 - far:257 - near] = beside[40:-40, 256 + near:256 + far] = True
        beside &= (d.mask == 0) | (d.mask == d.bit("TOUCHED"))
        for x, y in new:  # away from the sources
            beside[int(y) - 8:int(y) + 9, int(x) - 8:int(x) + 9] = False
        pull = d.image[beside] / np.sqrt(d.variance[beside])
        assert 0.9 < mad_std(pull) < 1.1 and abs(np.mean(pull)) < 0.05, (near, pull)
