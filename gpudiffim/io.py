"""FITS input and output of exposures and PSFs, with atomic writes.

:func:`read_exposure` reads any single- or multi-HDU FITS image:

* the image HDU by name or type (``IMAGE``, ``SCI`` in ``EXTNAME`` or ``EXTTYPE``), else the
  first with 2-D data; integer pixels (``BZERO``/``BSCALE`` applied) become float32, NaN and
  inf become NO_DATA;
* LSST-style planes (``MASK``, ``VARIANCE``, named by ``EXTNAME`` or ``EXTTYPE`` as afw
  writes them), mask planes from the ``MP_<NAME>`` cards, and the PSF from a ``PSF``
  extension (written by gpudiffim) or an afw ``KernelPsf`` with a ``FixedKernel`` in the
  ``ARCHIVE_INDEX``/``ARCHIVE_DATA`` tables;
* the noise from a variance plane, else from an HDU or a separate file holding sigma
  (``ERR``, ``SIGMA``, ``RMS``, ``NOISE``, ``STD``), variance (``VAR``, ``VARIANCE``) or
  inverse variance (``WHT``, ``IVAR``, ``WEIGHT``, ``INVVAR``), else estimated
  (:mod:`gpudiffim.imagenoise`);
* saturation from the header (``SATURATE`` and its common spellings) or the caller;
* metadata leniently: a header value of an unexpected type is kept as text in
  ``ExposureInfo.extra``, never a crash; units (``BUNIT``) and zero points (``MAGZERO``,
  ``MAGZPT``, ``PHOTZP``, ``FLUXMAG0``, ...) when present.

Any bad input raises :class:`~gpudiffim.errors.InputError` naming the file and the problem.
This module is the host-side edge of the engine: it works on NumPy arrays.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning
from astropy.wcs import WCS, FITSFixedWarning
from scipy import ndimage

from .errors import InputError
from .exposure import MASK_PLANES, Exposure, ExposureInfo, mask_bits
from .imagenoise import estimate_variance
from .obstime import midpoint_mjd_tai
from .psf import ImagePsf, PolynomialPsf, centred_psf_image, psf_image_problem
from .spatial import monomial_terms, scaled_coords

__all__ = ["atomic_path", "check_output_space", "output_bytes", "read_exposure",
           "read_noise_plane", "read_mask_plane", "write_exposure", "read_psf", "write_psf",
           "checked_psf", "SATURATION_CARDS", "ZERO_POINT_CARDS"]

log = logging.getLogger(__name__)

IMAGE_NAMES = ("IMAGE", "SCI")
NOISE_KINDS = {**dict.fromkeys(("ERR", "SIGMA", "RMS", "NOISE", "STD"), "sigma"),
               **dict.fromkeys(("VARIANCE", "VAR"), "variance"),
               **dict.fromkeys(("WHT", "IVAR", "WEIGHT", "INVVAR"), "inverse variance")}
#: a saturation level flagging more of the pixels than this is not one (``SATURATE = 0`` on
#: sky-subtracted data would flag half of them)
MAX_SATURATED_SHARE = 0.1
#: header cards giving the saturation level, first found wins
SATURATION_CARDS = ("SATURATE", "SATURATN", "SATLEVEL", "SATUR", "SATURLEV", "ESATUR", "TSATUR")
#: header cards giving the AB magnitude of one count
ZERO_POINT_CARDS = ("MAGZERO", "MAGZPT", "MAGZP", "PHOTZP", "ZEROPT")
GAIN_CARDS = ("GAIN", "EGAIN", "CCDGAIN")
READ_NOISE_CARDS = ("RDNOISE", "READNOIS", "READNOISE", "RON")
_META_CARDS = {"visit": ("VISIT", "EXPNUM"), "detector": ("DETECTOR", "CCDNUM", "DETNUM"),
               "band": ("BAND", "FILTER"), "exptime": ("EXPTIME",)}
_META_TYPES = {"visit": int, "detector": int, "band": str, "exptime": float}


def _umask() -> int:
    """The process's file-creation mask (read without changing it where /proc says it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success. The
    file gets the permissions the user's umask gives a new file (a temporary file's own are
    owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_output_space(outdir, needed_bytes: int) -> None:
    """Refuse, before any compute, an output directory that cannot be written (InputError
    naming it: not creatable, not writable, or under ``needed_bytes`` free)."""
    outdir = Path(outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=outdir, prefix=".gpudiffim-write-test."):
            pass
    except OSError as exc:
        raise InputError(outdir, f"output directory not writable ({exc.strerror or exc})") from exc
    free = shutil.disk_usage(outdir).free
    if free < needed_bytes:
        raise InputError(outdir, f"output directory has {free / 1e9:.2f} GB free; the outputs "
                                 f"need about {needed_bytes / 1e9:.2f} GB")


def output_bytes(shape, compressed: bool = False) -> int:
    """About what one exposure's outputs take on disk: a difference of ``shape`` (image,
    mask and variance planes, 12 bytes a pixel; tile-compressed, at most 3) and its
    catalogue."""
    ny, nx = shape
    return int((3 if compressed else 12) * ny * nx * 1.05) + 2**20


# ---------------------------------------------------------------------------- reading
def read_exposure(path, *, psf=None, noise=None, noise_kind: str | None = None, mask=None,
                  saturation: float | None = None) -> Exposure:
    """Read a FITS exposure onto the host.

    Parameters
    ----------
    path : path
        The FITS file (any layout described in :mod:`gpudiffim.io`).
    psf : path, optional
        A PSF file (:func:`read_psf`); it replaces any PSF in ``path``.
    noise : path, optional
        A separate file holding the image's noise (sigma, variance or inverse variance, told
        apart by its HDU name or ``noise_kind``); it replaces any noise in ``path``.
    noise_kind : {"sigma", "variance", "inverse variance"}, optional
        What ``noise`` holds, when its HDU name does not say.
    mask : path, optional
        A separate mask file: its ``MP_*`` planes, or non-zero pixels as BAD.
    saturation : float, optional
        Pixels at or above this level get SAT (default: the header's, if any).

    Returns
    -------
    Exposure
        Host float32 image and variance, int32 mask.
    """
    path = Path(path)
    exposure = _with_fits(path, lambda hdul: _read(path, hdul, saturation))
    if noise is not None:
        variance = read_noise_plane(noise, exposure.shape, noise_kind)
        exposure = _sanitised(path, exposure.replace(variance=variance))
    if mask is not None:
        planes = dict(exposure.mask_planes)
        extra = read_mask_plane(mask, exposure.shape, planes)
        exposure = exposure.replace(mask=exposure.mask | extra, mask_planes=planes)
    if psf is not None:
        exposure = exposure.replace(psf=read_psf(psf))
    elif exposure.psf is not None:
        checked_psf(exposure.psf, path)
    return exposure.replace(info=replace(exposure.info, path=str(path)))


def _with_fits(path: Path, read):
    """``read(hdul)`` on an open FITS file; any failure an InputError naming the file."""
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with warnings.catch_warnings(), fits.open(path, memmap=False) as hdul:
            warnings.simplefilter("ignore", FITSFixedWarning)
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            warnings.simplefilter("ignore", AstropyUserWarning)
            for hdu in hdul:
                _unparsable_cards_as_text(path, hdu.header)
            return read(hdul)
    except InputError:
        raise
    except Exception as exc:  # truncated, corrupt or not FITS at all
        raise InputError(path, f"not a readable FITS file ({exc.__class__.__name__}: "
                               f"{exc})") from exc


def _unparsable_cards_as_text(path, header) -> None:
    """Cards whose value no FITS parser reads (``MAGZERO = abc``, an unclosed quote) keep
    their raw text as a string value, said in the log, instead of refusing the file; the
    readers then treat them as any other value of an unexpected type."""
    for index, card in enumerate(header.cards):
        try:
            _ = card.value
        except Exception:  # astropy's VerifyError, or a ValueError from the parser
            raw = card.image[10:].split(" /")[0] if card.image[8:10] == "= " else ""
            text = raw.strip().strip("'").strip()
            log.warning("%s: header card %s has an unparsable value %r: kept as text", path,
                        card.image[:8].strip(), text)
            header[index] = text
    for key in ("BSCALE", "BZERO"):
        value = header.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(path, f"{key} is {value!r}, not a number: the pixels cannot be "
                                   "scaled")


def _kind(hdu) -> str:
    """An HDU's name or type (EXTNAME, else EXTTYPE), upper case."""
    name = hdu.header.get("EXTNAME") or hdu.header.get("EXTTYPE") or ""
    return str(name).strip().upper()


def _find(hdul, names):
    """The first HDU whose name or type is one of ``names`` (EXTNAME or EXTTYPE)."""
    for hdu in hdul:
        kinds = {str(hdu.header.get(k, "")).strip().upper() for k in ("EXTNAME", "EXTTYPE")}
        if kinds & set(names) and hdu.data is not None:
            return hdu
    return None


def _image_hdu(path, hdul):
    hdu = _find(hdul, IMAGE_NAMES)
    if hdu is not None:
        return hdu
    others = set(NOISE_KINDS) | {"MASK", "PSF"}
    images = [h for h in hdul if h.is_image and h.data is not None and _kind(h) not in others]
    flat = [h for h in images if h.data.ndim == 2]
    if flat:
        return flat[0]
    if images:
        raise InputError(path, f"HDU {hdul.index_of(images[0])} holds a {images[0].data.ndim}-D "
                               f"array of shape {images[0].data.shape}, not a 2-D image")
    raise InputError(path, "no HDU holds a 2-D image")


def _float_plane(path, hdu, what) -> np.ndarray:
    data = hdu.data
    if data is None or data.ndim != 2:
        raise InputError(path, f"{what} HDU holds no 2-D image")
    if data.dtype.kind not in "fiu":
        raise InputError(path, f"{what} data are {data.dtype.name}, not numbers")
    return np.array(data, dtype=np.float32)


def _read_wcs(path, header):
    if not any(k.startswith("CTYPE") for k in header):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wcs = WCS(header, naxis=2)
            wcs.pixel_to_world_values(0.0, 0.0)
    except Exception as exc:
        raise InputError(path, f"unparseable WCS ({exc.__class__.__name__}: "
                               f"{str(exc).strip().splitlines()[-1]})") from exc
    return wcs


def _number(header, cards):
    """The first of ``cards`` whose value is a finite number, as a float (or None)."""
    for card in cards:
        try:
            value = float(header[card])
        except (KeyError, TypeError, ValueError):
            continue
        if np.isfinite(value):
            return value
    return None


def _read_info(header, where: str = "") -> tuple[ExposureInfo, float | None]:
    """Metadata, leniently: each field from the first of its cards whose value has the
    field's type; a value of another type is kept as text in ``extra``; the midpoint time
    from any of the cards :func:`~gpudiffim.obstime.midpoint_mjd_tai` knows."""
    values, extra = {}, {}
    for name, cards in _META_CARDS.items():
        for card in cards:
            if card not in header:
                continue
            value = header[card]
            try:
                cast = _META_TYPES[name](value)
            except (TypeError, ValueError):
                extra.setdefault(card, str(value).strip())
                continue
            if name in ("visit", "detector") and (isinstance(value, str) or cast != value):
                extra.setdefault(card, str(value).strip())
                continue
            values[name] = cast.strip() if isinstance(cast, str) else cast
            break
    if "BUNIT" in header:
        values["units"] = str(header["BUNIT"]).strip()
    values["mjd"] = midpoint_mjd_tai(header, where)
    zp = _number(header, ZERO_POINT_CARDS)
    flux_mag0 = _number(header, ("FLUXMAG0",))
    if zp is None and flux_mag0 is not None and flux_mag0 > 0:
        zp = 2.5 * np.log10(flux_mag0)
    return ExposureInfo(**values, extra=extra), zp


def _remap_mask(raw: np.ndarray, header, planes=None) -> tuple[np.ndarray, dict]:
    """Move the file's mask bits onto gpudiffim's planes (unknown planes keep free bits)."""
    file_planes = {k[3:]: int(v) for k, v in header.items() if k.startswith("MP_")}
    planes = dict(MASK_PLANES) if planes is None else planes
    free = iter(b for b in range(31) if b not in planes.values())
    for name in sorted(file_planes, key=file_planes.get):
        if name not in planes:
            planes[name] = next(free)
    if all(planes[n] == b for n, b in file_planes.items()):
        return raw.astype(np.int32), planes
    out = np.zeros(raw.shape, np.int32)
    for name, b in file_planes.items():
        out |= ((raw.astype(np.int64) >> b) & 1).astype(np.int32) << planes[name]
    return out, planes


def _to_variance(path, data: np.ndarray, kind: str) -> np.ndarray:
    """A sigma, variance or inverse-variance plane as variance; unusable values NaN."""
    data = np.asarray(data, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "sigma":
            var = np.where(data > 0, data * data, np.nan)
        elif kind == "variance":
            var = np.where(data > 0, data, np.nan)
        elif kind == "inverse variance":
            var = np.where(data > 0, 1.0 / data, np.nan)
        else:
            raise InputError(path, f"unknown noise kind {kind!r}: sigma, variance or "
                                   "inverse variance")
    return var.astype(np.float32)


def read_noise_plane(path, shape, kind: str | None = None) -> np.ndarray:
    """The variance plane held by a noise file (its first 2-D HDU, or the one named for
    its kind); ``kind`` overrides what the HDU's name says. Unusable pixels are NaN."""
    path = Path(path)

    def read(hdul):
        hdu = next((h for h in hdul if _kind(h) in NOISE_KINDS and h.data is not None), None)
        hdu = hdu or next((h for h in hdul if h.is_image and h.data is not None
                           and h.data.ndim == 2), None)
        if hdu is None:
            raise InputError(path, "no HDU holds a 2-D noise image")
        what = kind or NOISE_KINDS.get(_kind(hdu))
        if what is None:
            raise InputError(path, f"cannot tell whether HDU {_kind(hdu) or 0} holds sigma, "
                                   "variance or inverse variance: name its kind")
        data = _float_plane(path, hdu, "noise")
        if data.shape != tuple(shape):
            raise InputError(path, f"noise plane of shape {data.shape} for an image of "
                                   f"shape {tuple(shape)}")
        return _to_variance(path, data, what)

    return _with_fits(path, read)


def read_mask_plane(path, shape, planes: dict) -> np.ndarray:
    """A separate mask file's int32 bits on ``planes`` (updated with its ``MP_*`` planes),
    or its non-zero pixels as BAD when it declares none."""
    path = Path(path)

    def read(hdul):
        hdu = _find(hdul, ("MASK",)) or next(
            (h for h in hdul if h.is_image and h.data is not None and h.data.ndim == 2), None)
        if hdu is None or hdu.data.ndim != 2 or hdu.data.dtype.kind not in "iub":
            raise InputError(path, "no HDU holds a 2-D integer mask")
        if hdu.data.shape != tuple(shape):
            raise InputError(path, f"mask of shape {hdu.data.shape} for an image of shape "
                                   f"{tuple(shape)}")
        if any(k.startswith("MP_") for k in hdu.header):
            mask, new = _remap_mask(hdu.data, hdu.header, planes)
            planes.update(new)
            return mask
        return np.where(hdu.data != 0, mask_bits("BAD", planes=planes), 0).astype(np.int32)

    return _with_fits(path, read)


def _sanitised(path, exposure: Exposure) -> Exposure:
    """Non-finite image or variance pixels become NO_DATA with zero image and variance;
    an image with no finite pixel is an error."""
    image, variance = exposure.image, exposure.variance
    bad = ~np.isfinite(image) | ~np.isfinite(variance)
    if bad.all():
        raise InputError(path, "image has no finite pixels")
    if not bad.any():
        return exposure
    image, variance, mask = image.copy(), variance.copy(), exposure.mask.copy()
    mask[bad] |= mask_bits("NO_DATA", planes=exposure.mask_planes)
    image[bad] = 0.0
    variance[bad] = 0.0
    return exposure.replace(image=image, mask=mask, variance=variance)


def _read(path, hdul, saturation) -> Exposure:
    hdu = _image_hdu(path, hdul)
    image = _float_plane(path, hdu, "image")
    header = fits.Header()
    header.update(hdul[0].header)
    if hdu is not hdul[0]:
        header.update(hdu.header)
    mask_hdu, var_hdu = _find(hdul, ("MASK",)), _find(hdul, ("VARIANCE", "VAR"))
    noise_hdu = var_hdu or next((h for h in hdul if _kind(h) in NOISE_KINDS
                                 and h.data is not None and h is not hdu), None)
    planes = dict(MASK_PLANES)
    if mask_hdu is not None:
        raw = mask_hdu.data
        if raw.ndim != 2 or raw.dtype.kind not in "iu":
            raise InputError(path, "MASK extension holds no 2-D integer image")
        mask, planes = _remap_mask(raw, mask_hdu.header)
    else:
        mask = np.zeros(image.shape, np.int32)
    finite = np.isfinite(image)
    if not finite.any():
        raise InputError(path, "image has no finite pixels")
    sat_level = saturation if saturation is not None else _number(header, SATURATION_CARDS)
    if sat_level is not None and mask_hdu is None:
        saturated = finite & (image >= sat_level)
        share = saturated.sum() / finite.sum()
        if share > MAX_SATURATED_SHARE:
            log.warning("%s: a saturation level of %.6g would flag %.0f%% of the pixels: not a "
                        "saturation level, ignored", path, sat_level, 100 * share)
        else:
            mask[saturated] |= mask_bits("SAT", planes=planes)
    if noise_hdu is not None:
        variance = _float_plane(path, noise_hdu, "noise")
        if variance.shape == image.shape and noise_hdu is not var_hdu:
            variance = _to_variance(path, variance, NOISE_KINDS[_kind(noise_hdu)])
    else:
        good = finite & ((mask & mask_bits("SAT", "BAD", planes=planes)) == 0)
        variance, model = estimate_variance(image, good, _number(header, GAIN_CARDS),
                                            _number(header, READ_NOISE_CARDS) or 0.0,
                                            where=f"{path}: ")
        log.info("%s: no variance plane; %s noise model", path, model)
    shapes = {"image": image.shape, "mask": mask.shape, "variance": variance.shape}
    if len(set(shapes.values())) != 1:
        raise InputError(path, "plane shapes differ: " + ", ".join(
            f"{k.upper()} {v}" for k, v in shapes.items()))
    info, zp = _read_info(header, f"{path}: ")
    psf = _psf_from_hdu(path, hdul["PSF"]) if "PSF" in hdul else _afw_psf(path, hdul)
    exposure = Exposure(image, mask, variance, psf=psf, wcs=_read_wcs(path, header),
                        zero_point=zp, info=info, mask_planes=planes)
    return _sanitised(path, exposure)


def _afw_psf(path, hdul):
    """The PSF an afw Exposure persisted in its archive tables, when it is a KernelPsf with a
    FixedKernel (None otherwise, with a log line when there is a PSF of another kind)."""
    primary = hdul[0].header
    if "PSF_ID" not in primary or "AR_HDU" not in primary:
        return None
    start = int(primary["AR_HDU"]) - 1  # 1-based
    tables = {int(h.header.get("AR_CATN", -1)): h.data for h in hdul[start:]
              if _kind(h) in ("ARCHIVE_INDEX", "ARCHIVE_DATA")}
    index = tables.get(0)
    if index is None:
        raise InputError(path, f"AR_HDU = {primary['AR_HDU']} does not point at the archive")

    def entry(object_id):
        rows = index[index["id"] == object_id]
        if not len(rows):
            raise InputError(path, f"archive object {object_id} not found")
        row = rows[0]
        data = tables[int(row["cat.archive"])]
        return str(row["name"]).strip(), data[int(row["row0"])]

    name, psf_row = entry(int(primary["PSF_ID"]))
    if name == "KernelPsf":
        kernel_name, kernel = entry(int(psf_row["kernel"]))
        if kernel_name == "FixedKernel":
            nx, ny = int(kernel["dimensions_x"]), int(kernel["dimensions_y"])
            image = np.asarray(kernel["image"], float).reshape(ny, nx)
            return ImagePsf(centred_psf_image(image, (int(kernel["center_x"]),
                                                      int(kernel["center_y"]))))
        name = f"KernelPsf with a {kernel_name}"
    log.info("%s: its persisted PSF is a %s, which gpudiffim does not read: it will be "
             "measured", path, name)
    return None


# ---------------------------------------------------------------------------- PSFs
def _psf_hdu(psf) -> fits.ImageHDU:
    hdu = fits.ImageHDU(np.asarray(psf.image, dtype=np.float64), name="PSF")
    if isinstance(psf, PolynomialPsf):
        hdu.header["PSFTYPE"] = "POLYNOMIAL"
        hdu.header["PSFORDER"] = psf.order
        hdu.header["PSFBBOXW"], hdu.header["PSFBBOXH"] = psf.bbox
    else:
        hdu.header["PSFTYPE"] = "IMAGE"
    return hdu


def _psf_from_hdu(path, hdu):
    data = hdu.data
    try:
        if hdu.header.get("PSFTYPE", "IMAGE") == "POLYNOMIAL":
            return PolynomialPsf(data, order=int(hdu.header["PSFORDER"]),
                                 bbox=(int(hdu.header["PSFBBOXW"]), int(hdu.header["PSFBBOXH"])))
        return ImagePsf(centred_psf_image(data))
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"bad PSF model ({exc})") from exc


def _psfex_psf(path, hdu) -> PolynomialPsf:
    """A PSFEx model (a ``PSF_DATA`` table: ``PSF_MASK`` components of a polynomial in
    ``(X_IMAGE - POLZERO) / POLSCAL``, 1-based pixels, terms ``x^i y^j`` with ``i`` fastest,
    each component sampled every ``PSF_SAMP`` image pixels) as a :class:`PolynomialPsf` of
    the same degree: the two span the same polynomials, so the conversion, fitted on a
    grid of positions, is exact; components sampled off the pixel grid are resampled."""
    h = hdu.header
    try:
        if int(h.get("POLNAXIS", 0)) not in (0, 2):
            raise InputError(path, f"PSFEx model in {h['POLNAXIS']} variables, not x and y")
        degree = int(h.get("POLDEG1", 0)) if int(h.get("POLNAXIS", 0)) else 0
        zero = (float(h.get("POLZERO1", 0.0)), float(h.get("POLZERO2", 0.0)))
        scale = (float(h.get("POLSCAL1", 1.0)), float(h.get("POLSCAL2", 1.0)))
        comps = np.asarray(hdu.data["PSF_MASK"][0], dtype=np.float64)
        samp = float(h.get("PSF_SAMP", 1.0))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"unreadable PSFEx model ({exc})") from exc
    comps = comps.reshape((-1,) + comps.shape[-2:])
    powers = [(i, j) for j in range(degree + 1) for i in range(degree + 1 - j)]
    if len(comps) != len(powers):
        raise InputError(path, f"PSFEx model of degree {degree} needs {len(powers)} "
                               f"components, has {len(comps)}")
    if abs(samp - 1.0) > 1e-3:  # onto image pixels, centre kept
        comps = np.array([ndimage.zoom(c, samp, order=3) for c in comps])
    comps = np.array([centred_psf_image(c) for c in comps])
    bbox = (max(2, int(round(zero[0] + scale[0] / 2))), max(2, int(round(zero[1] + scale[1] / 2))))
    order = degree
    n = order + 3
    xs, ys = np.meshgrid(np.linspace(0, bbox[0] - 1, n), np.linspace(0, bbox[1] - 1, n))
    rows, images = [], []
    for x, y in zip(xs.ravel(), ys.ravel()):
        dx, dy = (x + 1 - zero[0]) / scale[0], (y + 1 - zero[1]) / scale[1]
        images.append(np.tensordot([dx**i * dy**j for i, j in powers], comps, axes=1).ravel())
        rows.append(monomial_terms(*scaled_coords(x, y, bbox), order))
    coeffs, *_ = np.linalg.lstsq(np.array(rows), np.array(images), rcond=None)
    return PolynomialPsf(coeffs.reshape((len(powers),) + comps.shape[1:]), order=order,
                         bbox=bbox)


def checked_psf(psf, where):
    """``psf``, refused with an InputError naming ``where`` when its image at the centre of
    its bounding box is not a PSF (:func:`~gpudiffim.psf.psf_image_problem`)."""
    bbox = getattr(psf, "bbox", (1, 1))
    problem = psf_image_problem(psf.image_at((bbox[0] - 1) / 2, (bbox[1] - 1) / 2))
    if problem:
        raise InputError(where, f"the PSF {problem}")
    return psf


def read_psf(path):
    """Read a PSF model: gpudiffim's (a ``PSF`` extension), a PSFEx ``.psf`` file (a
    ``PSF_DATA`` table), or any image (its first 2-D or 3-D HDU; any size, centred and
    normalised on reading)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with fits.open(path, memmap=False) as hdul:
            table = _find(hdul, ("PSF_DATA",))
            if isinstance(table, fits.BinTableHDU) and "PSF_MASK" in table.columns.names:
                return checked_psf(_psfex_psf(path, table), path)
            hdu = hdul["PSF"] if "PSF" in hdul else next(
                (h for h in hdul if h.data is not None and h.data.ndim in (2, 3)), None)
            if hdu is None:
                raise InputError(path, "no HDU holds a PSF image")
            psf = _psf_from_hdu(path, hdu)
        return checked_psf(psf, path)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"not a readable FITS file ({exc.__class__.__name__}: "
                               f"{exc})") from exc


def write_psf(psf, path) -> Path:
    """Write a PSF model atomically (primary HDU empty, model in a ``PSF`` extension)."""
    with atomic_path(path) as tmp:
        fits.HDUList([fits.PrimaryHDU(), _psf_hdu(psf)]).writeto(tmp, overwrite=True)
    return Path(path)


# ---------------------------------------------------------------------------- writing
def _primary_header(exposure: Exposure) -> fits.Header:
    header = fits.Header()
    info = exposure.info
    for key, value in (("VISIT", info.visit), ("DETECTOR", info.detector),
                       ("BAND", info.band), ("EXPTIME", info.exptime),
                       ("MAGZERO", exposure.zero_point), ("BUNIT", info.units),
                       ("MJD-AVG", info.mjd), ("TIMESYS", "TAI" if info.mjd is not None else None)):
        if value is not None:
            header[key] = value
    for key, value in info.extra.items():  # the typed values above win a clash
        if key[:8].upper() not in header:
            header[key[:8].upper()] = value
    return header


def write_exposure(exposure: Exposure, path, compress: bool = False) -> Path:
    """Write an LSST-style exposure (IMAGE, MASK, VARIANCE[, PSF]) atomically.

    With ``compress``, the planes are tile-compressed FITS (what astropy, afw and ds9 read
    as they are): the image and variance RICE-compressed after quantisation at 1/16 of each
    tile's noise with subtractive dithering that keeps zeros exact (an error of ~0.02 sigma
    rms), the mask losslessly (GZIP_2); a noise-dominated 2 Mpix exposure shrinks 6.5x.
    """
    image_header = exposure.wcs.to_header(relax=True) if exposure.wcs is not None else None
    mask_header = fits.Header()
    for name, bit in sorted(exposure.mask_planes.items(), key=lambda kv: kv[1]):
        mask_header[f"MP_{name}"[:8] if len(name) <= 5 else f"HIERARCH MP_{name}"] = bit
    hdus = [
        fits.PrimaryHDU(header=_primary_header(exposure)),
        _plane_hdu(np.asarray(exposure.image, np.float32), image_header, "IMAGE", compress),
        _plane_hdu(np.asarray(exposure.mask, np.int32), mask_header, "MASK", compress),
        _plane_hdu(np.asarray(exposure.variance, np.float32), None, "VARIANCE", compress),
    ]
    if exposure.psf is not None:
        hdus.append(_psf_hdu(exposure.psf))
    with atomic_path(path) as tmp:
        fits.HDUList(hdus).writeto(tmp, overwrite=True)
    return Path(path)


def _plane_hdu(data, header, name: str, compress: bool):
    """One plane's HDU: as it is, or tile-compressed (floats quantised at 1/16 of the noise,
    SUBTRACTIVE_DITHER_2 seeded from the data, so a file is reproducible; integers
    lossless)."""
    if not compress:
        return fits.ImageHDU(data, header=header, name=name)
    if data.dtype.kind == "f":
        return fits.CompImageHDU(data, header=header, name=name, compression_type="RICE_1",
                                 quantize_level=16.0, quantize_method=2, dither_seed=-1)
    return fits.CompImageHDU(data, header=header, name=name, compression_type="GZIP_2")
