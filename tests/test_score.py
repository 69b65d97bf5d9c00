"""The score's flux normalisation over a spatially varying PSF."""

import numpy as np

from gpudiffim.backend import get_backend
from gpudiffim.profiles import PsfField
from gpudiffim.score import score_norm


def test_score_normalisation_follows_the_psf_across_the_detector():
    """The score's value per unit flux at (x, y) is sum(P_centre P(x, y)); with a PSF whose
    width varies over the detector, a single centre value would bias fluxes by several
    per cent at the corners."""
    field = PsfField(fwhm=5.0, beta=3.0, width=2048, height=1024, gx=0.08, gy=-0.05,
                     curvature=0.04)
    model = field.model(41)
    centre = model.image_at(1023.5, 511.5)
    norm = get_backend("cpu").to_host(score_norm(get_backend("cpu"), model, centre, (1024, 2048)))
    c = centre / centre.sum()
    for x, y in [(0, 0), (2047, 0), (0, 1023), (2047, 1023), (1000, 300)]:
        truth = float(np.sum(c * model.image_at(x, y)))
        assert abs(norm[y, x] / truth - 1) < 1e-5, (x, y)  # exact: a ratio of polynomials
    corner = float(np.sum(c * model.image_at(2047, 0))) / float(np.sum(c * c))
    assert abs(corner - 1) > 0.03  # the variation the map corrects
