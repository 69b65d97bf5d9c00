"""The study's figures of merit on hand-made catalogues with known answers."""

import numpy as np
import pytest

from gpudiffim.metrics import (
    contamination,
    effective_radius,
    efficiency_curve,
    fit_sigmoid,
    fractional_area,
    ideal_efficiency,
    match_fakes,
    photometry_pulls,
    sigmoid,
    uniformity_test,
)

from pairs import gaussian_image


def test_fakes_match_one_to_one_closest_first():
    sources = np.array([[10.0, 10.0], [10.8, 10.0], [50.0, 50.0]])
    fakes = np.array([[10.5, 10.0], [10.9, 10.1], [30.0, 30.0], [50.0, 51.4]])
    # fake 1 is closest to source 1 (0.14 px), so fake 0 takes source 0 (0.5 px); fake 2
    # has none within 1.5 px; fake 3 is 1.4 px from source 2
    assert match_fakes(sources, fakes).tolist() == [0, 1, -1, 2]
    assert match_fakes(sources[:0], fakes).tolist() == [-1] * 4


def test_efficiency_and_its_binomial_errors():
    """5 of 10 found: 0.5 with the Wilson 68.3% interval computed by hand; an empty bin is
    NaN; 10 of 10: 1 with no upper error."""
    values = np.r_[np.full(10, 1.5), np.full(10, 3.5)]
    found = np.r_[np.arange(10) < 5, np.ones(10, bool)]
    t = efficiency_curve(values, found, [1, 2, 3, 4])
    assert t["n"].tolist() == [10, 0, 10] and t["k"].tolist() == [5, 0, 10]
    assert t["efficiency"][0] == 0.5 and np.isnan(t["efficiency"][1])
    z = 0.99982  # the normal quantile of a 68.27% two-sided interval
    centre = (0.5 + z * z / 20) / (1 + z * z / 10)
    half = z / (1 + z * z / 10) * np.sqrt(0.25 / 10 + z * z / 400)
    assert t["err_lo"][0] == pytest.approx(0.5 - (centre - half), rel=1e-3)
    assert t["err_hi"][0] == pytest.approx(centre + half - 0.5, rel=1e-3)
    assert t["efficiency"][2] == 1.0 and t["err_hi"][2] == pytest.approx(0.0, abs=1e-12)
    assert ideal_efficiency(5.0) == pytest.approx(0.5) and ideal_efficiency(7.0) > 0.97


def test_the_sigmoid_fit_recovers_its_50_and_90_percent_points():
    """20 000 fakes found with probability 1 / (1 + exp(-2 (S/N - 5.5))): the fit gives
    b = 5.5 and a = 2 within their errors (and those errors are a few hundredths)."""
    rng = np.random.default_rng(1)
    snr = rng.uniform(2, 12, 20_000)
    found = rng.uniform(size=snr.size) < sigmoid(snr, 2.0, 5.5)
    fit = fit_sigmoid(snr, found)
    assert abs(fit["b"] - 5.5) < 3 * fit["b_err"] and fit["b_err"] < 0.03
    assert abs(fit["a"] - 2.0) < 3 * fit["a_err"] and fit["a_err"] < 0.1
    assert fit["x90"] == pytest.approx(5.5 + np.log(9) / 2.0, abs=0.1)
    with pytest.raises(ValueError, match="found and lost"):
        fit_sigmoid(snr, np.ones(snr.size, bool))


def test_contamination_counts():
    unmatched = np.array([1, 1, 1, 0, 1, 0, 1], bool)
    flagged = np.array([1, 0, 0, 1, 1, 0, 0], bool)
    c = contamination(unmatched, flagged, n_ccd=2, area_deg2=0.5)
    assert (c["n"], c["n_clean"]) == (5, 3)
    assert (c["per_ccd"], c["per_ccd_clean"], c["per_deg2"]) == (2.5, 1.5, 10.0)


def test_pulls_split_out_the_magnitude_outliers():
    true = np.full(6, 1000.0)
    flux = np.array([1000.0, 1050.0, 950.0, 1200.0, -5.0, 1010.0])
    err = np.full(6, 50.0)
    p = photometry_pulls(flux, err, true, outlier_mag=0.1)
    np.testing.assert_allclose(p["pull"], [0, 1, -1, 4, -20.1, 0.2])
    assert p["outlier"].tolist() == [False, False, False, True, True, False]
    assert p["pull_median"] == pytest.approx(0.1)


def test_fractional_area_is_uniform_for_uniform_sources_only():
    """Uniform positions on a 2048 x 4176 CCD: gamma passes the KS test; the same number
    piled within 20 px of the edges, or in the central 200 px, fails it by far."""
    rng = np.random.default_rng(3)
    w, h, n = 2048, 4176, 3000
    x, y = rng.uniform(0, w - 1, n), rng.uniform(0, h - 1, n)
    uniform = uniformity_test(fractional_area(x, y, w, h))
    assert uniform["p"] > 0.01 and 0.8 < uniform["edge_excess"] < 1.2
    edge_x = np.where(rng.uniform(size=n) < 0.5, rng.uniform(0, 20, n),
                      rng.uniform(w - 21, w - 1, n))
    piled = uniformity_test(fractional_area(edge_x, y, w, h))
    assert piled["p"] < 1e-10 and piled["edge_excess"] > 10
    central = uniformity_test(fractional_area(rng.uniform(924, 1124, n),
                                              rng.uniform(1988, 2188, n), w, h))
    assert central["p"] < 1e-10 and central["edge_excess"] == 0.0
    assert fractional_area([0.0, (w - 1) / 2], [(h - 1) / 2, (h - 1) / 2], w, h) == \
        pytest.approx([(1 - 1 / w) ** 2, 0.0])


def test_effective_radius_of_a_gaussian():
    assert effective_radius(gaussian_image(61, 2.0)) == pytest.approx(2.0 * np.sqrt(2), rel=1e-3)
