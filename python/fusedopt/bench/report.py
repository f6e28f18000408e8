"""Output: the fixed-width table (stdout), the JSON document, the PNG plot and the README's
markdown table, which is always rendered from a JSON file (never typed by hand)."""
from __future__ import annotations

import json
import os

BASELINE = "torch-fused"


def _ms(x: float) -> str:
    return f"{x:.1f}" if x >= 100 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _num(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def header_lines(doc: dict) -> list[str]:
    m, v, bw, st = doc["machine"], doc["versions"], doc["bandwidth"], doc["settings"]
    dev = st["device"]
    where = (f"{m['gpu']['name']}" if dev == "cuda" and m.get("gpu") else
             f"{m['cpu']} ({m['usable_cores']} cores, {m['torch_threads']} torch threads)")
    fo = v.get("fusedopt") or "not available"
    if v.get("fusedopt_isa"):
        fo += f" [{v['fusedopt_isa']}]"
    return [
        f"fusedopt-bench  {doc['date']}  {dev}: {where}",
        f"torch {v['torch']}  fusedopt {fo}  python {v['python']}",
        f"streaming bandwidth: {bw['gb_s']:.1f} GB/s ({bw['method']}, "
        f"{bw['tensor_bytes'] / 2**20:g} MiB, median of {bw['repeats']})",
    ]


_COLS = "{:<26} {:>30} {:>4} {:>7} {:>6} {:>15} {:>9}"


def format_table(doc: dict) -> str:
    lines = header_lines(doc)
    st = doc["settings"]
    lines.append(f"settings: {'quick, ' if st['quick'] else ''}{st['repeats']} interleaved rounds, "
                 f"{st['warmup']} warm-up step(s), scale {st['scale']:g}"
                 + (f", time budget {st['time_budget_s']:g} s" if st.get("time_budget_s") else ""))
    lines.append("B/p = model bytes moved per param per step; GB/s = B/p x params / median time; "
                 "% BW = of the streaming bandwidth measured in the same interleaved rounds;")
    lines.append("vs torch-fused = torch-fused time / this time (>1 is faster); "
                 "state B/p = optimizer state bytes per param")
    head = _COLS.format("case / contender", "ms/step median [min-max]", "B/p", "GB/s", "% BW",
                        "vs torch-fused", "state B/p")
    lines += ["", head, "-" * len(head)]
    for case in doc["cases"]:
        lines.append(f"{case['name']}: {case['optimizer']} {case['param_dtype']}, "
                     f"{_params(case['n_params'])} params in {case['n_tensors']} tensors, "
                     f"{case['bytes_per_param']:g} B/param ({case['bytes_model']})"
                     + (f"; bandwidth during the case {case['bandwidth_gb_s']:.1f} GB/s"
                        if case.get("bandwidth_gb_s") else ""))
        if case["status"] != "ok":
            lines.append(f"  skipped: {case['reason']}")
            continue
        if case.get("rounds", st["repeats"]) < st["repeats"]:
            lines.append(f"  ({case['rounds']} of {st['repeats']} rounds: time budget reached)")
        for r in case["results"]:
            name = "  " + r["contender"]
            if r["status"] != "ok":
                lines.append(f"{name:<26} skipped: {r['reason']}")
                continue
            t = f"{_ms(r['ms_median'])} [{_ms(r['ms_min'])}-{_ms(r['ms_max'])}]"
            lines.append(_COLS.format(name, t, f"{r['bytes_per_param']:g}", _num(r["gb_s"]), _num(r["pct_bandwidth"], "{:.0f}%"),
                                      _ratio(r["vs_torch_fused"]),
                                      _num(r["state_bytes_per_param"], "{:.2f}")))
    missing = doc.get("peers", {}).get("missing") or {}
    if missing:
        lines.append("")
        lines.append("peers not run: " + "; ".join(f"{k} ({v})" for k, v in missing.items()))
    lines.append(f"total {doc.get('elapsed_s', 0):.1f} s")
    return "\n".join(lines)


def write_json(doc: dict, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, default=str)
        f.write("\n")


def write_plot(doc: dict, path: str) -> tuple[str | None, str | None]:
    """Grouped bars of GB/s per contender per case, a dashed line at the measured bandwidth.
    Returns ``(path, None)`` or ``(None, why there is no plot)``; never raises for a missing
    matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        return None, f"matplotlib is not installed ({e}); pip install matplotlib for the PNG"
    cases = [c for c in doc["cases"] if c["status"] == "ok" and any(r["status"] == "ok" for r in c["results"])]
    if not cases:
        return None, "no case produced results"
    names = list(dict.fromkeys(r["contender"] for c in cases for r in c["results"] if r["status"] == "ok"))
    per_case = [[r for r in c["results"] if r["status"] == "ok"] for c in cases]
    width = 0.84 / max(len(rs) for rs in per_case)
    fig = Figure(figsize=(max(8.0, 1.4 * len(cases) + 3), 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = {n: f"C{j % 10}" for j, n in enumerate(names)}
    labelled = set()
    for i, rs in enumerate(per_case):
        for j, r in enumerate(rs):
            name = r["contender"]
            ax.bar(i + (j - (len(rs) - 1) / 2) * width, r["gb_s"], width=width * 0.95,
                   color=colors[name], label=None if name in labelled else name)
            labelled.add(name)
    bw = doc["bandwidth"]["gb_s"]
    ax.axhline(bw, color="black", linestyle="--", linewidth=1, label=f"x.mul_(c) bandwidth {bw:.0f} GB/s")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([c["name"] for c in cases], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("effective GB/s (model bytes / time)")
    st, m = doc["settings"], doc["machine"]
    where = m["gpu"]["name"] if st["device"] == "cuda" and m.get("gpu") else f"{m['cpu']}, {m['usable_cores']} cores"
    ax.set_title(f"fusedopt-bench on {st['device']} ({where}), torch {doc['versions']['torch']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path)
    return path, None


def render_markdown(json_path) -> str:
    """The README results section, made from a bench JSON file (a path, or the loaded dict)."""
    if isinstance(json_path, dict):
        doc, src = json_path, "the benchmark JSON"
    else:
        with open(json_path) as f:
            doc = json.load(f)
        src = f"`{os.path.basename(str(json_path))}`"
    m, v, bw, st = doc["machine"], doc["versions"], doc["bandwidth"], doc["settings"]
    dev = st["device"]
    where = (m["gpu"]["name"] if dev == "cuda" and m.get("gpu")
             else f"{m['cpu']}, {m['usable_cores']} cores, {m['torch_threads']} torch threads")
    fo = v.get("fusedopt") or "not available"
    if v.get("fusedopt_isa"):
        fo += f" ({v['fusedopt_isa']})"
    out = [
        f"Measured {doc['date'][:10]} on **{dev}** ({where}); torch {v['torch']}, fusedopt {fo}, "
        f"python {v['python']}. Streaming bandwidth (`x.mul_(c)`, fp32 in place, 8 B/element): "
        f"**{bw['gb_s']:.1f} GB/s** at the start; the probe also runs inside every case's interleaved rounds "
        f"and *% BW* is relative to that case's own figure (this machine's bandwidth drifts during a run). "
        f"{st['repeats']} interleaved rounds"
        f"{' (--quick)' if st['quick'] else ''}, median [min–max]. B/param = model bytes moved per param per step; GB/s = B/param × params / "
        f"median time; *vs torch-fused* = torch-fused time / this time (> 1 is faster). "
        f"Generated from {src} by `python -m fusedopt.bench --markdown`.",
        "",
        "| case | contender | ms/step | B/param | GB/s | % BW | vs torch-fused | state B/param |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for case in doc["cases"]:
        case_bw = f", {case['bandwidth_gb_s']:.0f} GB/s" if case.get("bandwidth_gb_s") else ""
        label = (f"{case['name']}<br><sub>{case['optimizer']} {case['param_dtype']}, "
                 f"{_params(case['n_params'])} params, {case['n_tensors']} tensors{case_bw}</sub>")
        if case["status"] != "ok":
            notes.append(f"- `{case['name']}` skipped: {case['reason']}")
            continue
        first = True
        for r in case["results"]:
            if r["status"] != "ok":
                notes.append(f"- `{case['name']}` / {r['contender']} skipped: {r['reason']}")
                continue
            name = f"**{r['contender']}**" if r["contender"] == "fusedopt" else r["contender"]
            t = f"{_ms(r['ms_median'])} [{_ms(r['ms_min'])}–{_ms(r['ms_max'])}]"
            out.append(f"| {label if first else ''} | {name} | {t} | {r['bytes_per_param']:g} | {_num(r['gb_s'])} | "
                       f"{_num(r['pct_bandwidth'], '{:.0f}%')} | {_ratio(r['vs_torch_fused'])} | "
                       f"{_num(r['state_bytes_per_param'], '{:.2f}')} |")
            first = False
    missing = doc.get("peers", {}).get("missing") or {}
    if missing:
        notes.append("- peers not run: " + ", ".join(f"{k} ({r})" for k, r in missing.items()))
    if notes:
        out += [""] + notes
    return "\n".join(out) + "\n"
