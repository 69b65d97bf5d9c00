"""Runner throughput (exposures/s) on the demo preset, and peak memory vs run length (CPU):
the same inputs repeated, and exposures whose sizes vary (new FFT plans, new buffers)."""

import subprocess
import sys

import pytest
from astropy.table import Table, vstack

from gpudiffim.io import read_exposure, write_exposure
from gpudiffim.runner import run
from gpudiffim.simulate import simulate

SIZES = [(2048, 1024), (1536, 1024), (2048, 768), (1024, 1024), (1800, 900)]


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    simulate(out, "demo", seed=0)
    return out


def test_runner_exposures_per_second(benchmark, demo_repo, tmp_path):
    n = len(Table.read(demo_repo / "manifest.ecsv"))

    def once():
        run(demo_repo, tmp_path / "out", force=True, progress=False)

    benchmark.pedantic(once, rounds=2, iterations=1)
    benchmark.extra_info["exposures"] = n
    benchmark.extra_info["exposures_per_second"] = n / benchmark.stats.stats.median


def _cutouts(repo, rows, sizes):
    """``rows`` exposures cut from the demo pairs at the origin (WCS and PSF stay valid),
    cycling through ``sizes``: a manifest in a new directory."""
    manifest = Table.read(repo / "manifest.ecsv")
    many = vstack([manifest] * (rows // len(manifest) + 1))[:rows]
    many["visit"] = list(range(1, rows + 1))  # distinct outputs
    sub = repo / f"manifest_{rows}_{len(sizes)}"
    sub.mkdir(exist_ok=True)
    for col in ("science", "template"):
        paths = []
        for i, name in enumerate(many[col]):
            ny, nx = sizes[i % len(sizes)]
            exp = read_exposure(repo / name)
            cut = exp.replace(image=exp.image[:ny, :nx], mask=exp.mask[:ny, :nx],
                              variance=exp.variance[:ny, :nx])
            paths.append(str(sub / f"{col}_{i:03d}.fits"))
            write_exposure(cut, paths[-1])
        many[col] = paths
    many.write(sub / "manifest.ecsv", overwrite=True)
    return sub


def _peak_rss_mb(repo, out, rows, sizes=SIZES[:1]):
    """Peak RSS of a fresh process running ``rows`` exposures of the given sizes."""
    sub = _cutouts(repo, rows, sizes)
    # VmHWM, not ru_maxrss: the latter survives exec, so a child would report the
    # high-water mark of the pytest process that forked it
    code = ("from gpudiffim.runner import run; "
            f"t = run({str(sub)!r}, {str(out)!r}, progress=False); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
            "print((t['status'] == 'done').sum(), hwm.split()[1])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    done, rss = map(int, result.stdout.strip().splitlines()[-1].split())
    assert done == rows, result.stderr[-2000:]
    return rss / 1024


def test_memory_stays_flat(benchmark, demo_repo, tmp_path):
    small = _peak_rss_mb(demo_repo, tmp_path / "two", 2)
    large = benchmark.pedantic(_peak_rss_mb, args=(demo_repo, tmp_path / "twenty", 20),
                               rounds=1, iterations=1)
    benchmark.extra_info.update({"peak_rss_mb_2": small, "peak_rss_mb_20": large,
                                 "ratio": large / small})
    print(f"\npeak RSS: 2 exposures {small:.0f} MB, 20 exposures {large:.0f} MB "
          f"(x{large / small:.2f})")


def test_memory_stays_flat_with_varying_sizes(benchmark, demo_repo, tmp_path):
    """20 exposures in 5 sizes (each size needs its own FFT plans and buffers) against 2 of
    the largest size."""
    small = _peak_rss_mb(demo_repo, tmp_path / "two", 2, SIZES[:1])
    large = benchmark.pedantic(_peak_rss_mb, args=(demo_repo, tmp_path / "twenty", 20, SIZES),
                               rounds=1, iterations=1)
    benchmark.extra_info.update({"peak_rss_mb_2": small, "peak_rss_mb_20_varying": large,
                                 "ratio": large / small})
    print(f"\npeak RSS: 2 exposures {small:.0f} MB, 20 exposures in {len(SIZES)} sizes "
          f"{large:.0f} MB (x{large / small:.2f})")
