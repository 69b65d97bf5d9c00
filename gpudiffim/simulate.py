"""A miniature HSC "DIA sprint": simulated science visits, deep templates and truth.

``simulate(outdir, preset, seed)`` writes, for every band and detector, one deep
template and one science exposure per visit (LSST-style FITS with PSF models), a
manifest table and truth tables (see :data:`PRESETS`). Scenes hold stars from a
power-law luminosity function up to saturation, Sersic galaxies, variable stars and
transients (half on galaxies); science images get a sky gradient, Poisson and read
noise, masked cosmic rays and bad columns; each exposure has its own Moffat PSF
(seeing, wing slope, variation across the detector), zero point and WCS offset.
Fakes go into the science images (positive in the difference) and the templates
(negative) through :func:`gpudiffim.inject.inject`; the demo and sprint presets set a
fifth of the science fakes 1-3 FWHM from another, so that they blend.

This is the data generator at the edge of the engine: it runs on the host (NumPy).
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table, vstack
from astropy.wcs import WCS
from scipy.signal import fftconvolve

from .exposure import Exposure, ExposureInfo, mask_bits
from .inject import inject, optimal_snr, overlap_slices, psf_stamp
from .io import atomic_path, write_exposure
from .options import configclass, option
from .profiles import ARCSEC_PER_PIXEL, PsfField, moffat_radius, sersic_stamp
from .zogy import optimal_snr_at

__all__ = ["SimConfig", "PRESETS", "simulate", "make_scene", "make_transients", "render",
           "add_cosmic_rays", "make_wcs", "transient_mag", "star_mag"]

HSC_G_VISITS = (11690, 11692, 11694, 11696, 11698, 11700, 11702, 11704, 11706, 11708, 11710,
                11712, 29324, 29326, 29336, 29340, 29350)
HSC_R_VISITS = (1202, 1204, 1206, 1208, 1210, 1212, 1214, 1216, 1218, 1220, 23692, 23694,
                23704, 23706, 23716, 23718)
HSC_DETECTORS = (49, 50, 57, 58, 65, 66)


@configclass
class SimConfig:
    """What to simulate. Densities are per million pixels; fluxes are in electrons (gain 1)."""

    name: str = option(doc="the preset's name")
    visits: dict = option(doc="band -> tuple of visit ids")
    detectors: tuple = option(doc="detector ids")
    shape: tuple = option(doc="(ny, nx) of every exposure")
    bad_template_detectors: tuple = option((), "detectors whose template has worse seeing")
    star_density: float = option(150.0, "stars per million pixels")
    galaxy_density: float = option(200.0, "galaxies per million pixels")
    fakes_per_science: int = option(40, "fakes injected into each science exposure")
    fakes_per_template: int = option(10, "fakes injected into each template")
    fake_separation: float = option(30.0, "pixels between fakes placed alone")
    fake_pair_fraction: float = option(0.0, "fraction of science fakes placed 1-3 PSF FWHM "
                                            "from another (blends)")
    transients_per_visit: int = option(6, "transients per visit, half on galaxies")
    variable_fraction: float = option(0.03, "fraction of 17-22 mag stars that vary")
    cr_density: float = option(8.0, "cosmic rays per million pixels")
    bad_columns: int = option(1, "bad columns per detector (after the first, some partial, "
                                 "some two pixels wide)")
    seeing: tuple = option((0.5, 1.3), "science seeing range (arcsec FWHM)")
    template_seeing: tuple = option((0.55, 0.7), "good templates' seeing range (arcsec)")
    bad_template_seeing: tuple = option((1.15, 1.3), "bad templates' seeing range (arcsec)")
    template_depth: float = option(12.0, "the template's variance is this many times lower")
    sky: dict = option(factory=lambda: {"g": 600.0, "r": 1200.0}, doc="sky per band (e-/px)")
    read_noise: float = option(5.0, "read noise (e-)")
    saturation: float = option(60000.0, "saturation level (e-)")
    zero_point: float = option(31.5, "the template's zero point; visits scatter around it")
    max_offset: float = option(3.0, "largest pointing offset template -> science (pixels)")
    star_mags: tuple = option((15.0, 25.5), "star magnitude range (a power law)")
    galaxy_mags: tuple = option((18.0, 25.0), "galaxy magnitude range")
    first_mjd: float = option(57800.0, "midpoint (MJD TAI) of each band's first visit")
    cadence: float = option(2.0, "days between a band's visits")


PRESETS = {
    "ci": SimConfig("ci", {"g": HSC_G_VISITS[:2]}, HSC_DETECTORS[:1], (512, 512),
                    fakes_per_science=50, fakes_per_template=8,
                    transients_per_visit=4),
    "demo": SimConfig("demo", {"g": HSC_G_VISITS[:4], "r": HSC_R_VISITS[:4]},
                      HSC_DETECTORS[:2], (2048, 1024), bad_template_detectors=(50,),
                      fake_pair_fraction=0.2, cr_density=30.0, bad_columns=4),
    "sprint": SimConfig("sprint", {"g": HSC_G_VISITS, "r": HSC_R_VISITS}, HSC_DETECTORS,
                        (4176, 2048), bad_template_detectors=(58, 66), fakes_per_science=80,
                        fakes_per_template=20, transients_per_visit=12,
                        fake_pair_fraction=0.2, cr_density=30.0, bad_columns=4),
}


def _arcsec_to_px(fwhm_arcsec):
    return fwhm_arcsec / ARCSEC_PER_PIXEL


def _power_law_mags(rng, n, lo, hi, slope):
    """Magnitudes with dN/dm proportional to 10**(slope*m) between lo and hi."""
    a, b = 10 ** (slope * lo), 10 ** (slope * hi)
    return np.log10(a + rng.random(n) * (b - a)) / slope


# ------------------------------------------------------------------------------ scene
def make_scene(cfg: SimConfig, rng: np.random.Generator) -> dict:
    """Static sky of one detector in template pixel coordinates."""
    ny, nx = cfg.shape
    mpix = nx * ny / 1e6
    n_star = rng.poisson(cfg.star_density * mpix)
    n_gal = rng.poisson(cfg.galaxy_density * mpix)
    n_bright = max(1, int(round(2 * mpix)))  # saturated stars, at least one per detector
    mags = np.concatenate([rng.uniform(13.5, 15.0, n_bright),
                           _power_law_mags(rng, n_star, *cfg.star_mags, 0.25)])
    n_star += n_bright
    stars = Table({"x": rng.uniform(-10, nx + 10, n_star), "y": rng.uniform(-10, ny + 10, n_star),
                   "mag": mags})
    var = (rng.random(n_star) < cfg.variable_fraction) & (stars["mag"] > 17) & (stars["mag"] < 22)
    stars["amplitude"] = np.where(var, rng.uniform(0.1, 0.5, n_star), 0.0)  # mag
    stars["phase"] = rng.uniform(0, 2 * np.pi, n_star)
    stars["period"] = rng.uniform(1.5, 6.0, n_star)  # in visits
    gmag = _power_law_mags(rng, n_gal, *cfg.galaxy_mags, 0.35)
    galaxies = Table({"x": rng.uniform(0, nx, n_gal), "y": rng.uniform(0, ny, n_gal), "mag": gmag,
                      "n": rng.uniform(0.6, 4.0, n_gal),
                      "r_eff": np.clip(rng.lognormal(np.log(3.0), 0.4, n_gal)
                                       * 10 ** (-0.1 * (gmag - 21)), 1.0, 15.0),
                      "q": rng.uniform(0.35, 1.0, n_gal), "theta": rng.uniform(0, np.pi, n_gal)})
    return {"stars": stars, "galaxies": galaxies}


def make_transients(cfg, scene, n_visits, rng) -> Table:
    """Transients: half on galaxies (within an effective radius), half isolated."""
    ny, nx = cfg.shape
    n = cfg.transients_per_visit * max(n_visits // 2, 1)
    gal = scene["galaxies"]
    on_gal = np.arange(n) % 2 == 0
    if len(gal) == 0:
        on_gal[:] = False
    host = rng.integers(0, max(len(gal), 1), n)
    r = rng.uniform(0, 1, n) * (np.asarray(gal["r_eff"])[host] if len(gal) else 0)
    phi = rng.uniform(0, 2 * np.pi, n)
    gx = np.asarray(gal["x"])[host] + r * np.cos(phi) if len(gal) else 0
    x = np.where(on_gal, gx, rng.uniform(30, nx - 30, n))
    gy = np.asarray(gal["y"])[host] + r * np.sin(phi) if len(gal) else 0
    y = np.where(on_gal, gy, rng.uniform(30, ny - 30, n))
    return Table({"x": np.clip(x, 20, nx - 20), "y": np.clip(y, 20, ny - 20),
                  "peak_mag": rng.uniform(21.0, 24.5, n), "t0": rng.integers(0, n_visits, n),
                  "tau": rng.uniform(0.7, 3.0, n), "on_galaxy": on_gal})


def transient_mag(tr, visit_index):
    """Magnitude of each transient at a visit (inf before it appears): linear decline."""
    dt = visit_index - np.asarray(tr["t0"])
    return np.where(dt >= 0, np.asarray(tr["peak_mag"]) + dt / np.asarray(tr["tau"]), np.inf)


def star_mag(stars, visit_index):
    """Star magnitudes at a visit (index) or, with ``None``, the template's mean."""
    base = np.asarray(stars["mag"])
    if visit_index is None:
        return base
    return base + np.asarray(stars["amplitude"]) * np.sin(
        2 * np.pi * visit_index / np.asarray(stars["period"]) + np.asarray(stars["phase"]))


# ------------------------------------------------------------------------------ drawing
def render(shape, psf: PsfField, points, galaxies, zp, offset, sky_sigma) -> np.ndarray:
    """Noise-free image (electrons) of point sources and galaxies.

    ``points``: (x, y, mag) in template pixels; ``offset`` moves them to this image.
    Stamps extend until the profile falls to 1% of the sky noise, so no edge shows.
    """
    ny, nx = shape
    image = np.zeros(shape)
    dx, dy = offset
    for x, y, mag in points:
        if not np.isfinite(mag):
            continue
        flux = 10 ** (-0.4 * (mag - zp))
        x, y = x + dx, y + dy
        fwhm = psf.params(np.clip(x, 0, nx - 1), np.clip(y, 0, ny - 1))[0]
        half = int(min(np.ceil(moffat_radius(flux, fwhm, psf.beta, 0.01 * sky_sigma)), 400))
        stamp, y0, x0 = psf.stamp(x, y, half, flux)
        _add(image, stamp, y0, x0)
    for g in galaxies:
        x, y = g["x"] + dx, g["y"] + dy
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        half = int(np.ceil(6 * g["r_eff"] / np.sqrt(g["q"]))) + 2
        intrinsic = sersic_stamp(g["n"], g["r_eff"], g["q"], g["theta"], half, x - ix, y - iy)
        cx, cy = np.clip(x, 0, nx - 1), np.clip(y, 0, ny - 1)
        fwhm = psf.params(cx, cy)[0]
        kernel = psf.image_at(cx, cy, 2 * int(np.ceil(4 * fwhm)) + 1)
        stamp = fftconvolve(intrinsic, kernel, mode="full") * 10 ** (-0.4 * (g["mag"] - zp))
        kh = kernel.shape[0] // 2
        _add(image, stamp, iy - half - kh, ix - half - kh)
    return image


def _add(image, stamp, y0, x0):
    cut = overlap_slices(image.shape, y0, x0, *stamp.shape)
    if cut is not None:
        image[cut[0]] += stamp[cut[1]]


def add_cosmic_rays(image, mask, rng, density, expect=None, read_noise=0.0):
    """Short random-walk tracks of high counts, masked CR. With ``expect`` (the noise-free
    image) the hit pixels are then repaired the way ISR interpolates them (CR | INTRP)."""
    ny, nx = image.shape
    cr = mask_bits("CR")
    for _ in range(rng.poisson(density * nx * ny / 1e6)):
        y, x = rng.integers(0, ny), rng.integers(0, nx)
        amp = rng.uniform(800, 20000)
        for _ in range(rng.integers(1, 9)):
            image[y, x] += amp * rng.uniform(0.5, 1.0)
            mask[y, x] |= cr
            y = int(np.clip(y + rng.integers(-1, 2), 0, ny - 1))
            x = int(np.clip(x + rng.integers(-1, 2), 0, nx - 1))
    if expect is not None:
        hit = (mask & cr) != 0
        noise = rng.normal(0, 1, hit.sum()) * np.sqrt(expect[hit] + read_noise**2)
        image[hit] = expect[hit] + noise
        mask[hit] |= mask_bits("INTRP")


def make_wcs(shape, detector, offset=(0.0, 0.0)) -> WCS:
    """TAN WCS at 0.168"/px; detectors sit on a grid on the sky; ``offset`` shifts the pixels."""
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    k = HSC_DETECTORS.index(detector) if detector in HSC_DETECTORS else detector
    w.wcs.crval = [150.0 + (k % 2) * 0.2, 2.0 + (k // 2) * 0.4]
    w.wcs.crpix = [nx / 2 + 0.5 + offset[0], ny / 2 + 0.5 + offset[1]]
    w.wcs.cd = np.array([[-1.0, 0.0], [0.0, 1.0]]) * ARCSEC_PER_PIXEL / 3600.0
    return w


def _psf_field(rng, fwhm_arcsec, beta, shape) -> PsfField:
    ny, nx = shape
    return PsfField(fwhm=_arcsec_to_px(fwhm_arcsec), beta=beta, width=nx, height=ny,
                    gx=rng.uniform(-0.04, 0.04), gy=rng.uniform(-0.04, 0.04),
                    curvature=rng.uniform(0.0, 0.04), e1_0=rng.uniform(-0.05, 0.05),
                    e1_u=rng.uniform(-0.03, 0.03), e2_0=rng.uniform(-0.05, 0.05),
                    e2_v=rng.uniform(-0.03, 0.03))


def _place(rng, n, shape, margin, min_sep, avoid=()):
    """``n`` random positions at least ``min_sep`` apart and from ``avoid`` (x, y) points."""
    ny, nx = shape
    placed = [tuple(p) for p in avoid]
    out = []
    for _ in range(50 * n):
        if len(out) == n:
            break
        x, y = rng.uniform(margin, nx - margin), rng.uniform(margin, ny - margin)
        if all((x - px) ** 2 + (y - py) ** 2 >= min_sep**2 for px, py in placed):
            placed.append((x, y))
            out.append((x, y))
    return np.array(out).reshape(-1, 2)


def _companions(rng, around, n, fwhm, shape, margin):
    """``n`` positions each 1-3 ``fwhm`` from a random one of ``around`` (x, y)."""
    ny, nx = shape
    if not len(around) or n <= 0:
        return np.zeros((0, 2))
    base = around[rng.integers(0, len(around), n)]
    r, phi = rng.uniform(1.0, 3.0, n) * fwhm, rng.uniform(0, 2 * np.pi, n)
    return np.column_stack([np.clip(base[:, 0] + r * np.cos(phi), margin, nx - margin),
                            np.clip(base[:, 1] + r * np.sin(phi), margin, ny - margin)])


def _target_snr(rng, n):
    """Most fakes at SNR 3-10 where efficiency is decided, the rest log-uniform 2-100."""
    core = rng.random(n) < 0.7
    return np.where(core, rng.uniform(3, 10, n), np.exp(rng.uniform(np.log(2), np.log(100), n)))


def _flux_for_snr(psf, x, y, snr, variance, gain=1.0):
    """Flux whose optimal SNR over ``variance`` (plus its own photon noise) is ``snr``."""
    stamp, y0, x0 = psf_stamp(psf, x, y)
    h, w = stamp.shape
    var = variance[y0:y0 + h, x0:x0 + w]
    flux = snr / np.sqrt(np.sum(stamp**2 / var))
    for _ in range(4):
        flux = snr / np.sqrt(np.sum(stamp**2 / (var + flux * stamp / gain)))
    return flux


# ------------------------------------------------------------------------------ one detector
@dataclass(frozen=True)
class _Visit:
    visit: int
    index: int
    fwhm: float  # arcsec
    beta: float
    zp: float
    sky: float
    offset: tuple
    mjd: float  # midpoint, MJD TAI


def _visit_params(cfg, band, visit, index, seed, sky0) -> _Visit:
    """Conditions of one visit, shared by all its detectors (seeing, wings, zero point, sky,
    pointing offset); each detector then gets its own PSF variation and sky gradient."""
    rng = np.random.default_rng([seed, ord(band[0]), visit, 0])
    return _Visit(visit, index, rng.uniform(*cfg.seeing), rng.uniform(2.5, 4.5),
                  cfg.zero_point + rng.normal(0, 0.2), sky0 * rng.uniform(0.8, 1.3),
                  tuple(rng.uniform(-cfg.max_offset, cfg.max_offset, 2)),
                  cfg.first_mjd + cfg.cadence * index + 0.05 * sorted(cfg.visits).index(band))


def _simulate_detector(cfg: SimConfig, band: str, detector: int, seed: int, outdir: Path):
    """Everything for one (band, detector): template, visits, truth rows, manifest rows."""
    ss = np.random.SeedSequence([seed, ord(band[0]), detector])
    rng_scene, rng_tmpl = (np.random.default_rng(s) for s in ss.spawn(2))
    scene = make_scene(cfg, rng_scene)
    visits = cfg.visits[band]
    transients = make_transients(cfg, scene, len(visits), rng_scene)
    sky0 = cfg.sky.get(band, 1000.0)
    vparams = [_visit_params(cfg, band, v, i, seed, sky0) for i, v in enumerate(visits)]
    template, t_psf, t_var = _make_template(cfg, band, detector, scene, sky0, rng_tmpl)
    template, tf_truth = _template_fakes(cfg, template, t_var, vparams[len(vparams) // 2],
                                         rng_tmpl)
    t_rel = Path("templates") / band / f"template_{band}_{detector:03d}.fits"
    write_exposure(template, outdir / t_rel)
    truth_rows, manifest_rows = [], []
    for vp in vparams:
        rng = np.random.default_rng([seed, ord(band[0]), detector, vp.visit])
        science, s_psf, s_var = _make_science(cfg, band, detector, seed, vp, scene, transients,
                                              rng)
        t_var_here = _template_variance_on(template, vp, cfg)
        science, f_truth = _science_fakes(cfg, science, s_var + t_var_here, vp, tf_truth, rng)
        s_rel = (Path("science") / band / str(vp.visit)
                 / f"science_{band}_{vp.visit}_{detector:03d}.fits")
        write_exposure(science, outdir / s_rel)
        truth_rows += _visit_truth(cfg, band, vp, science, t_var_here, f_truth,
                                   tf_truth, transients, scene["stars"], t_psf)
        manifest_rows.append(_manifest_row(cfg, band, detector, vp, s_rel, t_rel, s_psf, t_psf))
    return vstack(truth_rows), manifest_rows, _static_catalogue(scene, band, detector)


def _psf_model_size(cfg: SimConfig) -> int:
    """Side of the PSF models: 3.5 x the worst seeing's FWHM each side."""
    worst = max(cfg.seeing[1], cfg.bad_template_seeing[1])
    return 2 * int(np.ceil(3.5 * _arcsec_to_px(worst))) + 1


def _make_template(cfg: SimConfig, band, detector, scene, sky0, rng):
    """A deep, background-subtracted coadd of the static sky, its PSF field and its float64
    variance."""
    bad = detector in cfg.bad_template_detectors
    t_fwhm = rng.uniform(*(cfg.bad_template_seeing if bad else cfg.template_seeing))
    t_psf = _psf_field(rng, t_fwhm, 3.0, cfg.shape)
    t_var_sky = (sky0 + cfg.read_noise**2) / cfg.template_depth
    stars = scene["stars"]
    points = list(zip(stars["x"], stars["y"], star_mag(stars, None)))
    t_model = render(cfg.shape, t_psf, points, scene["galaxies"], cfg.zero_point, (0, 0),
                     np.sqrt(t_var_sky))
    t_variance = (t_var_sky + np.clip(t_model, 0, None) / cfg.template_depth)
    t_image = t_model + rng.normal(size=cfg.shape) * np.sqrt(t_variance)
    t_mask = np.zeros(cfg.shape, np.int32)
    t_sat = t_model >= cfg.saturation
    t_mask[t_sat] |= mask_bits("SAT")
    t_image[t_sat] = cfg.saturation
    info = ExposureInfo(detector=detector, band=band,
                        extra={"GAIN": 1.0, "NCOADD": cfg.template_depth})
    template = Exposure.from_arrays(t_image, t_mask, t_variance,
                                    psf=t_psf.model(_psf_model_size(cfg)),
                                    wcs=make_wcs(cfg.shape, detector), zero_point=cfg.zero_point,
                                    info=info)
    return template, t_psf, t_variance


def _template_fakes(cfg: SimConfig, template, variance, typical: _Visit, rng):
    """Fakes in the template (negative in every difference), their S/N aimed at a typical
    visit's difference."""
    tf_xy = _place(rng, cfg.fakes_per_template, cfg.shape, 40, cfg.fake_separation)
    scale = 10 ** (0.4 * (typical.zp - cfg.zero_point))
    eff_var = variance + (typical.sky + cfg.read_noise**2) / scale**2
    tf_flux = [_flux_for_snr(template.psf, x, y, s, eff_var)
               for (x, y), s in zip(tf_xy, _target_snr(rng, len(tf_xy)))]
    return inject(template, Table({"x": tf_xy[:, 0], "y": tf_xy[:, 1], "flux": tf_flux}),
                  rng=rng, gain=cfg.template_depth)


def _make_science(cfg: SimConfig, band, detector, seed, vp: _Visit, scene, transients, rng):
    """One visit's exposure: the scene as it is then (variables, transients), its own PSF,
    sky gradient, Poisson and read noise, saturation, cosmic rays and a bad column; with
    its PSF field and its float64 variance."""
    ny, nx = cfg.shape
    s_psf = _psf_field(rng, vp.fwhm, vp.beta, cfg.shape)
    yy, xx = np.mgrid[:ny, :nx]
    gx, gy = rng.uniform(-0.05, 0.05, 2)  # this detector's sky gradient
    sky = vp.sky * (1 + gx * (2 * xx / (nx - 1) - 1) + gy * (2 * yy / (ny - 1) - 1))
    sky_sigma = np.sqrt(vp.sky + cfg.read_noise**2)
    stars = scene["stars"]
    points = list(zip(stars["x"], stars["y"], star_mag(stars, vp.index)))
    points += list(zip(transients["x"], transients["y"], transient_mag(transients, vp.index)))
    model = render(cfg.shape, s_psf, points, scene["galaxies"], vp.zp, vp.offset, sky_sigma)
    expect = model + sky
    variance = expect + cfg.read_noise**2
    image = rng.poisson(expect).astype(np.float64) + rng.normal(0, cfg.read_noise, cfg.shape)
    mask = np.zeros(cfg.shape, np.int32)
    sat = expect >= cfg.saturation
    image[sat] = cfg.saturation
    mask[sat] |= mask_bits("SAT")
    add_cosmic_rays(image, mask, rng, cfg.cr_density, expect, cfg.read_noise)
    for rows, cols in bad_columns(cfg.shape, cfg.bad_columns,
                                  np.random.default_rng([seed, detector])):
        image[rows, cols] *= 0.3
        mask[rows, cols] |= mask_bits("BAD")
    info = ExposureInfo(visit=vp.visit, detector=detector, band=band, exptime=30.0,
                        mjd=vp.mjd, extra={"GAIN": 1.0})
    science = Exposure.from_arrays(image, mask, variance, psf=s_psf.model(_psf_model_size(cfg)),
                                   wcs=make_wcs(cfg.shape, detector, vp.offset), zero_point=vp.zp,
                                   info=info)
    return science, s_psf, variance


def bad_columns(shape, n: int, rng) -> list[tuple[slice, slice]]:
    """A detector's ``n`` bad columns as (rows, columns) slices: the first whole and one
    pixel wide; the others each whole or running from a random row to the readout edge,
    one or two pixels wide (a detector's defects, the same in every visit)."""
    ny, nx = shape
    out = []
    for k in range(n):
        x = int(rng.integers(nx // 8, nx - nx // 8))
        width = 1 if k == 0 else int(rng.integers(1, 3))
        start = 0 if k == 0 or rng.random() < 0.5 else int(rng.integers(0, ny // 2))
        out.append((slice(start, ny), slice(x, x + width)))
    return out


def _template_variance_on(template, vp: _Visit, cfg: SimConfig) -> np.ndarray:
    """The template's variance moved onto this science grid (integer shift), in science
    units."""
    scale = 10 ** (0.4 * (vp.zp - cfg.zero_point))  # science counts per template count
    ox, oy = int(round(vp.offset[0])), int(round(vp.offset[1]))
    return np.roll(np.roll(template.variance, oy, axis=0), ox, axis=1) * scale**2


def _science_fakes(cfg: SimConfig, science, diff_var, vp: _Visit, tf_truth, rng):
    """Fakes in the science (positive in the difference), apart from the template's, their
    S/N set on the difference's variance ``diff_var``."""
    avoid = np.column_stack([tf_truth["x"] + vp.offset[0], tf_truth["y"] + vp.offset[1]])
    n_pair = int(round(cfg.fake_pair_fraction * cfg.fakes_per_science))
    alone = _place(rng, cfg.fakes_per_science - n_pair, cfg.shape, 40, cfg.fake_separation,
                   avoid)
    fx, fy = np.vstack([alone, _companions(rng, alone, n_pair, _arcsec_to_px(vp.fwhm),
                                           cfg.shape, 40)]).T
    fflux = [_flux_for_snr(science.psf, x, y, s, diff_var)
             for x, y, s in zip(fx, fy, _target_snr(rng, len(fx)))]
    return inject(science, Table({"x": fx, "y": fy, "flux": fflux}), rng=rng)


def _truth_table(band, vp: _Visit, science, kind, image_kind, xs, ys, dflux, snr, snr_image,
                 on_gal, optimal) -> Table:
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    ra, dec = science.wcs.pixel_to_world_values(xs, ys)
    with np.errstate(divide="ignore"):
        mag = vp.zp - 2.5 * np.log10(np.abs(dflux))
    n = len(xs)
    return Table({"kind": np.full(n, kind, "U9"), "image": np.full(n, image_kind, "U8"),
                  "band": np.full(n, band, "U4"), "visit": np.full(n, vp.visit),
                  "detector": np.full(n, science.info.detector), "x": xs, "y": ys, "ra": ra,
                  "dec": dec, "flux": np.asarray(dflux, float), "mag": mag,
                  "snr": np.asarray(snr, float), "snr_image": np.asarray(snr_image, float),
                  "optimal_snr": np.asarray(optimal, float),
                  "on_galaxy": np.asarray(on_gal, bool)})


def _visit_truth(cfg: SimConfig, band, vp: _Visit, science, t_var_here, f_truth,
                 tf_truth, transients, stars, t_psf) -> list:
    """Truth rows of one visit: every change in its difference, positions in its pixels,
    ``flux`` the signed change in science counts, ``snr`` its S/N through the science PSF
    over both images' variance, ``optimal_snr`` proper image subtraction's S/N for it (both
    PSFs, each image's variance: the most any subtraction finds)."""
    ny, nx = cfg.shape
    diff_var = np.asarray(science.variance, np.float64) + t_var_here
    size = _psf_model_size(cfg)

    def optimal(x, y, flux):
        return optimal_snr_at(flux, science.psf.image_at(x, y),
                              t_psf.image_at(x - vp.offset[0], y - vp.offset[1], size),
                              science.variance, t_var_here, x, y)

    def rows(kind, image_kind, xs, ys, dflux, snr_image, on_gal):
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        snr = [optimal_snr(abs(f), *_stamp_var(science.psf, x, y, diff_var))
               for x, y, f in zip(xs, ys, dflux)]
        best = [optimal(x, y, f) for x, y, f in zip(xs, ys, dflux)]
        return _truth_table(band, vp, science, kind, image_kind, xs, ys, dflux, snr, snr_image,
                            on_gal, best)

    scale = 10 ** (0.4 * (vp.zp - cfg.zero_point))
    out = [rows("fake", "science", f_truth["x"], f_truth["y"], f_truth["flux"], f_truth["snr"],
                np.zeros(len(f_truth), bool)),
           rows("fake", "template", tf_truth["x"] + vp.offset[0], tf_truth["y"] + vp.offset[1],
                -np.asarray(tf_truth["flux"]) * scale, tf_truth["snr"],
                np.zeros(len(tf_truth), bool))]
    tmag = transient_mag(transients, vp.index)
    live = np.isfinite(tmag)
    tflux = 10 ** (-0.4 * (tmag[live] - vp.zp))
    txs = np.asarray(transients["x"])[live] + vp.offset[0]
    tys = np.asarray(transients["y"])[live] + vp.offset[1]
    out.append(rows("transient", "science", txs, tys, tflux,
                    [optimal_snr(f, *_stamp_var(science.psf, x, y, science.variance))
                     for x, y, f in zip(txs, tys, tflux)],
                    np.asarray(transients["on_galaxy"])[live]))
    vs = np.asarray(stars["amplitude"]) > 0
    vflux = (10 ** (-0.4 * (star_mag(stars, vp.index)[vs] - vp.zp))
             - 10 ** (-0.4 * (np.asarray(stars["mag"])[vs] - vp.zp)))
    vxs = np.asarray(stars["x"])[vs] + vp.offset[0]
    vys = np.asarray(stars["y"])[vs] + vp.offset[1]
    inside = (vxs > 0) & (vxs < nx - 1) & (vys > 0) & (vys < ny - 1)
    out.append(rows("variable", "science", vxs[inside], vys[inside], vflux[inside],
                    [optimal_snr(abs(f), *_stamp_var(science.psf, x, y, science.variance))
                     for x, y, f in zip(vxs[inside], vys[inside], vflux[inside])],
                    np.zeros(inside.sum(), bool)))
    return out


def _manifest_row(cfg: SimConfig, band, detector, vp: _Visit, s_rel, t_rel, s_psf, t_psf):
    ny, nx = cfg.shape
    return {"visit": vp.visit, "detector": detector, "band": band,
            "science": str(s_rel), "template": str(t_rel),
            "science_fwhm": s_psf.params(nx / 2, ny / 2)[0] * ARCSEC_PER_PIXEL,
            "template_fwhm": t_psf.params(nx / 2, ny / 2)[0] * ARCSEC_PER_PIXEL,
            "psf_beta": vp.beta, "zero_point": vp.zp, "mjd": vp.mjd,
            "template_zero_point": cfg.zero_point,
            "offset_x": vp.offset[0], "offset_y": vp.offset[1]}


def _static_catalogue(scene, band, detector) -> Table:
    sc = scene["stars"]["x", "y", "mag", "amplitude"].copy()
    sc["kind"] = "star"
    gc = scene["galaxies"]["x", "y", "mag"].copy()
    gc["amplitude"] = 0.0
    gc["kind"] = "galaxy"
    static = vstack([sc, gc])
    static["band"], static["detector"] = band, detector
    return static


def _stamp_var(psf, x, y, variance):
    """PSF stamp at (x, y) and the variance pixels under it (cropped at the edges)."""
    stamp, y0, x0 = psf_stamp(psf, x, y)
    img_sl, st_sl = overlap_slices(variance.shape, y0, x0, *stamp.shape)
    return stamp[st_sl], np.asarray(variance[img_sl], float)


def _run(args):
    return _simulate_detector(*args)


def simulate(outdir, preset: str | SimConfig = "demo", seed: int = 0,
             workers: int | None = None) -> Table:
    """Write a simulated survey under ``outdir``; return its manifest table.

    Files: ``manifest.ecsv`` (one row per science exposure), ``truth.ecsv`` (fakes,
    transients, variables: one row per change per science exposure, positions in that
    exposure's pixels, ``flux`` the signed change in science counts, ``snr`` its expected
    optimal SNR in the difference, ``snr_image`` in the image it went into),
    ``scene.ecsv`` (static stars and galaxies, template pixels), ``templates/`` and
    ``science/`` FITS. The same seed gives identical files.
    """
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    jobs = [(cfg, band, det, seed, outdir) for band in cfg.visits for det in cfg.detectors]
    if workers is None:
        workers = min(len(jobs), 2)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_run, jobs))
    else:
        results = [_run(j) for j in jobs]
    truth = vstack([r[0] for r in results])
    manifest = Table(rows=[row for r in results for row in r[1]])
    manifest.sort(["band", "visit", "detector"])
    scene = vstack([r[2] for r in results])
    truth["id"] = np.arange(len(truth))
    manifest.meta["preset"], manifest.meta["seed"] = cfg.name, seed
    for name, table in (("manifest.ecsv", manifest), ("truth.ecsv", truth), ("scene.ecsv", scene)):
        with atomic_path(outdir / name) as tmp:
            table.write(tmp, format="ascii.ecsv", overwrite=True)
    return manifest
