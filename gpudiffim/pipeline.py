"""The per-exposure pipeline: subtraction, then detection and measurement, with one config.

:class:`PipelineConfig` composes the three stages' configs; the runner, the CLI and
:func:`process_pair` all take it whole, so a setting given once reaches its stage unchanged.
"""

from __future__ import annotations

import time

from .backend import get_backend
from .detect import DetectionConfig
from .exposure import Exposure
from .measure import MeasureConfig, dia_sources
from .options import configclass, option
from .subtract import SubtractConfig, subtract

__all__ = ["PipelineConfig", "process_pair"]


@configclass
class PipelineConfig:
    """Everything the per-exposure pipeline does, stage by stage."""

    subtract: SubtractConfig = option(factory=SubtractConfig, doc="the subtraction")
    detection: DetectionConfig = option(factory=DetectionConfig, doc="detection")
    measure: MeasureConfig = option(factory=MeasureConfig, doc="measurement")


def process_pair(science: Exposure, template: Exposure,
                 config: PipelineConfig | None = None, backend=None):
    """Subtract ``template`` from ``science`` and find the diaSources.

    Parameters
    ----------
    science, template : Exposure
        The pair, on one pixel grid, with PSF models.
    config : PipelineConfig, optional
        The stages' settings (default: ``PipelineConfig()``).
    backend : str or Backend, optional
        Where the arrays live.

    Returns
    -------
    result : SubtractionResult
        The subtraction (difference on the backend).
    sources : astropy.table.Table
        Its DiaSource table.
    timings : dict
        Seconds spent in ``subtract`` and ``detect_measure`` (device work included).
    """
    config = config or PipelineConfig()
    backend = get_backend(backend)
    t = time.perf_counter()
    result = subtract(science, template, config.subtract, backend)
    backend.synchronize()
    timings = {"subtract": time.perf_counter() - t}
    t = time.perf_counter()
    sources = dia_sources(result, science.to_backend(backend), config.detection, config.measure,
                          backend)
    backend.synchronize()
    timings["detect_measure"] = time.perf_counter() - t
    return result, sources, timings
