"""Saturated cores modelled from their stars' unsaturated wings."""

import numpy as np
import pytest
from astropy.table import Table

from gpudiffim.convolve import grow_convolved_mask
from gpudiffim.exposure import Exposure, mask_bits
from gpudiffim.inject import psf_stamp
from gpudiffim.psf import ImagePsf
from gpudiffim.saturation import (
    SaturatedCoreConfig,
    difference_stars,
    model_saturated_cores,
    saturated_stars,
    wing_variance,
)
from gpudiffim.subtract import SubtractConfig, subtract

from pairs import kernel_pair

FULL_WELL = 50_000.0


def _moffat(size=41, alpha=3.0, beta=2.8):
    half = size // 2
    y, x = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
    return (1 + (x * x + y * y) / alpha**2) ** -beta


def _saturated_scene(rng, stars, shape=(160, 200), sky_sigma=8.0):
    """Sky noise and Moffat stars ``(x, y, flux)``, clipped at the full well and flagged
    SAT there; also the true (unclipped, noiseless) image."""
    psf = ImagePsf(_moffat())
    truth = np.zeros(shape)
    for x, y, flux in stars:
        stamp, y0, x0 = psf_stamp(psf, x, y)
        h, w = stamp.shape
        truth[y0:y0 + h, x0:x0 + w] += flux * stamp
    var = sky_sigma**2 + np.clip(truth, 0, None)
    image = truth + rng.normal(size=shape) * np.sqrt(var)
    sat = truth >= FULL_WELL
    image[sat] = FULL_WELL
    mask = np.where(sat, mask_bits("SAT"), 0)
    return Exposure.from_arrays(image, mask, var, psf=psf), truth


def test_saturated_pixels_group_into_stars():
    shape = (20, 30)
    flat = np.ravel_multi_index(([2, 2, 3, 3, 10, 11, 12, 12], [5, 6, 5, 7, 20, 21, 22, 29]),
                                shape)
    stars = saturated_stars(flat, shape)
    assert sorted(stars["npix"]) == [1, 3, 4]  # (3, 7) touches (2, 6) diagonally
    big = stars[np.argmax(stars["npix"])]
    assert (big["x"], big["y"]) == (5.75, 2.5)
    assert len(stars.meta["labels"]) == len(flat)


def test_cores_take_the_fitted_star(backend, rng):
    stars = [(60.3, 50.7, 6.0e6), (140.6, 100.2, 1.5e6), (100.0, 120.0, 2.0e4)]
    exposure, truth = _saturated_scene(rng, stars)
    sat = (exposure.mask & mask_bits("SAT")) != 0
    out, found = model_saturated_cores(exposure.to_backend(backend), backend)
    assert len(found) == 2 and found["modelled"].all()  # the faint star is not saturated
    order = np.argsort(found["x"])
    for (x, y, flux), row in zip(stars[:2], found[order]):
        assert row["flux"] == pytest.approx(flux, rel=0.02)
        assert abs(row["x"] - x) < 0.05 and abs(row["y"] - y) < 0.05
    image, mask = (backend.to_host(p) for p in (out.image, out.mask))
    # each core pixel within a few percent of the truth (the clipped value was 17-60x off)
    assert np.max(np.abs(image[sat] / truth[sat] - 1)) < 0.05
    assert np.all(mask[sat] == mask_bits("SAT", "INTRP"))
    assert np.array_equal(image[~sat], exposure.image[~sat])  # the rest untouched


def test_a_modelled_core_grows_by_the_kernel_core_only(backend):
    kernel = _moffat(31, 2.0, 2.5)
    mask = np.zeros((80, 80), np.int32)
    mask[20:23, 20:23] = mask_bits("SAT")
    mask[50:53, 50:53] = mask_bits("SAT", "INTRP")
    grown = backend.to_host(grow_convolved_mask(backend.asarray(mask), kernel, backend))
    sat = (grown & mask_bits("SAT")) != 0
    raw, modelled = sat[:40, :40].sum(), sat[40:, 40:].sum()
    assert modelled < raw / 3
    flagged = (grown[38:65, 38:65] & mask_bits("SAT", "TOUCHED")) != 0
    assert flagged.all()  # the kernel's box around it is TOUCHED


def test_no_saturation_is_a_no_op(backend, rng):
    exposure, _ = _saturated_scene(rng, [(80.0, 80.0, 1.0e4)])
    on = exposure.to_backend(backend)
    out, found = model_saturated_cores(on, backend)
    assert out is on and len(found) == 0


def test_both_inputs_stars_merge_in_science_units():
    sci = Table({"x": [10.0, 50.0], "y": [10.0, 50.0], "flux": [1e6, 2e6],
                 "modelled": [True, False]})
    tmpl = Table({"x": [11.0, 80.0], "y": [10.5, 20.0], "flux": [3e6, 4e6],
                  "modelled": [True, True]})
    stars = difference_stars(sci, tmpl, template_to_science=0.5)
    # the science's modelled star, and the template's that the science does not have
    assert list(stars["x"]) == [10.0, 80.0] and list(stars["flux"]) == [1e6, 2e6]


def test_a_stars_light_adds_its_error_to_the_variance(backend):
    psf = ImagePsf(_moffat())
    var = np.full((120, 120), 25.0, np.float32)
    mask = np.zeros(var.shape, np.int32)
    stars = Table({"x": [60.4], "y": [59.7], "flux": [2e5]})
    config = SaturatedCoreConfig(wingError=0.5, maxWingVariance=100.0)
    new_var, new_mask = (backend.to_host(a) for a in wing_variance(
        backend.asarray(var), backend.asarray(mask), stars, psf, config, backend))
    stamp, y0, x0 = psf_stamp(psf, 60.4, 59.7)
    light = np.zeros(var.shape)
    light[y0:y0 + stamp.shape[0], x0:x0 + stamp.shape[1]] = 2e5 * stamp
    expected = 25.0 + np.minimum((0.5 * light) ** 2, 100 * 25.0)
    np.testing.assert_allclose(new_var, expected, rtol=1e-3)
    # where the star's error passes 10 sigma the pixel is the star's
    assert np.array_equal((new_mask & mask_bits("SAT")) != 0, (0.5 * light) ** 2 > 2500)
    assert ((new_mask & mask_bits("SAT")) != 0).sum() > 0


def _saturated_pair(full_well=30_000.0):
    """A known-kernel pair with one star bright enough to saturate both images."""
    science, template = kernel_pair(shape=(256, 256), n_stars=80, seed=3,
                                    moved=[(128.3, 127.6, 3.0e6, 0.0, 0.0)])
    out = []
    for e in (science, template):
        sat = e.image >= full_well
        out.append(e.replace(image=np.where(sat, full_well, e.image).astype(np.float32),
                             mask=np.where(sat, mask_bits("SAT"), 0).astype(np.int32)))
    return out


def test_a_saturated_star_leaves_its_core_alone_in_the_difference(backend):
    science, template = _saturated_pair()
    result = subtract(science, template, SubtractConfig(mode="convolveTemplate"), backend)
    old = subtract(science, template, SubtractConfig(
        mode="convolveTemplate", saturatedCores=SaturatedCoreConfig(doModelCores=False)),
        "cpu")
    diff, var, mask = (backend.to_host(p) for p in (result.difference.image,
                                                    result.difference.variance,
                                                    result.difference.mask))
    closed = (mask & mask_bits("SAT", "SAT_TEMPLATE")) != 0
    closed_before = (old.difference.mask & mask_bits("SAT", "SAT_TEMPLATE")) != 0
    assert closed.sum() < closed_before.sum() / 4
    ys, xs = np.mgrid[:256, :256]
    ring = (np.hypot(xs - 128.3, ys - 127.6) < 40) & ~closed & (var > 0)
    assert ring.sum() > 2000
    pull = diff[ring] / np.sqrt(var[ring])
    assert abs(np.mean(pull)) < 0.1 and 0.8 < np.std(pull) < 1.2
