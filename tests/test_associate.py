"""Association (ap_association's rules) on hand-made catalogues with known answers."""

import numpy as np
import pandas as pd
import pytest

from gpudiffim.associate import (
    AssociationConfig,
    match_sources,
    new_object_sources,
    summarize_objects,
)

ARCSEC = 1.0 / 3600.0


def _frame(ra, dec, err_arcsec=0.1, **extra):
    n = len(ra)
    dec = np.asarray(dec, float)
    return pd.DataFrame({"ra": np.asarray(ra, float), "dec": dec,
                         "raErr": np.full(n, err_arcsec * ARCSEC) / np.cos(np.radians(dec)),
                         "decErr": np.full(n, err_arcsec * ARCSEC), **extra})


def test_sources_match_the_nearest_object_within_one_arcsec_one_to_one():
    objects = _frame([10.0, 10.0 + 3 * ARCSEC], [-30.0, -30.0])
    cos = np.cos(np.radians(-30.0))
    # 0.3" from object 0; 0.2" from object 1; 1.5" from both (no match); 0.5" from object 0
    sources = _frame([10.0 + 0.3 * ARCSEC / cos, 10.0 + 2.8 * ARCSEC / cos,
                      10.0 + 1.5 * ARCSEC / cos, 10.0 - 0.5 * ARCSEC / cos],
                     [-30.0, -30.0, -30.0, -30.0])
    matched = match_sources(sources, objects)
    # object 0 is wanted by sources 0 and 3: the nearer (0.3") takes it, the other none
    assert matched.tolist() == [0, 1, -1, -1]


def test_the_positional_likelihood_decides_between_candidates():
    """A source 0.6" from a precise object and 0.5" from a poorly measured one: the
    likelihood with both errors prefers the poorly measured (its error covers 0.5"), where
    the nearest neighbour would not."""
    objects = _frame([0.0, 0.0], [0.6 * ARCSEC, -0.5 * ARCSEC])
    objects["raErr"] = objects["decErr"] = [0.05 * ARCSEC, 0.5 * ARCSEC]
    sources = _frame([0.0], [0.0], err_arcsec=0.05)
    assert match_sources(sources, objects).tolist() == [1]
    nearest = match_sources(sources, objects.iloc[[0]].reset_index(drop=True))
    assert nearest.tolist() == [0]  # alone within the radius, it is taken


def test_the_radius_is_the_configured_one():
    objects = _frame([0.0], [0.0])
    sources = _frame([0.0], [1.5 * ARCSEC])
    assert match_sources(sources, objects).tolist() == [-1]
    wide = AssociationConfig(maxDistArcSeconds=2.0)
    assert match_sources(sources, objects, wide).tolist() == [0]


def test_matching_crosses_ra_zero_and_empty_inputs():
    objects = _frame([359.99995], [0.0])
    sources = _frame([0.00005], [0.0])  # 0.36" apart across RA 0
    assert match_sources(sources, objects).tolist() == [0]
    assert match_sources(sources.iloc[:0], objects).tolist() == []
    assert match_sources(sources, objects.iloc[:0]).tolist() == [-1]


def test_flagged_centres_start_no_object():
    sources = _frame([0, 1, 2, 3], [0, 0, 0, 0], pixelFlags_crCenter=[False, True, False, False],
                     pixelFlags_saturatedCenter=[False, False, True, False])
    matched = np.array([-1, -1, -1, 5])
    assert new_object_sources(sources, matched).tolist() == [True, False, False, False]


def test_object_summaries_from_the_source_history():
    flux = np.array([100.0, 200.0, 130.0])
    err = np.array([10.0, 20.0, 10.0])
    mjd = np.array([60000.0, 60001.0, 60003.0])
    sources = _frame([10.0] * 3, [-30.0 + 0.1 * ARCSEC, -30.0, -30.0 - 0.1 * ARCSEC],
                     diaObjectId=[7, 7, 7], psfFlux=flux, psfFluxErr=err,
                     scienceFlux=flux + 1000, scienceFluxErr=err, midpointMjdTai=mjd,
                     band=["g", "g", "r"])
    row = summarize_objects(sources).iloc[0]
    assert row["diaObjectId"] == 7 and row["nDiaSources"] == 3
    assert row["firstDiaSourceMjdTai"] == 60000.0 and row["lastDiaSourceMjdTai"] == 60003.0
    w = 1 / err[:2] ** 2
    assert row["g_psfFluxMean"] == pytest.approx(np.sum(w * flux[:2]) / w.sum())
    assert row["g_psfFluxMeanErr"] == pytest.approx(1 / np.sqrt(w.sum()))
    assert row["g_psfFluxSigma"] == pytest.approx(np.std(flux[:2], ddof=1))
    assert row["g_psfFluxNdata"] == 2 and row["r_psfFluxNdata"] == 1
    assert row["u_psfFluxNdata"] == 0
    assert (row["g_psfFluxMin"], row["g_psfFluxMax"]) == (100.0, 200.0)
    assert row["g_psfFluxMaxSlope"] == pytest.approx(100.0)  # per day
    assert row["g_scienceFluxMean"] == pytest.approx(row["g_psfFluxMean"] + 1000)
    # equal errors: the mean position is the middle one, its error the sources' over sqrt(3)
    assert row["dec"] == pytest.approx(-30.0, abs=1e-9)
    assert row["decErr"] == pytest.approx(0.1 * ARCSEC / np.sqrt(3))
    forced = pd.DataFrame({"diaObjectId": [7, 7], "band": ["g", "g"],
                           "psfFlux": [50.0, 70.0], "psfFluxErr": [10.0, 10.0]})
    row = summarize_objects(sources, forced).iloc[0]
    assert row["g_fpFluxMean"] == pytest.approx(60.0)
    assert row["g_fpFluxMeanErr"] == pytest.approx(10 / np.sqrt(2))


def test_each_objects_summary_is_its_own_history_alone():
    """The summaries are grouped sums over every object at once: each object's row must be
    what its own sources (and forced rows) give on their own, whatever the others hold —
    unsorted ids, several bands, missing fluxes and errors, repeated times, objects with
    no forced rows."""
    rng = np.random.default_rng(3)
    n = 400
    ids = rng.choice([11, 5, 907, 42, 6, 3000], n)
    sources = _frame(10 + rng.normal(0, 1e-4, n), -30 + rng.normal(0, 1e-4, n),
                     diaObjectId=ids, psfFlux=rng.normal(100, 30, n),
                     psfFluxErr=rng.uniform(5, 15, n), scienceFlux=rng.normal(900, 30, n),
                     scienceFluxErr=rng.uniform(5, 15, n),
                     midpointMjdTai=60000 + rng.integers(0, 40, n).astype(float),
                     band=rng.choice(["g", "r", "i"], n))
    for column, share in (("psfFlux", 0.05), ("psfFluxErr", 0.05), ("raErr", 0.05)):
        sources.loc[rng.random(n) < share, column] = np.nan
    sources.loc[(sources["diaObjectId"] == 6) & (sources["band"] == "i"), "psfFlux"] = np.nan
    m = 300
    forced = pd.DataFrame({"diaObjectId": rng.choice([11, 5, 907, 42, 77], m),
                           "band": rng.choice(["g", "r"], m),
                           "psfFlux": rng.normal(50, 10, m), "psfFluxErr": rng.uniform(5, 9, m)})
    together = summarize_objects(sources, forced).set_index("diaObjectId")
    assert list(together.index) == sorted(set(ids))
    for object_id in set(ids):
        alone = summarize_objects(sources[sources["diaObjectId"] == object_id],
                                  forced[forced["diaObjectId"] == object_id]).iloc[0]
        for column, value in alone.items():
            if column == "diaObjectId":
                continue
            got = together.loc[object_id, column]
            assert (np.isnan(value) and np.isnan(got)) or got == pytest.approx(value,
                                                                               rel=1e-12), \
                (object_id, column)
    # a band an object never had: no values, and none counted
    no_i = together.loc[[i for i in together.index
                         if not ((sources["diaObjectId"] == i) & (sources["band"] == "i")).any()]]
    assert np.all(no_i["i_psfFluxNdata"] == 0) and np.all(np.isnan(no_i["i_psfFluxMean"]))
