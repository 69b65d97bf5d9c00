"""Cosmic rays found in a single exposure, told apart from stars, and repaired."""

import numpy as np

from gpudiffim.cosmic import CosmicRayConfig, find_cosmic_rays, repair_cosmic_rays
from gpudiffim.exposure import Exposure
from gpudiffim.psf import ImagePsf

from pairs import gaussian_image


def _scene(rng, shape=(200, 200), sky_sigma=10.0):
    """Sky noise, 40 Gaussian stars (FWHM 4.2 px) from faint to far brighter than any
    cosmic ray, and 25 cosmic rays (single pixels and 2-5 pixel tracks)."""
    ny, nx = shape
    truth = np.zeros(shape)
    psf = gaussian_image(25, 1.8)
    for _ in range(40):
        x, y = rng.integers(15, nx - 15), rng.integers(15, ny - 15)
        truth[y - 12:y + 13, x - 12:x + 13] += 10 ** rng.uniform(3, 6) * psf
    hits = np.zeros(shape, bool)
    cr = np.zeros(shape)
    for _ in range(25):
        y, x = rng.integers(5, ny - 5), rng.integers(5, nx - 5)
        for _ in range(rng.integers(1, 6)):
            cr[y, x] += rng.uniform(150, 3000)
            hits[y, x] = True
            y, x = y + rng.integers(-1, 2), x + rng.integers(-1, 2)
    image = truth + cr + rng.normal(0, sky_sigma, shape)
    var = np.full(shape, sky_sigma**2) + truth / 4.0
    exposure = Exposure.from_arrays(image, None, var, psf=ImagePsf(psf))
    return exposure, truth, hits


def test_cosmic_rays_are_found_and_stars_are_not(backend, rng):
    exposure, truth, hits = _scene(rng)
    found = backend.to_host(find_cosmic_rays(exposure.to_backend(backend), exposure.psf.image,
                                             CosmicRayConfig(), backend))
    strong = hits & (exposure.image - truth > 8 * 10.0)  # CR pixels standing 8 sigma out
    assert found[strong].mean() > 0.95
    stars = truth > 30.0  # pixels where a star stands 3 sigma above the sky
    assert found[stars & ~hits].mean() < 0.01, np.argwhere(found & stars & ~hits)[:5]


def test_repair_interpolates_and_flags_and_leaves_masked_exposures_alone(backend, rng):
    exposure, truth, hits = _scene(rng)
    fixed = repair_cosmic_rays(exposure.to_backend(backend), exposure.psf.image,
                               CosmicRayConfig(), backend)
    mask, image = backend.to_host(fixed.mask), backend.to_host(fixed.image)
    flagged = (mask & exposure.bit("CR")) != 0
    assert np.all((mask[flagged] & exposure.bit("INTRP")) != 0)
    sky_hits = hits & flagged & (truth < 5.0)  # on empty sky: the fill is the sky's mean
    fill = np.abs(image[sky_hits])  # (a few sit beside a track's faint, unflagged pixels)
    assert np.median(fill) < 5.0 and np.percentile(fill, 90) < 20.0
    np.testing.assert_array_equal(image[~flagged], exposure.image[~flagged])
    masked = exposure.replace(mask=np.where(hits, exposure.bit("CR"), 0).astype(np.int32))
    again = repair_cosmic_rays(masked.to_backend(backend), exposure.psf.image,
                               CosmicRayConfig(), backend)
    np.testing.assert_array_equal(backend.to_host(again.image), masked.image)
