"""Synthetic science/template pairs with a known, spatially varying matching kernel."""

import numpy as np

from gpudiffim.exposure import Exposure
from gpudiffim.psf import ImagePsf


def gaussian_image(size, sigma_x, sigma_y=None, dx=0.0, dy=0.0):
    sigma_y = sigma_x if sigma_y is None else sigma_y
    h = size // 2
    y, x = np.mgrid[-h:h + 1, -h:h + 1].astype(float)
    g = np.exp(-0.5 * (((x - dx) / sigma_x) ** 2 + ((y - dy) / sigma_y) ** 2))
    return g / (2 * np.pi * sigma_x * sigma_y)


def true_kernel(x, y, shape, size, params=None):
    """The matching kernel used to make the pair: an elliptical Gaussian whose widths and
    sum vary across the detector (``params``: :func:`kernel_params` or another such)."""
    sx, sy, ks = (params or kernel_params)(x, y, shape)
    k = gaussian_image(size, sx, sy)
    return ks * k / k.sum()


def kernel_params(x, y, shape):
    ny, nx = shape
    u, v = 2 * x / (nx - 1) - 1, 2 * y / (ny - 1) - 1
    return 1.8 + 0.25 * u, 1.7 + 0.2 * v + 0.1 * u * v, 0.9 * (1 + 0.01 * u)


def gentle_kernel_params(x, y, shape):
    """An elliptical kernel whose widths change by +-5% over the detector: the Alard-Lupton
    basis with a quadratic spatial model represents it to 0.23% of its peak inside the
    detector and 0.34% at the corners (least-squares projection on a 15 x 15 grid), where
    :func:`kernel_params`' stronger variation leaves 1.0% and 2.1%."""
    ny, nx = shape
    u, v = 2 * x / (nx - 1) - 1, 2 * y / (ny - 1) - 1
    return 1.8 + 0.1 * u, 1.7 + 0.08 * v, 0.9 * (1 + 0.01 * u)


def kernel_pair(shape=(1024, 1024), n_stars=500, seed=0, sigma_t=1.3, sky=500.0,
                template_var=10.0, moved=(), params=None):
    """Template of Gaussian stars; science = known kernel * template + sky + noise.

    ``moved``: (x, y, flux, dx, dy) stars drawn at (x, y) in the template and at
    (x + dx, y + dy) in the science (dipoles in the difference). ``params``: the kernel's
    widths and sum over the detector (:func:`kernel_params` by default).
    """
    params = params or kernel_params
    rng = np.random.default_rng(seed)
    ny, nx = shape
    tmpl = np.zeros(shape)
    sci = np.zeros(shape)
    xs, ys = rng.uniform(20, nx - 20, n_stars), rng.uniform(20, ny - 20, n_stars)
    fluxes = 10 ** rng.uniform(3.3, 5.5, n_stars)
    half = 15
    shifts = [(0.0, 0.0)] * n_stars
    for x, y, f, dx, dy in moved:
        xs, ys, fluxes = np.r_[xs, x], np.r_[ys, y], np.r_[fluxes, f]
        shifts.append((dx, dy))
    for x, y, f, (mx, my) in zip(xs, ys, fluxes, shifts):
        ix, iy = int(round(x)), int(round(y))
        sx, sy, ks = params(x, y, shape)
        t = f * gaussian_image(2 * half + 1, sigma_t, sigma_t, x - ix, y - iy)
        s = f * ks * gaussian_image(2 * half + 1, np.hypot(sigma_t, sx), np.hypot(sigma_t, sy),
                                    x + mx - ix, y + my - iy)
        sl = (slice(max(iy - half, 0), iy + half + 1), slice(max(ix - half, 0), ix + half + 1))
        cut = (slice(sl[0].start - (iy - half), sl[0].stop - (iy - half)),
               slice(sl[1].start - (ix - half), sl[1].stop - (ix - half)))
        tmpl[sl] += t[cut][:tmpl[sl].shape[0], :tmpl[sl].shape[1]]
        sci[sl] += s[cut][:sci[sl].shape[0], :sci[sl].shape[1]]
    sci_var = sci + sky + 25.0
    sci_img = sci + sky + rng.normal(size=shape) * np.sqrt(sci_var)
    t_var = np.full(shape, template_var) + tmpl / 20.0
    t_img = tmpl + rng.normal(size=shape) * np.sqrt(t_var)
    psf_t = ImagePsf(gaussian_image(31, sigma_t))
    sx, sy, _ = params(nx / 2, ny / 2, shape)
    psf_s = ImagePsf(gaussian_image(31, np.hypot(sigma_t, sx), np.hypot(sigma_t, sy)))
    science = Exposure.from_arrays(sci_img, None, sci_var, psf=psf_s, zero_point=30.0)
    template = Exposure.from_arrays(t_img, None, t_var, psf=psf_t, zero_point=30.0)
    return science, template
