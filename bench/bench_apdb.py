"""Association and APDB insert per exposure, with 10^4 and 10^6 diaObjects already stored
(SQLite, and PostgreSQL where a server starts): one 512^2 exposure of ~50 diaSources,
its objects loaded, matched, forced-measured, summarised and stored in one transaction.

The stored objects are spread at 2 x 10^4 per square degree (a busy field's diaObjects)
around the exposure, so the footprint query finds the same few dozen whatever the total:
what grows with it is the table and its spatial index."""

import dataclasses
import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lsst.dax.apdb")

from gpudiffim.apdb import apdb_url, ingest_exposure, make_apdb  # noqa: E402
from gpudiffim.io import read_exposure  # noqa: E402
from gpudiffim.pipeline import PipelineConfig, process_pair  # noqa: E402
from gpudiffim.simulate import PRESETS, simulate  # noqa: E402
from gpudiffim.warp import template_on_science_grid  # noqa: E402

# the tests' throwaway PostgreSQL server (their conftest, under a name of its own: the
# benchmarks have a conftest too)
_spec = importlib.util.spec_from_file_location(
    "gpudiffim_tests_conftest", Path(__file__).resolve().parents[1] / "tests" / "conftest.py")
_tests_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tests_conftest)
postgres_server = _tests_conftest.postgres_server

DENSITY = 2e4  # stored diaObjects per square degree
_visits = itertools.count(100000)


@pytest.fixture(scope="module")
def exposure(tmp_path_factory):
    """(difference, diaSources, science, is_score) of one processed 512^2 exposure."""
    out = tmp_path_factory.mktemp("apdb_bench")
    cfg = dataclasses.replace(PRESETS["ci"], visits={"g": (11690,)})
    row = simulate(out, cfg, seed=1, workers=1)[0]
    science = read_exposure(out / row["science"])
    template, _ = template_on_science_grid(science, read_exposure(out / row["template"]), "cpu")
    result, sources, _ = process_pair(science, template, PipelineConfig(), "cpu")
    return result.difference, sources, science, result.is_score


def _prefill(url, difference, n):
    """``n`` diaObjects at DENSITY around the exposure's centre, stored in chunks."""
    import pandas as pd
    from astropy.time import Time

    apdb = make_apdb(url)
    ny, nx = difference.shape
    ra0, dec0 = difference.wcs.pixel_to_world_values(nx / 2, ny / 2)
    side = np.sqrt(n / DENSITY)  # degrees
    rng = np.random.default_rng(3)
    for start in range(0, n, 100_000):
        k = min(100_000, n - start)
        frame = pd.DataFrame({
            "diaObjectId": np.arange(start + 1, start + k + 1, dtype=np.int64),
            "ra": ra0 + rng.uniform(-side / 2, side / 2, k) / np.cos(np.radians(dec0)),
            "dec": dec0 + rng.uniform(-side / 2, side / 2, k),
            "raErr": 1e-5, "decErr": 1e-5, "nDiaSources": 1, "validityStartMjdTai": 57000.0,
            **{f"{b}_psfFluxNdata": 0 for b in "ugrizy"}})
        apdb.store(Time(57000.0, format="mjd", scale="tai"), frame)


def _bench(benchmark, url, exposure, n):
    difference, sources, science, is_score = exposure
    _prefill(url, difference, n)

    def once():
        visit = next(_visits)  # a new visit a minute later: new object versions
        info = dataclasses.replace(difference.info, visit=visit,
                                   mjd=difference.info.mjd + (visit - 100000) / 1440.0)
        ingest_exposure(url, difference.replace(info=info), sources, science, is_score)

    once()  # the first exposure opens the database
    benchmark.pedantic(once, rounds=5, iterations=1)
    benchmark.extra_info.update({"stored_objects": n, "dia_sources": int(
        (~np.asarray(sources["sky_source"])).sum())})


@pytest.mark.parametrize("n", [10**4, 10**6])
def test_ingest_sqlite(benchmark, exposure, tmp_path, n):
    _bench(benchmark, f"sqlite:///{tmp_path / 'apdb.db'}", exposure, n)


@pytest.mark.parametrize("n", [10**4, 10**6])
def test_ingest_postgresql(benchmark, exposure, postgres_server, n):  # noqa: F811
    from sqlalchemy import create_engine, text
    name = f"bench_{n}"
    engine = create_engine(apdb_url(f"{postgres_server}/postgres"),
                           isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(text(f"CREATE DATABASE {name}"))
    engine.dispose()
    _bench(benchmark, f"{postgres_server}/{name}", exposure, n)
