"""Test fixtures with real instruments' file layouts: the headers of ../shared/reference/headers
exactly as the instruments wrote them (every card but the structural ones, which the data's
own shape and type set), the pixels simulated: a star field at two epochs and a transient."""

from pathlib import Path

import numpy as np
from astropy.io import fits

from gpudiffim.profiles import moffat

HEADERS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "headers"
STRUCTURAL = ("SIMPLE", "XTENSION", "BITPIX", "NAXIS", "EXTEND", "PCOUNT", "GCOUNT", "BZERO",
              "BSCALE", "TFIELDS", "TTYPE", "TFORM", "TDIM", "TUNIT", "TDOC", "TCCLS", "THEAP",
              "CHECKSUM", "DATASUM")


def dumped_headers(name: str) -> list[fits.Header]:
    """The headers of every HDU in a header dump, structural cards removed."""
    text = (HEADERS / name).read_text().splitlines()
    headers, block = [], None
    for line in text:
        if line.startswith("## HDU"):
            block = []
        elif block is not None and line.strip() == "END":
            header = fits.Header.fromstring("".join(c.ljust(80)[:80] for c in block))
            for key in list(header.keys()):
                if key.rstrip("0123456789") in STRUCTURAL or key in STRUCTURAL:
                    del header[key]
            headers.append(header)
            block = None
        elif block is not None:
            block.append(line)
    return headers


def star_field(rng, shape, fwhm, n_stars, flux_range, transient=None, beta=3.0):
    """Noise-free image of Moffat stars (the same positions for every epoch: seed ``rng``
    the same way) plus, when given, a transient (x, y, flux); and the stars' (x, y)."""
    ny, nx = shape
    xs, ys = rng.uniform(12, nx - 12, n_stars), rng.uniform(12, ny - 12, n_stars)
    fluxes = np.exp(rng.uniform(*np.log(flux_range), n_stars))
    image = np.zeros(shape)
    half = int(6 * fwhm)
    for x, y, f in list(zip(xs, ys, fluxes)) + ([transient] if transient else []):
        ix, iy = int(round(x)), int(round(y))
        y0, y1, x0, x1 = max(iy - half, 0), min(iy + half + 1, ny), max(ix - half, 0), \
            min(ix + half + 1, nx)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        image[y0:y1, x0:x1] += f * moffat(xx - x, yy - y, fwhm, beta)
    return image, np.column_stack([xs, ys])


# per layout: header file(s), shape, FWHM (science; the template is 0.85 of it), sky, gain,
# flux unit (counts per unit), how the pixels are stored
LAYOUTS = {
    "decam": dict(header="decam_cutout.txt", fwhm=5.2, sky=0.0, sky_sigma=9.0, gain=3.98,
                  unit=1.0, dtype=">f8"),
    "jwst": dict(header="jwst_nircam_i2d.txt", fwhm=2.6, sky=0.0, sky_sigma=20.0, gain=None,
                 unit=1e-4, dtype=">f4", nan_corner=True),
    "liverpool": dict(header="liverpool_ioo.txt", fwhm=5.4, sky=1526.0, sky_sigma=None,
                      gain=2.4, unit=1.0, dtype="int16"),
    "apogee": dict(header="bosque_alegre_apogee.txt", fwhm=3.5, sky=1200.0, sky_sigma=None,
                   gain=1.5, unit=1.0, dtype="uint16"),
    "lsst": dict(header="lsst_afw_exposure.txt", fwhm=3.8, sky=0.0, sky_sigma=12.0, gain=2.0,
                 unit=1.0, dtype=">f4"),
}


def write_layout_pair(name: str, outdir: Path, seed: int = 0):
    """Science and template files of one layout; returns their paths, the transient's
    (x, y) and the stars' (n, 2) positions."""
    spec = LAYOUTS[name]
    headers = dumped_headers(spec["header"])
    shape = _shape(spec["header"])
    ny, nx = shape
    transient = (nx / 2 + 0.3, ny / 2 - 0.2)
    paths = []
    for epoch, (fwhm, with_transient) in enumerate([(spec["fwhm"], True),
                                                    (0.85 * spec["fwhm"], False)]):
        rng = np.random.default_rng(seed)  # the same stars at both epochs
        field, stars = star_field(rng, shape, fwhm, int(150e-6 * nx * ny) + 20,
                                  (3e3, 3e5), (*transient, 2e4) if with_transient else None)
        noise_rng = np.random.default_rng([seed, epoch])
        counts = field + spec["sky"]
        if spec["sky_sigma"] is None:  # sky in the image: Poisson in electrons
            gain = spec["gain"]
            image = noise_rng.poisson(np.maximum(counts * gain, 0)) / gain
            image = image + noise_rng.normal(0, 3.0, shape)
        else:
            var = spec["sky_sigma"] ** 2 + np.maximum(field, 0) / spec["gain"] if spec["gain"] \
                else spec["sky_sigma"] ** 2 + np.maximum(field, 0) * 1e-3
            image = counts + noise_rng.normal(size=shape) * np.sqrt(var)
        image = image * spec["unit"]
        if spec.get("nan_corner"):  # outside the mosaic's footprint
            yy, xx = np.mgrid[:ny, :nx]
            image[xx + yy < 120] = np.nan
        path = outdir / f"{name}_{'science' if epoch == 0 else 'template'}.fits"
        (_write_lsst if name == "lsst" else _write_single)(path, image, headers, spec, fwhm)
        paths.append(path)
    return paths[0], paths[1], transient, stars


def _shape(header_file):
    for line in (HEADERS / header_file).read_text().splitlines():
        if line.startswith("## HDU") and "shape=(" in line and "BinTable" not in line:
            dims = line.split("shape=(")[1].split(")")[0]
            return tuple(int(v) for v in dims.split(","))
    raise ValueError(f"no image shape in {header_file}")


def _write_single(path, image, headers, spec, fwhm):
    hdu = fits.PrimaryHDU(header=headers[0].copy())
    if spec["dtype"] == "int16":
        hdu.data = np.clip(np.round(image), -32768, 32767 + 32768).astype(np.float32)
        hdu.scale("int16", bzero=32768, bscale=1)
    elif spec["dtype"] == "uint16":
        hdu.data = np.clip(np.round(image), 0, 65535).astype(np.uint16)
    else:
        hdu.data = image.astype(spec["dtype"])
    hdu.writeto(path, overwrite=True)


def _write_lsst(path, image, headers, spec, fwhm):
    """IMAGE, MASK, VARIANCE by EXTTYPE (no EXTNAME), MP_* planes, and the PSF as afw
    persists it: a KernelPsf whose FixedKernel is the 25x25 PSF image."""
    ny, nx = image.shape
    var = np.full(image.shape, spec["sky_sigma"] ** 2, np.float32) + np.maximum(
        image, 0).astype(np.float32) / spec["gain"]
    mask = np.zeros(image.shape, np.uint16)
    mask[:, :2] |= 1 << int(headers[2]["MP_EDGE"])
    yy, xx = np.mgrid[-12:13, -12:13]
    kernel = moffat(xx, yy, fwhm, 3.0)
    kernel /= kernel.sum()
    index = fits.BinTableHDU.from_columns([
        fits.Column("id", "J", array=[1, 2]), fits.Column("cat.archive", "J", array=[1, 2]),
        fits.Column("cat.persistable", "J", array=[0, 0]), fits.Column("row0", "J", array=[0, 0]),
        fits.Column("nrows", "J", array=[1, 1]),
        fits.Column("name", "64A", array=["KernelPsf", "FixedKernel"]),
        fits.Column("module", "64A", array=["lsst.meas.algorithms", "lsst.afw.math"])],
        header=headers[4].copy())
    psf_row = fits.BinTableHDU.from_columns([
        fits.Column("kernel", "J", array=[2]),
        fits.Column("averagePosition_x", "D", array=[nx / 2]),
        fits.Column("averagePosition_y", "D", array=[ny / 2])], header=headers[5].copy())
    kernel_row = fits.BinTableHDU.from_columns([
        fits.Column("dimensions_x", "J", array=[25]), fits.Column("dimensions_y", "J", array=[25]),
        fits.Column("center_x", "J", array=[12]), fits.Column("center_y", "J", array=[12]),
        fits.Column("image", "625D", array=[kernel.ravel()])], header=headers[6].copy())
    fits.HDUList([fits.PrimaryHDU(header=headers[0].copy()),
                  fits.ImageHDU(image.astype(np.float32), header=headers[1].copy()),
                  fits.ImageHDU(mask, header=headers[2].copy()),
                  fits.ImageHDU(var, header=headers[3].copy()),
                  index, psf_row, kernel_row]).writeto(path, overwrite=True)
    return kernel
