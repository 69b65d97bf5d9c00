"""Helpers the benchmarks share: simulated pairs, and device work timed to completion."""

import dataclasses

from gpudiffim.io import read_exposure
from gpudiffim.simulate import PRESETS, simulate


def synchronized(backend, fn):
    """``fn`` wrapped so that its queued device work is finished when it returns."""
    def run(*args, **kw):
        out = fn(*args, **kw)
        backend.synchronize()
        return out
    return run


def simulated_pair(tmp_path_factory, shape, seed: int = 2):
    """A science/template pair of ``shape`` from the built-in simulator (stars, galaxies, sky
    gradient, differing PSF wings, the template on the science grid), read back as a run
    reads it."""
    out = tmp_path_factory.mktemp(f"bench{shape[0]}x{shape[1]}")
    cfg = dataclasses.replace(PRESETS["ci"], name="bench", shape=shape, max_offset=0.0,
                              visits={"g": (11692,)})
    manifest = simulate(out, cfg, seed=seed, workers=1)
    row = manifest[0]
    return read_exposure(out / row["science"]), read_exposure(out / row["template"])
