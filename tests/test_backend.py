"""Backend conformance: every backend gives the same answers as NumPy/SciPy."""

import os

import numpy as np
import pytest
from scipy import ndimage

from gpudiffim.backend import CpuBackend, get_backend
from gpudiffim.errors import BackendError


def test_rfft_roundtrip_and_values(backend, rng):
    a = rng.normal(size=(3, 40, 37))
    spec = backend.rfft2(backend.to_device(a), s=(64, 45))
    np.testing.assert_allclose(backend.to_host(spec), np.fft.rfftn(a, s=(64, 45), axes=(-2, -1)),
                               rtol=1e-10, atol=1e-10)
    back = backend.to_host(backend.irfft2(spec, s=(64, 45)))[:, :40, :37]
    np.testing.assert_allclose(back, a, atol=1e-12)


def test_rfft_keeps_float32(backend, rng):
    a = backend.to_device(rng.normal(size=(32, 32)).astype(np.float32))
    out = backend.irfft2(backend.rfft2(a), s=(32, 32))
    assert backend.to_host(out).dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_kernel_padded_to_a_large_frame(backend, rng, dtype):
    """Kernels far smaller than the frame take a rows-then-columns path on the CPU: the
    same spectrum as the full 2-D transform."""
    k = rng.normal(size=(3, 21, 17)).astype(dtype)
    got = backend.to_host(backend.rfft2(backend.to_device(k), s=(200, 180)))
    want = np.fft.rfft2(k.astype(np.float64), s=(200, 180))
    assert got.shape == want.shape
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert np.abs(got - want).max() < tol * np.abs(want).max()
    assert got.dtype == (np.complex64 if dtype == np.float32 else np.complex128)


def test_fft_plans_are_cached():
    cpu = get_backend("cpu")
    a = np.ones((16, 18), np.float32)
    cpu.rfft2(a)
    n = len(cpu._plans)
    cpu.rfft2(a + 1)
    assert len(cpu._plans) == n
    out1 = cpu.rfft2(a)
    out2 = cpu.rfft2(2 * a)  # results must not alias the plan's buffer
    assert np.allclose(out2, 2 * out1)


def test_stacks_use_fixed_size_chunk_plans(rng):
    """Stacks whose length changes (stamps per exposure) reuse one chunk-sized plan, and
    the partial last chunk is right."""
    from gpudiffim.backend import CpuBackend

    cpu = CpuBackend(threads=1)
    cpu.chunk_bytes = 4 * (30 * 28 + 30 * 15 * 2) * 2 * 4  # about 4 stamps a chunk
    for n in (5, 7, 13):
        a = rng.normal(size=(n, 2, 30, 28)).astype(np.float32)
        spec = cpu.rfft2(a)
        np.testing.assert_allclose(spec, np.fft.rfftn(a, axes=(-2, -1)), rtol=2e-5, atol=2e-4)
        np.testing.assert_allclose(cpu.irfft2(spec, s=(30, 28)), a, atol=1e-5)
    assert len(cpu._plans) == 2  # one r2c and one c2r plan for every stack length


def test_label_matches_scipy(backend, rng):
    mask = rng.random((50, 60)) > 0.7
    labels, n = backend.label(backend.to_device(mask))
    ref, n_ref = ndimage.label(mask, structure=np.ones((3, 3)))
    assert n == n_ref
    np.testing.assert_array_equal(backend.to_host(labels), ref)


@pytest.mark.parametrize("size", [1, 3, 4, 7, 40])
def test_filters_match_scipy(backend, rng, size):
    a = rng.normal(size=(31, 29))
    got = backend.to_host(backend.maximum_filter(backend.to_device(a), size))
    np.testing.assert_array_equal(got, ndimage.maximum_filter(a, size, mode="constant",
                                                              cval=-np.inf))
    got = backend.to_host(backend.uniform_filter(backend.to_device(a), size))
    np.testing.assert_allclose(got, ndimage.uniform_filter(a, size, mode="constant"), atol=1e-12)
    # the types the stages filter: float32 images (within a rounding) and uint8 flags
    b = (100.0 + rng.normal(size=(33, 27))).astype(np.float32)
    got = backend.to_host(backend.uniform_filter(backend.to_device(b), size))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ndimage.uniform_filter(b, size, mode="constant"),
                               rtol=1e-5)
    flags = (rng.random((33, 27)) > 0.95).astype(np.uint8)
    got = backend.to_host(backend.maximum_filter(backend.to_device(flags), size))
    np.testing.assert_array_equal(got, ndimage.maximum_filter(flags, size, mode="constant"))


def test_batched_solve(backend, rng):
    m = rng.normal(size=(10, 6, 6))
    a = m @ np.swapaxes(m, -1, -2) + 6 * np.eye(6)
    x = rng.normal(size=(10, 6))
    b = np.einsum("kij,kj->ki", a, x)
    got = backend.to_host(backend.solve(backend.to_device(a), backend.to_device(b)))
    np.testing.assert_allclose(got, x, rtol=1e-10)


def test_strict_refuses_implicit_numpy_conversion():
    strict = get_backend("strict")
    a = strict.to_device(np.ones((4, 4)))
    with pytest.raises((RuntimeError, TypeError, ValueError)):
        np.asarray(a)
    assert np.array_equal(strict.to_host(a), np.ones((4, 4)))  # explicit is fine


def test_auto_without_cupy_falls_back_to_cpu(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cupy", None)
    backend = get_backend("auto")
    assert backend.name == "cpu"
    assert "CuPy" in backend.reason
    with pytest.raises(BackendError, match="GPU backend unavailable"):
        get_backend("gpu")


def test_environment_variable_and_unknown_name(monkeypatch):
    monkeypatch.setenv("GPUDIFFIM_BACKEND", "strict")
    assert get_backend().name == "strict"
    with pytest.raises(BackendError, match="unknown backend"):
        get_backend("tpu")


def test_upload_from_a_reader_thread(backend, rng):
    """Bulk uploads made ahead of the compute (on GPU: pinned memory, non-blocking stream,
    from another thread) land whole and equal to a plain copy."""
    from concurrent.futures import ThreadPoolExecutor

    planes = [rng.normal(size=(257, 130)).astype(np.float32) for _ in range(3)]
    with ThreadPoolExecutor(2) as pool:
        up = list(pool.map(lambda p: backend.upload(p, np.float32), planes))
    total = backend.xp.sum(up[0] + up[1] + up[2])  # used by this thread's compute
    for p, u in zip(planes, up):
        np.testing.assert_array_equal(backend.to_host(u), p)
    assert abs(float(backend.to_host(total)) - sum(p.sum() for p in planes)) < 1e-2



def _mapped_bytes():
    """Bytes glibc holds in separately mmapped blocks (``mallinfo2().hblkhd``)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("no glibc mallinfo2 here")
    f.restype = MallInfo2
    return f().hblkhd


@pytest.mark.slow
def test_cpu_backend_keeps_exposure_sized_blocks_in_the_heap():
    """A temporary the size of a 2048 x 4176 float32 plane and larger comes from the heap,
    where a freed block is reused, not from a fresh mmap that faults every page in again
    (glibc's default above 32 MiB: 1.4 s of system time per 2048 x 4176 subtraction)."""
    from gpudiffim.hostmem import tune_host_allocator

    get_backend("cpu")
    if not tune_host_allocator():
        pytest.skip("not glibc: the allocator is left as it is")
    before = _mapped_bytes()
    a = np.ones((4176, 2048 * 2), np.float32)  # 68 MiB
    grown = _mapped_bytes() - before
    del a
    assert grown < (1 << 20), grown


def test_a_singular_matrix_solves_to_nan_on_every_backend(backend, rng):
    """NumPy raises on a singular matrix where CuPy returns NaN unchecked: every backend
    gives NaN for that matrix alone, the others solved as usual."""
    a = rng.normal(size=(4, 3, 3))
    a[2] = [[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 1.0]]  # rank 2
    b = rng.normal(size=(4, 3))
    x = backend.to_host(backend.solve(backend.to_device(a), backend.to_device(b)))
    assert np.all(np.isnan(x[2]))
    for i in (0, 1, 3):
        np.testing.assert_allclose(a[i] @ x[i], b[i], rtol=1e-9, atol=1e-9)


def _fake_cupy(broken: str | None):
    """A stand-in for CuPy on NumPy that counts one device; ``broken``: the library
    ('fft', 'linalg' or 'kernel') that fails as a CuPy wheel without the CUDA libraries
    does."""
    import types

    fake = types.SimpleNamespace()
    fake.float32 = np.float32
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))

    def fail(*args, **kwargs):
        raise ImportError("libcufft.so.11: cannot open shared object file")

    fake.fft = types.SimpleNamespace(rfft2=fail if broken == "fft" else np.fft.rfft2,
                                     irfft2=np.fft.irfft2)
    fake.linalg = types.SimpleNamespace(solve=fail if broken == "linalg" else np.linalg.solve)
    fake.eye, fake.ones = np.eye, np.ones
    fake.arange = fail if broken == "kernel" else np.arange
    return fake


@pytest.mark.parametrize("broken, step", [("fft", "cuFFT"), ("linalg", "cuSOLVER"),
                                          ("kernel", "NVRTC")])
def test_auto_probes_the_gpu_before_choosing_it(monkeypatch, broken, step):
    """A device CuPy counts but cannot use (its CUDA libraries missing) is not chosen:
    `auto` says which step failed and runs on the CPU; a working device passes the probe."""
    import sys

    from gpudiffim.backend import _make, gpu_unavailable_reason

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(broken))
    _make.cache_clear()
    try:
        reason = gpu_unavailable_reason()
        assert reason is not None and step in reason and "libcufft" in reason
        backend = get_backend("auto")
        assert backend.name == "cpu" and step in backend.reason
        monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(None))
        assert gpu_unavailable_reason() is None
    finally:
        _make.cache_clear()


def test_several_arrays_come_back_in_one_read(backend, rng, monkeypatch):
    """to_host_all returns each array as to_host would (values, shape, dtype), in one
    device read; host arrays pass through."""
    arrays = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=5),
              np.arange(-3, 9, dtype=np.int32).reshape(2, 6), np.array(2**40, np.int64),
              rng.random(7) > 0.5, np.zeros((0, 2), np.float32)]
    on_device = [backend.to_device(a) for a in arrays]
    reads = []
    to_host = backend.to_host
    monkeypatch.setattr(backend, "to_host", lambda a: reads.append(1) or to_host(a))
    got = backend.to_host_all(*on_device, np.array([1.5]))
    assert len(reads) <= 1
    for a, g in zip(arrays + [np.array([1.5])], got):
        assert g.dtype == a.dtype and g.shape == a.shape
        np.testing.assert_array_equal(g, a)
    cols = backend.to_host_columns({"x": on_device[1], "flag": on_device[4], "n": 3})
    np.testing.assert_array_equal(cols["x"], arrays[1])
    assert cols["flag"].dtype == bool and int(cols["n"]) == 3


def test_cpu_threads_follow_omp_num_threads(monkeypatch):
    """A Dask worker's share of the cores (it sets OMP_NUM_THREADS=1 for single-threaded
    workers) bounds the CPU backend's FFT threads; unset, every core is used."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert CpuBackend().threads == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert CpuBackend().threads == len(os.sched_getaffinity(0))
    assert CpuBackend(threads=3).threads == 3
