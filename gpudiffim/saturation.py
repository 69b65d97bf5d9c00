"""Saturated stars: each core given the PSF fitted to its unsaturated wings.

A saturated pixel holds the full-well level, not the star: convolved as it is, the core's
missing flux spreads as far as the kernel reaches, so a convolution grows SAT by the box
holding nearly all of the kernel's weight (:func:`~gpudiffim.convolve.grow_convolved_mask`)
and once more for the wings. Here each group of touching SAT pixels is one star: its flux,
centre and local background are fitted with its PSF model to the unsaturated ring around
it, and its SAT pixels take the model's value (never less than the value they hold). They
keep SAT and gain INTRP, so a convolution grows them by the kernel's core only, TOUCHED
beyond. The star's light is matched in the difference only as well as the kernel reaches
its wings: :func:`wing_variance` adds that error (``wingError`` times the star's light)
to the difference's variance, where no FFT spreads it. A core the fit cannot model (too
few ring pixels, too large for the PSF model, a fit that fails) keeps its SAT alone and
grows as before.
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .exposure import DETECTION_EXCLUDED, MODELLED_CORE_PLANES, Exposure, mask_bits
from .inject import shift_image
from .options import configclass, option
from .psf import psf_stack
from .stamps import gather_stamps

__all__ = ["SaturatedCoreConfig", "saturated_stars", "fit_saturated_cores",
           "model_saturated_cores", "difference_stars", "wing_variance", "halo_rings",
           "added_at"]

#: planes whose pixels the ring fit does not use (besides SAT, which it never does)
_RING_EXCLUDED = ("NO_DATA", "BAD", "CR", "EDGE", "SUSPECT", "INTRP", "SAT_TEMPLATE")


@configclass
class SaturatedCoreConfig:
    """How saturated cores are modelled before a convolution."""

    doModelCores: bool = option(True, "give saturated cores the PSF fitted to their "
                                      "unsaturated wings")
    ringWidth: float = option(2.0, "width of the ring fitted around each core, in FWHM of "
                                   "the PSF (at most to the PSF model's edge)")
    minRingPixels: int = option(16, "fewest usable ring pixels a fit needs")
    maxShift: float = option(2.0, "largest move of the fitted centre from the core's, pixels")
    wingError: float = option(1.0, "the error of a modelled star's light in the difference, a "
                                   "fraction of it (the kernel does not reach its wings)")
    haloRadius: float = option(15.0, "how far each modelled star's ring is taken out of the "
                                     "difference, in FWHM of the PSF")
    maxWingVariance: float = option(100.0, "most variance that error adds, in units of the "
                                           "pixel's own; past it the pixel is the star's "
                                           "(SAT)")
    nIter: int = option(3, "centre refinements of the fit")


def saturated_stars(flat_index: np.ndarray, shape) -> Table:
    """Group the flat indices of saturated pixels into stars (8-connected groups).

    Returns a Table with one row per star: ``x``, ``y`` (the core's mean position),
    ``radius`` (its farthest pixel from there, plus half a pixel), ``npix``, and the fit's
    ``flux``, ``background`` (NaN) and ``modelled`` (False) for
    :func:`model_saturated_cores` to fill; its ``meta["labels"]`` gives each input pixel's
    row.
    """
    flat_index = np.asarray(flat_index, np.int64)
    nx = int(shape[1])
    ys, xs = np.divmod(flat_index, nx)
    n = len(flat_index)
    if n == 0:
        return _stars_table(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, np.int64),
                            np.zeros(0, np.int64))
    # neighbours: each pixel and the 8 around it, found by a sorted lookup of flat indices
    order = np.argsort(flat_index)
    sorted_idx = flat_index[order]
    rows, cols = [], []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            ny_, nx_ = ys + dy, xs + dx
            inside = (ny_ >= 0) & (nx_ >= 0) & (nx_ < nx)
            target = ny_ * nx + nx_
            pos = np.clip(np.searchsorted(sorted_idx, target), 0, n - 1)
            hit = inside & (sorted_idx[pos] == target)
            rows.append(np.flatnonzero(hit))
            cols.append(order[pos[hit]])
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r)), (r, c)), shape=(n, n))
    count, labels = connected_components(graph, directed=False)
    npix = np.bincount(labels, minlength=count)
    cx = np.bincount(labels, xs, count) / npix
    cy = np.bincount(labels, ys, count) / npix
    d2 = (xs - cx[labels]) ** 2 + (ys - cy[labels]) ** 2
    radius = np.sqrt(np.maximum.reduceat(d2[np.argsort(labels, kind="stable")],
                                         np.r_[0, np.cumsum(npix)[:-1]])) + 0.5
    return _stars_table(cx, cy, radius, npix, labels)


def _stars_table(x, y, radius, npix, labels) -> Table:
    """The stars' table, the fit's columns (``flux``, ``background``, ``modelled``) not
    yet filled."""
    t = Table({"x": x, "y": y, "radius": radius, "npix": npix,
               "flux": np.full(len(x), np.nan), "background": np.full(len(x), np.nan),
               "modelled": np.zeros(len(x), bool)})
    t.meta["labels"] = labels
    return t


def fit_saturated_cores(image, variance, usable, psf, x, y, config: SaturatedCoreConfig):
    """Fit each star's flux, centre and local background to its ring pixels.

    Parameters
    ----------
    image, variance : ndarray
        Host (n, size, size) stamps centred on the rounded core positions.
    usable : ndarray
        Host (n, size, size) boolean: the stamp pixels the fit may use (unsaturated, not
        next to a saturated pixel, unmasked, inside the ring).
    psf : PSF model
        The exposure's.
    x, y : ndarray
        The cores' positions (the fit starts there).
    config : SaturatedCoreConfig

    Returns
    -------
    flux, x, y, background, ok : ndarray
        Per star; ``ok`` where the fit stands (enough ring pixels, a positive finite flux,
        a centre within ``maxShift`` of the core's).
    """
    n, size = image.shape[0], image.shape[-1]
    x0, y0 = np.asarray(x, float), np.asarray(y, float)
    cx, cy = x0.copy(), y0.copy()
    ix, iy = np.floor(x0 + 0.5), np.floor(y0 + 0.5)  # the stamps' centres
    w = np.where(usable & (variance > 0), 1.0 / np.where(variance > 0, variance, 1.0), 0.0)
    for _ in range(max(1, config.nIter)):
        basis = _psf_design(psf, ix, iy, cx - ix, cy - iy, size)
        design = np.concatenate([basis, np.ones((n, 1, size, size))], axis=1)
        normal, rhs = _normal_equations(design, w, image)
        normal += np.eye(4) * 1e-12 * np.trace(normal, axis1=1, axis2=2)[:, None, None]
        with np.errstate(all="ignore"):
            coeffs = np.linalg.solve(normal, rhs[..., None])[..., 0]
            step_x = np.clip(-coeffs[:, 1] / coeffs[:, 0], -1.0, 1.0)
            step_y = np.clip(-coeffs[:, 2] / coeffs[:, 0], -1.0, 1.0)
        good = np.isfinite(step_x) & np.isfinite(step_y)
        cx = np.where(good, cx + step_x, cx)
        cy = np.where(good, cy + step_y, cy)
    # the flux and background at the final centre, derivatives left out
    p = _psf_design(psf, ix, iy, cx - ix, cy - iy, size)[:, 0]
    normal, rhs = _normal_equations(np.stack([p, np.ones_like(p)], axis=1), w, image)
    with np.errstate(all="ignore"):
        det = normal[:, 0, 0] * normal[:, 1, 1] - normal[:, 0, 1] ** 2
        flux = (normal[:, 1, 1] * rhs[:, 0] - normal[:, 0, 1] * rhs[:, 1]) / det
        background = (normal[:, 0, 0] * rhs[:, 1] - normal[:, 0, 1] * rhs[:, 0]) / det
    shift = np.hypot(cx - x0, cy - y0)
    n_ring = usable.reshape(n, -1).sum(axis=1)
    ok = (np.isfinite(flux) & (flux > 0) & np.isfinite(background)
          & (n_ring >= config.minRingPixels) & (shift <= config.maxShift))
    return flux, cx, cy, background, ok


def _normal_equations(design, weight, image):
    """Weighted least squares per stamp: the normal matrices (n, k, k) and right-hand
    sides (n, k) of ``design`` (n, k, size, size) against ``image`` (n, size, size)."""
    n, k = design.shape[:2]
    a = design.reshape(n, k, -1)
    aw = a * weight.reshape(n, 1, -1)
    return (np.einsum("nip,njp->nij", aw, a),
            np.einsum("nip,np->ni", aw, image.reshape(n, -1)))


def _psf_design(psf, ix, iy, sx, sy, size):
    """The PSF on (n, size, size) stamps centred on the integer pixels (ix, iy), its centre
    offset by (sx, sy) from theirs, and its x and y derivatives: (n, 3, size, size)."""
    centred = psf_stack(psf, np.asarray(ix, float), np.asarray(iy, float), size)
    p = shift_image(centred, sx, sy)
    dy, dx = np.gradient(p, axis=(1, 2))
    return np.stack([p, dx, dy], axis=1)


def model_saturated_cores(exposure: Exposure, backend, config: SaturatedCoreConfig | None = None,
                          n_saturated: int | None = None) -> tuple[Exposure, Table]:
    """``exposure`` (on the backend) with its saturated cores modelled, and its stars.

    Parameters
    ----------
    exposure : Exposure
        On the backend, with a PSF model and a SAT plane.
    backend : Backend
    config : SaturatedCoreConfig, optional
    n_saturated : int, optional
        How many pixels are SAT, when already read (else counted: a device read).

    Returns
    -------
    exposure : Exposure
        Modelled cores hold the fitted PSF (at least their own value), flagged SAT | INTRP.
    stars : Table
        One row per saturated star: ``x``, ``y``, ``radius``, ``npix`` of its core,
        ``flux``, ``background`` and ``modelled``.
    """
    config = config or SaturatedCoreConfig()
    xp = backend.xp
    if (not config.doModelCores or "SAT" not in exposure.mask_planes
            or exposure.psf is None):
        return exposure, saturated_stars(np.zeros(0, np.int64), exposure.shape)
    sat = (exposure.mask & exposure.bit("SAT")) != 0
    if n_saturated is None:
        n_saturated = int(backend.scalar(xp.sum(xp.astype(sat, xp.int64))))
    if n_saturated == 0:
        return exposure, saturated_stars(np.zeros(0, np.int64), exposure.shape)
    flat = backend.to_host(backend.true_indices(sat, n_saturated))  # one read
    stars = saturated_stars(flat, exposure.shape)
    ny, nx = exposure.shape
    psf_size = min(exposure.psf.image_at((nx - 1) / 2, (ny - 1) / 2).shape)
    fwhm = float(np.mean(exposure.psf.fwhm((nx - 1) / 2, (ny - 1) / 2)))
    # the ring as far as the PSF model reaches, at least 3 pixels past the core's
    reach = np.minimum(np.asarray(stars["radius"]) + max(3.0, config.ringWidth * fwhm),
                       psf_size // 2 - 1)
    fits = reach >= np.asarray(stars["radius"]) + 3.0
    if not fits.any():
        return exposure, stars
    rows = np.flatnonzero(fits)
    size = 2 * int(np.ceil(reach[rows].max())) + 1
    centres = _centres(np.asarray(stars["x"])[rows], np.asarray(stars["y"])[rows])
    outside = exposure.bit("NO_DATA") if "NO_DATA" in exposure.mask_planes else 0
    img, var, mask = backend.to_host_all(  # one read; pixels off the detector: no variance
        *(gather_stamps(backend, plane, centres, size, fill=fill) for plane, fill in
          ((exposure.image, 0), (exposure.variance, 0), (exposure.mask, outside))))
    img, var, mask = img.astype(float), var.astype(float), mask.astype(np.int64)
    usable = _ring_pixels(exposure, mask, stars["x"][rows] - centres[:, 0],
                          stars["y"][rows] - centres[:, 1], reach[rows]) & (var > 0)
    flux, cx, cy, bg, ok = fit_saturated_cores(img, var, usable, exposure.psf,
                                               stars["x"][rows], stars["y"][rows], config)
    stars["flux"][rows], stars["background"][rows] = flux, bg
    stars["x"][rows[ok]], stars["y"][rows[ok]] = cx[ok], cy[ok]
    stars["modelled"][rows[ok]] = True
    if not ok.any():
        return exposure, stars
    return (_filled(exposure, stars, flat, rows[ok], centres[ok], (img[ok], mask[ok]), backend),
            stars)


def _ring_pixels(exposure, mask, dx, dy, reach):
    """The stamp pixels a ring fit uses: within ``reach`` of the core's centre, no SAT
    within a pixel, none of :data:`_RING_EXCLUDED`."""
    size = mask.shape[-1]
    half = size // 2
    grown = ndimage.binary_dilation((mask & exposure.bit("SAT")) != 0,
                                    structure=np.ones((1, 3, 3), bool))
    planes = [p for p in _RING_EXCLUDED if p in exposure.mask_planes]
    masked = (mask & exposure.bit(*planes)) != 0 if planes else np.zeros_like(grown)
    off = np.arange(size) - half
    r2 = ((off[None, None, :] - np.asarray(dx)[:, None, None]) ** 2
          + (off[None, :, None] - np.asarray(dy)[:, None, None]) ** 2)
    return ~grown & ~masked & (r2 <= np.asarray(reach)[:, None, None] ** 2)


def _filled(exposure, stars, flat, rows, centres, stamps, backend):
    """The exposure with the SAT pixels of the stars ``rows`` given their model (``stamps``:
    their image and mask stamps, centred on ``centres``)."""
    labels = stars.meta["labels"]
    keep = np.isin(labels, rows)
    index = flat[keep]
    which = np.searchsorted(rows, labels[keep])  # rows is sorted: its position per pixel
    img, mask = stamps
    size = img.shape[-1]
    half = size // 2
    ys, xs = np.divmod(index, exposure.shape[1])
    at = (which, ys - centres[which, 1] + half, xs - centres[which, 0] + half)
    x, y = np.asarray(stars["x"])[rows], np.asarray(stars["y"])[rows]
    star = _psf_design(exposure.psf, centres[:, 0], centres[:, 1], x - centres[:, 0],
                       y - centres[:, 1], size)[:, 0]
    star = star * np.asarray(stars["flux"])[rows][:, None, None]
    value = star[at]
    filled = np.maximum(value + np.asarray(stars["background"])[rows][which], img[at])
    new_mask = mask[at] | exposure.bit(*MODELLED_CORE_PLANES)
    return exposure.replace(image=backend.put(exposure.image, index, filled),
                            mask=backend.put(exposure.mask, index, new_mask))


def difference_stars(science: Table, template: Table, template_to_science: float,
                     match_radius: float = 3.0) -> Table:
    """The modelled stars of both inputs in the science's flux units (``x``, ``y``,
    ``flux``): the science's, and the template's not within ``match_radius`` pixels of
    one, their fluxes times ``template_to_science``."""
    cols = ("x", "y", "flux")
    parts = []
    for t, factor in ((science, 1.0), (template, template_to_science)):
        t = t[np.asarray(t["modelled"], bool)]
        parts.append(np.stack([np.asarray(t["x"], float), np.asarray(t["y"], float),
                               np.asarray(t["flux"], float) * factor], axis=1).reshape(-1, 3))
    sci, tmpl = parts
    if len(sci) and len(tmpl):
        d2 = ((tmpl[:, None, :2] - sci[None, :, :2]) ** 2).sum(axis=2)
        tmpl = tmpl[d2.min(axis=1) > match_radius**2]
    both = np.concatenate([sci, tmpl])
    return Table({c: both[:, i] for i, c in enumerate(cols)})


def wing_variance(variance, mask, stars: Table, psf, config: SaturatedCoreConfig, backend,
                  score: bool = False) -> tuple:
    """``variance`` plus ``(wingError * flux * profile)**2`` around each of ``stars``, and
    ``mask`` with SAT where that would exceed ``maxWingVariance`` times the variance there.

    A modelled star's light in the difference is matched only as well as the kernel
    reaches its wings, so its own error goes with it; where that error is far above the
    noise, the pixel is the star's (SAT: no detection seeds there), and its variance takes
    the cap (a detection's filters would otherwise spread values 1e7 times the sky's along
    their FFTs' rows). ``profile``: ``psf`` (the difference's) at the star, of unit sum, or
    of unit peak for a score image (whose value at a source is its flux).
    """
    if not len(stars) or config.wingError <= 0:
        return variance, mask
    xp = backend.xp
    ny, nx = variance.shape
    x, y = np.asarray(stars["x"], float), np.asarray(stars["y"], float)
    size = min(psf.image_at((nx - 1) / 2, (ny - 1) / 2).shape)
    profile = psf_stack(psf, x, y, size)
    if score:
        profile = profile / profile.max(axis=(1, 2), keepdims=True)
    add = (config.wingError * np.asarray(stars["flux"], float)[:, None, None] * profile) ** 2
    ys, xs = _stamp_grid(_centres(x, y), size)
    inside = (ys >= 0) & (ys < ny) & (xs >= 0) & (xs < nx) & (add > 0)
    index, summed = _summed_at(ys, xs, add, inside, nx)
    added = backend.asarray(summed)
    at = backend.asarray(index, np.int64)
    held = xp.take(xp.reshape(variance, (-1,)), at)
    cap = config.maxWingVariance * held
    over = xp.astype(added, held.dtype) > cap
    held_mask = xp.take(xp.reshape(mask, (-1,)), at)
    sat = xp.astype(backend.asarray(mask_bits("SAT")), held_mask.dtype)
    return (backend.put(variance, index,
                        held + xp.where(over, cap, xp.astype(added, held.dtype))),
            backend.put(mask, index, xp.where(over, held_mask | sat, held_mask)))


def halo_rings(diff, mask, stars: Table, radius: int, backend, width: float = 2.0,
               min_pixels: int = 8) -> tuple:
    """Each star's ring in ``diff``: its azimuthal median profile out to ``radius`` pixels.

    The kernel does not reach a bright star's far wings, so where the two PSFs' wings
    differ the star leaves a ring in the difference, below the noise per pixel but
    coherent over thousands of them. Its median over each annulus (``width`` pixels, usable
    pixels only, at least ``min_pixels`` of them) is that ring and not a source on it, which
    covers a small part of its annulus. Returns host ``(index, ring)``: flat pixel indices
    and the rings' summed value there.
    """
    if not len(stars) or radius < 1:
        return np.zeros(0, np.int64), np.zeros(0)
    ny, nx = diff.shape
    size = 2 * int(radius) + 1
    x, y = np.asarray(stars["x"], float), np.asarray(stars["y"], float)
    centres = _centres(x, y)
    values, bits = backend.to_host_all(  # one read
        gather_stamps(backend, diff, centres, size, fill=0),
        gather_stamps(backend, mask, centres, size, fill=mask_bits("NO_DATA")))
    ys, xs = _stamp_grid(centres, size)
    r = np.hypot(xs - x[:, None, None], ys - y[:, None, None])
    usable = ((bits.astype(np.int64) & mask_bits(*DETECTION_EXCLUDED)) == 0) & (r <= radius)
    n_ann = int(np.ceil(radius / width)) + 1
    ann = np.minimum((r / width).astype(np.int64), n_ann - 1)
    labels = np.where(usable, np.arange(len(x))[:, None, None] * n_ann + ann, -1)
    groups = np.arange(len(x) * n_ann)
    counts = np.bincount(labels[usable], minlength=len(groups))
    medians = np.asarray(ndimage.median(values, labels, groups), float)
    medians[counts < min_pixels] = 0.0
    profile = np.nan_to_num(medians).reshape(len(x), n_ann)
    centre_r = (np.arange(n_ann) + 0.5) * width
    ring = np.stack([np.interp(r[i], centre_r, profile[i], right=0.0) for i in range(len(x))])
    return _summed_at(ys, xs, ring, usable & (ring != 0), nx)


def _centres(x, y) -> np.ndarray:
    """(n, 2) integer (x, y): the pixels holding positions ``x``, ``y``."""
    return np.stack([np.floor(x + 0.5), np.floor(y + 0.5)], axis=1).astype(np.int64)


def _stamp_grid(centres, size: int) -> tuple:
    """Frame row and column of every pixel of (n, size, size) stamps on ``centres``."""
    off = np.arange(size) - size // 2
    ys = centres[:, 1, None, None] + off[None, :, None]
    xs = centres[:, 0, None, None] + off[None, None, :]
    shape = (len(centres), size, size)
    return np.broadcast_to(ys, shape), np.broadcast_to(xs, shape)


def _summed_at(ys, xs, values, keep, nx: int) -> tuple:
    """``values`` of stamp pixels ``keep`` summed where stamps overlap: host flat frame
    indices (unique, ascending) and the sums there."""
    index, where = np.unique((ys * nx + xs)[keep], return_inverse=True)
    return index, np.bincount(where, values[keep], len(index))


def added_at(a, index, delta, backend):
    """``a`` with host ``delta`` added at its flat positions ``index`` (no repeats)."""
    xp = backend.xp
    at = backend.asarray(index, np.int64)
    held = xp.take(xp.reshape(a, (-1,)), at)
    return backend.put(a, index, held + xp.astype(backend.asarray(delta), held.dtype))
