"""Shared fixtures: every engine test runs on each backend that exists here."""

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from gpudiffim.backend import get_backend, gpu_unavailable_reason

_GPU_REASON = gpu_unavailable_reason()

BACKENDS = [
    "cpu",
    "strict",
    pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
        _GPU_REASON is not None, reason=f"no GPU: {_GPU_REASON}")]),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend under test (cpu, strict, and gpu where a device exists)."""
    return get_backend(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(20261124)


# ------------------------------------------------------------------ a PostgreSQL server
def _pg_bin(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, else in Debian's versioned directory."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


def _as_server_user(cmd: list) -> list:
    """PostgreSQL refuses to run as root: run its programs as the postgres user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server on loopback (``GPUDIFFIM_TEST_POSTGRES``: the URL of
    one to use instead). Skips where none can be started, except under CI (``CI`` set, as
    ``.ci/run`` does), where that is a failure."""
    given = os.environ.get("GPUDIFFIM_TEST_POSTGRES")
    if given:
        yield given
        return
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        message = "no PostgreSQL server programs (initdb, pg_ctl) on this machine"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # in the system's temporary directory itself: the server's user must reach it
    base = Path(tempfile.mkdtemp(prefix="gpudiffim-postgres-"))
    base.chmod(0o755)
    data = base / "data"
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        subprocess.run(_as_server_user([initdb, "-D", str(data), "-A", "trust", "-U",
                                        "postgres", "--no-sync"]),
                       check=True, capture_output=True)
        subprocess.run(_as_server_user([pg_ctl, "-D", str(data), "-w", "-l",
                                        str(base / "log"), "-o",
                                        f"-p {port} -k {base} -c listen_addresses=127.0.0.1 "
                                        "-c fsync=off", "start"]),
                       check=True, capture_output=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        message = f"PostgreSQL could not start: {exc} {detail.decode(errors='replace')}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_server_user([pg_ctl, "-D", str(data), "-m", "fast", "stop"]),
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server, request):
    """A new, empty database on the test server, for one test."""
    from sqlalchemy import create_engine, text

    from gpudiffim.apdb import apdb_url
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    engine = create_engine(apdb_url(f"{postgres_server}/postgres"), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{postgres_server}/{name}"
