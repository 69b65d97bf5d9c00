"""The command line's start-up: `gpudiffim --help` in a fresh process (issue 17: < 0.3 s)."""

import subprocess
import sys


def test_help_starts_quickly(benchmark):
    def run():
        subprocess.run([sys.executable, "-m", "gpudiffim.cli", "--help"], check=True,
                       capture_output=True)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
