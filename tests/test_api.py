"""The package's shape: its public API, its configs, and the rules its modules keep."""

import ast
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpudiffim
from gpudiffim import options
from gpudiffim import pipeline as pipeline_module
from gpudiffim.backend import get_backend
from gpudiffim.basis import BasisConfig
from gpudiffim.detect import DetectionConfig
from gpudiffim.kernel_fit import KernelFitConfig
from gpudiffim.measure import MeasureConfig, dia_sources
from gpudiffim.pipeline import PipelineConfig
from gpudiffim.quality import QualityConfig
from gpudiffim.runner import RunConfig, run
from gpudiffim.simulate import PRESETS, SimConfig, simulate
from gpudiffim.sources import SourceSelectionConfig
from gpudiffim.subtract import SubtractConfig, subtract

from pairs import kernel_pair

PACKAGE = Path(gpudiffim.__file__).parent
MODULES = sorted(p for p in PACKAGE.glob("*.py"))
CONFIGS = (SubtractConfig, BasisConfig, KernelFitConfig, SourceSelectionConfig, DetectionConfig,
           MeasureConfig, PipelineConfig, RunConfig, SimConfig)


def _tree(path):
    return ast.parse(path.read_text(), filename=str(path))


def _sibling(node: ast.ImportFrom) -> str | None:
    """The package module an ``from . import`` / ``from gpudiffim.x import`` names."""
    if node.level == 1:
        return node.module or ""
    if node.level == 0 and node.module and node.module.split(".")[0] == "gpudiffim":
        return node.module.partition(".")[2]
    return None


def test_subtract_stays_callable_after_importing_its_module():
    """The README's own example: importing the config from the module must not rebind
    ``gpudiffim.subtract`` (nor ``simulate``, ``inject``, ``detect``, ``measure``) to it."""
    code = ("import gpudiffim\n"
            "from gpudiffim.subtract import SubtractConfig\n"
            "from gpudiffim.simulate import PRESETS\n"
            "from gpudiffim.inject import psf_stamp\n"
            "from gpudiffim.detect import DetectionConfig\n"
            "from gpudiffim.measure import MeasureConfig\n"
            "names = ('subtract', 'simulate', 'inject', 'detect', 'measure')\n"
            "print(all(callable(getattr(gpudiffim, n)) for n in names))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", out.stderr


def test_public_functions_have_real_signatures_and_numpydoc():
    functions = [getattr(gpudiffim, n) for n in gpudiffim.__all__
                 if inspect.isfunction(getattr(gpudiffim, n))]
    assert {f.__name__ for f in functions} >= {"subtract", "run", "simulate", "inject",
                                               "dia_sources", "read_exposure", "get_backend"}
    for f in functions:
        params = inspect.signature(f).parameters
        assert not any(p.kind == p.VAR_KEYWORD for p in params.values()), f  # no wrappers
        doc = inspect.getdoc(f) or ""
        assert doc, f
    for name in ("subtract", "run", "dia_sources", "detect", "measure", "process_pair"):
        doc = inspect.getdoc(getattr(gpudiffim, name))
        assert "Parameters\n----------" in doc and "Returns\n-------" in doc, name
    assert list(inspect.signature(gpudiffim.subtract).parameters) == [
        "science", "template", "config", "backend"]


def test_every_module_declares_its_public_names():
    for path in MODULES:
        module = __import__(f"gpudiffim.{path.stem}" if path.stem != "__init__" else "gpudiffim",
                            fromlist=["*"])
        assert hasattr(module, "__all__"), path.name
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, (path.name, missing)


def test_no_module_imports_a_private_name_from_another():
    offenders = []
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and _sibling(node) is not None:
                offenders += [f"{path.name}: {a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__version__"]
    assert not offenders, offenders


def test_no_function_local_imports_between_sibling_modules():
    """Stages import each other at the top (no hidden cycles). The one exception is the
    command line, the imperative shell: each command imports its stages when it runs, so
    `gpudiffim --help` starts without the numerical stack."""
    offenders = []
    for path in MODULES:
        if path.name == "cli.py":
            continue
        for fn in ast.walk(_tree(path)):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                offenders += [f"{path.name}:{n.lineno} in {fn.name}" for n in ast.walk(fn)
                              if isinstance(n, ast.ImportFrom) and _sibling(n) is not None]
    assert not offenders, offenders


def test_no_import_cycles_between_modules():
    graph = {}
    for path in MODULES:
        if path.stem == "__init__":
            continue
        deps = set()
        for node in _tree(path).body:
            if isinstance(node, ast.ImportFrom) and _sibling(node):
                deps.add(_sibling(node).split(".")[0])
        graph[path.stem] = deps
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in graph.get(node, ()):
            if state.get(dep) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack + [node, dep])}")
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_field_has_one_line_of_documentation(config):
    docs = options.field_docs(config)
    assert docs and all(doc and "\n" not in doc for doc in docs.values()), docs
    assert dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen
    text = inspect.getdoc(config)
    assert all(f"{name} :" in text for name in docs)  # help() lists every field


def test_a_run_config_reaches_subtract_unchanged(tmp_path, monkeypatch):
    """Every subtraction, detection and measurement setting of a run's config arrives at
    its stage as given (the runner once rebuilt SubtractConfig field by field and reset
    refitBackground and preconvolveByMatching)."""
    repo = tmp_path / "repo"
    simulate(repo, dataclasses.replace(PRESETS["ci"], visits={"g": (11692,)}), seed=1,
             workers=1)
    pipeline = PipelineConfig(
        subtract=SubtractConfig(mode="preconvolve", refitBackground=False,
                                preconvolveByMatching=False, doDecorrelation=False,
                                kernel=KernelFitConfig(spatialKernelOrder=1),
                                # these settings leave this pair's difference 7x noisier
                                # than its variance says: the gates would reject it
                                quality=QualityConfig(doQualityGates=False)),
        detection=DetectionConfig(thresholdValue=6.0, doResidualVariance=False),
        measure=MeasureConfig(nSkySources=7))
    seen = {}

    def spy_subtract(science, template, config, backend):
        seen["subtract"] = config
        return subtract(science, template, config, backend)

    def spy_sources(result, science, detection_config, measure_config, backend):
        seen["detection"], seen["measure"] = detection_config, measure_config
        return dia_sources(result, science, detection_config, measure_config, backend)

    monkeypatch.setattr(pipeline_module, "subtract", spy_subtract)
    monkeypatch.setattr(pipeline_module, "dia_sources", spy_sources)
    table = run(repo, tmp_path / "out", RunConfig(pipeline=pipeline), progress=False)
    assert list(table["status"]) == ["done"]
    assert seen == {"subtract": pipeline.subtract, "detection": pipeline.detection,
                    "measure": pipeline.measure}
    assert table["flavor"][0] == "preconvolve"
    with pytest.raises(TypeError, match="not both"):
        run(repo, tmp_path / "other", RunConfig(), flavor="auto", progress=False)


# device syncs of one 512^2 subtraction with detection and measurement, as issue 17 counts
# them on the strict backend: every to_host, every scalar conversion of a device array
# (float, int, bool, item), every boolean-mask index and every nonzero or unique (their
# sizes are data). Two moved stars make dipoles, so detection and measurement have
# sources to work on. A budget to keep, the count issue 17 asks to bring to 10 and below
# (docs/algorithm.md section 16 lists what the syncs are). Was 54 / 80 / 53 / 58 counting
# to_host alone before session 14; counting all of them, on the pair without dipoles,
# 37 / 45 / 35 / 40 before session 15.
SYNC_BUDGET = {"convolveTemplate": 24, "convolveScience": 29, "preconvolve": 22, "zogy": 23}


def count_device_syncs(backend, monkeypatch) -> list:
    """Instrument the strict backend: returns the list each sync appends its kind to."""
    import array_api_strict as xps

    syncs = []
    array = type(xps.asarray(0.0))
    on_device = lambda a: isinstance(a, array) and a.device == backend.device  # noqa: E731
    to_host = backend.to_host
    monkeypatch.setattr(backend, "to_host",
                        lambda a: (syncs.append("to_host") if on_device(a) else None)
                        or to_host(a))
    for name in ("__float__", "__int__", "__bool__", "__index__", "__complex__", "item"):
        if hasattr(array, name):
            def converted(self, *args, _run=getattr(array, name), _name=name, **kw):
                if on_device(self):
                    syncs.append(_name)
                return _run(self, *args, **kw)
            monkeypatch.setattr(array, name, converted)
    getitem = array.__getitem__

    def indexed(self, key):
        keys = key if isinstance(key, tuple) else (key,)
        if on_device(self) and any(isinstance(k, array) and k.dtype == xps.bool for k in keys):
            syncs.append("boolean index")
        return getitem(self, key)
    monkeypatch.setattr(array, "__getitem__", indexed)
    for name in ("nonzero", "unique_all", "unique_counts", "unique_inverse", "unique_values"):
        def selected(x, *args, _run=getattr(xps, name), _name=name, **kw):
            if on_device(x):
                syncs.append(_name)
            return _run(x, *args, **kw)
        monkeypatch.setattr(xps, name, selected)
    return syncs


@pytest.mark.parametrize("mode", sorted(SYNC_BUDGET))
def test_device_syncs_stay_within_budget(mode, monkeypatch):
    backend = get_backend("strict")
    science, template = kernel_pair(shape=(512, 512), n_stars=300, seed=4, moved=(
        (150.3, 160.7, 4e4, 2.5, 0.0), (380.2, 300.6, 3e4, 0.0, 3.0)))
    syncs = count_device_syncs(backend, monkeypatch)
    # one model's syncs: convolveScience, a poor model for this sharper template, fails its
    # quality gates and each retry costs another subtraction's
    config = SubtractConfig(mode=mode, quality=QualityConfig(doQualityGates=False))
    result = subtract(science, template, config, backend)
    table = dia_sources(result, science, backend=backend)
    assert np.count_nonzero(~table["sky_source"]) >= 2
    assert np.isfinite(result.quality["difference_pull_sigma"])
    assert len(syncs) <= SYNC_BUDGET[mode], sorted(syncs)


def test_the_sync_counter_sees_each_kind_of_sync(monkeypatch):
    """The instrument itself: each kind of sync counted once, host arrays never."""
    backend = get_backend("strict")
    xp = backend.xp
    syncs = count_device_syncs(backend, monkeypatch)
    a = backend.to_device(np.arange(6.0))
    float(xp.sum(a))
    bool(xp.any(a > 3))
    a[a > 3]
    xp.nonzero(a > 3)
    backend.to_host(a)
    np.arange(3.0)[np.arange(3) > 0]
    assert sorted(syncs) == ["__bool__", "__float__", "boolean index", "nonzero", "to_host"]


# full-frame Fourier transforms (forward and inverse, each image of a batch counted) of one
# 512^2 subtraction with detection and measurement on the strict backend: a budget to keep,
# issue 17's ceiling is 20 (convolveTemplate: 7 forward, 12 inverse, a spatially varying
# kernel's terms each inverted once; kernel sources' noise map by box passes since session 14)
FFT_BUDGET = {"convolveTemplate": 19, "preconvolve": 17, "zogy": 10}


@pytest.mark.parametrize("mode", sorted(FFT_BUDGET))
def test_full_frame_transforms_stay_within_budget(mode, monkeypatch):
    backend = get_backend("strict")
    science, template = kernel_pair(shape=(512, 512), n_stars=300, seed=4)
    full = []
    for name in ("rfft2", "irfft2"):
        def counted(a, *args, _run=getattr(backend, name), _inverse=name == "irfft2", **kw):
            shape = tuple(args[0] if args else kw["s"]) if _inverse else tuple(a.shape[-2:])
            if min(shape) >= 512:  # the frame (padded), not a stamp or a kernel's own grid
                full.append(int(np.prod(a.shape[:-2])) if a.ndim > 2 else 1)
            return _run(a, *args, **kw)
        monkeypatch.setattr(backend, name, counted)
    config = SubtractConfig(mode=mode, quality=QualityConfig(doQualityGates=False))
    result = subtract(science, template, config, backend)
    assert len(dia_sources(result, science, backend=backend)) > 0
    assert 0 < sum(full) <= FFT_BUDGET[mode], sum(full)


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python quick start, as written, on a simulated pair and repository."""
    text = (PACKAGE.parent / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    repo = tmp_path / "repo"
    manifest = simulate(repo, dataclasses.replace(PRESETS["ci"], visits={"g": (11692,)}), seed=5,
                        workers=1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "calexp.fits").write_bytes((repo / manifest[0]["science"]).read_bytes())
    (tmp_path / "template.fits").write_bytes((repo / manifest[0]["template"]).read_bytes())
    names = {}
    exec(compile(code, "README.md", "exec"), names)
    assert len(names["sources"]) > 0 and (tmp_path / "difference.fits").is_file()
    import sqlite3
    with sqlite3.connect(tmp_path / "apdb.db") as db:
        stored = db.execute('SELECT COUNT(*) FROM "DiaSource"').fetchone()[0]
    assert stored == int((~names["sources"]["sky_source"]).sum()) > 0
    assert list(names["table"]["status"]) == ["done"]
    assert names["table"]["flavor"][0] == "preconvolve"


def test_the_command_line_starts_without_the_numerical_stack():
    """`gpudiffim --help` and `import gpudiffim` load no NumPy, SciPy, Astropy or
    SQLAlchemy (it took 2-3 s when the package imported every stage); the public names still
    resolve, each on first use."""
    code = ("import sys, gpudiffim.cli, gpudiffim\n"
            "heavy = [m for m in ('numpy', 'scipy', 'astropy', 'sqlalchemy', 'lsst')\n"
            "         if m in sys.modules]\n"
            "print(heavy)\n"
            "print(all(hasattr(gpudiffim, n) for n in gpudiffim.__all__))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout + out.stderr
    helptext = subprocess.run([sys.executable, "-m", "gpudiffim.cli", "--help"],
                              capture_output=True, text=True, check=True).stdout
    assert "subtract" in helptext and "make-apdb" in helptext
