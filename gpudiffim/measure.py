"""Measurement of diaSources, batched over all sources at once.

Stamps around every source are gathered with one indexing operation and measured with
array math on the backend: PSF flux and error (linear fit with the difference's PSF and
variance; for a score image its value at the centroid, Lanczos-interpolated), aperture
flux and error, a sub-pixel centroid and its error, S/N, peak value, second moments, a
two-lobe dipole fit for merged positive/negative pairs, forced PSF flux on the science
image, and pixel flags in the footprint and at the centre. Blank "sky sources" are
measured the same way to give the noise floor. The result is an astropy Table with Rubin
APDB DiaSource column names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table

from .backend import get_backend
from .convolve import fft_convolve
from .detect import Detections
from .exposure import Exposure
from .inject import shift_image
from .kernel_fit import _gather

#: (column suffix, mask plane) for the pixel flags
PIXEL_FLAGS = (("edge", "EDGE"), ("bad", "BAD"), ("saturated", "SAT"),
               ("saturatedTemplate", "SAT_TEMPLATE"), ("cr", "CR"), ("interpolated", "INTRP"),
               ("suspect", "SUSPECT"), ("nodata", "NO_DATA"), ("injected", "INJECTED"))


@dataclass(frozen=True)
class MeasureConfig:
    stampSize: int = 31
    apertureRadius: float = 6.0  # pixels
    nSkySources: int = 100
    skySeed: int = 1


def _psf_stack(psf, xs, ys, size):
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


def _psf_fit(xp, data, var, model, good):
    """Linear PSF flux and error per stamp: sum(P D / V) / sum(P^2 / V)."""
    w = xp.where(good, model / xp.where(var > 0, var, 1.0), 0.0)
    norm = xp.sum(w * model, axis=(1, 2))
    flux = xp.sum(w * data, axis=(1, 2)) / norm
    return flux, 1.0 / xp.sqrt(norm)


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


def _value_at(backend, stamps, dx, dy, a: int = 5):
    """Each stamp (n, S, S) interpolated at (centre + dx, centre + dy) by a Lanczos kernel
    of ``a`` lobes, the weights normalised (host weights, device sums). A score peak (the
    PSF twice, FWHM >= 3 px) is read to 0.25%; a quadratic through the 3x3 around its
    peak pixel was up to 2% off, Lanczos-3 0.8%."""
    from .warp import lanczos

    xp = backend.xp
    c = stamps.shape[-1] // 2
    offs = np.arange(-a, a + 1)

    def weights(d):
        w = lanczos(np, np.asarray(d, float)[:, None] - offs[None, :], a)
        return backend.to_device((w / w.sum(axis=1, keepdims=True)).astype(np.float32))

    wy, wx = weights(dy), weights(dx)
    window = stamps[:, c - a:c + a + 1, c - a:c + a + 1]
    return xp.sum(wy[:, :, None] * wx[:, None, :] * window, axis=(1, 2))


def measure(difference: Exposure, detections: Detections, science: Exposure | None = None,
            is_score: bool = False, config: MeasureConfig = MeasureConfig(),
            backend=None, noise_paths: tuple = (), residual: tuple | None = None) -> Table:
    """Measure every detection; returns a DiaSource table (plus sky sources, flagged).

    ``noise_paths`` (a subtraction's: each input's variance plane and the filter it
    reaches the difference through) make the PSF and aperture flux errors sum the
    difference's correlated noise; without them each pixel's variance is taken as
    independent, which understates the errors of bright sources whose own photon noise
    went through the matching kernel. ``residual`` (the subtraction's residual power and
    the scale detection measured for it, :func:`~gpudiffim.detect.residual_scale`) adds the
    kernel's own error near bright sources: a residual smooth on the PSF's scale, of
    variance ``scale * power`` there, enters a flux with the sum of its weights squared.
    """
    backend = get_backend(backend)
    xp = backend.xp
    ny, nx = difference.shape
    n_det = len(detections)
    sky_x, sky_y = _sky_positions(backend, detections, difference, config)
    xs = np.concatenate([detections.x, sky_x]).astype(np.int64)
    ys = np.concatenate([detections.y, sky_y]).astype(np.int64)
    n = len(xs)
    S = config.stampSize
    half = S // 2
    # stamps may poke out of the image: gather from a padded copy
    image = backend.asarray(difference.image)
    var = backend.asarray(difference.variance)
    mask = backend.asarray(difference.mask)
    pad = lambda a, v: _pad(backend, a, half, v)  # noqa: E731
    pos = backend.to_device(np.column_stack([xs, ys]) + half)
    d_st = _gather(backend, pad(image, 0.0), pos, S)
    v_st = _gather(backend, pad(var, 0.0), pos, S)
    m_st = _gather(backend, pad(mask, difference.bit("NO_DATA")), pos, S)
    snr_st = _gather(backend, pad(detections.snr_image, 0.0), pos, S)
    dx, dy = _centroid(backend, snr_st) if n else (np.zeros(0), np.zeros(0))
    dx[n_det:], dy[n_det:] = 0.0, 0.0  # sky sources are measured where they were placed
    cx, cy = xs + dx, ys + dy
    psf = backend.to_device(_psf_stack(difference.psf, cx, cy, S).astype(np.float32))
    good = (m_st & difference.bit("NO_DATA", "BAD", "SAT", "EDGE", "SAT_TEMPLATE")) == 0
    good = good & (v_st > 0)
    if is_score:  # the score is in flux units: its value at the source is the PSF flux
        flux = _value_at(backend, d_st, dx, dy)  # sky sources: dx = dy = 0, the pixel itself
        flux_err = xp.sqrt(v_st[:, half, half])
    else:
        flux, flux_err = _psf_fit(xp, d_st, v_st, psf, good)
    off = backend.arange(S) - half
    yy = xp.astype(xp.reshape(off, (1, S, 1)), xp.float32) - backend.to_device(dy.astype(np.float32))[:, None, None]
    xx = xp.astype(xp.reshape(off, (1, 1, S)), xp.float32) - backend.to_device(dx.astype(np.float32))[:, None, None]
    r2 = xx * xx + yy * yy
    inap = (r2 <= config.apertureRadius**2) & good
    ap = xp.sum(xp.where(inap, d_st, 0.0), axis=(1, 2))
    ap_err = xp.sqrt(xp.sum(xp.where(inap, v_st, 0.0), axis=(1, 2)))
    # the PSF fit's weights, normalised: its flux is sum(w_psf * D)
    w_psf = xp.where(good, psf / xp.where(v_st > 0, v_st, 1.0), 0.0)
    w_psf = w_psf / xp.sum(w_psf * psf, axis=(1, 2))[:, None, None]
    if noise_paths and n:
        weights = xp.concat([w_psf, xp.astype(inap, w_psf.dtype)], axis=0)
        var2 = _filtered_variance(backend, weights, noise_paths, np.concatenate([xs, xs]),
                                  np.concatenate([ys, ys]))
        if not is_score:
            flux_err = xp.sqrt(var2[:n])
        ap_err = xp.sqrt(var2[n:])
    if residual is not None and residual[1] > 0 and n:
        at = xp.take(xp.reshape(backend.asarray(residual[0]), (-1,)),
                     backend.to_device(ys * nx + xs))
        extra = xp.astype(at, xp.float32) * float(residual[1])
        if is_score:  # the scale was measured on the score itself
            flux_err = xp.sqrt(flux_err * flux_err + extra)
        else:
            w_sum = xp.sum(w_psf, axis=(1, 2))
            flux_err = xp.sqrt(flux_err * flux_err + extra * w_sum * w_sum)
        n_ap = xp.sum(xp.astype(inap, xp.float32), axis=(1, 2))
        ap_err = xp.sqrt(ap_err * ap_err + extra * n_ap * n_ap)
    # second moments of |D| with a Gaussian weight matched to the PSF core
    fwhm = np.mean(difference.psf.fwhm())
    sig2 = float((fwhm / 2.3548) ** 2)
    wgt = xp.exp(-0.5 * r2 / sig2) * xp.abs(d_st) * xp.astype(good, xp.float32)
    wsum = xp.sum(wgt, axis=(1, 2))
    wsum = xp.where(wsum > 0, wsum, 1.0)
    ixx = xp.sum(wgt * xx * xx, axis=(1, 2)) / wsum
    iyy = xp.sum(wgt * yy * yy, axis=(1, 2)) / wsum
    ixy = xp.sum(wgt * xx * yy, axis=(1, 2)) / wsum
    centre = m_st[:, half, half]
    table = Table()
    table["x"], table["y"] = cx, cy
    snr = backend.to_host(flux / flux_err)
    # centroid error ~ FWHM / (2.35 SNR) per axis (Gaussian PSF, background-limited)
    table["xErr"] = table["yErr"] = np.sqrt(sig2) * np.sqrt(2) / np.maximum(np.abs(snr), 1e-3)
    if difference.wcs is not None and n:
        ra, dec = difference.wcs.pixel_to_world_values(cx, cy)
    else:
        ra = dec = np.full(n, np.nan)
    table["ra"], table["dec"] = ra, dec
    table["psfFlux"], table["psfFluxErr"] = backend.to_host(flux), backend.to_host(flux_err)
    table["apFlux"], table["apFluxErr"] = backend.to_host(ap), backend.to_host(ap_err)
    table["snr"] = snr
    table["peakValue"] = backend.to_host(d_st[:, half, half])
    table["significance"] = np.concatenate([detections.significance, backend.to_host(snr_st[n_det:, half, half])])
    table["footprintArea"] = np.concatenate([detections.area, np.zeros(len(sky_x), int)])
    table["ixx"], table["iyy"], table["ixy"] = (backend.to_host(ixx), backend.to_host(iyy),
                                                backend.to_host(ixy))
    _dipoles(table, detections, difference, backend, n_det)
    if science is not None:
        _forced(table, science, cx, cy, backend)
    fp_bits = _footprint_bits(backend, detections, mask, n_det)
    centre = backend.to_host(centre)
    fp_bits = np.concatenate([fp_bits, centre[n_det:]])
    for name, plane in PIXEL_FLAGS:
        if plane not in difference.mask_planes:
            continue
        bit = difference.bit(plane)
        table[f"pixelFlags_{name}"] = (fp_bits & bit) != 0
        table[f"pixelFlags_{name}Center"] = (centre & bit) != 0
    table["sky_source"] = np.arange(n) >= n_det
    info = difference.info
    table.add_column(np.arange(n, dtype=np.int64), name="diaSourceId", index=0)
    table.add_column(np.full(n, -1 if info.visit is None else info.visit), name="visit", index=1)
    table.add_column(np.full(n, -1 if info.detector is None else info.detector), name="detector", index=2)
    table.add_column(np.full(n, info.band or ""), name="band", index=3)
    return table


def _filtered_variance(backend, weights, paths, xs, ys):
    """Variance of ``sum(weights * D)`` per stamp, for a difference ``D = sum_p g_p * N_p``
    of images with independent pixel noise of variance ``V_p``:
    ``sum_p sum_m V_p(m) (w corr g_p)(m)^2`` (each input pixel's noise reaches every stamp
    pixel its filter spreads it to). ``weights`` (n, S, S) centred on (xs, ys)."""
    xp = backend.xp
    n, S = weights.shape[0], weights.shape[-1]
    total = backend.zeros((n,), dtype=xp.float32)
    for plane, g in paths:
        G = g.shape[0]
        L, h = S + G - 1, (S + G - 1) // 2
        edge = (G - 1) // 2
        zc = backend.zeros((n, S, edge), dtype=weights.dtype)
        wide = xp.concat([zc, weights, zc], axis=2)
        zr = backend.zeros((n, edge, L), dtype=weights.dtype)
        wide = xp.concat([zr, wide, zr], axis=1)
        spread = fft_convolve(wide, backend.to_device(np.flip(g).astype(np.float32)), backend)
        pos = backend.to_device(np.column_stack([xs, ys]).astype(np.int64) + h)
        v = _gather(backend, _pad(backend, backend.asarray(plane), h, 0.0), pos, L)
        total = total + xp.sum(xp.astype(v, xp.float32) * spread * spread, axis=(1, 2))
    return total


def _pad(backend, a, half, value):
    xp = backend.xp
    ny, nx = a.shape
    col = backend.full((ny, half), value, dtype=a.dtype)
    a = xp.concat([col, a, col], axis=1)
    row = backend.full((half, nx + 2 * half), value, dtype=a.dtype)
    return xp.concat([row, a, row], axis=0)


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


def _footprint_bits(backend, detections, mask, n_det):
    """OR of the mask bits over each footprint (host int array, one per detection)."""
    xp = backend.xp
    labels = backend.asarray(detections.labels)
    ys, xs = xp.nonzero(labels > 0)
    lab = backend.to_host(labels[ys, xs])
    bits = backend.to_host(mask[ys, xs])
    out = np.zeros(int(lab.max()) + 1 if len(lab) else 1, np.int64)
    np.bitwise_or.at(out, lab, bits.astype(np.int64))
    # detections keep the footprint ids of their peaks
    ids = backend.to_host(labels[backend.to_device(detections.y), backend.to_device(detections.x)])
    return out[ids] if n_det else np.zeros(0, np.int64)


def _dipoles(table, det, difference, backend, n_det):
    """Two-lobe fit for sources with both a positive and a negative peak."""
    n = len(table)
    cols = {k: np.full(n, np.nan) for k in ("dipolePosFlux", "dipoleNegFlux", "dipoleMeanFlux",
                                             "dipoleFluxDiff", "dipoleLength", "dipoleAngle")}
    is_dip = np.zeros(n, bool)
    is_dip[:n_det] = det.is_dipole
    idx = np.nonzero(is_dip)[0]
    if len(idx):
        S = 41
        half = S // 2
        px, py = det.pos_x[idx].astype(float), det.pos_y[idx].astype(float)
        nxn, nyn = det.neg_x[idx].astype(float), det.neg_y[idx].astype(float)
        mx, my = np.round((px + nxn) / 2).astype(np.int64), np.round((py + nyn) / 2).astype(np.int64)
        pos = backend.to_device(np.column_stack([mx, my]) + half)
        d = backend.to_host(_gather(backend, _pad(backend, backend.asarray(difference.image), half, 0.0), pos, S))
        v = backend.to_host(_gather(backend, _pad(backend, backend.asarray(difference.variance), half, 0.0), pos, S))
        for k in range(len(idx)):
            a = _psf_stack(difference.psf, [px[k]], [py[k]], S)[0]
            b = _psf_stack(difference.psf, [nxn[k]], [nyn[k]], S)[0]
            a = np.roll(np.roll(a, int(py[k] - my[k]), 0), int(px[k] - mx[k]), 1)
            b = np.roll(np.roll(b, int(nyn[k] - my[k]), 0), int(nxn[k] - mx[k]), 1)
            w = np.where(v[k] > 0, 1.0 / np.where(v[k] > 0, v[k], 1.0), 0.0)
            m = np.array([[np.sum(w * a * a), np.sum(w * a * b)], [np.sum(w * a * b), np.sum(w * b * b)]])
            rhs = np.array([np.sum(w * a * d[k]), np.sum(w * b * d[k])])
            fa, fb = np.linalg.solve(m + 1e-12 * np.eye(2) * np.trace(m), rhs)
            j = idx[k]
            cols["dipolePosFlux"][j], cols["dipoleNegFlux"][j] = fa, fb
            cols["dipoleMeanFlux"][j] = 0.5 * (fa - fb)
            cols["dipoleFluxDiff"][j] = fa + fb
            cols["dipoleLength"][j] = np.hypot(px[k] - nxn[k], py[k] - nyn[k])
            cols["dipoleAngle"][j] = np.degrees(np.arctan2(py[k] - nyn[k], px[k] - nxn[k]))
    table["isDipole"] = is_dip
    for k, v in cols.items():
        table[k] = v


def _forced(table, science, cx, cy, backend):
    """Forced PSF flux on the science image (flux plus a constant local sky, jointly)."""
    xp = backend.xp
    S = 31
    half = S // 2
    pos = backend.to_device(np.column_stack([np.round(cx), np.round(cy)]).astype(np.int64) + half)
    img = backend.asarray(science.image)
    d = _gather(backend, _pad(backend, img, half, 0.0), pos, S)
    v = _gather(backend, _pad(backend, backend.asarray(science.variance), half, 0.0), pos, S)
    p = backend.to_device(_psf_stack(science.psf, cx, cy, S).astype(np.float32))
    w = xp.where(v > 0, 1.0 / xp.where(v > 0, v, 1.0), 0.0)
    spp = xp.sum(w * p * p, axis=(1, 2))
    sp1 = xp.sum(w * p, axis=(1, 2))
    s11 = xp.sum(w, axis=(1, 2))
    spd = xp.sum(w * p * d, axis=(1, 2))
    s1d = xp.sum(w * d, axis=(1, 2))
    det = spp * s11 - sp1 * sp1
    det = xp.where(det > 0, det, 1.0)
    table["scienceFlux"] = backend.to_host((s11 * spd - sp1 * s1d) / det)
    table["scienceFluxErr"] = backend.to_host(xp.sqrt(s11 / det))


def dia_sources(result, science: Exposure | None = None, detection_config=None,
                measure_config: MeasureConfig = MeasureConfig(), backend=None) -> Table:
    """Detect and measure on a :class:`~gpudiffim.subtract.SubtractionResult`."""
    from .detect import DetectionConfig, detect

    backend = get_backend(backend)
    det = detect(result.difference, result.is_score, detection_config or DetectionConfig(), backend,
                 result.residual_power, result.kernel_sources, result.kernel.basis.size)
    table = measure(result.difference, det, science, result.is_score, measure_config, backend,
                    result.noise_paths, (result.residual_power, det.residual_scale))
    table.meta["residual_scale"] = det.residual_scale
    return table


def write_dia_sources(table: Table, path) -> None:
    """Write a DiaSource table as Parquet, atomically."""
    from .io import atomic_path

    with atomic_path(path) as tmp:
        table.write(tmp, format="parquet", overwrite=True)
