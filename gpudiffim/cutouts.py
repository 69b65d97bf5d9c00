"""Triplet cutouts: science, template and difference around chosen positions, for eyes.

The study's report shows a random sample of detections and of the fakes (found and lost)
as science / template / difference triplets, and hands them to a classification project
(Zooniverse). Only the runner holds all three images of an exposure at once (the science
with its fakes injected, the template on the science grid), so it cuts them there: a few
diaSources and a few fakes chosen at random, one gather per image on the device, written
beside the exposure's catalogue as ``cutouts.fits`` (an (n, 3, size, size) cube and the
table of what each cutout shows).
"""

from __future__ import annotations

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .stamps import gather_stamps

__all__ = ["CUTOUT_PLANES", "choose_cutouts", "triplet_cutouts", "write_cutouts",
           "read_cutouts"]

#: the images of a triplet, in the cube's second axis
CUTOUT_PLANES = ("science", "template", "difference")


def choose_cutouts(sources: Table, fakes: Table | None, n: int,
                   rng: np.random.Generator) -> Table:
    """Up to ``n`` diaSources (sky sources excluded) and up to ``n`` fakes, drawn at random
    without replacement: columns ``kind`` ('diaSource' or 'fake'), ``index`` (the row in
    the diaSource or truth table), ``x``, ``y``."""
    parts = []
    real = np.flatnonzero(~np.asarray(sources["sky_source"], bool)) \
        if "sky_source" in sources.colnames else np.arange(len(sources))
    for kind, table, rows in (("diaSource", sources, real),
                              ("fake", fakes, np.arange(0 if fakes is None else len(fakes)))):
        if table is None or not len(rows) or n <= 0:
            continue
        pick = np.sort(rng.choice(rows, size=min(n, len(rows)), replace=False))
        parts.append(Table({"kind": np.full(len(pick), kind), "index": pick,
                            "x": np.asarray(table["x"], float)[pick],
                            "y": np.asarray(table["y"], float)[pick]}))
    if not parts:
        return Table({"kind": np.zeros(0, "U9"), "index": np.zeros(0, int),
                      "x": np.zeros(0), "y": np.zeros(0)})
    return Table(np.concatenate([p.as_array() for p in parts]))


def triplet_cutouts(backend, images, xs, ys, size: int = 31) -> np.ndarray:
    """(n, len(images), size, size) float32 host cutouts of backend ``images`` (2-D planes
    of one shape) centred on the pixels nearest (xs, ys); beyond the image: NaN."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    pos = np.column_stack([np.round(xs), np.round(ys)]).astype(np.int64)
    if not len(pos):
        return np.zeros((0, len(images), size, size), np.float32)
    xp = backend.xp
    cubes = [gather_stamps(backend, backend.asarray(image, np.float32), pos, size, np.nan)
             for image in images]
    return np.asarray(backend.to_host(xp.stack(cubes, axis=1)), np.float32)


def write_cutouts(path, cube: np.ndarray, table: Table) -> None:
    """``cutouts.fits`` at ``path`` (written as given: the caller makes it atomic): the
    cube in the primary HDU, what each cutout shows in the CUTOUTS table."""
    header = fits.Header()
    for i, name in enumerate(CUTOUT_PLANES):
        header[f"PLANE{i}"] = (name, "axis 2 of the cube")
    what = fits.table_to_hdu(table)
    what.name = "CUTOUTS"
    fits.HDUList([fits.PrimaryHDU(np.asarray(cube, np.float32), header=header),
                  what]).writeto(path, overwrite=True)


def read_cutouts(path) -> tuple[np.ndarray, Table]:
    """``(cube, table)`` from a ``cutouts.fits``."""
    with fits.open(path) as hdus:
        return np.asarray(hdus[0].data, np.float32), Table.read(hdus["CUTOUTS"])
