"""Neighbouring changes in one footprint become separate diaSources, fitted together."""

import numpy as np
import pytest

from gpudiffim.detect import DetectionConfig, detect
from gpudiffim.exposure import Exposure
from gpudiffim.measure import measure
from gpudiffim.profiles import moffat
from gpudiffim.psf import ImagePsf

from pairs import gaussian_image

SHAPE = (240, 320)


def _field(rng, sources, psf):
    """White noise (sigma 1) plus point sources (x, y, S/N; negative S/N: a negative
    source) drawn with ``psf``; returns the exposure and the true fluxes."""
    image = rng.normal(size=SHAPE)
    h = psf.shape[0] // 2
    per_snr = 1.0 / np.sqrt(np.sum(psf * psf))
    fluxes = []
    for x, y, snr in sources:
        image[y - h:y + h + 1, x - h:x + h + 1] += snr * per_snr * psf
        fluxes.append(snr * per_snr)
    exposure = Exposure.from_arrays(image.astype(np.float32),
                                    variance=np.ones(SHAPE, np.float32), psf=ImagePsf(psf))
    return exposure, np.array(fluxes)


def _nearest(table, x, y):
    d = np.hypot(table["x"] - x, table["y"] - y)
    return int(np.argmin(d)), float(d.min())


def test_touching_neighbours_are_split_and_a_dipole_is_not():
    """Pairs of S/N 34 and 31 sources 9, 12 and 15 px apart (FWHM 4.7 px: their footprints
    touch) are two diaSources each, at their positions, with one parent; a dipole (a
    source and a negative one 3 px apart) and a lone S/N 100 source stay one each. Without
    deblending each pair is one diaSource (the fainter lost)."""
    rng = np.random.default_rng(5)
    psf = gaussian_image(31, 2.0)
    pairs = [((60, 60), (69, 60)), ((160, 60), (172, 60)), ((250, 60), (265, 60))]
    sources = [(x, y, s) for pair in pairs for (x, y), s in zip(pair, (34.0, 31.0))]
    sources += [(80, 170, 30.0), (83, 170, -30.0), (220, 170, 100.0)]
    exposure, fluxes = _field(rng, sources, psf)
    table = measure(exposure, detect(exposure))
    table = table[~table["sky_source"]]
    assert len(table) == 8
    for k, (a, b) in enumerate(pairs):
        i, di = _nearest(table, *a)
        j, dj = _nearest(table, *b)
        assert i != j and di < 1 and dj < 1
        assert table["parentDiaSourceId"][i] == table["parentDiaSourceId"][j] == i
        for row, flux in ((i, fluxes[2 * k]), (j, fluxes[2 * k + 1])):
            assert abs(table["psfFlux"][row] - flux) < 3 * table["psfFluxErr"][row]
    dipole, _ = _nearest(table, 81, 170)
    lone, _ = _nearest(table, 220, 170)
    assert table["isDipole"][dipole] and table["parentDiaSourceId"][dipole] == -1
    assert table["parentDiaSourceId"][lone] == -1
    whole = detect(exposure, config=DetectionConfig(doDeblend=False))
    assert len(whole) == 5


def test_blended_fluxes_are_fitted_together():
    """A S/N 60 and a S/N 20 source 12 px apart with a Moffat PSF (beta 2.5: wide wings):
    fitted alone, the fainter one takes the brighter one's wing as its own flux (mean pull
    +0.77 over 12 noise draws); fitted together it is unbiased (measured -0.02), its pulls'
    spread 1.36 (its centroid, on the wing, is the less certain)."""
    py, px = np.mgrid[-20:21, -20:21]
    psf = moffat(px, py, 4.0, 2.5)
    psf /= psf.sum()
    pulls = []
    for seed in range(12):
        rng = np.random.default_rng(100 + seed)
        exposure, fluxes = _field(rng, [(150, 120, 60.0), (162, 120, 20.0)], psf)
        table = measure(exposure, detect(exposure))
        i, d = _nearest(table, 162, 120)
        assert d < 1.5 and table["parentDiaSourceId"][i] >= 0
        pulls.append((table["psfFlux"][i] - fluxes[1]) / table["psfFluxErr"][i])
    assert abs(np.mean(pulls)) < 0.4, pulls
    assert 0.7 < np.std(pulls) < 1.7, pulls


@pytest.mark.parametrize("contrast", [0.3])
def test_a_bright_source_is_not_split_by_its_own_noise(contrast):
    """Forty lone sources of S/N 15-300: each one diaSource, none deblended."""
    rng = np.random.default_rng(9)
    psf = gaussian_image(31, 2.0)
    sources = [(40 + 40 * (k % 7), 40 + 40 * (k // 7), float(s))
               for k, s in enumerate(np.geomspace(15, 300, 35))]
    exposure, _ = _field(rng, sources, psf)
    det = detect(exposure, config=DetectionConfig(deblendContrast=contrast))
    assert len(det) == len(sources) and np.all(det.blend == -1)
