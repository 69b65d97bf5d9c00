"""The noise model of a difference image, and every variance formula that follows from it.

The model, stated once. A difference (or score) image is a sum of filtered input images
plus the matching's own error::

    D = sum_p g_p * N_p + dk * I

* each input ``N_p`` (the science and the template) has independent pixel noise of
  variance ``V_p`` (its variance plane, NO_DATA pixels zeroed), and reaches ``D`` through
  a small filter ``g_p``: the decorrelation ``phi`` for the image left unconvolved,
  ``phi * k`` for the one convolved with the matching kernel ``k`` (divided by the kernel
  sum when the science is convolved, the pre-filter too for the score);
* ``dk * I`` is the kernel's error ``dk`` acting on the image it convolved, ``I``. For
  errors alike over the kernel's box its variance is a scale times ``I^2`` summed over that
  box (the *residual power*); the scale is measured on each difference around its kernel
  sources (:func:`residual_scale`), as ZOGY (Zackay et al. 2016) adds the like for
  registration and flux-scale errors;
* a misregistration ``delta`` of the template against the science leaves
  ``delta . grad(g_T * T)``, the template's gradient as it reaches the difference: for
  shifts of variance ``sigma^2`` per axis, a variance ``sigma^2 |grad(g_T * T)|^2`` (ZOGY's
  astrometric term) and a second-order one at bright stars' centres
  (:func:`registration_variance`). ``sigma^2`` is measured from the kernel sources' own
  residual shifts (:func:`registration_scale`); well-registered data give 0.

Then the variance of one pixel of ``D`` is ``sum_p (g_p^2 * V_p) + scale * power``
(:func:`convolved_variance`, :func:`decorrelated_variance`, :func:`score_variance`), and
that of any weighted sum of pixels ``sum w D`` is
``sum_p sum_m V_p(m) (w corr g_p)(m)^2 + scale * power * (sum w)^2``
(:func:`filtered_variance`): the variance plane alone holds no covariance, which the
photometry of a bright source, whose own photon noise went through the kernel, needs.

:class:`NoiseModel` carries the pieces from the subtraction to detection (which measures
the scale) and measurement (which uses it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.signal import fftconvolve

from .convolve import fft_convolve
from .spatial import quadratic_term_map
from .stamps import gather_stamps
from .stats import weighted_median

__all__ = ["NoiseModel", "convolved_variance", "decorrelated_variance", "score_variance",
           "filtered_variance", "residual_power", "residual_scale", "position_residual_scale",
           "registration_gradients", "registration_scale", "registration_variance",
           "shared_noise_correlation"]


@dataclass(frozen=True, eq=False)
class NoiseModel:
    """How the inputs' noise and the matching's error reach a difference image.

    Attributes
    ----------
    paths : tuple of (array, ndarray)
        Per input image, its variance plane (device, NO_DATA zeroed) and the small host
        filter it reaches the difference through, the difference's units folded in. Empty
        for a score image, whose flux is one pixel's value.
    residual_power : array or None
        The image the kernel convolved, less its sky, squared and summed over the kernel's
        box (device).
    calibrate_at : ndarray or None
        Host (n, 2) positions of the kernel sources, where the residual scale is measured.
    box : int
        The kernel's side (pixels): the box the residual power and its calibration use.
    residual_scale : float
        Variance per unit of residual power; 0 until detection measures it.
    registration : tuple
        The template (device, sky removed, masked pixels 0) and the small host filter it
        reaches the difference through (for zogy's score its whole path: the score is
        matched-filtered already); empty for preconvolve's score.
    correlation : ndarray or None
        The difference's noise autocorrelation (host, odd, 1 at its centre) where its
        pixels' noise is not independent (zogy's score), for the registration fit's noise.
    """

    paths: tuple = ()
    residual_power: object = None
    calibrate_at: np.ndarray | None = None
    box: int = 0
    residual_scale: float = 0.0
    registration: tuple = ()
    correlation: np.ndarray | None = None

    def with_residual_scale(self, scale: float) -> "NoiseModel":
        """The same model with the residual scale measured on its difference."""
        return replace(self, residual_scale=float(scale))


def convolved_variance(variance, kernel, backend, terms=None, spatial=None, phi=None):
    """``variance`` convolved with the square of ``kernel`` (after ``phi`` when given).

    With the spatial ``terms`` (the kernel's term kernels) and ``spatial`` (their bbox and
    order) it is scaled by that squared kernel's sum over the detector relative to its
    value for ``kernel``: ``sum (phi * k(x, y))^2`` is a quadratic form in the spatial
    weights whose matrix is the term kernels' inner products, so a kernel that carries more
    power in one corner than at the centre puts more of the convolved image's noise there.
    """
    if phi is not None:
        kernel = fftconvolve(phi, kernel)
        terms = None if terms is None else np.array([fftconvolve(phi, t) for t in terms])
    conv = fft_convolve(variance, backend.to_device(kernel**2, np.float32), backend)
    if terms is None:
        return conv
    gram = np.tensordot(terms, terms, axes=([1, 2], [1, 2]))
    return conv * quadratic_term_map(gram, variance.shape, *spatial, backend) / float(
        np.sum(kernel**2))


def decorrelated_variance(backend, target_var, source_var, phi, kernel, terms=None,
                          spatial=None):
    """Per-pixel variance of ``phi * (target - kernel * source)``:
    ``phi^2 * V_target + (phi * k)^2 * V_source`` (``phi`` None: none applied).

    In flat sky it equals the white value the decorrelation aims at; around bright sources
    it follows their photon noise as the convolutions spread it. With ``terms`` and
    ``spatial`` the second part follows the kernel's power across the detector.
    """
    through = (target_var if phi is None else
               fft_convolve(target_var, backend.to_device(phi**2, np.float32), backend))
    return through + convolved_variance(source_var, kernel, backend, terms, spatial, phi)


def score_variance(backend, science_var, template_var, prefilter, phi, kernel, terms, spatial,
                   filter_template: bool):
    """Per-pixel variance of the score ``phi * (P * N - k * R)``: the science through the
    pre-filter ``P`` (and ``phi``), the template through the fitted kernel (and ``phi``; and
    ``P`` too when ``filter_template``, the kernel having been fitted in the science's own
    space)."""
    phi_sci = prefilter if phi is None else fftconvolve(phi, prefilter)
    return (fft_convolve(science_var, backend.to_device(phi_sci**2, np.float32), backend)
            + convolved_variance(template_var, kernel, backend, terms, spatial,
                                 phi_sci if filter_template else phi))


def filtered_variance(backend, weights, paths, xs, ys):
    """Variance of ``sum(weights * D)`` per stamp, ``weights`` (n, S, S) centred on (xs, ys),
    for the ``paths`` of a :class:`NoiseModel`: ``sum_p sum_m V_p(m) (w corr g_p)(m)^2``
    (each input pixel's noise reaches every stamp pixel its filter spreads it to)."""
    xp = backend.xp
    n, S = weights.shape[0], weights.shape[-1]
    total = backend.zeros((n,), dtype=xp.float32)
    centres = np.column_stack([xs, ys]).astype(np.int64)
    for plane, g in paths:
        G = g.shape[0]
        L = S + G - 1
        edge = (G - 1) // 2
        zc = backend.zeros((n, S, edge), dtype=weights.dtype)
        wide = xp.concat([zc, weights, zc], axis=2)
        zr = backend.zeros((n, edge, L), dtype=weights.dtype)
        wide = xp.concat([zr, wide, zr], axis=1)
        spread = fft_convolve(wide, backend.to_device(np.flip(g), np.float32), backend)
        v = gather_stamps(backend, backend.asarray(plane), centres, L, 0.0)
        total = total + xp.sum(xp.astype(v, xp.float32) * spread * spread, axis=(1, 2))
    return total


def residual_power(backend, image, size: int, factor: int = 4, variance=None):
    """``image^2`` summed over a box of about ``size`` pixels around each pixel, on a grid
    of ``factor``-pixel blocks (a smooth map, a third of the cost of the full-resolution
    box filter). With ``variance`` (the image's), its noise is taken out first (``image^2
    - variance``, the sum kept >= 0): the power is the sources', and empty sky has none."""
    xp = backend.xp
    ny, nx = image.shape
    sq = image * image
    if variance is not None:
        sq = sq - xp.astype(variance, sq.dtype)
    py, px = -ny % factor, -nx % factor
    if py:
        sq = xp.concat([sq, backend.zeros((py, nx), dtype=sq.dtype)], axis=0)
    if px:
        sq = xp.concat([sq, backend.zeros((sq.shape[0], px), dtype=sq.dtype)], axis=1)
    Y, X = sq.shape
    blocks = xp.sum(xp.reshape(sq, (Y // factor, factor, X // factor, factor)), axis=(1, 3))
    box = max(1, size // factor) | 1
    summed = backend.uniform_filter(blocks, box) * float(box * box)
    if variance is not None:
        summed = xp.clip(summed, 0.0, None)
    return xp.repeat(xp.repeat(summed, factor, axis=0), factor, axis=1)[:ny, :nx]


def residual_scale(backend, image, var, power, good, positions, box: int) -> float:
    """How much variance the matching's own error leaves per unit of ``power``.

    Around each calibration star the (filtered) difference's excess over its noise,
    ``sum (image^2 - var)``, against ``sum power``, in boxes of ``box`` pixels; the scale
    is the brightness-weighted median of those ratios (a variable star among them does not
    move it), 0 where the difference is as quiet as its noise.
    """
    xp = backend.xp
    p = _inside(positions, image.shape, box // 2)
    if box < 1 or not len(p):
        return 0.0
    w = xp.astype(gather_stamps(backend, good, p, box), xp.float64)
    excess = (xp.astype(gather_stamps(backend, image, p, box), xp.float64) ** 2
              - xp.astype(gather_stamps(backend, var, p, box), xp.float64))
    e, pw = backend.to_host_all(  # one device read
        xp.sum(xp.reshape(excess * w, (w.shape[0], -1)), axis=1),
        xp.sum(xp.reshape(xp.astype(gather_stamps(backend, power, p, box), xp.float64) * w,
                          (w.shape[0], -1)), axis=1))
    use = pw > 0
    if not use.any():
        return 0.0
    return max(0.0, weighted_median(e[use] / pw[use], pw[use]))


def position_residual_scale(backend, image, var, good, power, positions,
                            psf_image) -> float:
    """How far the matching's own error moves a centroid, per unit of ``power``: position
    variance (pixels^2) times flux^2.

    At each calibration star (static: the difference holds only the subtraction's
    residual there) the residual's dipole moment along x and y, the stamp correlated with
    the PSF's derivative over that derivative's own power (the shift a matched-filter
    centroid takes, times the source's flux), squared, less what the noise alone gives it;
    against the residual power there. The brightness-weighted median of the ratios, 0
    where the residual has no dipole beyond its noise.
    """
    xp = backend.xp
    nx = image.shape[1]
    psf = np.asarray(psf_image, np.float64)
    h = psf.shape[0] // 2
    p = _inside(positions, image.shape, h)
    if not len(p):
        return 0.0
    size = 2 * h + 1
    gy, gx = np.gradient(psf / psf.sum())
    weights = backend.to_device(np.stack([gx / np.sum(gx * gx), gy / np.sum(gy * gy)]),
                                np.float32)
    ok = xp.astype(gather_stamps(backend, good, p, size), xp.float32)
    d = xp.astype(gather_stamps(backend, image, p, size), xp.float32) * ok
    v = xp.astype(gather_stamps(backend, var, p, size), xp.float32) * ok
    n = len(p)
    d, v = xp.reshape(d, (n, 1, size, size)), xp.reshape(v, (n, 1, size, size))
    weights = xp.reshape(weights, (1, 2, size, size))
    moments = xp.sum(d * weights, axis=(2, 3))  # (n, 2): flux x pixels
    noise = xp.sum(v * weights * weights, axis=(2, 3))
    excess = xp.sum(moments * moments - noise, axis=1) / 2.0
    at = xp.take(xp.reshape(power, (-1,)), backend.to_device(p[:, 1] * nx + p[:, 0]))
    e, pw = backend.to_host(xp.stack([xp.astype(excess, xp.float64), xp.astype(at, xp.float64)]))
    use = pw > 0
    if not use.any():
        return 0.0
    return max(0.0, weighted_median(e[use] / pw[use], pw[use]))


def registration_gradients(backend, image, filt, positions, size: int):
    """x and y gradients (central differences) of ``filt * image`` as (n, size, size)
    stamps around ``positions`` (host (n, 2) integer x, y), each convolved on its own (no
    full-frame transform)."""
    filt = np.asarray(filt, np.float32)
    o = filt.shape[0] // 2
    conv = fft_convolve(gather_stamps(backend, image, positions, size + 2 + 2 * o, 0.0),
                        backend.to_device(filt), backend)
    return _derivatives(conv[:, o:o + size + 2, o:o + size + 2])[:2]


def registration_variance(backend, image, filt, scale: float):
    """Variance that shifts of ``scale`` pixels^2 per axis (Gaussian, independent) leave in
    ``filt * image``: ``scale |grad|^2 + scale^2 / 2 (Hxx^2 + 2 Hxy^2 + Hyy^2)`` (the first
    and second orders of the shifted image; the second matters at bright stars' centres,
    where the gradient vanishes). Central differences; 0 on the outermost pixels."""
    xp = backend.xp
    f = fft_convolve(image, backend.to_device(np.asarray(filt, np.float32)), backend)
    gx, gy, hxx, hyy, hxy = _derivatives(f)
    scale = float(scale)
    inner = scale * (gx * gx + gy * gy) + 0.5 * scale * scale * (hxx * hxx + 2.0 * hxy * hxy
                                                                  + hyy * hyy)
    ny, nx = f.shape
    inner = xp.concat([backend.zeros((ny - 2, 1), dtype=f.dtype), inner,
                       backend.zeros((ny - 2, 1), dtype=f.dtype)], axis=1)
    zr = backend.zeros((1, nx), dtype=f.dtype)
    return xp.concat([zr, inner, zr], axis=0)


def _derivatives(f):
    """Central-difference first and second derivatives (gx, gy, hxx, hyy, hxy) over the
    last two axes of ``f``, on its interior (one pixel less on each side)."""
    c = f[..., 1:-1, 1:-1]
    left, right = f[..., 1:-1, :-2], f[..., 1:-1, 2:]
    down, up = f[..., :-2, 1:-1], f[..., 2:, 1:-1]
    return ((right - left) / 2.0, (up - down) / 2.0, right - 2.0 * c + left, up - 2.0 * c + down,
            (f[..., 2:, 2:] - f[..., 2:, :-2] - f[..., :-2, 2:] + f[..., :-2, :-2]) / 4.0)


def _inside(positions, shape, margin: int) -> np.ndarray:
    """The host (n, 2) integer (x, y) ``positions`` at least ``margin`` pixels inside."""
    ny, nx = shape[-2:]
    pos = np.asarray(positions, np.int64).reshape(-1, 2)
    return pos[(pos[:, 0] >= margin) & (pos[:, 0] < nx - margin) & (pos[:, 1] >= margin)
               & (pos[:, 1] < ny - margin)]


def registration_scale(backend, image, var, good, template, filt, positions,
                       size: int, correlation=None) -> float:
    """Mean-square misregistration per axis (pixels^2) of the template against the science.

    At each kernel source the difference (``image``, ``var``, ``good``) is fitted, in a box
    of ``size`` pixels and weighted by its inverse variance, as a shift times the
    template's gradient as it reaches the difference (:func:`registration_gradients` of
    ``template`` through ``filt``). Each star's shift is one draw from the misregistration's
    spread, so the stars count alike whatever their brightness, as long as their noise is
    small next to that spread (weights ``1 / (noise + sigma^2)^2``, iterated). Each shift's
    noise is the fit's covariance; with a ``correlation`` (the noise's autocorrelation, 1 at
    its centre) the sandwich ``A^-1 G' W C W G A^-1`` of correlated pixels: the median
    of the shifts' squares less their noise, over ``ln 2`` (the median of a 2-D Gaussian
    shift's square is ``2 ln 2 sigma^2``). Symmetric residuals (seeing, a variable star)
    do not project on a gradient; 0 when the shifts are no larger than their noise.
    """
    xp = backend.xp
    pos = _inside(positions, image.shape, size // 2 + np.asarray(filt).shape[0] // 2 + 1)
    if len(pos) < 3:
        return 0.0
    gx, gy = registration_gradients(backend, template, filt, pos, size)
    v = gather_stamps(backend, var, pos, size, 0.0)
    w = xp.where(gather_stamps(backend, good, pos, size, False) & (v > 0),
                 1.0 / xp.where(v > 0, v, 1.0), 0.0)
    d = gather_stamps(backend, image, pos, size, 0.0)
    terms = [w * gx * gx, w * gx * gy, w * gy * gy, w * gx * d, w * gy * d]
    if correlation is not None:  # G' W C W G with C = sqrt(v) rho sqrt(v)
        root = xp.sqrt(w)
        ux, uy = root * gx, root * gy
        rho = backend.to_device(np.asarray(correlation, np.float32))
        cx, cy = fft_convolve(ux, rho, backend), fft_convolve(uy, rho, backend)
        terms += [ux * cx, ux * cy, uy * cy]
    sums = backend.to_host(xp.stack([xp.sum(xp.astype(t, xp.float64), axis=(1, 2))
                                     for t in terms], axis=1))
    a = np.stack([sums[:, [0, 1]], sums[:, [1, 2]]], axis=1)
    ok = np.linalg.det(a) > 0
    if ok.sum() < 3:
        return 0.0
    cov = np.linalg.inv(a[ok])
    shift = np.einsum("nij,nj->ni", cov, sums[ok][:, 3:5])
    if correlation is not None:
        b = np.stack([sums[ok][:, [5, 6]], sums[ok][:, [6, 7]]], axis=1)
        cov = cov @ b @ cov
    noise = cov[:, 0, 0] + cov[:, 1, 1]
    excess = (np.sum(shift * shift, axis=1) - noise) / 2.0
    ln2 = float(np.log(2.0))
    s2 = max(0.0, float(np.median(excess)) / ln2)
    for _ in range(3):
        s2 = max(0.0, weighted_median(excess, 1.0 / (noise / 2.0 + s2) ** 2) / ln2)
    return s2


def shared_noise_correlation(backend, source, target, usable, nsigma: float = 5.0) -> float:
    """Correlation of two images' pixel noise, from neighbouring-pixel differences (which
    cancel the sky and most of the PSF-scale signal) over the ``usable`` pixels (empty sky
    in both): 0 for independent exposures, 1 for an image and itself. Values within
    ``nsigma`` of their own noise (``1 / sqrt(n)``) are returned as 0."""
    xp = backend.xp
    use = usable[:, 1:] & usable[:, :-1]
    ha = xp.where(use, xp.astype(source[:, 1:] - source[:, :-1], xp.float64), 0.0)
    hb = xp.where(use, xp.astype(target[:, 1:] - target[:, :-1], xp.float64), 0.0)
    sums = backend.to_host(xp.stack([xp.sum(ha * hb), xp.sum(ha * ha), xp.sum(hb * hb),
                                     xp.sum(xp.astype(use, xp.float64))]))
    ab, aa, bb, n = (float(v) for v in sums)
    if n < 100 or aa <= 0 or bb <= 0:
        return 0.0
    rho = ab / np.sqrt(aa * bb)
    return float(rho) if abs(rho) > nsigma / np.sqrt(n) else 0.0
