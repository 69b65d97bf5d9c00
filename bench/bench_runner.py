"""Runner throughput (exposures/s) on the demo preset, and peak memory vs run length (CPU)."""

import resource
import subprocess
import sys

import pytest
from astropy.table import Table, vstack

from gpudiffim.runner import run
from gpudiffim.simulate import simulate


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


def _peak_rss_mb(repo, out, rows):
    """Peak RSS of a fresh process running ``rows`` exposures."""
    manifest = Table.read(repo / "manifest.ecsv")
    many = vstack([manifest] * (rows // len(manifest) + 1))[:rows]
    many["visit"] = list(range(1, rows + 1))  # distinct outputs, same input files
    sub = repo / f"manifest_{rows}"
    sub.mkdir(exist_ok=True)
    for col in ("science", "template"):
        many[col] = [str(repo / p) for p in many[col]]
    many.write(sub / "manifest.ecsv", overwrite=True)
    code = ("import resource, sys; from gpudiffim.runner import run; "
            f"run({str(sub)!r}, {str(out)!r}, progress=False); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def test_memory_stays_flat(benchmark, demo_repo, tmp_path):
    small = _peak_rss_mb(demo_repo, tmp_path / "two", 2)
    large = benchmark.pedantic(_peak_rss_mb, args=(demo_repo, tmp_path / "twenty", 20),
                               rounds=1, iterations=1)
    benchmark.extra_info.update({"peak_rss_mb_2": small, "peak_rss_mb_20": large,
                                 "ratio": large / small})
    print(f"\npeak RSS: 2 exposures {small:.0f} MB, 20 exposures {large:.0f} MB "
          f"(x{large / small:.2f})")
