"""The benchmarks' JSON (``--benchmark-json``) as one Markdown table: each case's median on
the CPU and on the GPU side by side, the speed-up, and the cost model's figures where the
case has them (bench/costmodel.py).

    python bench/table.py bench.json
"""

import json
import re
import sys


def rows(report: dict) -> dict:
    """{case: {backend: benchmark}} — the backend taken from the ``bench_backend`` param."""
    out = {}
    for b in report.get("benchmarks", []):
        params = b.get("params") or {}
        backend = params.get("bench_backend", "cpu")
        case = re.sub(r"-?\b(cpu|gpu)\b-?", "-", b["name"]).replace("[-", "[").replace("-]", "]")
        out.setdefault(case.replace("[]", ""), {})[backend] = b
    return out


def table(report: dict) -> str:
    machine = report.get("machine_info", {})
    lines = [f"CPU: {machine.get('cpu', {}).get('brand_raw', '?')}, "
             f"{machine.get('cpu', {}).get('count', '?')} cores",
             "",
             "| case | CPU median (s) | GPU median (s) | CPU / GPU | full-frame transforms "
             "| their time on GPU (s) | explicit reads (GPU) |",
             "|---|---|---|---|---|---|---|"]
    for case, by in sorted(rows(report).items()):
        cpu, gpu = (by.get(k, {}).get("stats", {}).get("median") for k in ("cpu", "gpu"))
        info = by.get("gpu", by.get("cpu", {})).get("extra_info", {})
        cells = [case, f"{cpu:.3f}" if cpu else "–", f"{gpu:.4f}" if gpu else "–",
                 f"{cpu / gpu:.1f}" if cpu and gpu else "–",
                 str(info.get("transforms", "–")),
                 f"{info['transform_s']:.4f}" if "transform_s" in info and "gpu" in by else "–",
                 str(info.get("reads", "–")) if "gpu" in by else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(table(json.load(f)))
