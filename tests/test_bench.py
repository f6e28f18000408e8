"""fusedopt.bench: the CLI end to end on tiny sizes, the JSON schema and its arithmetic, the
table, case filtering, peer detection and the peer plumbing (simulated peers: missing, failing
to import, failing to step, not moving, wrong math, consuming grads, compiling; and the real
test-requirement peers on tiny sizes), the correctness guard, slow contenders, fusedopt
fallbacks (missing keyword, missing class), the peer installer, progress and plot fallbacks,
and the README markdown made from the JSON."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import os
import subprocess
import sys
import time
import types

import pytest
import torch

from fusedopt.bench import __main__ as cli
from fusedopt.bench import cases, contenders, progress, report, suite, timing

# --no-peers: the shared run times fusedopt and torch only (installed peers that compile would
# cost minutes); the peer plumbing has its own tests below.
TINY = ["--device", "cpu", "--quick", "--scale", "0.001", "--repeats", "2", "--bandwidth-mib", "4"]
TINY_NO_PEERS = TINY + ["--no-peers"]
RUN_CASES = ["adamw_fp32", "many_small", "adamw_clip"]
TORCH = ["torch-forloop", "torch-foreach", "torch-fused"]


def _main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny CLI run shared by the schema/table/plot/markdown tests."""
    d = tmp_path_factory.mktemp("bench")
    js, png = str(d / "r.json"), str(d / "r.png")
    rc, out, err = _main(TINY_NO_PEERS + ["--cases", ",".join(RUN_CASES), "--json", js, "--plot", png])
    assert rc == 0, err
    with open(js) as f:
        doc = json.load(f)
    return types.SimpleNamespace(doc=doc, out=out, err=err, json=js, png=png)


def _ok(case):
    return [r for r in case["results"] if r["status"] == "ok"]


def test_json_schema(run):
    doc = run.doc
    assert doc["schema"] == suite.SCHEMA
    for key in ("date", "command", "settings", "machine", "versions", "bandwidth", "cases", "peers",
                "fusedopt", "elapsed_s", "plot"):
        assert key in doc, key
    m, v = doc["machine"], doc["versions"]
    assert m["cpu"] and m["cores"] >= 1 and m["usable_cores"] >= 1 and m["platform"]
    assert v["torch"] == torch.__version__ and v["python"]
    assert doc["settings"]["quick"] is True and doc["settings"]["repeats"] == 2
    assert doc["settings"]["device"] == "cpu" and doc["settings"]["scale"] == 0.001
    assert doc["settings"]["time_budget_s"] == 120.0   # --quick's budget
    assert all(c["rounds"] == 2 for c in doc["cases"] if c["status"] == "ok")
    bw = doc["bandwidth"]
    assert bw["gb_s"] > 0 and bw["ms_min"] <= bw["ms_median"] <= bw["ms_max"]
    assert bw["repeats"] == 5   # --quick's probe
    assert [c["name"] for c in doc["cases"]] == RUN_CASES   # --cases filters and keeps the order


def test_result_values_are_consistent(run):
    for case in run.doc["cases"]:
        if case["status"] != "ok":
            assert case["reason"], case["name"]
            continue
        # % of bandwidth is relative to the probe timed inside the case's own rounds
        bw = case["bandwidth_gb_s"]
        assert bw > 0
        assert case["n_params"] == cases.numel(cases.CASES[case["name"]].shapes("cpu", 0.001))
        results = {r["contender"]: r for r in case["results"]}
        base = results["torch-fused"]
        assert base["status"] == "ok" and base["vs_torch_fused"] == pytest.approx(1.0)
        for r in _ok(case):
            assert 0 < r["ms_min"] <= r["ms_median"] <= r["ms_max"], r
            assert r["samples"] == 2 and r["steps_per_sample"] >= 1
            assert r["gb_s"] == pytest.approx(r["bytes_per_param"] * case["n_params"]
                                              / (r["ms_median"] * 1e-3) / 1e9)
            assert r["pct_bandwidth"] == pytest.approx(100 * r["gb_s"] / bw)
            assert r["vs_torch_fused"] == pytest.approx(base["ms_median"] / r["ms_median"])
            assert r["state_bytes_per_param"] > 0
            assert r["step_peak_bytes_per_param"] is None   # CUDA only
            # every timed row passed the guard: these cases have a torch reference step
            assert r["guard"].startswith("matches torch.optim."), r
            assert r["first_step_s"] > 0 and r["compile_s"] is None   # nothing here compiles
        for r in case["results"]:
            assert r["status"] in ("ok", "skipped", "failed") and (r["status"] == "ok" or r["reason"])


def test_contenders_and_state_bytes(run):
    by_case = {c["name"]: c for c in run.doc["cases"]}
    r = {x["contender"]: x for x in by_case["adamw_fp32"]["results"]}
    assert set(TORCH) <= {k for k, x in r.items() if x["status"] == "ok"}
    for name in TORCH:
        # exp_avg + exp_avg_sq in fp32 = 8 B/param, plus a 4-byte step per tensor
        assert 8.0 <= r[name]["state_bytes_per_param"] < 8.1
    # fusedopt imports (else this module could not); it must take part or say why not
    assert "fusedopt" in r
    assert r["fusedopt"]["status"] == "ok", r["fusedopt"].get("reason")
    assert run.doc["fusedopt"]["available"] is True
    clip = by_case["adamw_clip"]
    if clip["status"] == "ok":
        names = [x["contender"] for x in clip["results"]]
        assert names[0] == "fusedopt" and "torch-forloop" not in names
        assert all("clip_grad_norm_" in x["detail"] for x in clip["results"] if x["kind"] == "torch")
    else:
        assert "max_grad_norm" in clip["reason"]


def test_table_printed(run):
    out = run.out
    assert "streaming bandwidth:" in out and "ms/step median [min-max]" in out
    for name in RUN_CASES:
        assert f"\n{name}: " in out
    for name in TORCH:
        assert f"  {name} " in out
    assert "vs torch" in out and "1.00x" in out and "=ref" in out
    assert f"JSON: {run.json}" in out
    assert "sgd_momentum_fp32" not in out   # filtered out by --cases


def test_png_written(run):
    pytest.importorskip("matplotlib")
    assert run.doc["plot"]["path"] == run.png
    with open(run.png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(run.png) > 5000


def test_markdown_from_json(run):
    md = report.render_markdown(run.json)
    assert "| case | contender | ms/step | B/param |" in md
    assert "`r.json`" in md and "GB/s" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    # one row per contender of a case that ran, one per skipped case
    n_rows = sum(len(c["results"]) if c["status"] == "ok" else 1 for c in run.doc["cases"])
    assert len(rows) == n_rows
    rc, out, _ = _main(["--markdown", run.json])
    assert rc == 0 and out == md


def test_module_entry_point(run):
    """``python -m fusedopt.bench`` runs (here its cheap modes)."""
    env = dict(os.environ)
    p = subprocess.run([sys.executable, "-m", "fusedopt.bench", "--markdown", run.json],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "| case | contender |" in p.stdout
    p = subprocess.run([sys.executable, "-m", "fusedopt.bench", "--list-cases", "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and "adamw_fp32" in p.stdout and "41.72M" in p.stdout


def test_unknown_case_is_an_error():
    rc, _, err = _main(["--cases", "adamw_fp32,nope", "--device", "cpu"])
    assert rc == 2 and "nope" in err and "adamw_fp32" in err


def test_scale_shapes_and_case_sizes():
    assert cases.numel(cases.GPT2_SMALL) == 124_439_808 and len(cases.GPT2_SMALL) == 148
    assert len(cases.GPT2_CPU) == 52 and 40e6 < cases.numel(cases.GPT2_CPU) < 42e6
    assert cases.scale_shapes([(1000, 3), (768,), (2,)], 0.01) == [(10, 3), (8,), (1,)]
    assert cases.scale_shapes([(4, 3)], 2.0) == [(8, 3)]
    c = cases.CASES["adamw_fp32"]
    assert cases.numel(c.shapes("cpu", 0.5)) == pytest.approx(cases.numel(cases.GPT2_CPU) * 0.5, rel=1e-3)
    assert [cases.CASES[n].bytes_per_param for n in
            ("adamw_fp32", "adamw_bf16", "sgd_momentum_fp32", "many_small", "adamw_master")] == [28, 14, 20, 28, 28]


# --------------------------------------------------------------------------- peers

def _not_installed(name):
    raise ModuleNotFoundError(f"No module named '{name}'", name=name)


def test_peer_detection_without_peers(monkeypatch):
    monkeypatch.setattr(contenders, "_import_module", _not_installed)
    available, missing = contenders.detect_peers()
    assert available == []
    assert set(missing) == {v.module for v in contenders.PEERS}
    assert set(missing.values()) == {"not installed"}


class _BrokenStep(torch.optim.AdamW):
    def step(self, closure=None):
        raise RuntimeError("no CPU kernel for this optimizer")


def _fake_peers(name):
    if name == "optimi":
        return types.SimpleNamespace(__name__="optimi", __version__="0-fake", AdamW=torch.optim.AdamW,
                                     Adam=torch.optim.Adam, SGD=torch.optim.SGD)
    if name == "heavyball":
        return types.SimpleNamespace(__name__="heavyball", ForeachAdamW=_BrokenStep)
    if name == "bitsandbytes":
        raise OSError("libbitsandbytes_cpu.so: cannot open shared object file")
    _not_installed(name)


def test_peers_run_or_are_skipped_with_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(contenders, "_import_module", _fake_peers)
    js = str(tmp_path / "p.json")
    rc, out, err = _main(TINY + ["--repeats", "1", "--cases", "adamw_fp32,sgd_momentum_fp32",
                                 "--json", js, "--no-plot"])
    assert rc == 0, err
    with open(js) as f:
        doc = json.load(f)
    assert doc["peers"]["available"] == ["heavyball", "optimi"]
    assert doc["peers"]["missing"]["bitsandbytes"].startswith("import failed: OSError")
    assert doc["peers"]["missing"]["torchao"] == "not installed"
    adamw = {r["contender"]: r for r in doc["cases"][0]["results"]}
    assert adamw["optimi"]["status"] == "ok" and adamw["optimi"]["kind"] == "peer"
    assert adamw["optimi"]["guard"] == "matches torch.optim.AdamW(foreach=False)"
    assert adamw["heavyball-adamw"]["status"] == "failed"
    assert "no CPU kernel" in adamw["heavyball-adamw"]["reason"]
    sgd = {r["contender"]: r for r in doc["cases"][1]["results"]}
    assert sgd["optimi"]["status"] == "ok" and "heavyball-adamw" not in sgd   # AdamW-only peer
    assert "heavyball-adamw" in out and "FAILED:" in out
    assert "peers not run: " in out and "bitsandbytes (import failed: OSError" in out
    assert doc["plot"] == {"path": None, "reason": "disabled (--no-plot)"}


def _run_with_peers(monkeypatch, tmp_path, import_module, cases_arg, extra=()):
    monkeypatch.setattr(contenders, "_import_module", import_module)
    js = str(tmp_path / "g.json")
    rc, out, err = _main(TINY + ["--repeats", "1", "--cases", cases_arg, "--json", js, "--no-plot", *extra])
    assert rc == 0, err
    with open(js) as f:
        doc = json.load(f)
    return doc, out


class _NoMove(torch.optim.AdamW):
    """Steps nothing: a broken setup (e.g. grads never reach it) that would look fast."""

    def step(self, closure=None):
        return None


class _TenTimesLr(torch.optim.AdamW):
    """Moves the params, but not by AdamW's step: wrong math."""

    def __init__(self, params, lr=1e-3, **kw):
        super().__init__(params, lr=10 * lr, **kw)


class _ConsumesGrads(torch.optim.AdamW):
    """A correct first step that then sets p.grad = None, so later steps do nothing."""

    def step(self, closure=None):
        super().step()
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None


@pytest.mark.parametrize("cls, expected", [
    (_NoMove, "guard: params did not move in one step"),
    (_TenTimesLr, "guard: after one step differs from torch.optim.AdamW(foreach=False)"),
    (_ConsumesGrads, "guard: params stopped moving after the first step"),
])
def test_guard_fails_a_broken_contender(monkeypatch, tmp_path, cls, expected):
    def peers(name):
        if name == "optimi":
            return types.SimpleNamespace(__name__="optimi", __version__="0-fake", AdamW=cls)
        _not_installed(name)

    doc, out = _run_with_peers(monkeypatch, tmp_path, peers, "adamw_fp32")
    res = {r["contender"]: r for r in doc["cases"][0]["results"]}
    assert res["optimi"]["status"] == "failed" and res["optimi"]["reason"].startswith(expected)
    assert "ms_median" not in res["optimi"]          # a failed row has no time
    assert all(res[n]["status"] == "ok" for n in ["fusedopt"] + TORCH)   # the run went on
    assert "optimi" in out and "FAILED: guard:" in out


def _fake_torchao(compile_s):
    class Compiling(torch.optim.AdamW):
        """torchao-like: the first step pays a 'compilation' delay."""
        first = True

        def step(self, closure=None):
            if Compiling.first:
                Compiling.first = False
                time.sleep(compile_s)
            return super().step()

    optim = types.SimpleNamespace(_AdamW=Compiling)
    return types.SimpleNamespace(__name__="torchao", __version__="0-fake", optim=optim)


def test_compile_time_is_reported_apart(monkeypatch, tmp_path):
    fake = _fake_torchao(0.3)

    def peers(name):
        if name == "torchao":
            return fake
        _not_installed(name)

    doc, out = _run_with_peers(monkeypatch, tmp_path, peers, "adamw_fp32")
    res = {r["contender"]: r for r in doc["cases"][0]["results"]}
    ao = res["torchao-adamw"]
    assert ao["status"] == "ok" and ao["compiles"] is True
    assert ao["first_step_s"] >= 0.3 and ao["compile_s"] == pytest.approx(ao["first_step_s"] - ao["ms_median"] / 1e3)
    assert ao["ms_median"] < 300                       # the timed steps do not include it
    assert res["fusedopt"]["compile_s"] is None        # only compiling contenders get one
    assert f"{ao['compile_s']:.1f}" in out


def test_slow_contenders_get_fewer_rounds():
    def runner(name, warm_s):
        r = contenders.Runner(name, [torch.zeros(1)], None, lambda: None, 4, torch.float32, "")
        r.warm_s = warm_s
        return r

    runners = [runner("torch-fused", 0.01), runner("fast-peer", 0.04), runner("slow-peer", 0.9)]
    slow = timing.limit_slow(runners, "torch-fused", rounds=20)
    assert slow == {"slow-peer": 0.9}
    timing.interleaved(runners, 20, "cpu")
    assert [len(r.samples) for r in runners] == [20, 20, 5]   # max(2, 20 // 4)


def test_missing_fusedopt_class_and_keyword(monkeypatch, tmp_path):
    """Muon (a missing class) and 8-bit state (a refused keyword) say 'not supported by this
    fusedopt build'; the 8-bit case still runs torch and the peers, Muon is skipped whole."""
    import fusedopt

    class NoUint8(fusedopt.AdamW):
        def __init__(self, params, *args, state_dtype=None, **kw):
            if state_dtype is torch.uint8:
                raise ValueError("Invalid state_dtype: torch.uint8")
            super().__init__(params, *args, **kw)

    fake = types.SimpleNamespace(__version__="0-fake", AdamW=NoUint8, Adam=fusedopt.Adam, SGD=fusedopt.SGD)
    monkeypatch.setattr(contenders, "load_fusedopt", lambda: (fake, None))

    def peers(name):
        if name == "bitsandbytes":   # stands in for bnb's AdamW8bit: same first step as AdamW
            return types.SimpleNamespace(__name__="bitsandbytes", __version__="0-fake",
                                         optim=types.SimpleNamespace(AdamW8bit=torch.optim.AdamW))
        _not_installed(name)

    doc, out = _run_with_peers(monkeypatch, tmp_path, peers, "adamw_8bit,muon")
    eight, muon = doc["cases"]
    assert eight["status"] == "ok"
    res = {r["contender"]: r for r in eight["results"]}
    assert res["fusedopt"]["status"] == "skipped"
    assert res["fusedopt"]["reason"].startswith("not supported by this fusedopt build: fusedopt.AdamW(state_dtype=uint8)")
    assert res["torch-fused"]["status"] == "ok" and res["bnb-adamw8bit"]["status"] == "ok"
    assert res["bnb-adamw8bit"]["bytes_per_param"] == 16     # 8-bit moments: p 8, g 4, m 2, v 2
    assert muon["status"] == "skipped" and muon["reason"].startswith(
        "not supported by this fusedopt build: no fusedopt.Muon")
    assert "skipped: not supported by this fusedopt build: no fusedopt.Muon" in out


def test_real_peers_tiny(monkeypatch, tmp_path):
    """The peers that are test requirements (optimi, lion-pytorch, schedulefree,
    pytorch-optimizer), for real, on tiny sizes: each row passes the guard; SAM, snapshot and
    EMA cases run too."""
    keep = {"optimi", "lion_pytorch", "schedulefree", "pytorch_optimizer"}
    monkeypatch.setattr(contenders, "PEERS", [v for v in contenders.PEERS if v.module in keep])
    monkeypatch.setattr(contenders, "_import_module", importlib.import_module)
    names = "adamw_fp32,adamw_kahan,lion_fp32,schedulefree_adamw_fp32,sam_sgd,snapshot_restore,ema_update"
    doc, out = _run_with_peers(monkeypatch, tmp_path, importlib.import_module, names)
    by = {c["name"]: {r["contender"]: r for r in c["results"]} for c in doc["cases"]}
    expect = {
        "adamw_fp32": {"optimi": "=ref"}, "adamw_kahan": {"optimi-kahan": "=ref"},
        "lion_fp32": {"fusedopt": "=ref", "lion-pytorch": "=ref", "optimi": "=ref", "torch-fused": "moves"},
        "schedulefree_adamw_fp32": {"fusedopt": "moves", "schedulefree": "moves"},
        "sam_sgd": {"fusedopt": "=ref", "pytorch_optimizer-sam": "=ref", "torch-fused": "=ref"},
        "snapshot_restore": {"fusedopt": "moves", "fusedopt-plain": "=ref", "torch-fused": "=ref"},
        "ema_update": {"fusedopt": "kept", "torch-foreach": "kept"},
    }
    for case, rows in expect.items():
        for name, mark in rows.items():
            r = by[case][name]
            assert r["status"] == "ok", (case, name, r.get("reason"))
            assert report._guard_mark(r) == mark, (case, name, r["guard"])
    assert by["sam_sgd"]["torch-fused"]["vs_torch_fused"] == pytest.approx(1.0)
    assert set(doc["peers"]["available"]) == keep
    # The snapshot case reports its work around its two plain steps: fusedopt - 2 x fusedopt-plain.
    snap = next(c for c in doc["cases"] if c["name"] == "snapshot_restore")
    rows = by["snapshot_restore"]
    assert snap["overhead"]["of"] == "fusedopt-plain" and snap["overhead"]["steps"] == 2
    plain = rows["fusedopt-plain"]["ms_median"]
    assert snap["overhead"]["ms"] == pytest.approx(rows["fusedopt"]["ms_median"] - 2 * plain)
    assert snap["overhead"]["ratio"] == pytest.approx(snap["overhead"]["ms"] / plain)
    assert "fusedopt's work around 2 fusedopt-plain steps" in out


# --------------------------------------------------------------------------- installing peers

def test_install_peers_falls_back_one_by_one(tmp_path):
    install_peers = _load_install_peers()
    calls = []

    def fake_run(cmd):
        calls.append(cmd)
        bad = "brokenpeer==1.0" in cmd
        return types.SimpleNamespace(returncode=1 if bad else 0)

    log = []
    status = install_peers.install(["goodpeer==2.0", "brokenpeer==1.0"], python="py", run=fake_run,
                                   torch_version="2.13.0", log=log.append)
    assert status == {"goodpeer==2.0": "ok", "brokenpeer==1.0": "failed"}
    assert len(calls) == 3 and all(c[:4] == ["py", "-m", "pip", "install"] and "-c" in c for c in calls)
    assert any("could not install brokenpeer==1.0" in line for line in log)
    pin = calls[0][calls[0].index("-c") + 1]
    assert not os.path.exists(pin)       # the torch pin file is removed afterwards
    assert install_peers.bench_requirements()[:2] == ["matplotlib", "tqdm"]
    assert any(r.startswith("bitsandbytes==") for r in install_peers.bench_requirements())


def _load_install_peers():
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "install_peers.py")
    spec = importlib.util.spec_from_file_location("install_peers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- fusedopt fallbacks

class _FakeAdamW(torch.optim.AdamW):
    """Accepts max_grad_norm only (and clips, as the guard's reference does); any other
    precision keyword is a TypeError."""

    def __init__(self, params, *args, max_grad_norm=None, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.max_grad_norm = max_grad_norm

    def step(self, closure=None):
        if self.max_grad_norm is not None:
            params = [p for g in self.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return super().step(closure)


def test_precision_cases_need_fusedopt_support(monkeypatch, tmp_path):
    fake = types.SimpleNamespace(AdamW=_FakeAdamW, Adam=torch.optim.Adam, SGD=torch.optim.SGD)
    monkeypatch.setattr(contenders, "load_fusedopt", lambda: (fake, None))
    monkeypatch.setattr(contenders, "_import_module", _not_installed)
    js = str(tmp_path / "f.json")
    rc, out, err = _main(TINY + ["--repeats", "1", "--cases", "adamw_master,adamw_clip",
                                 "--json", js, "--no-plot"])
    assert rc == 0, err
    with open(js) as f:
        master, clip = json.load(f)["cases"]
    assert master["status"] == "skipped" and "master_weights" in master["reason"]
    assert master["results"] == []
    assert clip["status"] == "ok"
    assert [r["contender"] for r in clip["results"]] == ["fusedopt", "torch-foreach", "torch-fused"]
    assert all(r["status"] == "ok" for r in clip["results"])
    assert "adamw_master" in out
    assert "skipped: not supported by this fusedopt build: fusedopt.AdamW(master_weights=True)" in out


def test_runs_without_fusedopt(monkeypatch, tmp_path):
    monkeypatch.setattr(contenders, "load_fusedopt", lambda: (None, "import fusedopt failed: boom"))
    monkeypatch.setattr(contenders, "_import_module", _not_installed)
    js = str(tmp_path / "n.json")
    rc, out, err = _main(TINY + ["--repeats", "1", "--cases", "sgd_momentum_fp32,adamw_clip",
                                 "--json", js, "--no-plot"])
    assert rc == 0, err
    with open(js) as f:
        sgd, clip = json.load(f)["cases"]
    fo = sgd["results"][0]
    assert fo["contender"] == "fusedopt" and fo["status"] == "skipped" and "boom" in fo["reason"]
    assert [r["status"] for r in sgd["results"][1:]] == ["ok"] * 3
    assert clip["status"] == "skipped" and "boom" in clip["reason"]


# --------------------------------------------------------------------------- fallbacks, timing

def test_no_matplotlib(monkeypatch, tmp_path, run):
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    path, reason = report.write_plot(run.doc, str(tmp_path / "x.png"))
    assert path is None and "matplotlib is not installed" in reason
    assert not (tmp_path / "x.png").exists()


def test_plain_progress_without_tqdm(monkeypatch):
    monkeypatch.setattr(progress, "_tqdm", lambda: None)
    buf = io.StringIO()
    p = progress.Progress(total=4, stream=buf)
    assert p.bar is None
    p.phase("adamw_fp32", "timing 4 contenders x 2 rounds")
    p.update(2)
    p.note("streaming bandwidth: 1.0 GB/s")
    p.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and all(line.startswith("[fusedopt-bench") for line in lines)
    assert "0/4] adamw_fp32: timing" in lines[0] and "2/4] streaming" in lines[1]
    quiet = io.StringIO()
    q = progress.Progress(total=1, enabled=False, stream=quiet)
    q.phase("x", "y")
    q.note("z")
    q.close()
    assert quiet.getvalue() == ""


def test_interleaving_rotates_order():
    calls = []
    runners = [contenders.Runner(n, [torch.zeros(1)], None, (lambda n=n: calls.append(n)), 4, torch.float32, "")
               for n in "abc"]
    failed = timing.interleaved(runners, 3, "cpu")
    assert failed == {} and calls == list("abc" "bca" "cab")
    assert all(len(r.samples) == 3 and min(r.samples) >= 0 for r in runners)
    # a deadline already passed stops after min_rounds
    failed = timing.interleaved(runners, 10, "cpu", deadline=0.0, min_rounds=3)
    assert failed == {} and all(len(r.samples) == 6 for r in runners)


def test_failing_runner_is_dropped_while_timing():
    def boom():
        raise RuntimeError("device lost")
    runners = [contenders.Runner(n, [torch.zeros(1)], None, f, 4, torch.float32, "")
               for n, f in (("good", lambda: None), ("bad", boom))]
    failed = timing.interleaved(runners, 2, "cpu")
    assert [r.name for r in runners] == ["good"] and len(runners[0].samples) == 2
    assert "device lost" in failed["bad"]


def test_state_bytes_counts_nested_tensors():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = types.SimpleNamespace(state={p: {"step": torch.tensor(1.0), "m": torch.zeros(10),
                                           "q": [torch.zeros(10, dtype=torch.uint8)], "n": 3}})
    assert contenders.state_bytes(opt) == 4 + 40 + 10


def test_bandwidth_probe_is_positive():
    bw = timing.measure_bandwidth("cpu", 2**20, repeats=3, min_sample_s=0.001)
    assert bw["gb_s"] > 0 and bw["numel"] == 2**18 and bw["repeats"] == 3
    assert math.isclose(bw["gb_s"], 8 * bw["numel"] / (bw["ms_median"] * 1e-3) / 1e9)
