"""Measurement of diaSources, batched over all sources at once.

Stamps around every source are gathered with one indexing operation (:class:`SourceStamps`)
and each group of columns is measured from them with array math on the backend: PSF flux and
error (linear fit with the difference's PSF and variance; for a score image its value at the
centroid, Lanczos-interpolated) with the fit's chi^2 over its stamp (``psfChi2`` over
``psfNdata`` pixels: what is not one point source shows as an excess), aperture flux and
error, a sub-pixel centroid and its error, S/N, peak value, second moments, a two-lobe
dipole fit for merged positive/negative pairs, forced PSF flux on the science image, and
pixel flags in the footprint and at the centre. Errors take the subtraction's
:class:`~gpudiffim.noise.NoiseModel` whole: correlated noise and the kernel's own error.
Blank "sky sources" are measured the same way to give the noise floor. The result is an
astropy Table with Rubin APDB DiaSource column names.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from astropy.table import Table

from .arrayops import shift_along
from .backend import get_backend
from .detect import DetectionConfig, Detections, detect
from .exposure import MEASUREMENT_EXCLUDED, Exposure
from .io import atomic_path
from .noise import NoiseModel, filtered_variance, position_residual_scale
from .options import configclass, option
from .psf import psf_stack
from .stamps import gather_stamps, interpolate_stamps

__all__ = ["PIXEL_FLAGS", "MeasureConfig", "SourceStamps", "measure", "dia_sources",
           "write_dia_sources", "source_stamps", "forced_psf_flux", "forced_psf_fit"]

#: (column suffix, mask plane) for the pixel flags
PIXEL_FLAGS = (("edge", "EDGE"), ("bad", "BAD"), ("saturated", "SAT"),
               ("saturatedTemplate", "SAT_TEMPLATE"), ("cr", "CR"), ("interpolated", "INTRP"),
               ("suspect", "SUSPECT"), ("nodata", "NO_DATA"), ("injected", "INJECTED"),
               ("touched", "TOUCHED"))

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
    variance (pixels^2) of the Gaussian matched to the difference PSF's core;
    ``centroid_failed`` marks sources measured at their peak pixel.
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
    centroid_failed: np.ndarray

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
    st = source_stamps(difference, detections, config, backend, is_score)
    blend = (np.full(len(detections), -1) if detections.blend is None
             else np.asarray(detections.blend))
    blends = [np.flatnonzero(blend == b) for b in np.unique(blend[blend >= 0])]
    photometry = _photometry(st, is_score, config, noise, difference.shape, backend, blends)
    if blends:  # centred again without the neighbours, then measured again
        st = _deblended_stamps(st, blends, photometry["psfFlux"], difference, is_score, backend)
        photometry = _photometry(st, is_score, config, noise, difference.shape, backend, blends)
    moved = _residual_position_variance(st, difference, is_score, noise, backend)
    parent = np.concatenate([blend, np.full(st.n - st.n_det, -1)])
    columns = {**_identifiers(difference, st.n), "parentDiaSourceId": parent,
               **_positions(st, photometry["snr"], moved / photometry["psfFlux"] ** 2,
                            difference),
               **photometry, **_detection_values(st, detections, backend),
               **_moments(st, backend), **_dipoles(st, detections, difference, backend),
               **(_forced(st, science, backend) if science is not None else {}),
               **_footprints(st, detections, difference, backend),
               "sky_source": np.arange(st.n) >= st.n_det}
    return Table(backend.to_host_columns(columns))  # the columns still on the device: one read


def source_stamps(difference: Exposure, detections: Detections,
                  config: MeasureConfig = MeasureConfig(), backend=None,
                  is_score: bool = False) -> SourceStamps:
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
    usable = (mask & difference.bit(*MEASUREMENT_EXCLUDED)) == 0
    inverse_var = xp.where(usable & (var > 0), 1.0 / xp.where(var > 0, var, 1.0), 0.0)
    dx, dy, failed = (_centroid(backend, xp.where(usable, image, 0.0), inverse_var,
                                difference.psf.image_at(), is_score)
                      if len(xs) else (np.zeros(0), np.zeros(0), np.zeros(0, bool)))
    dx[n_det:], dy[n_det:] = 0.0, 0.0  # sky sources are measured where they were placed
    failed[n_det:] = False
    psf = backend.to_device(psf_stack(difference.psf, xs + dx, ys + dy, S), np.float32)
    good = usable & (var > 0)
    off = backend.arange(S) - S // 2
    yy = (xp.astype(xp.reshape(off, (1, S, 1)), xp.float32)
          - backend.to_device(dy, np.float32)[:, None, None])
    xx = (xp.astype(xp.reshape(off, (1, 1, S)), xp.float32)
          - backend.to_device(dx, np.float32)[:, None, None])
    sigma2 = float((np.mean(difference.psf.fwhm()) / 2.3548) ** 2)
    return SourceStamps(n_det, xs, ys, dx, dy, image, var, mask, snr, psf, good, xx, yy, sigma2,
                        failed)


def _centroid(backend, image, weight, psf_image, is_score: bool):
    """Sub-pixel offsets (host arrays) of each stamp's peak, and where that failed (no
    maximum among the nine values below, or one beyond them: the peak pixel is kept).

    At the central 3x3 offsets, the square root of the chi^2 a PSF placed there explains,
    ``(sum w P D)^2 / sum w P^2`` with ``weight`` w the inverse variance (0 on masked
    pixels), whose maximum is the likelihood's; then a Gaussian (log-quadratic) through
    those nine values, exact for a Gaussian peak at any sampling. A score image is
    already filtered: its own nine values are used. A plain correlation would be pulled
    away from masked pixels (an edge, a bad column), and the S/N image's peak is
    flattened by a bright source's own photon noise."""
    xp = backend.xp
    c = image.shape[-1] // 2
    if is_score:
        s = backend.to_host(image[:, c - 1:c + 2, c - 1:c + 2])
    else:
        h = psf_image.shape[0] // 2
        r = min(h, c - 1)
        kernel = backend.to_device(psf_image[h - r:h + r + 1, h - r:h + r + 1], np.float32)
        values = []
        for oy in (-1, 0, 1):
            for ox in (-1, 0, 1):
                window = (slice(None), slice(c + oy - r, c + oy + r + 1),
                          slice(c + ox - r, c + ox + r + 1))
                w = kernel * weight[window]
                values.append(xp.sum(image[window] * w, axis=(1, 2))
                              / xp.sqrt(xp.maximum(xp.sum(w * kernel, axis=(1, 2)), 1e-30)))
        s = np.reshape(backend.to_host(xp.stack(values, axis=1)), (-1, 3, 3))
    s = np.abs(s)
    s = np.log(np.maximum(s, 1e-3 * s[:, 1:2, 1:2] + 1e-30))
    d = s[:, 1, 0] - 2 * s[:, 1, 1] + s[:, 1, 2]
    e = s[:, 0, 1] - 2 * s[:, 1, 1] + s[:, 2, 1]
    dx = 0.5 * (s[:, 1, 0] - s[:, 1, 2]) / np.where(d < 0, d, -1e-12)
    dy = 0.5 * (s[:, 0, 1] - s[:, 2, 1]) / np.where(e < 0, e, -1e-12)
    failed = (d >= 0) | (e >= 0) | (np.abs(dx) > 1.0) | (np.abs(dy) > 1.0)
    return np.where(failed, 0.0, dx), np.where(failed, 0.0, dy), failed


# ---------------------------------------------------------------------------- column groups
def _identifiers(difference: Exposure, n: int) -> dict:
    info = difference.info
    return {"diaSourceId": np.arange(n, dtype=np.int64),
            "visit": np.full(n, -1 if info.visit is None else info.visit),
            "detector": np.full(n, -1 if info.detector is None else info.detector),
            "band": np.full(n, info.band or "")}


def _residual_position_variance(st: SourceStamps, difference: Exposure, is_score: bool,
                                noise: NoiseModel | None, backend) -> np.ndarray:
    """Each source's centroid variance from the matching's own error, times its flux^2
    (:func:`~gpudiffim.noise.position_residual_scale` times the residual power there);
    zeros without a residual model, and for a score image."""
    if (is_score or noise is None or noise.residual_power is None or noise.calibrate_at is None
            or not st.n):
        return np.zeros(st.n)
    xp = backend.xp
    power = backend.asarray(noise.residual_power)
    good = (((backend.asarray(difference.mask) & difference.bit(*MEASUREMENT_EXCLUDED)) == 0)
            & (backend.asarray(difference.variance) > 0))
    scale = position_residual_scale(backend, backend.asarray(difference.image),
                                    backend.asarray(difference.variance), good, power,
                                    noise.calibrate_at, difference.psf.image_at())
    if scale <= 0:
        return np.zeros(st.n)
    at = xp.take(xp.reshape(power, (-1,)), backend.to_device(st.ys * difference.shape[1] + st.xs))
    return scale * backend.to_host(xp.astype(at, xp.float64))


def _positions(st: SourceStamps, snr, moved, difference: Exposure) -> dict:
    """Centroid, its error per axis (sqrt(2) sigma / (S/N), the Cramer-Rao bound of a
    Gaussian PSF of width sigma, and ``moved``, the variance the subtraction's residual
    adds), whether it failed, and sky position."""
    cx, cy = st.cx, st.cy
    err = np.sqrt(2 * st.sigma2 / np.maximum(np.abs(snr), 1e-3) ** 2
                  + np.where(np.isfinite(moved), moved, 0.0))
    # a source left at its peak pixel: anywhere within it (a uniform pixel's variance, 1/12)
    err = np.where(st.centroid_failed, np.sqrt(err**2 + 1.0 / 12.0), err)
    if difference.wcs is not None and st.n:
        ra, dec = difference.wcs.pixel_to_world_values(cx, cy)
    else:
        ra = dec = np.full(st.n, np.nan)
    return {"x": cx, "y": cy, "xErr": err, "yErr": err, "centroid_flag": st.centroid_failed,
            "ra": ra, "dec": dec}


def _photometry(st: SourceStamps, is_score: bool, config: MeasureConfig,
                noise: NoiseModel | None, shape, backend, blends=()) -> dict:
    """PSF and aperture fluxes, their errors (correlated noise and the kernel's own error
    from ``noise``), and S/N; the sources of each of ``blends`` (arrays of indices) fitted
    together (:func:`_blend_weights`)."""
    xp = backend.xp
    d, v, psf, good = st.image, st.variance, st.psf, st.good
    # the PSF fit's weights, normalised: its flux is sum(w_psf * D)
    w_psf = xp.where(good, psf / xp.where(v > 0, v, 1.0), 0.0)
    w_psf = w_psf / xp.sum(w_psf * psf, axis=(1, 2))[:, None, None]
    if blends and not is_score:
        w_psf = _blend_weights(backend, st, blends, w_psf)
    if is_score:  # the score is in flux units: its value at the source is the PSF flux
        flux = interpolate_stamps(backend, d, st.dx, st.dy)  # sky sources: the pixel itself
        flux_err = xp.sqrt(v[:, st.half, st.half])
    else:
        flux = xp.sum(w_psf * d, axis=(1, 2))
        flux_err = xp.sqrt(xp.sum(w_psf * w_psf * v, axis=(1, 2)))
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
    n_data = xp.sum(xp.astype(good, flux.dtype), axis=(1, 2))
    if is_score:  # correlated pixels: no chi^2 of independent ones
        chi2 = xp.full_like(flux, float("nan"))
    else:
        left = d - flux[:, None, None] * psf
        chi2 = xp.sum(xp.where(good, left * left / xp.where(v > 0, v, 1.0), 0.0), axis=(1, 2))
    flux, flux_err, ap, ap_err, n_data, chi2 = backend.to_host(
        xp.stack([flux, flux_err, ap, ap_err, n_data, chi2]))  # one device read
    return {"psfFlux": flux, "psfFluxErr": flux_err, "psfChi2": chi2,
            "psfNdata": n_data.astype(np.int64), "apFlux": ap, "apFluxErr": ap_err,
            "snr": flux / flux_err}


def _deblended_stamps(st: SourceStamps, blends, flux, difference: Exposure, is_score: bool,
                      backend) -> SourceStamps:
    """``st`` with each blended source centred again on its stamp less its neighbours'
    models (their first fluxes ``flux`` times their PSFs; a score's response scaled to its
    value at the source), whose wings otherwise pull a faint member's centroid towards a
    bright one by up to a pixel at 1.5 FWHM; its PSF stamp moved there. A score's stamps
    are those cleaned ones (its flux is its value), a difference's stay whole (its members
    are fitted together, :func:`_blend_weights`)."""
    xp = backend.xp
    S = st.image.shape[-1]
    h = S // 2
    rows, cleaned = [], []
    for members in blends:
        for i in members:
            near = _neighbours(st, members, i)
            if not near:
                continue
            model = 0.0
            for j in near:
                moved = _moved_psf(backend, st, j, i)
                scale = float(flux[j]) / st.psf[j, h, h] if is_score else float(flux[j])
                model = model + scale * moved
            rows.append(i)
            cleaned.append(st.image[i, ...] - model)
    if not rows:
        return st
    rows = np.array(rows)
    at = backend.to_device(rows)
    image, good = xp.stack(cleaned), xp.take(st.good, at, axis=0)
    var = xp.take(st.variance, at, axis=0)
    inverse_var = xp.where(good, 1.0 / xp.where(var > 0, var, 1.0), 0.0)
    dx_new, dy_new, failed = _centroid(backend, xp.where(good, image, 0.0), inverse_var,
                                       difference.psf.image_at(), is_score)
    dx, dy, failed_all = st.dx.copy(), st.dy.copy(), st.centroid_failed.copy()
    dx[rows] = np.where(failed, dx[rows], dx_new)
    dy[rows] = np.where(failed, dy[rows], dy_new)
    failed_all[rows] = failed_all[rows] & failed
    index = np.arange(st.n)
    index[rows] = st.n + np.arange(len(rows))
    index = backend.to_device(index)
    moved = backend.to_device(psf_stack(difference.psf, st.xs[rows] + dx[rows],
                                        st.ys[rows] + dy[rows], S), np.float32)
    psf = xp.take(xp.concat([st.psf, moved], axis=0), index, axis=0)
    if is_score:
        image = xp.take(xp.concat([st.image, xp.astype(image, st.image.dtype)], axis=0), index,
                        axis=0)
    else:
        image = st.image
    shift_x = backend.to_device(dx - st.dx, np.float32)[:, None, None]
    shift_y = backend.to_device(dy - st.dy, np.float32)[:, None, None]
    return replace(st, dx=dx, dy=dy, image=image, psf=psf, xx=st.xx - shift_x,
                   yy=st.yy - shift_y, centroid_failed=failed_all)


def _neighbours(st: SourceStamps, members, i) -> list:
    """The members of ``i``'s blend whose centres lie in the central half of its stamp."""
    h = st.image.shape[-1] // 2
    return [j for j in members
            if j != i and max(abs(st.xs[j] - st.xs[i]), abs(st.ys[j] - st.ys[i])) < h]


def _moved_psf(backend, st: SourceStamps, j, i):
    """Source ``j``'s PSF stamp moved into source ``i``'s stamp (whole pixels; its sub-pixel
    part is in its own PSF stamp already)."""
    return shift_along(backend, shift_along(backend, st.psf[j, ...], int(st.xs[i] - st.xs[j]),
                                            1, 0.0), int(st.ys[i] - st.ys[j]), 0, 0.0)


def _blend_weights(backend, st: SourceStamps, blends, w_psf):
    """``w_psf`` with each blended source's row replaced by the weights of its flux in a
    joint linear fit of its blend's PSFs on its stamp (inverse-variance weights): a
    neighbour's wing no longer counts as the source's flux. One small solve per source."""
    xp = backend.xp
    rows, index = [], np.arange(st.n)
    for members in blends:
        for i in members:
            near = _neighbours(st, members, i)
            if not near:  # no neighbour reaches this stamp's centre half
                continue
            basis = [st.psf[i, ...]] + [_moved_psf(backend, st, j, i) for j in near]
            a = xp.stack(basis)
            v = st.variance[i, ...]
            w = xp.where(st.good[i, ...], 1.0 / xp.where(v > 0, v, 1.0), 0.0)
            m = xp.sum(a[:, None, ...] * a[None, ...] * w, axis=(2, 3))
            e0 = backend.to_device(np.eye(len(basis))[0], np.float64)
            c = backend.solve(xp.astype(m, xp.float64), e0)  # NaN when singular
            joint = xp.astype(xp.sum(xp.reshape(xp.astype(c, a.dtype), (-1, 1, 1)) * a,
                                     axis=0) * w, w_psf.dtype)
            rows.append(xp.where(xp.all(xp.isfinite(joint)), joint, w_psf[i, ...]))
            index[i] = st.n + len(rows) - 1
    if not rows:
        return w_psf
    return xp.take(xp.concat([w_psf, xp.stack(rows)], axis=0), backend.to_device(index),
                   axis=0)


def _detection_values(st: SourceStamps, det: Detections, backend) -> dict:
    xp, h = backend.xp, st.half
    return {"peakValue": st.image[:, h, h],
            "significance": xp.concat([backend.to_device(det.significance, np.float64),
                                       xp.astype(st.snr[st.n_det:, h, h], xp.float64)]),
            "footprintArea": np.concatenate([det.area, np.zeros(st.n - st.n_det, int)])}


def _moments(st: SourceStamps, backend) -> dict:
    """Second moments of |D| with a Gaussian weight matched to the PSF core."""
    xp = backend.xp
    xx, yy = st.xx, st.yy
    wgt = (xp.exp(-0.5 * (xx * xx + yy * yy) / st.sigma2) * xp.abs(st.image)
           * xp.astype(st.good, xp.float32))
    wsum = xp.sum(wgt, axis=(1, 2))
    wsum = xp.where(wsum > 0, wsum, 1.0)
    return {"ixx": xp.sum(wgt * xx * xx, axis=(1, 2)) / wsum,
            "iyy": xp.sum(wgt * yy * yy, axis=(1, 2)) / wsum,
            "ixy": xp.sum(wgt * xx * yy, axis=(1, 2)) / wsum}


def _dipoles(st: SourceStamps, det: Detections, difference: Exposure, backend) -> dict:
    """Two-lobe fit for sources with both a positive and a negative peak."""
    n = st.n
    cols = {k: np.full(n, np.nan) for k in ("dipolePosFlux", "dipoleNegFlux", "dipoleMeanFlux",
                                             "dipoleFluxDiff", "dipoleLength", "dipoleAngle")}
    is_dip = np.zeros(n, bool)
    is_dip[:st.n_det] = det.is_dipole
    n_data = np.zeros(n, np.int64)
    idx = np.nonzero(is_dip)[0]
    if len(idx):
        S = DIPOLE_STAMP
        px, py = det.pos_x[idx].astype(float), det.pos_y[idx].astype(float)
        nxn, nyn = det.neg_x[idx].astype(float), det.neg_y[idx].astype(float)
        mx = np.round((px + nxn) / 2).astype(np.int64)
        my = np.round((py + nyn) / 2).astype(np.int64)
        pos = np.column_stack([mx, my])
        d, v = backend.to_host_all(*(gather_stamps(backend, backend.asarray(a), pos, S, 0.0)
                                     for a in (difference.image, difference.variance)))
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
            n_data[j] = np.count_nonzero(w)
            cols["dipoleAngle"][j] = np.degrees(np.arctan2(py[k] - nyn[k], px[k] - nxn[k]))
    return {"isDipole": is_dip, "dipoleNdata": n_data, **cols}


def _forced(st: SourceStamps, science: Exposure, backend) -> dict:
    """Forced PSF flux on the science image at each source's centroid (device columns)."""
    flux, err = forced_psf_fit(science, st.cx, st.cy, backend=backend)
    return {"scienceFlux": flux, "scienceFluxErr": err}


def forced_psf_flux(exposure: Exposure, xs, ys, is_score: bool = False,
                    backend=None) -> tuple[np.ndarray, np.ndarray]:
    """Forced PSF photometry at given positions: host ``(flux, error)`` arrays.

    On an image, the PSF at each (sub-pixel) position and a constant local sky are fitted
    jointly to a stamp, weighted by the inverse variance (pixels with none get no weight);
    on a score image (``is_score``) the flux is its value there, interpolated.
    """
    backend = get_backend(backend)
    return backend.to_host_all(*forced_psf_fit(exposure, xs, ys, is_score, backend))


def forced_psf_fit(exposure: Exposure, xs, ys, is_score: bool = False, backend=None):
    """:func:`forced_psf_flux` left on the device: backend ``(flux, error)`` arrays."""
    backend = get_backend(backend)
    xp = backend.xp
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    pos = np.column_stack([np.floor(xs + 0.5), np.floor(ys + 0.5)]).astype(np.int64)
    d = gather_stamps(backend, backend.asarray(exposure.image), pos, FORCED_STAMP, 0.0)
    v = gather_stamps(backend, backend.asarray(exposure.variance), pos, FORCED_STAMP, 0.0)
    if is_score:
        h = FORCED_STAMP // 2
        return (interpolate_stamps(backend, d, xs - pos[:, 0], ys - pos[:, 1]),
                xp.sqrt(v[:, h, h]))
    p = backend.to_device(psf_stack(exposure.psf, xs, ys, FORCED_STAMP), np.float32)
    w = xp.where(v > 0, 1.0 / xp.where(v > 0, v, 1.0), 0.0)
    spp = xp.sum(w * p * p, axis=(1, 2))
    sp1 = xp.sum(w * p, axis=(1, 2))
    s11 = xp.sum(w, axis=(1, 2))
    spd = xp.sum(w * p * d, axis=(1, 2))
    s1d = xp.sum(w * d, axis=(1, 2))
    det = spp * s11 - sp1 * sp1
    det = xp.where(det > 0, det, 1.0)
    return (s11 * spd - sp1 * s1d) / det, xp.sqrt(s11 / det)


def _footprints(st: SourceStamps, det: Detections, difference: Exposure, backend) -> dict:
    """Each plane of :data:`PIXEL_FLAGS` anywhere in the footprint and at the centre, and
    the side of the footprint's bounding box (``bboxSize``; a sky source's: its stamp)."""
    xp = backend.xp
    centre = xp.astype(st.mask[:, st.half, st.half], xp.int64)
    bits, side = _footprint_bits(det, difference.shape[1])
    fp_bits = xp.concat([backend.to_device(bits, np.int64), centre[st.n_det:]])
    out = {"bboxSize": np.concatenate([side, np.full(st.n - st.n_det, st.image.shape[-1])])}
    for name, plane in PIXEL_FLAGS:  # device columns
        if plane in difference.mask_planes:
            bit = difference.bit(plane)
            out[f"pixelFlags_{name}"] = (fp_bits & bit) != 0
            out[f"pixelFlags_{name}Center"] = (centre & bit) != 0
    return out


def _footprint_bits(detections, nx: int):
    """OR of the mask bits over each footprint and the side of its bounding box (host int
    arrays, one entry per detection), from the footprint pixels detection read (no device
    read)."""
    if not len(detections):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    px = detections.pixels
    lab, bits, hx, hy = px.labels, px.bits, px.xs, px.ys
    ids = px.lookup(nx, lab.astype(np.float64))(detections.y, detections.x).astype(np.int64)
    n = int(lab.max()) + 1 if len(lab) else 1
    out = np.zeros(n, np.int64)
    np.bitwise_or.at(out, lab, bits)
    lo_x, lo_y = np.full(n, np.iinfo(np.int64).max), np.full(n, np.iinfo(np.int64).max)
    hi_x, hi_y = np.full(n, -1), np.full(n, -1)
    np.minimum.at(lo_x, lab, hx)
    np.minimum.at(lo_y, lab, hy)
    np.maximum.at(hi_x, lab, hx)
    np.maximum.at(hi_y, lab, hy)
    side = np.maximum(hi_x - lo_x, hi_y - lo_y) + 1
    return out[ids], np.where(side[ids] > 0, side[ids], 1)


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
        kernel-error scale detection measured, ``meta["registration_sigma"]`` the
        template's misregistration (pixels per axis, rms).
    """
    backend = get_backend(backend)
    if science is not None and science.psf is None:  # measured by the subtraction
        science = science.replace(psf=result.science_psf)
    det = detect(result.difference, result.is_score, detection_config, backend, result.noise)
    noise = result.noise.with_residual_scale(det.residual_scale)
    table = measure(result.difference, det, science, result.is_score, measure_config, backend,
                    noise)
    table.meta["residual_scale"] = det.residual_scale
    table.meta["registration_sigma"] = float(np.sqrt(det.registration_scale))
    return table


def write_dia_sources(table: Table, path) -> None:
    """Write a DiaSource table as Parquet, atomically."""
    with atomic_path(path) as tmp:
        table.write(tmp, format="parquet", overwrite=True)
