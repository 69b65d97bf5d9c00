"""One exposure end to end (subtract, detect, measure) at 1024², 2048x4176 and 4096², on each
backend, with the cost model beside it (bench/costmodel.py): full-frame transforms and
explicit reads counted, the time the transforms alone take, and their bandwidth floor.

The figures land in the benchmark's ``extra_info`` (``--benchmark-json``) and are printed
as one line per case (``-s``); ``bench/gpu.sh`` runs this on a GPU machine.
"""

import os

import numpy as np
import pytest
from costmodel import cost_model, counting
from harness import simulated_pair, synchronized

from gpudiffim.pipeline import PipelineConfig, process_pair

#: memory bandwidth the floor assumes, GB/s (an H100's HBM3 ~3000; a 2-core host ~20)
BANDWIDTH = {"cpu": float(os.environ.get("GPUDIFFIM_BENCH_HOST_GBS", 20)),
             "gpu": float(os.environ.get("GPUDIFFIM_BENCH_DEVICE_GBS", 3000))}

SHAPES = {"1024x1024": (1024, 1024), "2048x4176": (4176, 2048), "4096x4096": (4096, 4096)}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request, tmp_path_factory):
    return request.param, simulated_pair(tmp_path_factory, SHAPES[request.param])


def test_exposure_end_to_end(benchmark, pair, bench_backend):
    name, (science, template) = pair
    backend = bench_backend
    science, template = science.upload(backend), template.upload(backend)
    run = synchronized(backend, process_pair)
    config = PipelineConfig()
    run(science, template, config, backend)  # plans and caches warm, as in a run
    with counting(backend, science.shape) as counts:
        _, sources, stages = run(science, template, config, backend)
    model = cost_model(backend, counts, BANDWIDTH[backend.name])
    benchmark.pedantic(run, args=(science, template, config, backend), rounds=3,
                       warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({**model, **{f"{k}_s": v for k, v in stages.items()},
                                 "dia_sources": int(np.count_nonzero(~sources["sky_source"]))})
    print(f"\n{name} {backend.name}: {median:.3f} s measured "
          f"(subtract {stages['subtract']:.3f}, detect+measure {stages['detect_measure']:.3f}); "
          f"{model['transforms']} full-frame transforms at {model.get('padded', '-')} take "
          f"{model['transform_s']:.3f} s (bandwidth floor {model['bandwidth_floor_s']:.4f} s "
          f"at {BANDWIDTH[backend.name]:.0f} GB/s), {model['reads']} explicit reads")
