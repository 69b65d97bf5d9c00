"""The study's report: one HTML page with every DMTN-256 analysis, flavors side by side.

:func:`write_report` takes one or more runs (:func:`~gpudiffim.evaluation.load_run`, one
per flavor) and writes ``index.html`` (self-contained: figures embedded), each figure as
PNG in ``figures/``, the numbers behind them as ECSV tables in ``tables/`` and
``summary.json``, and triplet stamps of sampled detections and lost fakes in ``subjects/``
with a Zooniverse subject manifest (``zooniverse_manifest.csv``) to classify them. All the
plotting of the package lives here (Matplotlib, Agg); the numbers come from
:mod:`gpudiffim.evaluation`.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from astropy.table import vstack  # noqa: E402
from astropy.visualization import ZScaleInterval  # noqa: E402

from . import evaluation as ev  # noqa: E402
from .apdb import redacted_url  # noqa: E402
from .io import atomic_path  # noqa: E402
from .metrics import ideal_efficiency, sigmoid  # noqa: E402

__all__ = ["FIGURES", "write_report"]

_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def _bands(runs) -> list[str]:
    bands = sorted({str(b) for r in runs for b in r.fakes["band"]})
    return bands + ["all"] if len(bands) > 1 else (bands or ["all"])


# ---------------------------------------------------------------------------- figures
def figure_counts(runs):
    """diaSources per CCD before and after the flag cuts, per flavor."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, r in enumerate(runs):
        c = ev.exposure_counts(r)
        k = np.arange(len(c))
        axes[0].plot(k, c["n_sources"], "o--", color=_color(i), ms=3, label=f"{r.name} all")
        axes[0].plot(k, c["n_clean"], "o-", color=_color(i), ms=3,
                     label=f"{r.name} after cuts")
        bins = np.linspace(0, max(1, max(int(np.max(ev.exposure_counts(q)["n_sources"]))
                                         for q in runs)), 25)
        axes[1].hist(c["n_clean"], bins, histtype="step", color=_color(i), lw=1.5,
                     label=f"{r.name} after cuts")
        axes[1].hist(c["n_sources"], bins, histtype="step", color=_color(i), ls="--")
    axes[0].set(xlabel="CCD (run table order)", ylabel="diaSources", title="diaSources per CCD")
    axes[1].set(xlabel="diaSources per CCD", ylabel="CCDs", title="dashed: before cuts")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    return fig


def figure_flags(runs):
    """How often each pixel flag is set, per flavor (the cuts' flags in bold)."""
    tables = [ev.flag_counts(r) for r in runs]
    names = list(tables[0]["flag"])
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(names) + 1.2))
    h = 0.8 / len(runs)
    for i, (r, t) in enumerate(zip(runs, tables)):
        n = dict(zip(t["flag"], t["fraction"]))
        ax.barh(np.arange(len(names)) + i * h, [n.get(f, 0.0) for f in names], h,
                color=_color(i), label=r.name)
    ax.set_yticks(np.arange(len(names)) + 0.4 - h / 2)
    ax.set_yticklabels([f.replace("pixelFlags_", "") for f in names], fontsize=7)
    for label, name in zip(ax.get_yticklabels(), names):
        if name in ev.FLAG_CUTS:
            label.set_fontweight("bold")
    ax.set(xlabel="fraction of diaSources", title="pixel flags (bold: the flag cuts)")
    ax.legend(fontsize=7)
    return fig


def _efficiency_panels(runs, column: str, xlabel: str, image: str = "science"):
    bands = _bands(runs)
    fig, axes = plt.subplots(1, len(bands), figsize=(4.6 * len(bands), 3.8), squeeze=False)
    for ax, band in zip(axes[0], bands):
        for i, r in enumerate(runs):
            t = ev.efficiency_tables(r, column)
            t = t[(t["band"] == band) & (t["image"] == image)] if len(t) else t
            if not len(t):
                continue
            ok = t["n"] > 0
            ax.errorbar(t["centre"][ok], t["efficiency"][ok],
                        yerr=[t["err_lo"][ok], t["err_hi"][ok]], fmt="o", ms=3,
                        color=_color(i), label=r.name)
            ax.plot(t["centre"][ok], t["efficiency_clean"][ok], ":", color=_color(i))
            fits = ev.sigmoid_fits(r)
            fit = fits[fits["band"] == band]
            if image == "science" and len(fit) and np.isfinite(fit[f"{column}_50"][0]):
                x = np.linspace(t["lo"][0], t["hi"][-1], 200)
                a = math.log(9.0) / (fit[f"{column}_90"][0] - fit[f"{column}_50"][0])
                ax.plot(x, sigmoid(x, a, fit[f"{column}_50"][0]), "-", color=_color(i),
                        lw=0.8)
        if column in ev.SNR_COLUMNS:
            x = np.linspace(0, 100, 400)
            ax.plot(x, ideal_efficiency(x), "k--", lw=0.8, label="ideal Φ(S/N − 5)")
            ax.set_xscale("log")
        if column == "mag":
            ax.invert_xaxis()
        ax.set(xlabel=xlabel, ylabel="efficiency", ylim=(-0.03, 1.05),
               title=f"{image} fakes, band {band}")
        ax.legend(fontsize=7)
    return fig


def figure_efficiency_snr(runs):
    """Efficiency of the science fakes against their true S/N in the difference, with
    binomial (Wilson) errors, the logistic fit, the ideal detector and (dotted) after the
    flag cuts."""
    return _efficiency_panels(runs, "true_snr", "true S/N in the difference")


def figure_efficiency_optimal(runs):
    """Efficiency of the science fakes against the S/N proper image subtraction reaches
    for them (both PSFs and both images' noise; the most any subtraction can find)."""
    return _efficiency_panels(runs, "optimal_snr", "optimal S/N (proper subtraction)")


def figure_efficiency_mag(runs):
    """Efficiency of the science fakes against their magnitude."""
    return _efficiency_panels(runs, "mag", "magnitude")


def figure_template_fakes(runs):
    """Fakes in the templates (negative in the difference) beside those in the science:
    efficiency and flux pulls."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, r in enumerate(runs):
        t = ev.efficiency_tables(r)
        p = ev.photometry_table(r)
        for image, style in (("science", "o-"), ("template", "s--")):
            e = t[(t["band"] == "all") & (t["image"] == image)] if len(t) else t
            if not len(e):
                e = t[(t["image"] == image)] if len(t) else t
            ok = e["n"] > 0 if len(e) else []
            if len(e):
                axes[0].plot(e["centre"][ok], e["efficiency"][ok], style, ms=3,
                             color=_color(i), label=f"{r.name} {image}")
            pulls = np.asarray(p["pull"][p["image"] == image], float)
            pulls = pulls[np.isfinite(pulls)]
            if len(pulls):
                axes[1].hist(np.clip(pulls, -10, 10), np.linspace(-10, 10, 41),
                             histtype="step", ls="-" if image == "science" else "--",
                             color=_color(i), label=f"{r.name} {image}")
    axes[0].set(xscale="log", xlabel="true |S/N|", ylabel="efficiency", ylim=(-0.03, 1.05),
                title="template fakes (dashed) beside science fakes")
    axes[1].set(xlabel="pull (clipped to ±10)", ylabel="fakes", title="flux pulls")
    for ax in axes:
        ax.legend(fontsize=7)
    return fig


def figure_contamination(runs):
    """diaSources no fake explains, per CCD, before and after the flag cuts."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    top = max(int(np.max(ev.exposure_counts(r)["n_unmatched"])) for r in runs)
    bins = np.linspace(0, max(top, 1) + 1, 25)
    for i, r in enumerate(runs):
        c = ev.exposure_counts(r)
        ax.hist(c["n_unmatched"], bins, histtype="step", ls="--", color=_color(i))
        ax.hist(c["n_unmatched_clean"], bins, histtype="step", color=_color(i), lw=1.5,
                label=f"{r.name}: {np.mean(c['n_unmatched_clean']):.1f} per CCD after cuts")
    ax.set(xlabel="unmatched diaSources per CCD", ylabel="CCDs",
           title="contamination (dashed: before cuts)")
    ax.legend(fontsize=7)
    return fig


def figure_photometry(runs):
    """Photometry of the matched fakes: Δm against true S/N (outliers, |Δm| > 0.1, in
    red), pulls of all of them (grey) and with the outliers apart (the inliers' width is
    narrow by construction: the cut keeps only fluxes within 10%), and the PSF-flux
    histogram."""
    fig, axes = plt.subplots(len(runs), 3, figsize=(13, 3.4 * len(runs)), squeeze=False)
    for row, r in zip(axes, runs):
        p = ev.photometry_table(r)
        out = np.asarray(p["outlier"], bool)
        dm = np.clip(np.asarray(p["dm"], float), -1.5, 1.5)
        row[0].scatter(p["true_snr"][~out], dm[~out], s=5, color="k", label="inliers")
        row[0].scatter(p["true_snr"][out], dm[out], s=5, color="tab:red", label="outliers")
        row[0].axhline(0, color="0.5", lw=0.5)
        row[0].set(xscale="log", xlabel="true S/N", ylabel="Δm = m − m_true (clipped)",
                   title=f"{r.name}: Δm")
        pulls = np.clip(np.asarray(p["pull"], float), -10, 10)
        bins = np.linspace(-10, 10, 41)
        row[1].hist(pulls[np.isfinite(pulls)], bins, histtype="step", color="0.6",
                    label=f"all: robust width {p.meta['pull_width_all']:.2f}")
        row[1].hist(pulls[~out & np.isfinite(pulls)], bins, histtype="step", color="k",
                    label=f"inliers: median {p.meta['pull_median']:.2f}, "
                          f"width {p.meta['pull_width']:.2f}")
        row[1].hist(pulls[out & np.isfinite(pulls)], bins, histtype="step", color="tab:red",
                    label="outliers")
        x = np.linspace(-10, 10, 200)
        row[1].plot(x, len(pulls) * 0.5 * np.exp(-x * x / 2) / np.sqrt(2 * np.pi),
                    ":", color="0.4", label="unit Gaussian (all)")
        row[1].set(xlabel="(flux − true) / error", title="pulls")
        flux = np.asarray(r.sources["psfFlux"], float)
        flux = flux[np.isfinite(flux)]
        if len(flux):
            lim = np.percentile(np.abs(flux), 99) or 1.0
            row[2].hist(np.clip(flux, -lim, lim), 60, histtype="step", color="k")
        row[2].set(xlabel="psfFlux (counts, clipped at the 99th percentile)",
                   ylabel="diaSources", title="PSF flux of all diaSources")
        for ax in row[:2]:
            ax.legend(fontsize=7)
    return fig


def figure_snr(runs):
    """The pipeline's S/N (detection significance) and the variance plane's (PSF flux over
    its error) against the model S/N of the matched fakes."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    lim = [1.5, 150]
    for i, r in enumerate(runs):
        t = ev.snr_table(r)
        axes[0].scatter(t["model_snr"], t["pipeline_snr"], s=5, color=_color(i), label=r.name)
        axes[1].scatter(t["model_snr"], t["variance_snr"], s=5, color=_color(i), label=r.name)
    for ax, what in zip(axes, ("pipeline (significance)", "variance plane (psfFlux/err)")):
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set(xscale="log", yscale="log", xlim=lim, ylim=lim, xlabel="model S/N (truth)",
               ylabel=f"{what} S/N")
        ax.legend(fontsize=7)
    return fig


def figure_illumination(runs):
    """Where on the CCD the diaSources fall: x and y histograms (relative to the mean)
    and the fractional area gamma, uniform for uniformly placed sources."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for i, r in enumerate(runs):
        s = r.sources
        at = np.asarray(s["exposure"], int)
        for ax, col, size in ((axes[0], "x", "width"), (axes[1], "y", "height")):
            v = np.asarray(s[col], float) / np.asarray(r.exposures[size], float)[at]
            n, edges = np.histogram(v, np.linspace(0, 1, 33))
            ax.stairs(n / max(n.mean(), 1e-9), edges, color=_color(i), label=r.name)
        gamma, test = ev.illumination(r)
        n, edges = np.histogram(gamma, np.linspace(0, 1, 21))
        axes[2].stairs(n / max(n.mean(), 1e-9), edges, color=_color(i),
                       label=f"{r.name}: KS p = {test['p']:.2g}, "
                             f"outer 5%: {test['edge_excess']:.1f}×")
    for ax, label in zip(axes, ("x / width", "y / height", "γ (fractional area)")):
        ax.axhline(1.0, color="0.5", lw=0.5)
        ax.set(xlabel=label, ylabel="relative density")
        ax.legend(fontsize=7)
    axes[0].set_title("CCD illumination")
    return fig


def figure_seeing(runs):
    """Template against science seeing (PSF effective radius) per CCD, and diaSources per
    CCD against their difference."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(runs):
        c = ev.exposure_counts(r)
        axes[0].scatter(c["science_psf_radius"], c["template_psf_radius"], s=10,
                        color=_color(i), label=r.name)
        axes[1].scatter(c["radius_difference"], c["n_sources"], s=10, color=_color(i),
                        label=r.name)
    lo, hi = axes[0].get_xlim()
    axes[0].plot([lo, hi], [lo, hi], "k--", lw=0.8)
    axes[0].set(xlabel="science r_eff (px)", ylabel="template r_eff (px)",
                title="seeing: r_eff = √(NEA / 2π)")
    axes[1].set(xlabel="template − science r_eff (px)", ylabel="diaSources per CCD")
    for ax in axes:
        ax.legend(fontsize=7)
    return fig


def figure_objects(runs):
    """diaSources per diaObject, and the rms of each diaObject's diaSource positions
    against their S/N (needs the run's APDB)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, r in enumerate(runs):
        t = ev.object_table(r)
        if not len(t):
            continue
        axes[0].hist(t["n"], np.arange(0.5, max(int(np.max(t["n"])), 2) + 1.5),
                     histtype="step", color=_color(i), label=f"{r.name}: {len(t)} diaObjects")
        ok = np.isfinite(t["rms_arcsec"])
        axes[1].scatter(t["snr"][ok], t["rms_arcsec"][ok], s=6, color=_color(i),
                        label=r.name)
    axes[0].set(xlabel="diaSources per diaObject", ylabel="diaObjects", yscale="log")
    axes[1].set(xscale="log", yscale="log", xlabel="median |S/N|",
                ylabel="coordinate rms (arcsec)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no APDB in these runs", ha="center", transform=ax.transAxes)
    return fig


def _scaled(plane) -> np.ndarray:
    """A stamp on [0, 1] through the zscale interval (NaN: 0)."""
    good = plane[np.isfinite(plane)]
    if not len(good):
        return np.zeros_like(plane)
    lo, hi = ZScaleInterval().get_limits(good)
    return np.clip((np.nan_to_num(plane, nan=lo) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def triplet_image(cube, gap: int = 2) -> np.ndarray:
    """Science, template and difference stamps side by side on [0, 1], each with its own
    zscale stretch, ``gap`` white pixels between them."""
    size = cube.shape[-1]
    strip = np.ones((size, 3 * size + 2 * gap))
    for k, plane in enumerate(cube):
        strip[:, k * (size + gap):k * (size + gap) + size] = _scaled(plane)[::-1]
    return strip


def figure_triplets(run, items):
    """Science / template / difference (left to right, each on its own zscale) of sampled
    detections and lost fakes (with their true S/N; detections: their significance)."""
    fig, ax = plt.subplots(figsize=(4.2, 0.9 + 1.15 * max(len(items), 1)))
    if items:
        rows = [triplet_image(item["cube"]) for item in items]
        gap = np.ones((2, rows[0].shape[1]))
        mosaic = np.vstack([r for row in rows for r in (row, gap)][:-1])
        ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        step = rows[0].shape[0] + 2
        ax.set_yticks(np.arange(len(items)) * step + rows[0].shape[0] / 2)
        ax.set_yticklabels([f"{i['kind']} {i['band']} {i['visit']} {i['detector']}\n"
                            f"S/N {i['snr']:.1f}" for i in items], fontsize=6)
        ax.set_xticks([(k + 0.5) * rows[0].shape[1] / 3 for k in range(3)])
        ax.set_xticklabels(["science", "template", "difference"], fontsize=7)
        ax.xaxis.tick_top()
    else:
        ax.text(0.5, 0.5, "no cutouts", ha="center", transform=ax.transAxes)
    ax.set_title(run.name, fontsize=9)
    return fig


#: (key, title, function) of every run-comparison figure, in the page's order
FIGURES = (
    ("counts", "diaSources per CCD", figure_counts),
    ("flags", "Flag histogram", figure_flags),
    ("efficiency_snr", "Efficiency against true S/N", figure_efficiency_snr),
    ("efficiency_optimal", "Efficiency against the optimal S/N", figure_efficiency_optimal),
    ("efficiency_mag", "Efficiency against magnitude", figure_efficiency_mag),
    ("template_fakes", "Template fakes beside science fakes", figure_template_fakes),
    ("contamination", "Contamination", figure_contamination),
    ("photometry", "Photometry", figure_photometry),
    ("snr", "Three S/N", figure_snr),
    ("illumination", "CCD illumination", figure_illumination),
    ("seeing", "Template and science seeing", figure_seeing),
    ("objects", "diaObjects", figure_objects),
)


# ---------------------------------------------------------------------------- writing
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _tables(runs) -> dict:
    """Every analysis' numbers, the flavors stacked (a ``flavor`` column)."""
    out = {}
    for key, fn in (("exposures", ev.exposure_counts), ("flags", ev.flag_counts),
                    ("efficiency_snr", ev.efficiency_tables),
                    ("efficiency_optimal", lambda r: ev.efficiency_tables(r, "optimal_snr")),
                    ("efficiency_mag", lambda r: ev.efficiency_tables(r, "mag")),
                    ("sigmoid_fits", ev.sigmoid_fits), ("photometry", ev.photometry_table),
                    ("snr", ev.snr_table), ("objects", ev.object_table)):
        parts = []
        for r in runs:
            t = fn(r)
            t.meta = {}
            if len(t):
                t["flavor"] = r.name
                parts.append(t)
        if parts:
            out[key] = vstack(parts, metadata_conflicts="silent")
    return out


_SUMMARY_ROWS = (
    ("CCDs", "n_ccd", "d"), ("diaSources", "n_dia_sources", "d"),
    ("diaObjects", "n_dia_objects", "d"), ("diaSources after flag cuts", "n_dia_sources_clean",
                                           "d"),
    ("diaObjects after flag cuts", "n_dia_objects_clean", "d"),
    ("fakes (science + template)", "n_fakes", "d"), ("fakes matched", "fakes_matched", "d"),
    ("fakes matched after flag cuts", "fakes_matched_clean", "d"),
    ("fraction of matched fakes the cuts lose", "fraction_lost_to_cuts", ".3f"),
    ("known changes found (truth given)", "known_changes_found", "d"),
    ("unmatched (contamination)", "unmatched", "d"),
    ("unmatched after flag cuts", "unmatched_clean", "d"),
    ("contamination per CCD", "contamination_per_ccd", ".1f"),
    ("contamination per CCD after cuts", "contamination_per_ccd_clean", ".1f"),
    ("contamination per deg²", "contamination_per_deg2", ".0f"),
    ("contamination per deg² after cuts", "contamination_per_deg2_clean", ".0f"),
    ("true S/N at 50% efficiency", "snr_50", ".2f"),
    ("true S/N at 90% efficiency", "snr_90", ".2f"),
    ("magnitude at 50% efficiency", "mag_50", ".2f"),
    ("efficiency above S/N 7", "efficiency_above_snr7", ".3f"),
    ("efficiency above S/N 7 after cuts", "efficiency_above_snr7_clean", ".3f"),
    ("optimal S/N at 50% efficiency", "optimal_snr_50", ".2f"),
    ("efficiency above optimal S/N 8", "efficiency_above_optimal_snr8", ".3f"),
    ("largest shortfall from Φ(optimal S/N − 5), S/N ≥ 5", "ideal_shortfall_optimal", ".3f"),
    ("flux pull median (inliers)", "pull_median", ".3f"),
    ("flux pull width (inliers)", "pull_width", ".3f"),
    ("flux pull width (all matched, robust)", "pull_width_all", ".3f"),
    ("illumination KS p-value", "illumination_ks_p", ".3g"),
)


def _summary_html(summaries: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(s['flavor'])}</th>" for s in summaries)
    rows = []
    for label, key, fmt in _SUMMARY_ROWS:
        cells = []
        for s in summaries:
            v = s.get(key)
            ok = v is not None and not (isinstance(v, float) and not np.isfinite(v))
            cells.append(f"<td>{format(v, fmt) if ok else '–'}</td>")
        rows.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"


_STYLE = """body{font-family:sans-serif;max-width:1500px;margin:1em auto;padding:0 1em}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 8px;
text-align:right}th:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}
figcaption{font-size:13px;color:#444}.triplets{display:flex;flex-wrap:wrap;gap:1em}"""


def write_report(runs, outdir, *, stamps: int = 8, seed: int = 0, truth=None) -> Path:
    """Write the report of ``runs`` (RunCatalogues, or run directories) to ``outdir``.

    Parameters
    ----------
    runs : sequence
        :class:`~gpudiffim.evaluation.RunCatalogues` or paths of run directories.
    outdir : path
        The report's directory (made).
    stamps : int
        Triplets of detections and of lost fakes sampled per run.
    seed : int
        Seeds that sample.
    truth : Table or path, optional
        Changes known to be in the data besides the fakes, for run directories given as
        paths (:func:`~gpudiffim.evaluation.load_run`).

    Returns
    -------
    Path
        ``outdir/index.html``.
    """
    runs = [r if isinstance(r, ev.RunCatalogues) else ev.load_run(r, truth=truth)
            for r in runs]
    if not runs:
        raise ValueError("a report needs at least one run")
    out = Path(outdir)
    for sub in ("figures", "tables", "subjects"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    summaries = [ev.summary(r) for r in runs]
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summaries, indent=1, default=_json_number))
    for key, table in _tables(runs).items():
        with atomic_path(out / "tables" / f"{key}.ecsv") as tmp:
            table.write(tmp, format="ascii.ecsv", overwrite=True)
    sections = []
    for key, title, fn in FIGURES:
        data = _png(fn(runs))
        _write_bytes(out / "figures" / f"{key}.png", data)
        sections.append(_figure_html(title, key, data, fn.__doc__))
    rng = np.random.default_rng(seed)
    triplets, subjects = [], []
    for r in runs:
        items = ev.cutout_sample(r, stamps, rng)
        data = _png(figure_triplets(r, items))
        _write_bytes(out / "figures" / f"triplets_{_safe(r.name)}.png", data)
        triplets.append(_figure_html(f"Triplets: {r.name}", f"triplets_{_safe(r.name)}", data,
                                     figure_triplets.__doc__))
        subjects += _write_subjects(out / "subjects", r, items, len(subjects))
    _write_manifest(out / "zooniverse_manifest.csv", subjects)
    page = _page(runs, summaries, sections, triplets)
    with atomic_path(out / "index.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out / "index.html"


def _json_number(o):
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    return str(o)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "run"


def _figure_html(title: str, key: str, data: bytes, doc: str | None) -> str:
    caption = html.escape(" ".join((doc or "").split()))
    src = "data:image/png;base64," + base64.b64encode(data).decode()
    return (f'<section id="{key}"><h2>{html.escape(title)}</h2><figure>'
            f'<img alt="{html.escape(title)}" src="{src}"><figcaption>{caption}'
            f"</figcaption></figure></section>")


def _write_subjects(directory: Path, run, items, start: int) -> list[dict]:
    """One PNG per triplet (4x enlarged) and its manifest row."""
    rows = []
    for k, item in enumerate(items):
        subject = start + k + 1
        name = f"subject_{subject:05d}.png"
        image = np.kron(triplet_image(item["cube"]), np.ones((4, 4)))
        buf = io.BytesIO()
        plt.imsave(buf, image, cmap="gray", vmin=0, vmax=1, format="png")
        _write_bytes(directory / name, buf.getvalue())
        rows.append({"subject_id": subject, "image_name_1": name, "#flavor": run.name,
                     "#kind": item["kind"], "#band": item["band"], "#visit": item["visit"],
                     "#detector": item["detector"], "#x": f"{item['x']:.2f}",
                     "#y": f"{item['y']:.2f}", "#snr": f"{item['snr']:.2f}",
                     "#image": item["image"]})
    return rows


def _write_manifest(path: Path, rows: list[dict]) -> None:
    fields = ["subject_id", "image_name_1", "#flavor", "#kind", "#band", "#visit", "#detector",
              "#x", "#y", "#snr", "#image"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


def _page(runs, summaries, sections, triplets) -> str:
    flavors = ", ".join(html.escape(r.name) for r in runs)
    toc = "".join(f'<li><a href="#{key}">{html.escape(title)}</a></li>'
                  for key, title, _ in FIGURES)
    dirs = "".join(f"<li>{html.escape(r.name)}: <code>{html.escape(str(r.run_dir))}</code>"
                   f"{' (APDB ' + html.escape(redacted_url(r.apdb)) + ')' if r.apdb else ''}"
                   "</li>" for r in runs)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>gpudiffim study: {flavors}</title><style>{_STYLE}</style></head><body>"
            f"<h1>gpudiffim study: {flavors}</h1><ul>{dirs}</ul>"
            f"<h2>Summary</h2>{_summary_html(summaries)}"
            f"<p>Flag cuts: {', '.join(f.replace('pixelFlags_', '') for f in ev.FLAG_CUTS)}. "
            "Tables: <code>tables/*.ecsv</code>, <code>summary.json</code>; Zooniverse "
            "subjects: <code>zooniverse_manifest.csv</code>.</p>"
            f"<ul>{toc}</ul>{''.join(sections)}<h2>Triplets</h2>"
            f"<div class='triplets'>{''.join(triplets)}</div></body></html>")
