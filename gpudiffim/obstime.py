"""When an exposure was taken: its midpoint as an MJD in TAI, from whatever its header says.

Instruments state the time in many ways: a midpoint MJD (``MJD-AVG``, ``MJD-MID``; JWST's
``TDB-MID``), a start MJD (``MJD-OBS``, ``MJD-BEG``, the Liverpool Telescope's ``MJD``) or an
ISO date (``DATE-AVG`` a midpoint, ``DATE-OBS`` a start), in the time scale ``TIMESYS``
names (UTC when it names none, as the FITS standard says). A start is moved to the
midpoint by half of ``EXPTIME``. The APDB keeps times as MJD TAI (``midpointMjdTai``).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from astropy.time import Time
from erfa import ErfaWarning

__all__ = ["MIDPOINT_CARDS", "START_CARDS", "midpoint_mjd_tai"]

log = logging.getLogger(__name__)

#: cards holding the exposure's midpoint, first found wins: (card, is an MJD, time scale or
#: None for the header's TIMESYS)
MIDPOINT_CARDS = (("MJD-AVG", True, None), ("MJD-MID", True, None), ("TDB-MID", True, "tdb"),
                  ("DATE-AVG", False, None))
#: cards holding the exposure's start, used with half of EXPTIME when no midpoint is given
START_CARDS = (("MJD-OBS", True, None), ("MJD-BEG", True, None), ("MJD", True, None),
               ("DATE-OBS", False, None))
#: TIMESYS values and their astropy scales (UT1 as UTC: within 0.9 s, and no IERS table needed)
_SCALES = {"UTC": "utc", "TAI": "tai", "TT": "tt", "TDB": "tdb", "TCB": "tcb", "TCG": "tcg",
           "UT1": "utc", "UT": "utc", "GMT": "utc", "Z": "utc"}


def _time(header, card: str, is_mjd: bool, scale: str) -> Time | None:
    """The card's value as a Time, or None when it is absent or not a time."""
    value = header.get(card)
    if value is None or isinstance(value, bool):
        return None
    try:
        with warnings.catch_warnings():  # "dubious year": a date beyond the leap-second table
            warnings.simplefilter("ignore", ErfaWarning)
            return _parsed(value, is_mjd, scale)
    except (TypeError, ValueError):
        return None


def _parsed(value, is_mjd: bool, scale: str) -> Time | None:
    if is_mjd:
        mjd = float(value)
        return Time(mjd, format="mjd", scale=scale) if np.isfinite(mjd) and 0 < mjd < 1e6 else None
    text = str(value).strip()
    return Time(text, format="isot" if "T" in text else "iso", scale=scale) if text else None


def midpoint_mjd_tai(header, where: str = "") -> float | None:
    """The exposure's midpoint as an MJD in TAI, or None when the header gives no time.

    ``where`` (the file) prefixes the log line said when ``TIMESYS`` names no time scale.
    """
    timesys = str(header.get("TIMESYS", "UTC")).strip().upper()
    scale = _SCALES.get(timesys)
    if scale is None:
        log.warning("%sTIMESYS %r is not a time scale: UTC assumed", where, timesys)
        scale = "utc"
    for card, is_mjd, card_scale in MIDPOINT_CARDS:
        t = _time(header, card, is_mjd, card_scale or scale)
        if t is not None:
            return float(t.tai.mjd)
    try:
        half = 0.5 * float(header.get("EXPTIME", 0.0))
    except (TypeError, ValueError):
        half = 0.0
    half = half if np.isfinite(half) and half > 0 else 0.0
    for card, is_mjd, card_scale in START_CARDS:
        t = _time(header, card, is_mjd, card_scale or scale)
        if t is not None:
            return float(t.tai.mjd) + half / 86400.0
    return None
