"""Exposure midpoints (MJD TAI) from real instruments' headers and the FITS time cards."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time

from gpudiffim.obstime import midpoint_mjd_tai

from layouts import HEADERS, dumped_headers

TAI_MINUS_UTC = {2015: 36.0, 2018: 37.0, 2020: 37.0}  # seconds (leap seconds)
needs_headers = pytest.mark.skipif(not HEADERS.is_dir(), reason=f"no headers at {HEADERS}")


@needs_headers
@pytest.mark.parametrize("name, start_utc, exptime, year", [
    ("decam_cutout.txt", 58334.39133794, 330.0, 2018),  # MJD-OBS, the start
    ("liverpool_ioo.txt", 59091.900684, 60.0, 2020),  # MJD (no MJD-OBS)
    ("bosque_alegre_apogee.txt", Time("2015-12-27T06:26:24", scale="utc").mjd, 60.0, 2015),
])
def test_real_headers_give_the_midpoint_in_tai(name, start_utc, exptime, year):
    header = dumped_headers(name)[0]
    expected = start_utc + (exptime / 2 + TAI_MINUS_UTC[year]) / 86400.0
    assert midpoint_mjd_tai(header) == pytest.approx(expected, abs=1e-8)  # ~1 ms


@needs_headers
def test_an_afw_exposure_without_time_cards_has_no_midpoint():
    assert all(midpoint_mjd_tai(h) is None for h in dumped_headers("lsst_afw_exposure.txt"))


def test_midpoint_cards_win_and_timesys_sets_the_scale():
    h = fits.Header({"MJD-OBS": 60000.0, "EXPTIME": 30.0, "MJD-AVG": 60000.5, "TIMESYS": "TAI"})
    assert midpoint_mjd_tai(h) == 60000.5
    h = fits.Header({"DATE-AVG": "2024-01-01T00:00:00", "TIMESYS": "TT"})
    assert midpoint_mjd_tai(h) == pytest.approx(Time("2024-01-01", scale="tt").tai.mjd)
    assert midpoint_mjd_tai(h) == pytest.approx(60310.0 - 32.184 / 86400.0)
    h = fits.Header({"TDB-MID": 59759.41309917784})  # JWST: TDB whatever TIMESYS says
    assert midpoint_mjd_tai(h) == pytest.approx(59759.41309917784 - 32.184 / 86400, abs=1e-7)


@pytest.mark.parametrize("value", ["abc", "", "NaN", "1.0E999", True, -5.0, 1e9])
def test_cards_that_hold_no_time_are_passed_over(value):
    h = fits.Header({"MJD-OBS": value, "EXPTIME": 30.0})
    assert midpoint_mjd_tai(h) is None
    h["DATE-OBS"] = "2020-01-01T00:00:00"
    assert midpoint_mjd_tai(h) == pytest.approx(
        Time("2020-01-01", scale="utc").tai.mjd + 15 / 86400.0)


def test_an_unknown_time_scale_is_taken_as_utc_and_said(caplog):
    h = fits.Header({"MJD-OBS": 60000.0, "TIMESYS": "LOCAL"})
    with caplog.at_level("WARNING", logger="gpudiffim.obstime"):
        value = midpoint_mjd_tai(h, "x.fits: ")
    assert value == pytest.approx(Time(60000.0, format="mjd", scale="utc").tai.mjd)
    assert "x.fits: TIMESYS 'LOCAL' is not a time scale: UTC assumed" in caplog.text
    assert np.isfinite(value)
