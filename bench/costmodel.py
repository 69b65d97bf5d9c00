"""What one exposure's work should cost: counted transforms and explicit reads, and the floor
they imply, printed beside the measured time.

The model is deliberately small: the full-frame Fourier transforms (counted by wrapping the
backend's ``rfft2``/``irfft2``), each timed alone at the padded size the pipeline used, give
the time the transforms alone need; the explicit device reads (``to_host``/``to_host_all``)
are counted; and the bytes the transforms must move (real frame in, half-spectrum out, two
passes each way) over a given memory bandwidth give the bandwidth floor. What the measured
time exceeds the transforms' time by is everything else (elementwise chains, filters, stamp
work, host Python).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np


@contextmanager
def counting(backend, frame_shape):
    """Count, while inside, the full-frame transforms (images of a stack counted each; a
    transform is full-frame when both sides reach half the frame's) and the explicit reads
    on ``backend``; yields the dict of counts and the padded shapes seen."""
    counts = {"forward": 0, "inverse": 0, "reads": 0, "padded": set()}
    low = (frame_shape[0] // 2, frame_shape[1] // 2)
    names = ("rfft2", "irfft2", "to_host", "to_host_all")
    saved = {name: getattr(backend, name) for name in names}
    own = {name: backend.__dict__[name] for name in names if name in backend.__dict__}

    def transform(name, inverse):
        run = saved[name]

        def counted(a, *args, **kw):
            s = args[0] if args else kw.get("s")
            shape = tuple(s) if s is not None else tuple(a.shape[-2:])
            if shape[0] >= low[0] and shape[1] >= low[1]:
                counts["inverse" if inverse else "forward"] += (
                    int(np.prod(a.shape[:-2])) if a.ndim > 2 else 1)
                counts["padded"].add(shape)
            return run(a, *args, **kw)
        return counted

    def read(name):
        run = saved[name]

        def counted(*args, **kw):
            counts["reads"] += 1
            return run(*args, **kw)
        return counted

    backend.rfft2 = transform("rfft2", False)
    backend.irfft2 = transform("irfft2", True)
    backend.to_host = read("to_host")
    backend.to_host_all = read("to_host_all")
    try:
        yield counts
    finally:
        for name in names:
            if name in own:
                setattr(backend, name, own[name])
            else:
                delattr(backend, name)  # the class's method again


def transform_seconds(backend, padded, repeats: int = 3) -> tuple[float, float]:
    """(forward, inverse) seconds of one float32 frame transform at ``padded`` size on
    ``backend``, the fastest of ``repeats`` after a warm-up, device work included."""
    rng = np.random.default_rng(0)
    frame = backend.to_device(rng.normal(size=padded).astype(np.float32))
    spec = backend.rfft2(frame, s=padded)
    out = []
    for fn in (lambda: backend.rfft2(frame, s=padded), lambda: backend.irfft2(spec, padded)):
        fn()
        backend.synchronize()
        best = np.inf
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            backend.synchronize()
            best = min(best, time.perf_counter() - t)
        out.append(best)
    return out[0], out[1]


def cost_model(backend, counts, bandwidth_gbs: float) -> dict:
    """The floor the counted transforms imply on ``backend``: their own time, and their
    bytes (float32 frame and complex64 half-spectrum, read and written twice per
    transform) at ``bandwidth_gbs`` GB/s."""
    if not counts["padded"]:
        return {"transforms": 0, "reads": counts["reads"], "transform_s": 0.0,
                "bandwidth_floor_s": 0.0}
    padded = max(counts["padded"], key=lambda s: s[0] * s[1])
    fwd, inv = transform_seconds(backend, padded)
    n = counts["forward"] + counts["inverse"]
    pixels = padded[0] * padded[1]
    bytes_per = 2 * (4 * pixels + 8 * padded[0] * (padded[1] // 2 + 1)) * 2
    return {"transforms": n, "forward": counts["forward"], "inverse": counts["inverse"],
            "padded": f"{padded[0]}x{padded[1]}", "reads": counts["reads"],
            "transform_s": counts["forward"] * fwd + counts["inverse"] * inv,
            "bandwidth_floor_s": n * bytes_per / (bandwidth_gbs * 1e9)}
