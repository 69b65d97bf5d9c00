"""Fuzz: whatever a file's header says and however it is damaged, the readers and the CLI
answer with a named error (InputError, exit 2) or a result, never a traceback."""

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpudiffim.cli import main
from gpudiffim.errors import InputError
from gpudiffim.io import read_exposure, read_psf

DECAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "decam"
SCIENCE, TEMPLATE = DECAM / "DEC-OBS04b.mini.fits", DECAM / "DEC-OBS18b.mini.fits"
needs_decam = pytest.mark.skipif(not SCIENCE.is_file(), reason=f"no DECam cutouts at {DECAM}")

# the cards the readers consult (metadata, units, zero points, saturation, noise, WCS, scaling)
KEYS = ["SATURATE", "SATURATN", "SATLEVEL", "GAIN", "EGAIN", "RDNOISE", "READNOIS", "MAGZERO",
        "MAGZPT", "PHOTZP", "FLUXMAG0", "BUNIT", "EXPTIME", "DETECTOR", "CCDNUM", "FILTER",
        "BAND", "VISIT", "EXPNUM", "MJD-OBS", "DATE-OBS", "EXTNAME", "EXTTYPE", "CTYPE1",
        "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CD1_1", "CD2_2", "CUNIT1", "BSCALE", "BZERO",
        "BLANK", "MP_BAD", "MP_SAT", "PSFTYPE"]
# raw value fields as files carry them: numbers of every size, NaN and inf as text, logicals,
# complex pairs, empty and unterminated strings, bare words
RAW_VALUES = st.one_of(
    st.sampled_from(["NaN", "nan", "INF", "-Infinity", "1E999", "-1E999", "1.0E-999", "0",
                     "-1", "T", "F", "(1.0, 2.0)", "''", "'", "' '", "abc", "1.2.3", "--5",
                     "12345678901234567890123456789", "'RA---TAN'", "'DEC--TAN'", "'deg'",
                     "'2018-08-10T04:54:34'", "'MULTIPLE'", "'S3-177_107419-14-1'"]),
    st.integers(-2**70, 2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda v: f"{v:.6E}"),
    st.text(st.characters(min_codepoint=32, max_codepoint=126, exclude_characters="'"),
            max_size=30).map(lambda t: f"'{t}'"),
)
CARDS = st.dictionaries(st.sampled_from(KEYS), st.one_of(RAW_VALUES, st.none()), max_size=12)
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _raw_fits(data: np.ndarray, cards: dict, path: Path) -> Path:
    """A one-HDU FITS file written byte by byte, so that its cards hold exactly the raw
    values given (None: the card is absent), as no FITS writer would write them."""
    data = np.ascontiguousarray(data, dtype=">f4")
    lines = ["SIMPLE  =                    T", "BITPIX  =                  -32",
             "NAXIS   =                    2", f"NAXIS1  = {data.shape[1]:20d}",
             f"NAXIS2  = {data.shape[0]:20d}"]
    lines += [f"{key:<8s}= {value:>20s}" for key, value in cards.items() if value is not None]
    lines.append("END")
    header = "".join(line[:80].ljust(80) for line in lines).encode("ascii")
    header += b" " * (-len(header) % 2880)
    body = data.tobytes()
    body += b"\0" * (-len(body) % 2880)
    path.write_bytes(header + body)
    return path


def _data_end(path):
    """The byte after the last HDU's data, before the FITS block's padding."""
    with fits.open(path) as hdus:
        last = hdus[-1].fileinfo()
        return last["datLoc"] + hdus[-1].size


@pytest.fixture(scope="module")
def decam_pixels():
    return fits.getdata(SCIENCE).astype(np.float32)


@needs_decam
@FUZZ
@given(cards=CARDS)
def test_any_header_values_read_or_fail_by_name(tmp_path_factory, decam_pixels, cards):
    path = _raw_fits(decam_pixels, cards, tmp_path_factory.mktemp("hdr") / "fuzzed.fits")
    try:
        exposure = read_exposure(path)
    except InputError as exc:
        assert str(path) in str(exc)
        return
    assert exposure.shape == decam_pixels.shape
    assert exposure.image.dtype == np.float32 and exposure.variance.dtype == np.float32
    assert np.isfinite(exposure.image).all()
    usable = exposure.mask == 0
    assert (exposure.variance[usable] > 0).all()


@needs_decam
@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cards=CARDS)
def test_the_cli_subtracts_or_exits_2_whatever_the_header(tmp_path_factory, decam_pixels,
                                                           cards, capsys):
    tmp = tmp_path_factory.mktemp("cli")
    path = _raw_fits(decam_pixels, cards, tmp / "fuzzed.fits")
    code = main(["subtract", str(path), str(TEMPLATE), "-o", str(tmp / "out")])
    err = capsys.readouterr().err
    assert code in (0, 2)
    if code == 2:
        assert err.startswith("gpudiffim: error: ") and "Traceback" not in err
    else:
        assert (tmp / "out" / "diaSources.parquet").is_file()


@needs_decam
@FUZZ
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_files_truncated_anywhere_are_named_errors(tmp_path_factory, decam_pixels, fraction):
    raw = SCIENCE.read_bytes()
    path = tmp_path_factory.mktemp("cut") / "truncated.fits"
    cut = int(fraction * len(raw))
    path.write_bytes(raw[:cut])
    if cut >= _data_end(SCIENCE):  # only the last block's padding is gone: nothing is lost
        assert np.array_equal(read_exposure(path).image, decam_pixels)
        return
    with pytest.raises(InputError, match="truncated.fits"):
        read_exposure(path)
    with pytest.raises(InputError, match="truncated.fits"):
        read_psf(path)


@needs_decam
@FUZZ
@given(offset=st.integers(0, 2880 * 3 - 1), junk=st.binary(min_size=1, max_size=200))
def test_files_overwritten_anywhere_in_the_header_read_or_fail_by_name(tmp_path_factory,
                                                                       offset, junk):
    raw = bytearray(SCIENCE.read_bytes())
    raw[offset:offset + len(junk)] = junk
    path = tmp_path_factory.mktemp("junk") / "damaged.fits"
    path.write_bytes(bytes(raw[:len(SCIENCE.read_bytes())]))
    try:
        read_exposure(path)
    except InputError as exc:
        assert "damaged.fits" in str(exc)


def _hdus(kind: str):
    image = np.ones((64, 64), np.float32)
    table = fits.BinTableHDU.from_columns([fits.Column("x", "E", array=np.arange(5.0))])
    return {
        "a table only": fits.HDUList([fits.PrimaryHDU(), table]),
        "no data": fits.HDUList([fits.PrimaryHDU()]),
        "1-D": fits.HDUList([fits.PrimaryHDU(np.ones(64, np.float32))]),
        "3-D": fits.HDUList([fits.PrimaryHDU(np.ones((3, 64, 64), np.float32))]),
        "an image named as a table": fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(
            image, name="SCI"), table.copy()]),
        "a table named SCI": fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
            [fits.Column("x", "E", array=np.arange(5.0))], name="SCI")]),
        "a variance table": fits.HDUList([fits.PrimaryHDU(image), fits.BinTableHDU.from_columns(
            [fits.Column("x", "E", array=np.arange(5.0))], name="VARIANCE")]),
        "a 1-D mask": fits.HDUList([fits.PrimaryHDU(image),
                                    fits.ImageHDU(np.ones(64, np.int32), name="MASK")]),
        "a mask of another shape": fits.HDUList([fits.PrimaryHDU(image),
                                                 fits.ImageHDU(np.ones((8, 8), np.int32),
                                                               name="MASK")]),
        "a variance of another shape": fits.HDUList(
            [fits.PrimaryHDU(image), fits.ImageHDU(np.ones((8, 8), np.float32),
                                                   name="VARIANCE")]),
        "a PSF table": fits.HDUList([fits.PrimaryHDU(image), fits.BinTableHDU.from_columns(
            [fits.Column("x", "E", array=np.arange(5.0))], name="PSF")]),
        "a 1-D PSF": fits.HDUList([fits.PrimaryHDU(image),
                                   fits.ImageHDU(np.ones(15, np.float32), name="PSF")]),
        "a complex image": fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
            [fits.Column("c", "C", array=np.ones(5, complex))])]),
        "all NaN": fits.HDUList([fits.PrimaryHDU(np.full((64, 64), np.nan, np.float32))]),
    }[kind]


@pytest.mark.parametrize("kind", ["a table only", "no data", "1-D", "3-D",
                                  "an image named as a table", "a table named SCI",
                                  "a variance table", "a 1-D mask", "a mask of another shape",
                                  "a variance of another shape", "a PSF table", "a 1-D PSF",
                                  "a complex image", "all NaN"])
def test_wrong_hdu_types_read_or_fail_by_name(tmp_path, kind):
    path = tmp_path / "odd.fits"
    _hdus(kind).writeto(path)
    for reader in (read_exposure, read_psf):
        try:
            reader(path)
        except InputError as exc:
            assert "odd.fits" in str(exc)
    assert main(["subtract", str(path), str(path), "-o", str(tmp_path / "out")]) in (0, 2)


# what the fuzzer found, each case pinned down
@needs_decam
def test_unparsable_cards_are_kept_as_text_not_a_refusal(tmp_path, decam_pixels, caplog):
    """``MAGZERO = abc`` or an unclosed quote refused the whole file ('not a readable FITS
    file (VerifyError: Unparsable card)'): the pixels are fine, only the card is not."""
    path = _raw_fits(decam_pixels, {"MAGZERO": "abc", "DETECTOR": "'S3-1", "EXPTIME": "90"},
                     tmp_path / "cards.fits")
    with caplog.at_level("WARNING", logger="gpudiffim.io"):
        exposure = read_exposure(path)
    assert exposure.zero_point is None and exposure.info.exptime == 90.0
    assert exposure.info.extra["DETECTOR"] == "S3-1"
    assert f"{path}: header card MAGZERO has an unparsable value 'abc'" in caplog.text


@needs_decam
def test_a_scaling_card_that_is_not_a_number_is_named(tmp_path, decam_pixels):
    path = _raw_fits(decam_pixels, {"BSCALE": "'x'"}, tmp_path / "scaled.fits")
    with pytest.raises(InputError, match=r"scaled.fits: BSCALE is 'x', not a number"):
        read_exposure(path)


@needs_decam
def test_a_saturation_level_that_would_flag_the_sky_is_ignored(tmp_path, decam_pixels, caplog):
    """DECam cutouts are sky subtracted: ``SATURATE = 0`` flagged 52% of the pixels SAT."""
    path = _raw_fits(decam_pixels, {"SATURATE": "0"}, tmp_path / "sat.fits")
    with caplog.at_level("WARNING", logger="gpudiffim.io"):
        exposure = read_exposure(path)
    assert not (exposure.mask & exposure.bit("SAT")).any()
    assert "would flag 52% of the pixels: not a saturation level" in caplog.text
    real = _raw_fits(decam_pixels, {"SATURATE": "2000"}, tmp_path / "sat2000.fits")
    flagged = (read_exposure(real).mask & exposure.bit("SAT")) != 0
    assert flagged.sum() == (decam_pixels >= 2000).sum() > 0


@needs_decam
@pytest.mark.parametrize("gain", ["1.0E-30", "6.0", "1E308"])
def test_a_gain_the_sky_contradicts_is_ignored(tmp_path, decam_pixels, gain, caplog):
    """With a sky of 500 put back, the cutout's scatter (sigma ~ 25) says the counts-per-
    variance gain is ~0.8: a header gain of 1e-30 gave variances of 3e30, one of 6 a
    variance 8x too small. Each is ignored and the sky's own noise is used."""
    image = decam_pixels + 500.0
    sky_sigma = float(np.std(image[(np.abs(decam_pixels) < 100)]))
    path = _raw_fits(image, {"GAIN": gain, "RDNOISE": "5.0"}, tmp_path / "gain.fits")
    with caplog.at_level("WARNING", logger="gpudiffim.imagenoise"):
        exposure = read_exposure(path)
    assert "gain.fits: the header's gain" in caplog.text
    assert np.median(exposure.variance) == pytest.approx(sky_sigma**2, rel=0.15)
