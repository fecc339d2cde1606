"""scripts/gpu_check.py rehearsed on CPU at toy sizes: every part runs and its correctness checks pass
(the same code the GPU machine runs, minus the sizes). Measured: ~20 s of CPU, ~100 s wall on a loaded 2-core box."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

from sparta_cli.tuners.sparta.layer import CHECK_WEIGHTS_ENV


def test_gpu_check_toy_runs_every_part(data_dir, minilm_path, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--toy", "--data-dir", str(data_dir),
                          "--tokenizer", minilm_path, "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=1200, check=False,  # a guard against hangs only
                         env={**os.environ, CHECK_WEIGHTS_ENV: "1"})  # every SpaRTA forward checks it sees W0 + delta
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and report["toy"]
    assert {(r["dtype"], r["path"]) for r in report["a_layer_gradients"]} == {
        (d, p) for d in ("float32", "bfloat16") for p in ("dense", "sampled")}
    assert [r["optimizer"] for r in report["a_optimizer_writes"]] == ["adamw", "adamw_fused", "sgd"]
    assert len(report["b_crossover"]) == 3 * 8 and all(r["dense_ms"] > 0 and r["sampled_ms"] > 0 for r in report["b_crossover"])
    rows = report["c_bench_step"]["tiny"]["rows"]
    assert [r["method"] for r in rows] == ["limit", "sparta", "sparta", "lora"]
    assert rows[2]["trainable_params"] > 5 * rows[1]["trainable_params"]  # 1% and 0.1% of the model
    d = report["d_end_to_end"]
    assert set(d["methods"]) == {"sparta", "lora", "full"} and all(m["samples_per_s"] for m in d["methods"].values())
    assert d["eval_merged"]["ok"] and "adapter_model.safetensors" in d["export"]["files"]
    e = report["e_fsdp"]  # 2 CPU processes over gloo stand in for two GPUs
    assert e["ranks"] == 2 and e["ok"] and 0 <= e["max_delta_error"] <= 1e-5
    assert "all checks passed" in out.stdout
