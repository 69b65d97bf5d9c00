"""FITS I/O: LSST-style round trip, plain images, and one test per kind of bad input."""

import dataclasses

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from gpudiffim.errors import InputError
from gpudiffim.exposure import Exposure, ExposureInfo, mask_bits
from gpudiffim.io import read_exposure, read_psf, write_exposure, write_psf
from gpudiffim.profiles import moffat
from gpudiffim.psf import PolynomialPsf, adaptive_moments, gaussian_psf

from layouts import HEADERS, LAYOUTS, write_layout_pair


def _wcs(crval=(150.1, 2.2)):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = crval
    w.wcs.crpix = [100.5, 60.5]
    w.wcs.cd = np.array([[-0.168, 0.001], [0.0005, 0.168]]) / 3600
    return w


def _exposure(rng, shape=(120, 200)):
    image = rng.normal(100, 5, size=shape).astype(np.float32)
    mask = np.zeros(shape, np.int32)
    mask[10, :] |= mask_bits("BAD")
    mask[50:53, 70:72] |= mask_bits("SAT", "INTRP")
    mask[5, 5] |= mask_bits("DETECTED_NEGATIVE")
    variance = rng.uniform(20, 30, size=shape).astype(np.float32)
    return Exposure(image, mask, variance, psf=gaussian_psf(1.7), wcs=_wcs(), zero_point=27.3,
                    info=ExposureInfo(visit=11690, detector=49, band="g", exptime=30.0))


def test_lsst_roundtrip_bit_for_bit(tmp_path, rng):
    exp = _exposure(rng)
    path = write_exposure(exp, tmp_path / "calexp.fits")
    back = read_exposure(path)
    for plane in ("image", "mask", "variance"):
        a, b = getattr(exp, plane), getattr(back, plane)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert back.info == dataclasses.replace(exp.info, path=str(path))  # errors name the file
    assert back.zero_point == exp.zero_point and back.mask_planes == exp.mask_planes
    assert back.wcs.to_header() == exp.wcs.to_header()
    np.testing.assert_allclose(back.psf.image, exp.psf.image, rtol=1e-12)
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF"]
        assert hdul["MASK"].header["MP_SAT"] == 1
        assert hdul["MASK"].header["MP_DETECTED_NEGATIVE"] == 6


def test_compressed_exposure_keeps_its_mask_and_the_noise_level(tmp_path, rng):
    """A tile-compressed exposure reads back with the same mask bit for bit, the same WCS,
    PSF and metadata, zeros kept exact (a NO_DATA row), the image within 0.03 of its noise
    rms (quantised at 1/16 of it) with no bias, the variance likewise within 0.03 of its
    own pixel-to-pixel scatter; at least 4x smaller than the plain file; the same bytes
    each time it is written."""
    exp = _exposure(rng, shape=(512, 384))
    image = exp.image.copy()
    image[100, :] = 0.0
    exp = exp.replace(image=image)
    plain = write_exposure(exp, tmp_path / "plain.fits")
    packed = write_exposure(exp, tmp_path / "packed.fits", compress=True)
    back = read_exposure(packed)
    assert back.mask.dtype == np.int32 and back.mask.tobytes() == exp.mask.tobytes()
    assert back.wcs.to_header() == exp.wcs.to_header() and back.zero_point == exp.zero_point
    assert back.info == dataclasses.replace(exp.info, path=str(packed))
    np.testing.assert_allclose(back.psf.image, exp.psf.image, rtol=1e-12)
    error = (back.image - exp.image) / 5.0  # the image's noise is 5
    assert np.all(back.image[100] == 0.0)
    assert np.std(error) < 0.03 and abs(np.mean(error)) < 0.005
    v_error = (back.variance - exp.variance) / np.std(exp.variance)
    assert np.std(v_error) < 0.03 and abs(np.mean(v_error)) < 0.005
    assert packed.stat().st_size * 4 < plain.stat().st_size
    assert read_exposure(write_exposure(exp, tmp_path / "again.fits", compress=True)
                         ).image.tobytes() == back.image.tobytes()  # reproducible


def test_foreign_mask_bits_are_remapped(tmp_path, rng):
    shape = (20, 30)
    mask = np.zeros(shape, np.int32)
    mask[3, 4] = 1 << 5  # the file says bit 5 is SAT
    mask[7, 8] = 1 << 12  # and bit 12 a plane we do not know
    hdr = fits.Header({"MP_SAT": 5, "MP_STREAK": 12})
    fits.HDUList([fits.PrimaryHDU(),
                  fits.ImageHDU(np.ones(shape, np.float32), name="IMAGE"),
                  fits.ImageHDU(mask, header=hdr, name="MASK"),
                  fits.ImageHDU(np.ones(shape, np.float32), name="VARIANCE")]).writeto(
        tmp_path / "x.fits")
    exp = read_exposure(tmp_path / "x.fits")
    assert exp.mask[3, 4] == exp.bit("SAT")
    assert exp.mask[7, 8] == exp.bit("STREAK") and exp.bit("STREAK") not in (
        exp.bit(n) for n in exp.mask_planes if n != "STREAK")


def test_plain_fits_with_gain(tmp_path, rng):
    """Sky 1000 counts, gain 2, read noise 6 e-: the gain model, whose sky variance the
    image's own scatter confirms."""
    image = rng.normal(1000.0, np.sqrt(1000.0 / 2 + 9.0), size=(64, 80)).astype(np.float32)
    image[3, 3] = np.nan
    image[30, 30] = 60000.0
    hdr = fits.Header({"GAIN": 2.0, "RDNOISE": 6.0, "SATURATE": 50000.0, "EXPTIME": 30.0})
    fits.PrimaryHDU(image, header=hdr).writeto(tmp_path / "plain.fits")
    exp = read_exposure(tmp_path / "plain.fits")
    good = np.isfinite(image)
    np.testing.assert_allclose(exp.variance[good], image[good] / 2.0 + 9.0, rtol=1e-6)
    assert exp.mask[3, 3] & exp.bit("NO_DATA") and exp.image[3, 3] == 0.0
    assert exp.mask[30, 30] & exp.bit("SAT")
    assert np.count_nonzero(exp.mask) == 2 and exp.info.exptime == 30.0


def test_sky_subtracted_image_without_variance_gets_its_local_noise(tmp_path, rng):
    """No variance, no gain, sky already subtracted: the variance map follows the sky noise
    as it changes across the image (sigma 5 -> 10 along x), and a bright source does not
    inflate it."""
    ny, nx = 256, 384
    sigma = np.broadcast_to(5.0 + 5.0 * np.arange(nx) / (nx - 1), (ny, nx))
    image = (rng.normal(size=(ny, nx)) * sigma).astype(np.float32)
    image[100:110, 100:110] += 5000.0
    fits.PrimaryHDU(image).writeto(tmp_path / "plain.fits")
    exp = read_exposure(tmp_path / "plain.fits")
    ratio = np.sqrt(exp.variance) / sigma
    inner = ratio[16:-16, 16:-16]
    assert np.abs(np.median(inner) - 1) < 0.02 and np.percentile(np.abs(inner - 1), 99) < 0.08
    assert abs(ratio[105, 105] - 1) < 0.1 and exp.wcs is None


def test_integer_pixels_become_scaled_float32(tmp_path):
    """int16 with BZERO/BSCALE (as the Liverpool Telescope writes) and uint16 (an Apogee
    camera) read as the physical values in float32."""
    values = np.arange(100, dtype=np.float64).reshape(10, 10) * 7.0 + 30000.0
    hdu = fits.PrimaryHDU(values.astype(np.float32))
    hdu.scale("int16", bzero=32768, bscale=1)
    hdu.writeto(tmp_path / "i16.fits")
    fits.PrimaryHDU(values.astype(np.uint16)).writeto(tmp_path / "u16.fits")
    for name in ("i16.fits", "u16.fits"):
        exp = read_exposure(tmp_path / name)
        assert exp.image.dtype == np.float32
        np.testing.assert_array_equal(exp.image, values)


def test_psf_file_roundtrip(tmp_path, rng):
    coeffs = rng.normal(size=(3, 11, 11)) * 0.01
    coeffs[0] += gaussian_psf(2.0, size=11).image
    psf = PolynomialPsf(coeffs, order=1, bbox=(200, 100))
    back = read_psf(write_psf(psf, tmp_path / "psf.fits"))
    np.testing.assert_allclose(back.image_at(10, 90), psf.image_at(10, 90))
    assert back.order == 1 and back.bbox == (200, 100)


def test_failed_write_leaves_old_file_intact(tmp_path, rng, monkeypatch):
    path = write_exposure(_exposure(rng), tmp_path / "calexp.fits")
    before = path.read_bytes()

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fits.HDUList, "writeto", boom)
    with pytest.raises(OSError):
        write_exposure(_exposure(rng), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["calexp.fits"]


# -- bad input: one test each, each error names the file ----------------------------------
def _check(path, fragment):
    with pytest.raises(InputError) as info:
        read_exposure(path)
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_missing_file(tmp_path):
    _check(tmp_path / "nope.fits", "not found")


def test_not_fits(tmp_path):
    (tmp_path / "junk.fits").write_bytes(b"SIMPLE  = garbage" * 100)
    _check(tmp_path / "junk.fits", "not a readable FITS")


def test_truncated_file(tmp_path, rng):
    path = write_exposure(_exposure(rng), tmp_path / "c.fits")
    path.write_bytes(path.read_bytes()[:20000])
    _check(path, "")


def test_no_image_hdu(tmp_path):
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column("a", "E", array=np.ones(3))])]).writeto(tmp_path / "t.fits")
    _check(tmp_path / "t.fits", "no HDU holds a 2-D image")


def test_shape_mismatch(tmp_path):
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((10, 10), np.float32), name="IMAGE"),
                  fits.ImageHDU(np.zeros((10, 10), np.int32), name="MASK"),
                  fits.ImageHDU(np.ones((10, 12), np.float32), name="VARIANCE")]).writeto(
        tmp_path / "s.fits")
    _check(tmp_path / "s.fits", "plane shapes differ")


def test_a_cube_is_no_image(tmp_path):
    fits.PrimaryHDU(np.ones((3, 10, 10), np.float32)).writeto(tmp_path / "cube.fits")
    _check(tmp_path / "cube.fits", "3-D array of shape (3, 10, 10), not a 2-D image")


def test_all_nan_image(tmp_path):
    fits.PrimaryHDU(np.full((10, 10), np.nan, np.float32)).writeto(tmp_path / "n.fits")
    _check(tmp_path / "n.fits", "no finite pixels")


def test_unparseable_wcs(tmp_path):
    hdr = fits.Header({"CTYPE1": "RA---FOO", "CTYPE2": "DEC--FOO", "CRVAL1": 1.0})
    fits.PrimaryHDU(np.ones((10, 10), np.float32), header=hdr).writeto(tmp_path / "w.fits")
    _check(tmp_path / "w.fits", "unparseable WCS")


# -- real instruments' layouts (headers as written, pixels simulated) --------------------
@pytest.mark.skipif(not HEADERS.is_dir(), reason=f"no header dumps at {HEADERS}")
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_real_layouts_read_with_their_metadata_and_noise(tmp_path, name):
    sci, _, _, stars = write_layout_pair(name, tmp_path)
    exp = read_exposure(sci)
    spec = LAYOUTS[name]
    assert exp.image.dtype == np.float32 and exp.variance.dtype == np.float32
    # the noise model against the noise the pixels were drawn with, on empty sky
    yy, xx = np.mgrid[:exp.shape[0], :exp.shape[1]]
    far = np.ones(exp.shape, bool)
    for x, y in stars:
        far[max(int(y) - 20, 0):int(y) + 21, max(int(x) - 20, 0):int(x) + 21] = False
    far &= (exp.mask == 0) & (xx > 10) & (yy > 10)
    if spec["sky_sigma"] is None:
        true_var = (spec["sky"] * spec["gain"]) / spec["gain"] ** 2 + 9.0
    else:
        true_var = (spec["sky_sigma"] * spec["unit"]) ** 2
    assert np.median(exp.variance[far]) == pytest.approx(true_var, rel=0.1), name
    if name == "decam":
        assert exp.info.detector == 37 and exp.info.extra["DETECTOR"] == "S3-177_107419-14-1"
        assert exp.wcs is not None
        back = read_exposure(write_exposure(exp, tmp_path / "back.fits"))
        assert back.info.detector == 37  # the typed value, not the text, is written back
    if name == "jwst":
        assert exp.info.units == "MJy/sr"
        assert exp.mask[0, 0] & exp.bit("NO_DATA") and exp.image[0, 0] == 0.0
    if name == "apogee":
        assert exp.wcs is None
    if name == "lsst":  # the afw PSF is read, not measured
        yy, xx = np.mgrid[-12:13, -12:13]
        kernel = moffat(xx, yy, spec["fwhm"], 3.0)
        np.testing.assert_allclose(exp.psf.image, kernel / kernel.sum(), rtol=1e-12)
        assert exp.mask[5, 0] & exp.bit("EDGE") and exp.info.exptime == 0.0


def _psfex_file(path, comps, degree, zero, scale, samp=1.0):
    """A PSFEx .psf file: the PSF_DATA table as PSFEx writes it."""
    col = fits.Column("PSF_MASK", format=f"{comps.size}E", dim=str(comps.shape[::-1]),
                      array=comps[None].astype(np.float32))
    hdu = fits.BinTableHDU.from_columns([col], name="PSF_DATA")
    h = hdu.header
    h["LOADED"], h["ACCEPTED"], h["POLNAXIS"] = 40, 38, 2
    h["POLGRP1"], h["POLNAME1"], h["POLZERO1"], h["POLSCAL1"] = 1, "X_IMAGE", zero[0], scale[0]
    h["POLGRP2"], h["POLNAME2"], h["POLZERO2"], h["POLSCAL2"] = 1, "Y_IMAGE", zero[1], scale[1]
    h["POLNGRP"], h["POLDEG1"], h["PSF_FWHM"], h["PSF_SAMP"] = 1, degree, 3.0, samp
    h["PSFNAXIS"] = 3
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    return path


def test_psfex_model_reads_exactly(tmp_path):
    """A PSFEx model of degree 2 (components in x^i y^j of (X_IMAGE - POLZERO) / POLSCAL,
    1-based) becomes a polynomial PSF equal to it at every position."""
    rng = np.random.default_rng(3)
    g = gaussian_psf(1.6, size=25).image
    comps = np.array([g] + [rng.normal(0, 0.02, g.shape) * g.max() for _ in range(5)])
    zero, scale = (1024.5, 512.5), (2048.0, 1024.0)
    psf = read_psf(_psfex_file(tmp_path / "x.psf", comps, 2, zero, scale))
    powers = [(i, j) for j in range(3) for i in range(3 - j)]
    for x, y in [(0, 0), (2047, 1023), (300, 800), (1500, 100)]:
        dx, dy = (x + 1 - zero[0]) / scale[0], (y + 1 - zero[1]) / scale[1]
        want = np.tensordot([dx**i * dy**j for i, j in powers], comps, axes=1)
        np.testing.assert_allclose(psf.image_at(x, y), want / want.sum(), atol=1e-6)


def test_psfex_model_sampled_off_the_pixel_grid(tmp_path):
    """PSF_SAMP 0.5 (the model sampled every half pixel): its width in image pixels is half
    the grid's."""
    g = gaussian_psf(3.0, size=51).image
    psf = read_psf(_psfex_file(tmp_path / "s.psf", g[None], 0, (100.0, 100.0), (200.0, 200.0),
                               samp=0.5))
    sx, sy, _ = adaptive_moments(psf.image_at(10, 10))
    assert sx == pytest.approx(1.5, rel=0.01) and sy == pytest.approx(1.5, rel=0.01)
