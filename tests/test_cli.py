"""The command line."""

import sys

from gpudiffim.cli import main


def test_info_without_cupy_says_cpu_and_why(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "in use:   cpu" in out
    assert "CuPy is not installed" in out
    assert "pyfftw" in out.lower()
    assert "threads:" in out
