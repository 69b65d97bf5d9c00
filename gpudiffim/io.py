"""FITS input and output of exposures and PSFs, with atomic writes.

Two layouts are read:

* **LSST-style**: a primary header with metadata, then ``IMAGE``, ``MASK`` and
  ``VARIANCE`` extensions; mask plane bits in ``MP_<NAME>`` cards; the WCS in the
  ``IMAGE`` header; optionally a ``PSF`` extension (written by gpudiffim).
* **plain**: the first HDU holding a 2-D image. The variance comes from the
  ``GAIN`` (e-/ADU) and ``RDNOISE`` (e-) cards when present, else from the robust
  sky noise; pixels at or above ``SATURATE`` get SAT; NaN pixels get NO_DATA.

Any bad input raises :class:`~gpudiffim.errors.InputError` naming the file.
This module is the host-side edge of the engine: it works on NumPy arrays.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.stats import mad_std
from astropy.wcs import WCS, FITSFixedWarning

from .errors import InputError
from .exposure import MASK_PLANES, Exposure, ExposureInfo, mask_bits
from .psf import ImagePsf, PolynomialPsf

__all__ = ["atomic_path", "read_exposure", "write_exposure", "read_psf", "write_psf",
           "estimate_sky_variance"]

_META_CARDS = {"visit": ("VISIT",), "detector": ("DETECTOR", "CCDNUM"),
               "band": ("BAND", "FILTER"), "exptime": ("EXPTIME",)}


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------- reading
def read_exposure(path) -> Exposure:
    """Read an LSST-style or plain FITS exposure onto the host."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with warnings.catch_warnings(), fits.open(path, memmap=False) as hdul:
            warnings.simplefilter("ignore", FITSFixedWarning)
            names = [hdu.name for hdu in hdul]
            if "IMAGE" in names:
                return _read_lsst(path, hdul)
            return _read_plain(path, hdul)
    except InputError:
        raise
    except Exception as exc:  # truncated, corrupt or not FITS at all
        raise InputError(path, f"not a readable FITS file ({exc.__class__.__name__}: "
                               f"{exc})") from exc


def _float_plane(path, hdu, what) -> np.ndarray:
    data = hdu.data
    if data is None or data.ndim != 2:
        raise InputError(path, f"{what} HDU holds no 2-D image")
    if data.dtype.kind != "f":
        raise InputError(path, f"{what} data are {data.dtype.name}, not floating point")
    return np.asarray(data, dtype=np.float32)


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


def _read_info(header) -> tuple[ExposureInfo, float | None]:
    values = {}
    for field_, cards in _META_CARDS.items():
        for card in cards:
            if card in header:
                values[field_] = header[card]
                break
    if "visit" in values:
        values["visit"] = int(values["visit"])
    if "detector" in values:
        values["detector"] = int(values["detector"])
    if "band" in values:
        values["band"] = str(values["band"]).strip()
    zp = None
    if "MAGZERO" in header:
        zp = float(header["MAGZERO"])
    elif "FLUXMAG0" in header and header["FLUXMAG0"] > 0:
        zp = 2.5 * np.log10(float(header["FLUXMAG0"]))
    return ExposureInfo(**values), zp


def _sanitise(path, image, mask, variance, planes):
    """NaN image pixels become NO_DATA with zero image and variance; all-NaN is an error."""
    bad = ~np.isfinite(image) | ~np.isfinite(variance)
    if bad.all():
        raise InputError(path, "image has no finite pixels")
    if bad.any():
        mask[bad] |= mask_bits("NO_DATA", planes=planes)
        image[bad] = 0.0
        variance[bad] = 0.0
    return image, mask, variance


def _remap_mask(raw: np.ndarray, header) -> tuple[np.ndarray, dict]:
    """Move the file's mask bits onto gpudiffim's planes (unknown planes keep free bits)."""
    file_planes = {k[3:]: int(v) for k, v in header.items() if k.startswith("MP_")}
    planes = dict(MASK_PLANES)
    free = iter(b for b in range(31) if b not in planes.values())
    for name in sorted(file_planes, key=file_planes.get):
        if name not in planes:
            planes[name] = next(free)
    if all(planes[n] == b for n, b in file_planes.items()):
        return raw.astype(np.int32), planes
    out = np.zeros(raw.shape, np.int32)
    for name, b in file_planes.items():
        out |= ((raw >> b) & 1).astype(np.int32) << planes[name]
    return out, planes


def _read_lsst(path, hdul) -> Exposure:
    for name in ("MASK", "VARIANCE"):
        if name not in hdul:
            raise InputError(path, f"LSST-style file lacks the {name} extension")
    image = _float_plane(path, hdul["IMAGE"], "IMAGE")
    variance = _float_plane(path, hdul["VARIANCE"], "VARIANCE")
    raw = hdul["MASK"].data
    if raw is None or raw.ndim != 2 or raw.dtype.kind not in "iu":
        raise InputError(path, "MASK extension holds no 2-D integer image")
    if not (image.shape == variance.shape == raw.shape):
        raise InputError(path, f"plane shapes differ: IMAGE {image.shape}, MASK {raw.shape}, "
                               f"VARIANCE {variance.shape}")
    mask, planes = _remap_mask(raw, hdul["MASK"].header)
    image, mask, variance = _sanitise(path, image, mask, variance, planes)
    info, zp = _read_info(hdul[0].header)
    wcs = _read_wcs(path, hdul["IMAGE"].header)
    psf = _psf_from_hdu(path, hdul["PSF"]) if "PSF" in hdul else None
    return Exposure(image, mask, variance, psf=psf, wcs=wcs, zero_point=zp, info=info,
                    mask_planes=planes)


def estimate_sky_variance(image: np.ndarray) -> float:
    """Robust (MAD) variance of the finite pixels: the sky noise when no gain is known."""
    finite = image[np.isfinite(image)]
    sigma = mad_std(finite)
    if not np.isfinite(sigma) or sigma <= 0:
        sigma = np.std(finite)
    return float(sigma) ** 2


def _read_plain(path, hdul) -> Exposure:
    hdu = next((h for h in hdul if h.data is not None and h.data.ndim == 2), None)
    if hdu is None:
        raise InputError(path, "no HDU holds a 2-D image")
    image = _float_plane(path, hdu, "image").copy()
    header = hdu.header
    mask = np.zeros(image.shape, np.int32)
    finite = np.isfinite(image)
    if not finite.any():
        raise InputError(path, "image has no finite pixels")
    if "SATURATE" in header:
        mask[finite & (image >= float(header["SATURATE"]))] |= mask_bits("SAT")
    if "GAIN" in header and float(header["GAIN"]) > 0:
        gain = float(header["GAIN"])
        read_noise = float(header.get("RDNOISE", 0.0))
        variance = np.maximum(np.where(finite, image, 0.0), 0.0) / gain + (read_noise / gain) ** 2
    else:
        variance = np.full(image.shape, estimate_sky_variance(image))
    variance = variance.astype(np.float32)
    image, mask, variance = _sanitise(path, image, mask, variance, MASK_PLANES)
    merged = fits.Header()
    merged.update(hdul[0].header)
    merged.update(header)
    info, zp = _read_info(merged)
    return Exposure(image, mask, variance, wcs=_read_wcs(path, header), zero_point=zp, info=info)


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
        return ImagePsf(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"bad PSF model ({exc})") from exc


def read_psf(path):
    """Read a PSF model: a FITS file whose first image HDU (or ``PSF`` extension) is the PSF."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with fits.open(path, memmap=False) as hdul:
            hdu = hdul["PSF"] if "PSF" in hdul else next(
                (h for h in hdul if h.data is not None and h.data.ndim in (2, 3)), None)
            if hdu is None:
                raise InputError(path, "no HDU holds a PSF image")
            return _psf_from_hdu(path, hdu)
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
                       ("MAGZERO", exposure.zero_point)):
        if value is not None:
            header[key] = value
    for key, value in info.extra.items():
        header[key[:8].upper()] = value
    return header


def write_exposure(exposure: Exposure, path) -> Path:
    """Write an LSST-style exposure (IMAGE, MASK, VARIANCE[, PSF]) atomically."""
    image_header = exposure.wcs.to_header(relax=True) if exposure.wcs is not None else None
    mask_header = fits.Header()
    for name, bit in sorted(exposure.mask_planes.items(), key=lambda kv: kv[1]):
        mask_header[f"MP_{name}"[:8] if len(name) <= 5 else f"HIERARCH MP_{name}"] = bit
    hdus = [
        fits.PrimaryHDU(header=_primary_header(exposure)),
        fits.ImageHDU(np.asarray(exposure.image, np.float32), header=image_header, name="IMAGE"),
        fits.ImageHDU(np.asarray(exposure.mask, np.int32), header=mask_header, name="MASK"),
        fits.ImageHDU(np.asarray(exposure.variance, np.float32), name="VARIANCE"),
    ]
    if exposure.psf is not None:
        hdus.append(_psf_hdu(exposure.psf))
    with atomic_path(path) as tmp:
        fits.HDUList(hdus).writeto(tmp, overwrite=True)
    return Path(path)
