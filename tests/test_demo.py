"""``python -m fusedopt.demo``: a few-step run of every configuration, the JSON it writes,
run selection, and the corpus (deterministic, never from the network)."""
from __future__ import annotations

import importlib.util
import json
import math
import socket

import pytest
import torch

from fusedopt.demo import data
from fusedopt.demo.__main__ import main
from fusedopt.demo.runs import RUNS
from test_schedules import wsd_ref as wsd_factor  # the API.md formula, written in the tests

ALL_IDS = {f"{name}/wd={wd}" for name in RUNS for wd in ("0", "0.1")}
RUN_KEYS = {"id", "name", "label", "weight_decay", "param_dtype", "optimizer", "precision",
            "state_dtypes", "schedule", "curves", "final_train_loss", "final_val_loss", "finite",
            "gap_vs_fp32_pct", "tokens_per_s", "train_s", "wall_s", "n_params", "param_bytes",
            "state_bytes", "bytes_per_param", "unchanged_in_cooldown"}

# Bytes per param of the param itself and of the per-element optimizer state (two Adam
# moments, plus an fp32 master copy or a bf16 Kahan buffer); the 4-byte step counter per
# tensor comes on top.
EXPECTED_BYTES = {"fp32": (4, 8), "bf16-naive": (2, 4), "bf16-sr": (2, 4),
                  "bf16-kahan": (2, 6), "bf16-master": (2, 12)}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["--steps", "5", "--size", "tiny", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "demo.json").read_text())


def test_json_schema(demo):
    _, doc = demo
    assert doc["schema"] == "fusedopt.demo/1"
    assert {"config", "versions", "machine", "wall_s", "runs"} <= set(doc)
    cfg = doc["config"]
    assert cfg["steps"] == 5 and cfg["size"] == "tiny" and cfg["weight_decays"] == [0.0, 0.1]
    assert cfg["corpus"]["train_tokens"] > 0 and cfg["corpus"]["val_tokens"] > 0
    assert doc["versions"]["torch"] == torch.__version__
    import fusedopt
    assert doc["versions"]["fusedopt"] == fusedopt.__version__
    assert doc["machine"]["cores"] >= 1


def test_every_run_present_and_finite(demo):
    _, doc = demo
    runs = doc["runs"]
    assert {r["id"] for r in runs} == ALL_IDS
    for r in runs:
        assert set(r) >= RUN_KEYS, r["id"]
        c = r["curves"]
        assert len(c["train_loss"]) == len(c["lr"]) == 5, r["id"]
        assert c["val_step"][0] == 0 and c["val_step"][-1] == 5, r["id"]
        assert len(c["val_step"]) == len(c["val_loss"]), r["id"]
        values = c["train_loss"] + c["val_loss"] + [r["final_train_loss"], r["final_val_loss"]]
        assert r["finite"] and all(math.isfinite(v) for v in values), r["id"]
        # An untrained model over 128 symbols starts near ln(128).
        assert abs(c["val_loss"][0] - math.log(128)) < 0.5, r["id"]
        assert r["tokens_per_s"] > 0 and r["wall_s"] > 0
        assert 0.0 <= r["unchanged_in_cooldown"] <= 1.0, r["id"]
        assert r["param_dtype"] == ("float32" if r["name"] == "fp32" else "bfloat16")


def test_gaps_are_relative_to_fp32_with_same_wd(demo):
    _, doc = demo
    ref = {r["weight_decay"]: r["final_val_loss"] for r in doc["runs"] if r["name"] == "fp32"}
    for r in doc["runs"]:
        expected = 100 * (r["final_val_loss"] / ref[r["weight_decay"]] - 1)
        assert r["gap_vs_fp32_pct"] == pytest.approx(expected), r["id"]


def test_bytes_per_param_measured_from_state(demo):
    _, doc = demo
    for r in doc["runs"]:
        param, state = EXPECTED_BYTES[r["name"]]
        b = r["bytes_per_param"]
        assert b["param"] == param, r["id"]
        # Step counters: 4 bytes per tensor, spread over the params.
        steps_extra = 4 * 4 * 64 / r["n_params"]  # generous: <= 64 tensors of fp32 counters
        assert state <= b["state"] <= state + steps_extra, (r["id"], b)
        assert b["total"] == pytest.approx(b["param"] + b["state"])


def test_schedule_is_wsd_1_sqrt(demo):
    _, doc = demo
    cfg = doc["config"]
    for r in doc["runs"]:
        expected = [cfg["lr"] * wsd_factor(t, cfg["warmup_steps"], cfg["steps"], cfg["cooldown_fraction"])
                    for t in range(cfg["steps"])]
        assert r["curves"]["lr"] == pytest.approx(expected, rel=1e-6), r["id"]


def test_plot_written_when_matplotlib_is_installed(demo):
    out, _ = demo
    png = out / "loss_curves.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png.exists()


def test_runs_option_filters(tmp_path, capsys):
    assert main(["--steps", "2", "--size", "tiny", "--out", str(tmp_path), "--no-progress",
                 "--no-plot", "--runs", "bf16-sr,fp32", "--wd", "0.1"]) == 0
    doc = json.loads((tmp_path / "demo.json").read_text())
    assert [r["id"] for r in doc["runs"]] == ["fp32/wd=0.1", "bf16-sr/wd=0.1"]
    assert not (tmp_path / "loss_curves.png").exists()
    table = capsys.readouterr().out
    assert "bf16-sr" in table and "bf16-naive" not in table


def test_unknown_run_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--steps", "1", "--size", "tiny", "--out", str(tmp_path), "--runs", "fp64"])
    assert e.value.code == 2


def test_corpus_is_deterministic_and_local(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the corpus loader tried to open a socket")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    a, b = data.load_corpus(), data.load_corpus()
    assert a.text == b.text and a.sources == b.sources
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.chars >= data.MIN_CHARS
    assert len(a.train) + len(a.val) == a.chars
    assert 0.05 < len(a.val) / a.chars < 0.15
    assert int(a.train.max()) < data.VOCAB_SIZE and a.text.isascii()


def test_corpus_falls_back_without_stdlib_sources(tmp_path):
    c = data.load_corpus(stdlib=str(tmp_path / "missing"), min_chars=10_000)
    assert c.chars > 10_000 and all(s.startswith("builtins.") for s in c.sources)
    assert c.text == data.load_corpus(stdlib=str(tmp_path / "missing"), min_chars=10_000).text


def test_batches_are_the_same_for_every_run():
    c = data.load_corpus()
    a = data.Batches(c, 4, 16, steps=3, seed=7, val_batches=2)
    b = data.Batches(c, 4, 16, steps=3, seed=7, val_batches=2)
    for step in range(3):
        (xa, ya), (xb, yb) = a.train(step), b.train(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])  # targets are the inputs shifted by one
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a.val(), b.val()))
