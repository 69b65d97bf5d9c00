"""The command line."""

import json
import sys

import numpy as np
import pytest
from astropy.table import Table

from gpudiffim.cli import main
from gpudiffim.io import read_exposure, write_exposure

from pairs import kernel_pair


def test_info_without_cupy_says_cpu_and_why(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "in use:   cpu" in out
    assert "CuPy is not installed" in out
    assert "pyfftw" in out.lower()
    assert "threads:" in out


def test_cli_writes_dia_sources(tmp_path):
    science, template = kernel_pair(shape=(512, 512), n_stars=300, seed=4,
                                    moved=[(200.0, 300.0, 5e4, 3.0, 0.0)])
    write_exposure(science, tmp_path / "sci.fits")
    write_exposure(template, tmp_path / "tmpl.fits")
    assert main(["subtract", str(tmp_path / "sci.fits"), str(tmp_path / "tmpl.fits"),
                 "-o", str(tmp_path / "out")]) == 0
    table = Table.read(tmp_path / "out" / "diaSources.parquet")
    for col in ("diaSourceId", "visit", "detector", "band", "x", "y", "ra", "dec", "psfFlux",
                "psfFluxErr", "apFlux", "apFluxErr", "snr", "isDipole", "pixelFlags_edge",
                "sky_source", "scienceFlux"):
        assert col in table.colnames
    real = table[~table["sky_source"]]
    assert np.min(np.hypot(real["x"] - 200, real["y"] - 300)) < 4


def test_cli_subtract_writes_difference_and_fit(tmp_path):
    science, template = kernel_pair(shape=(512, 512), n_stars=300, seed=4)
    write_exposure(science, tmp_path / "sci.fits")
    write_exposure(template, tmp_path / "tmpl.fits")
    out = tmp_path / "out"
    assert main(["subtract", str(tmp_path / "sci.fits"), str(tmp_path / "tmpl.fits"),
                 "-o", str(out),
                 "--flavor", "auto", "--backend", "cpu"]) == 0
    diff = read_exposure(out / "difference.fits")
    assert diff.shape == (512, 512) and diff.psf is not None
    fit = json.loads((out / "fit.json").read_text())
    assert fit["flavor"] == "convolveTemplate"
    assert fit["quality"]["kernel_sum_centre"] == pytest.approx(0.9, rel=0.01)
    assert main(["subtract", str(tmp_path / "missing.fits"), str(tmp_path / "tmpl.fits"),
                 "-o", str(out)]) == 2
