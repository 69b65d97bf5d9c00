"""Measurement of diaSources, batched over all sources at once.

Stamps around every source are gathered with one indexing operation (:class:`SourceStamps`)
and each group of columns is measured from them with array math on the backend: PSF flux
and error (linear fit with the difference's PSF and variance; for a score image its value
at the centroid, Lanczos-interpolated), aperture flux and error, a sub-pixel centroid and
its error, S/N, peak value, second moments, a two-lobe dipole fit for merged
positive/negative pairs, forced PSF flux on the science image, and pixel flags in the
footprint and at the centre. Errors take the subtraction's :class:`~gpudiffim.noise.NoiseModel`
whole: correlated noise and the kernel's own error. Blank "sky sources" are measured the
same way to give the noise floor. The result is an astropy Table with Rubin APDB DiaSource
column names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table

from .backend import get_backend
from .detect import DetectionConfig, Detections, detect
from .exposure import MEASUREMENT_EXCLUDED, Exposure
from .inject import shift_image
from .io import atomic_path
from .noise import NoiseModel, filtered_variance
from .options import configclass, option
from .stamps import gather_stamps, interpolate_stamps

__all__ = ["PIXEL_FLAGS", "MeasureConfig", "SourceStamps", "measure", "dia_sources",
           "write_dia_sources", "source_stamps", "psf_stack"]

#: (column suffix, mask plane) for the pixel flags
PIXEL_FLAGS = (("edge", "EDGE"), ("bad", "BAD"), ("saturated", "SAT"),
               ("saturatedTemplate", "SAT_TEMPLATE"), ("cr", "CR"), ("interpolated", "INTRP"),
               ("suspect", "SUSPECT"), ("nodata", "NO_DATA"), ("injected", "INJECTED"))

DIPOLE_STAMP = 41  # side of the two-lobe fit's stamp
FORCED_STAMP = 31  # side of the forced science photometry's stamp


@configclass
class MeasureConfig:
    """Measurement settings."""

    stampSize: int = option(31, "side of the stamps measured around each source")
    apertureRadius: float = option(6.0, "aperture flux radius (pixels)")
    nSkySources: int = option(100, "blank sky positions measured for the noise floor")
    skySeed: int = option(1, "seed of the sky-source positions")


@dataclass(frozen=True, eq=False)
class SourceStamps:
    """Every source's stamps and centre, gathered once (detections first, then sky sources).

    ``xs``, ``ys`` are host integer peaks, ``dx``, ``dy`` host sub-pixel offsets of the
    centroid (0 for sky sources); the planes are device (n, S, S) stacks; ``good`` marks
    pixels a fit uses; ``xx``, ``yy`` are offsets from the centroid; ``sigma2`` is the
    variance (pixels^2) of the Gaussian matched to the difference PSF's core.
    """

    n_det: int
    xs: np.ndarray
    ys: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    image: object
    variance: object
    mask: object
    snr: object
    psf: object
    good: object
    xx: object
    yy: object
    sigma2: float

    @property
    def n(self) -> int:
        return len(self.xs)

    @property
    def cx(self) -> np.ndarray:
        return self.xs + self.dx

    @property
    def cy(self) -> np.ndarray:
        return self.ys + self.dy

    @property
    def half(self) -> int:
        return self.image.shape[-1] // 2


def measure(difference: Exposure, detections: Detections, science: Exposure | None = None,
            is_score: bool = False, config: MeasureConfig | None = None, backend=None,
            noise: NoiseModel | None = None) -> Table:
    """Measure every detection; returns a DiaSource table (plus sky sources, flagged).

    Parameters
    ----------
    difference : Exposure
        The difference (or score) image.
    detections : Detections
        What :func:`~gpudiffim.detect.detect` found on it.
    science : Exposure, optional
        The science exposure, for forced PSF photometry at each source.
    is_score : bool
        True for a preconvolution score (its value at a source is the PSF flux).
    config : MeasureConfig, optional
        Stamp size, aperture and sky sources.
    backend : str or Backend, optional
        Where the arrays live.
    noise : NoiseModel, optional
        The subtraction's noise model, with the residual scale detection measured
        (:meth:`~gpudiffim.noise.NoiseModel.with_residual_scale`). Without it each pixel's
        variance is taken as independent, which understates the errors of bright sources
        whose own photon noise went through the matching kernel.

    Returns
    -------
    astropy.table.Table
        One row per detection, then the sky sources (``sky_source`` True).
    """
    config = config or MeasureConfig()
    backend = get_backend(backend)
    st = source_stamps(difference, detections, config, backend)
    photometry = _photometry(st, is_score, config, noise, difference.shape, backend)
    columns = {**_identifiers(difference, st.n), **_positions(st, photometry["snr"], difference),
               **photometry, **_detection_values(st, detections, backend),
               **_moments(st, backend), **_dipoles(st, detections, difference, backend),
               **(_forced(st, science, backend) if science is not None else {}),
               **_pixel_flags(st, detections, difference, backend),
               "sky_source": np.arange(st.n) >= st.n_det}
    return Table(columns)


def source_stamps(difference: Exposure, detections: Detections,
                  config: MeasureConfig = MeasureConfig(), backend=None) -> SourceStamps:
    """The :class:`SourceStamps` of every detection and of the blank sky positions."""
    backend = get_backend(backend)
    xp = backend.xp
    n_det = len(detections)
    sky_x, sky_y = _sky_positions(backend, detections, difference, config)
    xs = np.concatenate([detections.x, sky_x]).astype(np.int64)
    ys = np.concatenate([detections.y, sky_y]).astype(np.int64)
    S = config.stampSize
    pos = np.column_stack([xs, ys])
    image = gather_stamps(backend, backend.asarray(difference.image), pos, S, 0.0)
    var = gather_stamps(backend, backend.asarray(difference.variance), pos, S, 0.0)
    mask = gather_stamps(backend, backend.asarray(difference.mask), pos, S,
                         difference.bit("NO_DATA"))
    snr = gather_stamps(backend, backend.asarray(detections.snr_image), pos, S, 0.0)
    dx, dy = _centroid(backend, snr) if len(xs) else (np.zeros(0), np.zeros(0))
    dx[n_det:], dy[n_det:] = 0.0, 0.0  # sky sources are measured where they were placed
    psf = backend.to_device(psf_stack(difference.psf, xs + dx, ys + dy, S), np.float32)
    good = (mask & difference.bit(*MEASUREMENT_EXCLUDED)) == 0
    good = good & (var > 0)
    off = backend.arange(S) - S // 2
    yy = (xp.astype(xp.reshape(off, (1, S, 1)), xp.float32)
          - backend.to_device(dy, np.float32)[:, None, None])
    xx = (xp.astype(xp.reshape(off, (1, 1, S)), xp.float32)
          - backend.to_device(dx, np.float32)[:, None, None])
    sigma2 = float((np.mean(difference.psf.fwhm()) / 2.3548) ** 2)
    return SourceStamps(n_det, xs, ys, dx, dy, image, var, mask, snr, psf, good, xx, yy, sigma2)


def psf_stack(psf, xs, ys, size):
    """Host (n, size, size) PSF images shifted to sub-pixel positions. Each is the central
    part of a unit-sum PSF, not renormalised: the fitted amplitude is then the total flux,
    wings beyond the stamp included (renormalising the crop biased fluxes ~1% low)."""
    out = np.zeros((len(xs), size, size))
    if not len(xs):
        return out
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    img = np.stack([psf.image_at(x, y) for x, y in zip(xs, ys)])
    img = shift_image(img, xs - np.floor(xs + 0.5), ys - np.floor(ys + 0.5))  # one batch
    img = img / img.sum(axis=(1, 2), keepdims=True)
    h, half = img.shape[1] // 2, size // 2
    c = min(h, half)
    out[:, half - c:half + c + 1, half - c:half + c + 1] = img[:, h - c:h + c + 1, h - c:h + c + 1]
    return out


def _centroid(backend, snr_stamps):
    """Sub-pixel offsets of the peak by a quadratic fit to the central 3x3 (host arrays)."""
    c = snr_stamps.shape[-1] // 2
    s = backend.to_host(snr_stamps[:, c - 1:c + 2, c - 1:c + 2])
    s = np.abs(s)
    dx = 0.5 * (s[:, 1, 0] - s[:, 1, 2]) / np.where(
        (d := s[:, 1, 0] - 2 * s[:, 1, 1] + s[:, 1, 2]) != 0, d, -1e-12)
    dy = 0.5 * (s[:, 0, 1] - s[:, 2, 1]) / np.where(
        (e := s[:, 0, 1] - 2 * s[:, 1, 1] + s[:, 2, 1]) != 0, e, -1e-12)
    return np.clip(dx, -0.5, 0.5), np.clip(dy, -0.5, 0.5)


# ---------------------------------------------------------------------------- column groups
def _identifiers(difference: Exposure, n: int) -> dict:
    info = difference.info
    return {"diaSourceId": np.arange(n, dtype=np.int64),
            "visit": np.full(n, -1 if info.visit is None else info.visit),
            "detector": np.full(n, -1 if info.detector is None else info.detector),
            "band": np.full(n, info.band or "")}


def _positions(st: SourceStamps, snr, difference: Exposure) -> dict:
    """Centroid, its error (~ FWHM / (2.35 S/N) per axis: Gaussian PSF, background-limited)
    and sky position."""
    cx, cy = st.cx, st.cy
    err = np.sqrt(st.sigma2) * np.sqrt(2) / np.maximum(np.abs(snr), 1e-3)
    if difference.wcs is not None and st.n:
        ra, dec = difference.wcs.pixel_to_world_values(cx, cy)
    else:
        ra = dec = np.full(st.n, np.nan)
    return {"x": cx, "y": cy, "xErr": err, "yErr": err, "ra": ra, "dec": dec}


def _photometry(st: SourceStamps, is_score: bool, config: MeasureConfig,
                noise: NoiseModel | None, shape, backend) -> dict:
    """PSF and aperture fluxes, their errors (correlated noise and the kernel's own error
    from ``noise``), and S/N."""
    xp = backend.xp
    d, v, psf, good = st.image, st.variance, st.psf, st.good
    # the PSF fit's weights, normalised: its flux is sum(w_psf * D)
    w_psf = xp.where(good, psf / xp.where(v > 0, v, 1.0), 0.0)
    norm = xp.sum(w_psf * psf, axis=(1, 2))
    if is_score:  # the score is in flux units: its value at the source is the PSF flux
        flux = interpolate_stamps(backend, d, st.dx, st.dy)  # sky sources: the pixel itself
        flux_err = xp.sqrt(v[:, st.half, st.half])
    else:
        flux = xp.sum(w_psf * d, axis=(1, 2)) / norm
        flux_err = 1.0 / xp.sqrt(norm)
    w_psf = w_psf / norm[:, None, None]
    inap = ((st.xx * st.xx + st.yy * st.yy) <= config.apertureRadius**2) & good
    ap = xp.sum(xp.where(inap, d, 0.0), axis=(1, 2))
    ap_err = xp.sqrt(xp.sum(xp.where(inap, v, 0.0), axis=(1, 2)))
    if noise is not None and noise.paths and st.n:
        weights = xp.concat([w_psf, xp.astype(inap, w_psf.dtype)], axis=0)
        var2 = filtered_variance(backend, weights, noise.paths, np.concatenate([st.xs, st.xs]),
                                 np.concatenate([st.ys, st.ys]))
        if not is_score:
            flux_err = xp.sqrt(var2[:st.n])
        ap_err = xp.sqrt(var2[st.n:])
    if noise is not None and noise.residual_scale > 0 and st.n:
        # a residual smooth on the PSF's scale, of variance scale * power, enters a flux
        # with the sum of its weights squared
        at = xp.take(xp.reshape(backend.asarray(noise.residual_power), (-1,)),
                     backend.to_device(st.ys * shape[1] + st.xs))
        extra = xp.astype(at, xp.float32) * float(noise.residual_scale)
        if is_score:  # the scale was measured on the score itself
            flux_err = xp.sqrt(flux_err * flux_err + extra)
        else:
            w_sum = xp.sum(w_psf, axis=(1, 2))
            flux_err = xp.sqrt(flux_err * flux_err + extra * w_sum * w_sum)
        n_ap = xp.sum(xp.astype(inap, xp.float32), axis=(1, 2))
        ap_err = xp.sqrt(ap_err * ap_err + extra * n_ap * n_ap)
    return {"psfFlux": backend.to_host(flux), "psfFluxErr": backend.to_host(flux_err),
            "apFlux": backend.to_host(ap), "apFluxErr": backend.to_host(ap_err),
            "snr": backend.to_host(flux / flux_err)}


def _detection_values(st: SourceStamps, det: Detections, backend) -> dict:
    h = st.half
    return {"peakValue": backend.to_host(st.image[:, h, h]),
            "significance": np.concatenate([det.significance,
                                            backend.to_host(st.snr[st.n_det:, h, h])]),
            "footprintArea": np.concatenate([det.area, np.zeros(st.n - st.n_det, int)])}


def _moments(st: SourceStamps, backend) -> dict:
    """Second moments of |D| with a Gaussian weight matched to the PSF core."""
    xp = backend.xp
    xx, yy = st.xx, st.yy
    wgt = (xp.exp(-0.5 * (xx * xx + yy * yy) / st.sigma2) * xp.abs(st.image)
           * xp.astype(st.good, xp.float32))
    wsum = xp.sum(wgt, axis=(1, 2))
    wsum = xp.where(wsum > 0, wsum, 1.0)
    return {"ixx": backend.to_host(xp.sum(wgt * xx * xx, axis=(1, 2)) / wsum),
            "iyy": backend.to_host(xp.sum(wgt * yy * yy, axis=(1, 2)) / wsum),
            "ixy": backend.to_host(xp.sum(wgt * xx * yy, axis=(1, 2)) / wsum)}


def _dipoles(st: SourceStamps, det: Detections, difference: Exposure, backend) -> dict:
    """Two-lobe fit for sources with both a positive and a negative peak."""
    n = st.n
    cols = {k: np.full(n, np.nan) for k in ("dipolePosFlux", "dipoleNegFlux", "dipoleMeanFlux",
                                             "dipoleFluxDiff", "dipoleLength", "dipoleAngle")}
    is_dip = np.zeros(n, bool)
    is_dip[:st.n_det] = det.is_dipole
    idx = np.nonzero(is_dip)[0]
    if len(idx):
        S = DIPOLE_STAMP
        px, py = det.pos_x[idx].astype(float), det.pos_y[idx].astype(float)
        nxn, nyn = det.neg_x[idx].astype(float), det.neg_y[idx].astype(float)
        mx = np.round((px + nxn) / 2).astype(np.int64)
        my = np.round((py + nyn) / 2).astype(np.int64)
        pos = np.column_stack([mx, my])
        d = backend.to_host(gather_stamps(backend, backend.asarray(difference.image), pos, S, 0.0))
        v = backend.to_host(gather_stamps(backend, backend.asarray(difference.variance), pos, S,
                                          0.0))
        for k in range(len(idx)):
            a = psf_stack(difference.psf, [px[k]], [py[k]], S)[0]
            b = psf_stack(difference.psf, [nxn[k]], [nyn[k]], S)[0]
            a = np.roll(np.roll(a, int(py[k] - my[k]), 0), int(px[k] - mx[k]), 1)
            b = np.roll(np.roll(b, int(nyn[k] - my[k]), 0), int(nxn[k] - mx[k]), 1)
            w = np.where(v[k] > 0, 1.0 / np.where(v[k] > 0, v[k], 1.0), 0.0)
            m = np.array([[np.sum(w * a * a), np.sum(w * a * b)],
                          [np.sum(w * a * b), np.sum(w * b * b)]])
            rhs = np.array([np.sum(w * a * d[k]), np.sum(w * b * d[k])])
            fa, fb = np.linalg.solve(m + 1e-12 * np.eye(2) * np.trace(m), rhs)
            j = idx[k]
            cols["dipolePosFlux"][j], cols["dipoleNegFlux"][j] = fa, fb
            cols["dipoleMeanFlux"][j] = 0.5 * (fa - fb)
            cols["dipoleFluxDiff"][j] = fa + fb
            cols["dipoleLength"][j] = np.hypot(px[k] - nxn[k], py[k] - nyn[k])
            cols["dipoleAngle"][j] = np.degrees(np.arctan2(py[k] - nyn[k], px[k] - nxn[k]))
    return {"isDipole": is_dip, **cols}


def _forced(st: SourceStamps, science: Exposure, backend) -> dict:
    """Forced PSF flux on the science image (flux plus a constant local sky, jointly)."""
    xp = backend.xp
    cx, cy = st.cx, st.cy
    pos = np.column_stack([np.round(cx), np.round(cy)]).astype(np.int64)
    d = gather_stamps(backend, backend.asarray(science.image), pos, FORCED_STAMP, 0.0)
    v = gather_stamps(backend, backend.asarray(science.variance), pos, FORCED_STAMP, 0.0)
    p = backend.to_device(psf_stack(science.psf, cx, cy, FORCED_STAMP), np.float32)
    w = xp.where(v > 0, 1.0 / xp.where(v > 0, v, 1.0), 0.0)
    spp = xp.sum(w * p * p, axis=(1, 2))
    sp1 = xp.sum(w * p, axis=(1, 2))
    s11 = xp.sum(w, axis=(1, 2))
    spd = xp.sum(w * p * d, axis=(1, 2))
    s1d = xp.sum(w * d, axis=(1, 2))
    det = spp * s11 - sp1 * sp1
    det = xp.where(det > 0, det, 1.0)
    return {"scienceFlux": backend.to_host((s11 * spd - sp1 * s1d) / det),
            "scienceFluxErr": backend.to_host(xp.sqrt(s11 / det))}


def _pixel_flags(st: SourceStamps, det: Detections, difference: Exposure, backend) -> dict:
    """Each plane of :data:`PIXEL_FLAGS` anywhere in the footprint and at the centre."""
    centre = backend.to_host(st.mask[:, st.half, st.half])
    fp_bits = np.concatenate([_footprint_bits(backend, det, backend.asarray(difference.mask)),
                              centre[st.n_det:]])
    out = {}
    for name, plane in PIXEL_FLAGS:
        if plane in difference.mask_planes:
            bit = difference.bit(plane)
            out[f"pixelFlags_{name}"] = (fp_bits & bit) != 0
            out[f"pixelFlags_{name}Center"] = (centre & bit) != 0
    return out


def _footprint_bits(backend, detections, mask):
    """OR of the mask bits over each footprint (host int array, one per detection)."""
    xp = backend.xp
    labels = backend.asarray(detections.labels)
    ys, xs = xp.nonzero(labels > 0)
    lab = backend.to_host(labels[ys, xs])
    bits = backend.to_host(mask[ys, xs])
    out = np.zeros(int(lab.max()) + 1 if len(lab) else 1, np.int64)
    np.bitwise_or.at(out, lab, bits.astype(np.int64))
    if not len(detections):
        return np.zeros(0, np.int64)
    # detections keep the footprint ids of their peaks
    ids = backend.to_host(labels[backend.to_device(detections.y), backend.to_device(detections.x)])
    return out[ids]


def _sky_positions(backend, detections, difference, config):
    """Blank positions: outside every footprint and every masked pixel, away from edges."""
    if config.nSkySources <= 0:
        return np.zeros(0, int), np.zeros(0, int)
    xp = backend.xp
    ny, nx = difference.shape
    busy = (backend.asarray(detections.labels) > 0) | (backend.asarray(difference.mask) != 0)
    busy = backend.maximum_filter(xp.astype(busy, xp.uint8), 2 * config.stampSize // 3 + 1) > 0
    rng = np.random.default_rng(config.skySeed)
    cand_x = rng.integers(config.stampSize, nx - config.stampSize, 20 * config.nSkySources)
    cand_y = rng.integers(config.stampSize, ny - config.stampSize, 20 * config.nSkySources)
    free = ~backend.to_host(busy[backend.to_device(cand_y), backend.to_device(cand_x)])
    cand_x, cand_y = cand_x[free], cand_y[free]
    chosen = []
    for x, y in zip(cand_x, cand_y):  # keep them apart from each other too
        if all(abs(x - a) > config.stampSize or abs(y - b) > config.stampSize for a, b in chosen):
            chosen.append((x, y))
        if len(chosen) == config.nSkySources:
            break
    chosen = np.array(chosen, int).reshape(-1, 2)
    return chosen[:, 0], chosen[:, 1]


# ---------------------------------------------------------------------------- the stage
def dia_sources(result, science: Exposure | None = None,
                detection_config: DetectionConfig | None = None,
                measure_config: MeasureConfig | None = None, backend=None) -> Table:
    """Detect and measure the diaSources of a subtraction.

    Parameters
    ----------
    result : SubtractionResult
        What :func:`~gpudiffim.subtract.subtract` returned.
    science : Exposure, optional
        The science exposure, for forced photometry.
    detection_config, measure_config : DetectionConfig, MeasureConfig, optional
        The two stages' settings (default: their defaults).
    backend : str or Backend, optional
        Where the arrays live.

    Returns
    -------
    astropy.table.Table
        The DiaSource table (APDB column names); ``meta["residual_scale"]`` holds the
        kernel-error scale detection measured.
    """
    backend = get_backend(backend)
    if science is not None and science.psf is None:  # measured by the subtraction
        science = science.replace(psf=result.science_psf)
    det = detect(result.difference, result.is_score, detection_config, backend, result.noise)
    noise = result.noise.with_residual_scale(det.residual_scale)
    table = measure(result.difference, det, science, result.is_score, measure_config, backend,
                    noise)
    table.meta["residual_scale"] = det.residual_scale
    return table


def write_dia_sources(table: Table, path) -> None:
    """Write a DiaSource table as Parquet, atomically."""
    with atomic_path(path) as tmp:
        table.write(tmp, format="parquet", overwrite=True)
