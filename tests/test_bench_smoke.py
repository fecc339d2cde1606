"""The benchmark scripts run end to end on tiny models and print their JSON rows (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_step.py"
KEYS = {"method", "step_s", "ratio_to_limit", "peak_mem_gib", "trainable_params", "extra_bytes_per_trainable"}


def test_bench_step_tiny_json():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny", "--steps", "2", "--warmup", "1", "--threads", "1",
         "--batch", "2", "--seq", "16", "--json"],
        capture_output=True, text=True, timeout=1200, check=False,  # a guard against hangs only
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["method"] for r in rows] == ["limit", "sparta", "peft-sparta", "lora", "dora", "full"]
    for row in rows:
        assert KEYS <= row.keys()
        assert row["step_s"] > 0 and row["peak_mem_gib"] > 0 and row["trainable_params"] > 0
    by = {r["method"]: r for r in rows}
    assert by["limit"]["ratio_to_limit"] == 1.0 and by["limit"]["extra_bytes_per_trainable"] == 0.0
    # same matrices, same budget: peft-sparta's Bernoulli draw lands near our exact count
    assert abs(by["peft-sparta"]["trainable_params"] - by["sparta"]["trainable_params"]) < 0.2 * by["sparta"]["trainable_params"]
    assert by["full"]["trainable_params"] == by["full"]["params"]


def test_bench_step_sft_tiny_json():
    """The SFT mode: a causal LM on an assistant-masked batch, no head; peft-sparta is its own SFT trainer's step."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--task", "sft", "--size", "tiny", "--steps", "2", "--warmup", "1", "--threads", "1",
         "--batch", "2", "--seq", "16", "--methods", "limit,sparta,peft-sparta", "--no-memory", "--json"],  # memory: the test above
        capture_output=True, text=True, timeout=1200, check=False,  # a guard against hangs only
    )
    assert out.returncode == 0, out.stderr[-3000:]
    by = {r["method"]: r for r in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))}
    assert list(by) == ["limit", "sparta", "peft-sparta"]
    assert by["limit"]["trainable_params"] == 0  # no head in SFT: the limit trains nothing
    # v,o at density 0.01 of the tiny model (2 layers, 128 x 64 and 128 x 128 matrices): 2 x (82 + 164) entries
    assert by["sparta"]["trainable_params"] == 492
    assert abs(by["peft-sparta"]["trainable_params"] - 492) < 0.2 * 492


def test_bench_serve_quick_json(tiny_bert_nodropout_dir):
    """scripts/bench_serve.py --quick on a tiny base: a row per system, adapter count, mix and batch (no timing asserted)."""
    out = subprocess.run([sys.executable, str(SCRIPT.with_name("bench_serve.py")), "--quick", "--json", "--base", str(tiny_bert_nodropout_dir)],
                         capture_output=True, text=True, timeout=1200, check=False)  # a guard against hangs only
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["system"], r["adapters"], r["mix"]) for r in rows] == [
        (system, count, mix) for system in ("sparta", "peft-lora") for count, mix in ((1, "uniform"), (3, "uniform"), (3, "zipf"))]
    for row in rows:
        assert row["requests"] > 0 and row["requests_per_s"] > 0 and row["rss_mib"] > 0 and row["p99_ms"] >= row["p50_ms"]
    by = {(r["system"], r["adapters"], r["mix"]): r for r in rows}
    assert by[("sparta", 1, "uniform")]["vs_ceiling"] == 1.0
    assert by[("sparta", 3, "uniform")]["swaps_per_s"] > 0 and by[("sparta", 3, "uniform")]["adapter_bytes"] > 0
    assert "merged model per adapter" in out.stdout
