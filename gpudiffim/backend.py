"""The one seam between the DIA stages and an array library.

Every stage takes a :class:`Backend` and does its array work through it:

* ``backend.xp`` — the array namespace (NumPy, CuPy or ``array_api_strict``);
* ``rfft2`` / ``irfft2`` — real 2-D FFTs over the last two axes, plans cached by
  shape and dtype (pyFFTW with all cores on CPU, cuFFT through CuPy on GPU);
* ``label``, ``maximum_filter``, ``uniform_filter`` — the ``scipy.ndimage``
  operations the stages need;
* ``solve`` — batched linear solves;
* ``to_device`` / ``to_host`` — the only places data crosses between host and device
  (``dtype`` is always a NumPy dtype, applied on the host); ``upload`` is ``to_device`` for
  bulk pixel planes sent ahead of the compute (on GPU: through pinned host memory on a
  non-blocking stream, so the copy overlaps compute); ``scalar`` reads one value back (a
  device sync on CuPy: every such read goes through it, so they can be counted), and
  ``to_host_all`` several small arrays in one transfer;
* ``synchronize`` — wait for queued device work (timings).

``get_backend("strict")`` runs the same code on ``array_api_strict`` arrays placed
on a non-CPU device, which refuses any implicit conversion to NumPy, exactly as
CuPy does. The test suite uses it to prove the GPU path has no hidden host round
trip without needing a GPU.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from functools import lru_cache

import numpy as np
from scipy import fft as _scipy_fft
from scipy import ndimage as _ndi

from .arrayops import window_reduce
from .choices import BACKEND_NAMES
from .errors import BackendError
from .hostmem import tune_host_allocator

__all__ = ["BACKEND_NAMES", "Backend", "CpuBackend", "GpuBackend", "StrictBackend",
           "get_backend", "gpu_unavailable_reason", "host_threads", "next_fast_len"]

log = logging.getLogger(__name__)


def next_fast_len(n: int) -> int:
    """Smallest even length >= n that factors into 2, 3, 5 (fast for FFTW and cuFFT; FFTW's
    estimated plans for odd-length complex-to-real transforms are up to 10x slower)."""
    m = _scipy_fft.next_fast_len(int(n), real=True)
    while m % 2:
        m = _scipy_fft.next_fast_len(m + 1, real=True)
    return m


class Backend:
    """Base class: array-API generic implementations of everything but FFTs and I/O."""

    name = "base"
    fft_library = "none"
    threads = 1
    #: arrays live in host memory: a read costs nothing, and a selection whose size is data
    #: (boolean indexing, ``nonzero``) is no device sync
    host_memory = False

    def __init__(self, xp, device=None):
        self.xp = xp
        self.device = device
        self.reason = ""

    # -- host <-> device ---------------------------------------------------------
    def to_device(self, a, dtype=None):
        """Copy a host (NumPy) array or scalar onto this backend's device, cast first to the
        NumPy ``dtype`` when given."""
        raise NotImplementedError

    def to_host(self, a) -> np.ndarray:
        """Copy a backend array to a host NumPy array (explicit, never implicit)."""
        raise NotImplementedError

    def scalar(self, a):
        """One value of a 0-d (or one-element) backend array as a Python scalar: the single
        named place where a device value is read back for host control flow."""
        return self.to_host(a).item()

    def to_host_all(self, *arrays) -> tuple:
        """Several small arrays read back in one transfer (one sync on CuPy where each
        :meth:`to_host` is one): packed as float64 on the device, then each returned with its
        shape and dtype. Host arrays pass through. Integers must be exact in float64 (below
        2**53); complex arrays cannot go this way."""
        xp = self.xp
        on_device = [i for i, a in enumerate(arrays) if not _is_host(a)]
        out = [np.asarray(a) if _is_host(a) else None for a in arrays]
        if not on_device:
            return tuple(out)
        packed = self.to_host(xp.concat([xp.reshape(xp.astype(arrays[i], xp.float64), (-1,))
                                         for i in on_device]))
        start = 0
        for i in on_device:
            a = arrays[i]
            n = int(np.prod(a.shape))
            out[i] = packed[start:start + n].reshape(tuple(a.shape)).astype(
                self._host_dtype(a.dtype))
            start += n
        return tuple(out)

    def masked_sample(self, values, good, max_n: int = 200_000) -> tuple:
        """A sorted sample of 1-D ``values`` where ``good``, and how many it holds: ``(s, n)``
        with ``s[:n]`` the sample in ascending order. On a device every k-th pixel is taken
        (k from the array's size, so at most ~``max_n``), those not ``good`` set to +inf
        past the others, and ``n`` is a 0-d device count: no device read, where boolean
        indexing is one (its size is data). :class:`CpuBackend` indexes, every k-th of the
        good values, ``n`` an int."""
        xp = self.xp
        step = max(1, int(values.shape[0]) // max_n)
        v, g = values[::step], good[::step]
        return xp.sort(xp.where(g, v, xp.inf)), xp.sum(xp.astype(g, xp.int64))

    def take_at(self, a, index):
        """``a[index]`` for a 1-d ``a`` and an index that may be a 0-d device integer (then
        clipped to ``a``'s range and gathered on the device, no read)."""
        if isinstance(index, (int, np.integer)):
            return a[int(index)]
        i = self.xp.clip(self.xp.reshape(index, (1,)), 0, a.shape[0] - 1)
        return self.xp.reshape(self.xp.take(a, i), ())

    def true_indices(self, flags, count: int):
        """Flat indices (ascending) of the ``count`` true entries of a boolean array, the
        count known on the host (read with others before): on a device a stable sort puts
        them first, where ``nonzero`` would read its size back; :class:`CpuBackend`:
        ``flatnonzero``."""
        xp = self.xp
        flat = xp.reshape(flags, (-1,))
        return xp.argsort(xp.astype(~flat, xp.uint8), stable=True)[:count]

    def put(self, a, index, values):
        """A copy of ``a`` with its flat positions ``index`` (host or backend integers, no
        repeats) set to ``values``. The array API has no scatter: on a device each element
        finds its position among the sorted indices (one ``searchsorted``);
        :class:`CpuBackend` and :class:`GpuBackend` put them directly."""
        xp = self.xp
        index = self.asarray(index, np.int64)
        values = xp.astype(self.asarray(values), a.dtype)
        if index.shape[0] == 0:
            return a
        order = xp.argsort(index)
        index, values = xp.take(index, order), xp.take(values, order)
        flat = xp.reshape(a, (-1,))
        where = self.arange(flat.shape[0], dtype=xp.int64)
        pos = xp.clip(xp.searchsorted(index, where), 0, index.shape[0] - 1)
        hit = xp.take(index, pos) == where
        return xp.reshape(xp.where(hit, xp.take(values, pos), flat), a.shape)

    def choose(self, condition, if_true, if_false):
        """``if_true()`` where the 0-d boolean ``condition`` holds, else ``if_false()``: on a
        device both are computed and selected there (no read); :class:`CpuBackend` reads
        the condition and computes only the one it needs."""
        return self.xp.where(condition, if_true(), if_false())

    def to_host_columns(self, columns: dict) -> dict:
        """:meth:`to_host_all` over a dict's values (a catalogue's columns)."""
        return dict(zip(columns, self.to_host_all(*columns.values())))

    def _host_dtype(self, dtype):
        for kind in (np.bool_, np.float32, np.float64, np.int64, np.int32, np.int16, np.int8,
                     np.uint64, np.uint32, np.uint16, np.uint8):
            if dtype == self.xp_dtype(kind):
                return kind
        raise TypeError(f"to_host_all: no host dtype for {dtype}")

    def xp_dtype(self, dtype):
        """This namespace's dtype for a NumPy ``dtype``."""
        return getattr(self.xp, np.dtype(dtype).name)

    def upload(self, a, dtype=None):
        """:meth:`to_device` for bulk data copied ahead of the compute (reader threads):
        returns once the copy has landed. ``dtype`` is a NumPy dtype (cast on the host)."""
        return self.to_device(np.asarray(a, dtype=dtype))

    def asarray(self, a, dtype=None):
        """Backend arrays pass through (cast to the NumPy ``dtype`` if asked and they differ);
        host arrays are sent to the device."""
        if isinstance(a, np.ndarray) or np.isscalar(a) or isinstance(a, (list, tuple)):
            return self.to_device(np.asarray(a), dtype=dtype)
        if dtype is None or a.dtype == self.xp_dtype(dtype):
            return a
        return self.xp.astype(a, self.xp_dtype(dtype))

    def synchronize(self) -> None:
        """Block until queued device work is done (no-op on CPU)."""

    # -- creation on this backend's device ---------------------------------------
    _device_kw: dict = {}

    def arange(self, *args, dtype=None):
        return self.xp.arange(*args, dtype=dtype, **self._device_kw)

    def zeros(self, shape, dtype=None):
        return self.xp.zeros(shape, dtype=dtype, **self._device_kw)

    def ones(self, shape, dtype=None):
        return self.xp.ones(shape, dtype=dtype, **self._device_kw)

    def full(self, shape, value, dtype=None):
        return self.xp.full(shape, value, dtype=dtype, **self._device_kw)

    # -- FFTs --------------------------------------------------------------------
    def rfft2(self, a, s=None):
        """Real-to-complex FFT over the last two axes, zero-padded to ``s``."""
        raise NotImplementedError

    def irfft2(self, a, s):
        """Complex-to-real inverse of :meth:`rfft2` with output size ``s``."""
        raise NotImplementedError

    # -- ndimage -----------------------------------------------------------------
    def label(self, mask):
        """Label 8-connected components of a boolean image: ``(labels int32, count)``."""
        raise NotImplementedError

    def maximum_filter(self, a, size: int):
        """Running maximum in a ``size``x``size`` box (outside the image: -inf)."""
        xp = self.xp
        low = -xp.inf if xp.isdtype(a.dtype, "real floating") else xp.iinfo(a.dtype).min
        out = a
        for axis in (0, 1):
            out = window_reduce(self, out, size, axis, xp.maximum, low)
        return out

    def uniform_filter(self, a, size: int):
        """Mean in a ``size``x``size`` box, zero outside the image (``mode='constant'``)."""
        xp = self.xp
        out = a
        for axis in (0, 1):
            c = xp.cumulative_sum(out, axis=axis, include_initial=True)
            n = out.shape[axis]
            half = size // 2
            hi = xp.clip(self.arange(n) + (size - half), max=n)
            lo = xp.clip(self.arange(n) - half, min=0)
            out = (xp.take(c, hi, axis=axis) - xp.take(c, lo, axis=axis)) / size
        return xp.astype(out, a.dtype)

    # -- linear algebra ----------------------------------------------------------
    def matrix_transpose(self, a):
        """Swap the last two axes (a stack of matrices)."""
        return self.xp.matrix_transpose(a)

    def solve(self, a, b):
        """Solve ``a @ x = b`` for stacks: ``a`` (..., n, n), ``b`` (..., n). A singular
        matrix's solution is NaN on every backend (NumPy raises, CuPy returns NaN or
        infinities unchecked): callers check that what they use is finite."""
        xp = self.xp
        try:
            return xp.linalg.solve(a, b[..., None])[..., 0]
        except np.linalg.LinAlgError:
            return self._solve_each(a, b)

    def _solve_each(self, a, b):
        """:meth:`solve` one matrix at a time, NaN for the singular ones."""
        xp = self.xp
        n = a.shape[-1]
        flat_a, flat_b = xp.reshape(a, (-1, n, n)), xp.reshape(b, (-1, n))
        out = []
        for i in range(flat_a.shape[0]):
            try:
                out.append(xp.linalg.solve(flat_a[i, ...], flat_b[i, ...][:, None])[:, 0])
            except np.linalg.LinAlgError:
                out.append(self.full((n,), float("nan"), dtype=flat_b.dtype))
        return xp.reshape(xp.stack(out), b.shape)

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "device": str(self.device),
            "fft": self.fft_library,
            "threads": self.threads,
            "reason": self.reason,
        }


class CpuBackend(Backend):
    """NumPy arrays, pyFFTW (all cores) with cached plans, SciPy ndimage and LAPACK."""

    name = "cpu"
    host_memory = True
    max_plans = 40
    max_plan_bytes = 384 << 20  # pyFFTW plans own their buffers: bound them in bytes too
    chunk_bytes = 32 << 20  # FFT plans for stacks work on chunks of about this size

    def __init__(self, threads: int | None = None):
        super().__init__(np, device="cpu")
        tune_host_allocator()
        self.threads = threads or host_threads()
        self._plans: OrderedDict = OrderedDict()  # LRU: plans own their buffers
        self._plan_bytes: dict = {}
        self._lock = threading.Lock()
        try:
            import pyfftw  # noqa: F401

            self.fft_library = f"pyfftw {pyfftw.__version__}"
            self._pyfftw = pyfftw
        except ImportError:  # pragma: no cover - pyfftw is a core dependency
            self.fft_library = "scipy.fft (pyfftw not installed)"
            self._pyfftw = None

    def to_device(self, a, dtype=None):
        return np.asarray(a, dtype=dtype)

    def to_host(self, a):
        return np.asarray(a)

    def scalar(self, a):
        return np.asarray(a).item()

    def to_host_all(self, *arrays) -> tuple:
        return tuple(np.asarray(a) for a in arrays)

    def masked_sample(self, values, good, max_n: int = 200_000) -> tuple:
        sample = values[good]
        s = np.sort(sample[::max(1, sample.shape[0] // max_n)])
        return s, s.shape[0]

    def choose(self, condition, if_true, if_false):
        return if_true() if bool(condition) else if_false()

    def true_indices(self, flags, count: int):
        return np.flatnonzero(flags)[:count]

    def put(self, a, index, values):
        out = np.array(a, copy=True)
        np.put(out, np.asarray(index, np.int64), np.asarray(values, out.dtype))
        return out

    def _plan(self, kind, shape, dtype, s):
        key = (kind, shape, np.dtype(dtype).str, s)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
        else:
            b = self._pyfftw.builders
            proto = self._pyfftw.empty_aligned(shape, dtype=dtype)
            build = b.rfftn if kind == "r2c" else b.irfftn
            plan = build(proto, s=s, axes=(-2, -1), threads=self.threads,
                         planner_effort="FFTW_ESTIMATE", auto_align_input=True)
            self._plans[key] = plan
            self._plan_bytes[key] = plan.input_array.nbytes + plan.output_array.nbytes
            while len(self._plans) > 1 and (len(self._plans) > self.max_plans or
                                            sum(self._plan_bytes.values()) > self.max_plan_bytes):
                old, _ = self._plans.popitem(last=False)
                del self._plan_bytes[old]
        return plan

    def _run(self, kind, a, s):
        if kind == "r2c" and 4 * a.shape[-2] <= s[0] and 4 * a.shape[-1] <= s[1]:
            # a small kernel zero-padded to a large frame: only its own rows are non-zero,
            # so transform those along x first, then the columns (a 2-D plan would also
            # transform the thousands of zero rows)
            rows = _scipy_fft.rfft(a, n=s[1], axis=-1, workers=self.threads)
            return _scipy_fft.fft(rows, n=s[0], axis=-2, workers=self.threads)
        if self._pyfftw is None:
            f = _scipy_fft.rfftn if kind == "r2c" else _scipy_fft.irfftn
            return f(a, s=s, axes=(-2, -1), workers=self.threads)
        with self._lock:  # a pyFFTW plan owns its buffers: one caller at a time
            if a.ndim == 2:
                plan = self._plan(kind, a.shape, a.dtype, tuple(s))
                out = self._pyfftw.empty_aligned(plan.output_shape, dtype=plan.output_dtype)
                return plan(a, output_array=out)
            return self._run_batched(kind, a, tuple(s))

    def _run_batched(self, kind, a, s):
        """Stacks (stamps x basis terms, whose count changes with every exposure) go through
        plans for fixed-size chunks, so the plan cache stays a few plans of bounded size
        instead of growing by one large plan per exposure."""
        lead, item = a.shape[:-2], a.shape[-2:]
        flat = a.reshape((-1,) + item)
        n = flat.shape[0]
        out_item = (s[0], s[1] // 2 + 1) if kind == "r2c" else s
        bytes_per = (np.prod(item) + np.prod(out_item)) * flat.dtype.itemsize * 2
        chunk = 1 << max(0, int(np.log2(max(1, self.chunk_bytes // bytes_per))))
        chunk = min(chunk, 1 << int(np.ceil(np.log2(n))))
        plan = self._plan(kind, (chunk,) + item, flat.dtype, s)
        out = self._pyfftw.empty_aligned((n,) + tuple(plan.output_shape[1:]),
                                         dtype=plan.output_dtype)
        align = self._pyfftw.simd_alignment
        spare = None
        # always name the output: a plan given one keeps writing there until given another
        for i in range(0, n, chunk):
            part = flat[i:i + chunk]
            if part.shape[0] < chunk:  # the last, partial chunk: zero-padded to the plan's size
                pad = np.zeros((chunk,) + item, part.dtype)
                pad[:part.shape[0]] = part
                part = pad
            dest = out[i:i + chunk]
            if dest.shape[0] == chunk and dest.ctypes.data % align == 0:
                plan(part, output_array=dest)  # straight into the result
            else:
                if spare is None:
                    spare = self._pyfftw.empty_aligned(plan.output_shape, dtype=plan.output_dtype)
                plan(part, output_array=spare)
                dest[...] = spare[:dest.shape[0]]
        return out.reshape(lead + out.shape[1:])

    def rfft2(self, a, s=None):
        a = np.asarray(a)
        if a.dtype not in (np.float32, np.float64):
            a = a.astype(np.float64)
        return self._run("r2c", a, tuple(s) if s is not None else a.shape[-2:])

    def irfft2(self, a, s):
        return self._run("c2r", np.asarray(a), tuple(s))

    def label(self, mask):
        labels, n = _ndi.label(np.asarray(mask, dtype=bool), structure=np.ones((3, 3)))
        return labels.astype(np.int32), int(n)

    # SciPy's 1-D filters are fast along a C-contiguous row and ~7x slower down the columns
    # (each column copied out with a stride): the column pass runs on whole rows instead
    def maximum_filter(self, a, size):
        low = -np.inf if a.dtype.kind == "f" else np.iinfo(a.dtype).min
        if a.ndim != 2 or size <= 1:
            return _ndi.maximum_filter(a, size=size, mode="constant", cval=low)
        rows = _ndi.maximum_filter1d(a, size, axis=1, mode="constant", cval=low)
        return window_reduce(self, rows, size, 0, np.maximum, low)

    def uniform_filter(self, a, size):
        if a.ndim != 2 or size <= 1:
            return _ndi.uniform_filter(a, size=size, mode="constant", cval=0.0)
        rows = _ndi.uniform_filter1d(a, size, axis=1, mode="constant", cval=0.0)
        return _column_box_mean(rows, size).astype(rows.dtype, copy=False)


class GpuBackend(Backend):
    """CuPy arrays on the current CUDA device, cuFFT (CuPy's plan cache), cupyx.scipy.ndimage."""

    name = "gpu"

    def __init__(self):
        import cupy
        import cupyx.scipy.ndimage as cndi

        try:  # the array-API names the stages use (concat, astype, isdtype, ...) on CuPy arrays
            import array_api_compat.cupy as xp
        except ImportError:  # pragma: no cover - array-api-compat comes with the gpu extra
            xp = cupy
        super().__init__(xp, device=cupy.cuda.Device())
        self._cp, self._cndi = cupy, cndi
        self._local = threading.local()  # one upload stream per reader thread
        props = cupy.cuda.runtime.getDeviceProperties(self.device.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        self.device_name = f"cuda:{self.device.id} {name}"
        self.fft_library = f"cuFFT (CuPy {cupy.__version__})"

    def to_device(self, a, dtype=None):
        return self._cp.asarray(np.asarray(a, dtype=dtype))

    def to_host(self, a):
        return self._cp.asnumpy(a)

    def upload(self, a, dtype=None):
        """Host -> device through a pinned staging buffer on this thread's own non-blocking
        stream, so a reader thread's copy overlaps the kernels the compute thread queues on
        its stream. The device block comes from the upload stream's memory pool (never one
        that compute kernels still queued on another stream may be reading)."""
        import cupyx

        cp = self._cp
        a = np.ascontiguousarray(a, dtype=dtype)
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = cp.cuda.Stream(non_blocking=True)
        pinned = cupyx.empty_pinned(a.shape, a.dtype)  # CuPy's pinned pool reuses these
        pinned[...] = a
        with stream:
            out = cp.empty(a.shape, a.dtype)
            out.set(pinned, stream=stream)
        stream.synchronize()  # the reader waits; the compute stream never does
        return out

    def synchronize(self):
        self._cp.cuda.get_current_stream().synchronize()

    plan_cache_bytes = 1 << 30  # cuFFT work areas kept by the (per-thread) plan cache

    def _bound_plan_cache(self):
        """Stacks of stamps change their count with every exposure, so CuPy's per-thread
        cuFFT plan cache (16 plans, unbounded work areas by default) is capped by memory."""
        if not getattr(self._local, "plan_cache_bounded", False):
            self._cp.fft.config.get_plan_cache().set_memsize(self.plan_cache_bytes)
            self._local.plan_cache_bounded = True

    def rfft2(self, a, s=None):
        self._bound_plan_cache()
        return self._cp.fft.rfftn(a, s=s, axes=(-2, -1))

    def irfft2(self, a, s):
        self._bound_plan_cache()
        return self._cp.fft.irfftn(a, s=s, axes=(-2, -1))

    def label(self, mask):
        labels, n = self._cndi.label(mask, structure=self._cp.ones((3, 3)))
        return labels.astype(self._cp.int32), int(n)

    def maximum_filter(self, a, size):
        low = -self._cp.inf if a.dtype.kind == "f" else self._cp.iinfo(a.dtype).min
        return self._cndi.maximum_filter(a, size=size, mode="constant", cval=low)

    def uniform_filter(self, a, size):
        return self._cndi.uniform_filter(a, size=size, mode="constant", cval=0.0)

    def matrix_transpose(self, a):
        return self._cp.swapaxes(a, -1, -2)

    def put(self, a, index, values):
        out = a.copy()
        self._cp.put(out, self._cp.asarray(index, dtype=self._cp.int64),
                     self._cp.asarray(values, dtype=out.dtype))
        return out

    def describe(self):
        d = super().describe()
        d["device"] = self.device_name
        return d


class StrictBackend(Backend):
    """``array_api_strict`` on ``Device("device1")``: implicit NumPy conversion raises.

    FFTs use the namespace's own ``fft`` extension; everything else is the generic
    array-API code of :class:`Backend`, except :meth:`label`, which — like any
    explicit transfer — goes through :meth:`to_host` / :meth:`to_device`.
    """

    name = "strict"
    fft_library = "array_api_strict.fft (NumPy pocketfft)"

    def __init__(self):
        import array_api_strict as xps

        super().__init__(xps, device=xps.Device("device1"))
        self._cpu = xps.Device("CPU_DEVICE")
        self._device_kw = {"device": self.device}
        self._array_type = type(xps.asarray(0.0))

    def to_device(self, a, dtype=None):
        return self.xp.asarray(np.asarray(a, dtype=dtype), device=self.device)

    def to_host(self, a):
        if not hasattr(a, "to_device"):
            return np.asarray(a)
        return np.asarray(a.to_device(self._cpu))

    def asarray(self, a, dtype=None):
        if isinstance(a, self._array_type) and a.device != self.device:
            a = a.to_device(self.device)
        if isinstance(a, self._array_type):
            return super().asarray(a, dtype)
        return self.to_device(np.asarray(a), dtype=dtype)

    def rfft2(self, a, s=None):
        return self.xp.fft.rfftn(a, s=s, axes=(-2, -1))

    def irfft2(self, a, s):
        return self.xp.fft.irfftn(a, s=s, axes=(-2, -1))

    def label(self, mask):
        labels, n = _ndi.label(self.to_host(mask), structure=np.ones((3, 3)))
        return self.to_device(labels.astype(np.int32)), int(n)


def gpu_unavailable_reason() -> str | None:
    """None when CuPy sees a CUDA device that runs the engine's kinds of work, else a
    one-line reason. A device count alone is not enough: a CuPy wheel without the CUDA
    libraries counts the device, then fails at the first FFT (cuFFT), solve (cuSOLVER) or
    compiled elementwise kernel (NVRTC), so a tiny one of each is run (:func:`_probe`)."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install 'gpudiffim[gpu]')"
    except Exception as exc:  # broken CUDA install
        return f"CuPy failed to import: {exc}"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"CuPy sees no CUDA device ({exc.__class__.__name__}: {exc})"
    if n <= 0:
        return "CuPy sees no CUDA device"
    return _probe(cupy)


def host_threads() -> int:
    """Threads for the CPU's FFTs: ``OMP_NUM_THREADS`` where set (Dask sets it to
    each worker's share of the cores), else every core this process may run on."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1)


def _column_box_mean(a: np.ndarray, size: int) -> np.ndarray:
    """Mean of each ``size``-row window down the columns of a 2-D host array (zero outside,
    SciPy's centring), in float64: a running sum over whole rows."""
    n = a.shape[0]
    before, after = size // 2, size - 1 - size // 2  # rows each side of the window's centre
    out = np.empty(a.shape, np.float64)
    acc = a[:after + 1].sum(axis=0, dtype=np.float64)
    out[0] = acc
    for i in range(1, n):
        if i + after < n:
            acc += a[i + after]
        if i - before - 1 >= 0:
            acc -= a[i - before - 1]
        out[i] = acc
    out /= size
    return out


def _probe(cupy) -> str | None:
    """Run an FFT, a solve and an elementwise kernel on the device and check their values;
    None when all three work, else the step that failed and why."""
    steps = {
        "an FFT (cuFFT)": lambda: float(cupy.fft.irfft2(cupy.fft.rfft2(
            cupy.ones((8, 8), dtype=cupy.float32)), s=(8, 8)).sum()) == 64.0,
        "a solve (cuSOLVER)": lambda: abs(float(cupy.linalg.solve(
            2.0 * cupy.eye(3), cupy.ones(3)).sum()) - 1.5) < 1e-9,
        "an elementwise kernel (NVRTC)": lambda: float(
            (cupy.arange(4, dtype=cupy.float32) * 2.0 + 1.0).sum()) == 16.0,
    }
    for what, run in steps.items():
        try:
            ok = run()
        except Exception as exc:
            return (f"CuPy sees a CUDA device but cannot run {what}: "
                    f"{exc.__class__.__name__}: {exc} (pip install 'gpudiffim[gpu]' brings "
                    "the CUDA libraries)")
        if not ok:
            return f"CuPy sees a CUDA device but {what} gives wrong values"
    return None


def _is_host(a) -> bool:
    return isinstance(a, (np.ndarray, np.generic, int, float, bool))


@lru_cache(maxsize=None)
def _make(name: str) -> Backend:
    if name == "cpu":
        return CpuBackend()
    if name == "strict":
        try:
            return StrictBackend()
        except ImportError as exc:
            raise BackendError("the strict backend needs array-api-strict "
                               "(pip install 'gpudiffim[test]')") from exc
    if name == "gpu":
        reason = gpu_unavailable_reason()
        if reason:
            raise BackendError(f"GPU backend unavailable: {reason}")
        return GpuBackend()
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")


def get_backend(name: str | Backend | None = None) -> Backend:
    """Return the backend called ``name`` (default: ``$GPUDIFFIM_BACKEND`` or ``auto``).

    ``auto`` picks the GPU when CuPy sees a device, else the CPU, logging why.
    Backends are cached, so FFT plans are shared by every caller.
    """
    if isinstance(name, Backend):
        return name
    name = (name or os.environ.get("GPUDIFFIM_BACKEND") or "auto").lower()
    if name == "auto":
        reason = gpu_unavailable_reason()
        if reason is None:
            return _make("gpu")
        backend = _make("cpu")
        if not backend.reason:
            backend.reason = reason
            log.info("using the CPU backend: %s", reason)
        return backend
    return _make(name)
