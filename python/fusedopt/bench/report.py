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


_COLS = "{:<26} {:>30} {:>4} {:>9} {:>7} {:>6} {:>10} {:>9} {:>7}"
_GUARD_MARK = {"moves": "moves", "params unchanged (bit for bit)": "kept"}


def _guard_mark(r: dict) -> str:
    g = r.get("guard")
    if not g:
        return "-"
    return "=ref" if g.startswith("matches") else _GUARD_MARK.get(g, "ok")


def _compile(r: dict) -> str:
    return "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"


def _case_notes(case: dict, repeats: int) -> list[str]:
    notes = []
    if case.get("rounds", repeats) < repeats:
        notes.append(f"{case['rounds']} of {repeats} rounds: time budget reached")
    for name, s in (case.get("slow") or {}).items():
        notes.append(f"{name} slow ({s['step_s']:.2f} s/step): timed in {s['rounds']} rounds")
    over = case.get("overhead")
    if over:
        steps = over.get("steps", 1)
        around = f"the {over['of']} step" if steps == 1 else f"{steps} {over['of']} steps"
        notes.append(f"fusedopt's work around {around}: {over['ms']:.2f} ms = "
                     f"{over['ratio']:.2f}x one {over['of']} step (medians)")
    return notes


def format_table(doc: dict) -> str:
    lines = header_lines(doc)
    st = doc["settings"]
    lines.append(f"settings: {'quick, ' if st['quick'] else ''}{st['repeats']} interleaved rounds, "
                 f"{st['warmup']} warm-up step(s), scale {st['scale']:g}"
                 + (f", time budget {st['time_budget_s']:g} s" if st.get("time_budget_s") else ""))
    lines.append("B/p = model bytes moved per param per step; state B/p = optimizer state bytes per param; "
                 "GB/s = B/p x params / median time;")
    lines.append("% BW = of the streaming bandwidth measured in the same interleaved rounds; "
                 "vs torch = the case's torch baseline time / this time (>1 is faster);")
    lines.append("check = the guard after the first step: =ref matches the torch reference, moves = params "
                 "moved (no same-math reference), kept = left unchanged as required;")
    lines.append("compile s = first step minus a timed step, for contenders that torch.compile")
    head = _COLS.format("case / contender", "ms/step median [min-max]", "B/p", "state B/p", "GB/s", "% BW",
                        "vs torch", "compile s", "check")
    lines += ["", head, "-" * len(head)]
    for case in doc["cases"]:
        lines.append(f"{case['name']}: {case['optimizer']} {case['param_dtype']}, "
                     f"{_params(case['n_params'])} params in {case['n_tensors']} tensors, "
                     f"{case['bytes_per_param']:g} B/param ({case['bytes_model']})"
                     + (f"; bandwidth during the case {case['bandwidth_gb_s']:.1f} GB/s"
                        if case.get("bandwidth_gb_s") else "")
                     + (f"; vs {case['baseline']}" if case.get("baseline", BASELINE) != BASELINE else ""))
        if case["status"] != "ok":
            lines.append(f"  skipped: {case['reason']}")
            continue
        lines += [f"  ({n})" for n in _case_notes(case, st["repeats"])]
        for r in case["results"]:
            name = "  " + r["contender"]
            if r["status"] != "ok":
                word = "FAILED" if r["status"] == "failed" else "skipped"
                lines.append(f"{name:<26} {word}: {r['reason']}")
                continue
            t = f"{_ms(r['ms_median'])} [{_ms(r['ms_min'])}-{_ms(r['ms_max'])}]"
            lines.append(_COLS.format(name, t, f"{r['bytes_per_param']:g}",
                                      _num(r["state_bytes_per_param"], "{:.2f}"), _num(r["gb_s"]),
                                      _num(r["pct_bandwidth"], "{:.0f}%"), _ratio(r["vs_torch_fused"]),
                                      _compile(r), _guard_mark(r)))
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
    """Grouped bars, log scale: each contender's speed relative to the case's torch baseline
    (torch's fused step unless torch has none), a line at 1. Contenders move different bytes,
    so speed relative to the same job done by torch reads better than GB/s (which stays in the
    table). Returns ``(path, None)`` or ``(None, why there is no plot)``; never raises for a
    missing matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        return None, f"matplotlib is not installed ({e}); pip install matplotlib for the PNG"
    per_case = [(c, [r for r in c["results"] if r["status"] == "ok" and r.get("vs_torch_fused")])
                for c in doc["cases"] if c["status"] == "ok"]
    per_case = [(c, rs) for c, rs in per_case if rs]
    if not per_case:
        return None, "no case produced results"
    names = list(dict.fromkeys(r["contender"] for _, rs in per_case for r in rs))
    width = 0.84 / max(len(rs) for _, rs in per_case)
    fig = Figure(figsize=(max(10.0, 0.7 * len(per_case) + 5), 6.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    # tab10, then the light halves of tab20 and greys: distinct colours for up to 24 contenders
    cmap = [f"C{j}" for j in range(10)] + ["#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
                                           "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#444444",
                                           "#999999", "#000000", "#e0e0e0", "#5c3c00"]
    colors = {n: cmap[j % len(cmap)] for j, n in enumerate(names)}
    labelled = set()
    for i, (_, rs) in enumerate(per_case):
        for j, r in enumerate(rs):
            name = r["contender"]
            ax.bar(i + (j - (len(rs) - 1) / 2) * width, r["vs_torch_fused"], width=width * 0.95,
                   color=colors[name], label=None if name in labelled else name,
                   edgecolor="black" if name == "fusedopt" else None, linewidth=0.8)
            labelled.add(name)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="torch baseline (1x)")
    ax.set_xticks(range(len(per_case)))
    ax.set_xticklabels([c["name"] + ("" if c.get("baseline", BASELINE) == BASELINE else f"\n(vs {c['baseline']})")
                        for c, _ in per_case], rotation=25, ha="right", fontsize=7)
    ax.set_ylabel("speed vs torch's step (torch time / time, log scale; > 1 is faster)")
    st, m = doc["settings"], doc["machine"]
    where = m["gpu"]["name"] if st["device"] == "cuda" and m.get("gpu") else f"{m['cpu']}, {m['usable_cores']} cores"
    ax.set_title(f"fusedopt-bench on {st['device']} ({where}), torch {doc['versions']['torch']}, "
                 f"{doc['date'][:10]}", fontsize=9)
    ax.legend(fontsize=6, ncol=3, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", which="both", alpha=0.3)
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
        f"median time; *vs torch* = the case's torch baseline time / this time (> 1 is faster; torch's fused step "
        f"unless the case names another); *compile s* = first step minus a timed step, for contenders that "
        f"`torch.compile`; *check* = the correctness guard after the first step (=ref: matches one "
        f"`torch.optim` step on fp32 copies, moves: params moved where no torch step does the same math, "
        f"kept: left unchanged as required). "
        f"Generated from {src} by `python -m fusedopt.bench --markdown`.",
        "",
        "| case | contender | ms/step | B/param | state B/param | GB/s | % BW | vs torch | compile s | check |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes = []
    for case in doc["cases"]:
        case_bw = f", {case['bandwidth_gb_s']:.0f} GB/s" if case.get("bandwidth_gb_s") else ""
        vs = f", vs {case['baseline']}" if case.get("baseline", BASELINE) != BASELINE else ""
        label = (f"{case['name']}<br><sub>{case['optimizer']} {case['param_dtype']}, "
                 f"{_params(case['n_params'])} params, {case['n_tensors']} tensors{case_bw}{vs}</sub>")
        if case["status"] != "ok":
            out.append(f"| {label} | — | skipped | | | | | | | |")
            notes.append(f"- `{case['name']}` skipped: {case['reason']}")
            continue
        first = True
        notes += [f"- `{case['name']}`: {n}" for n in _case_notes(case, st["repeats"])]
        for r in case["results"]:
            if r["status"] != "ok":
                word = "FAILED" if r["status"] == "failed" else "skipped"
                out.append(f"| {label if first else ''} | {r['contender']} | {word} | | | | | | | |")
                notes.append(f"- `{case['name']}` / {r['contender']} {word.lower()}: {r['reason']}")
                first = False
                continue
            name = f"**{r['contender']}**" if r["contender"] == "fusedopt" else r["contender"]
            t = f"{_ms(r['ms_median'])} [{_ms(r['ms_min'])}–{_ms(r['ms_max'])}]"
            out.append(f"| {label if first else ''} | {name} | {t} | {r['bytes_per_param']:g} | "
                       f"{_num(r['state_bytes_per_param'], '{:.2f}')} | {_num(r['gb_s'])} | "
                       f"{_num(r['pct_bandwidth'], '{:.0f}%')} | {_ratio(r['vs_torch_fused'])} | "
                       f"{_compile(r)} | {_guard_mark(r)} |")
            first = False
    missing = doc.get("peers", {}).get("missing") or {}
    if missing:
        notes.append("- peers not run: " + ", ".join(f"{k} ({r})" for k, r in missing.items()))
    if notes:
        out += [""] + notes
    return "\n".join(out) + "\n"
