#!/usr/bin/env python
"""One GPU check (issue 12): correctness and speed on the paths only GPU users take, in one call.

  (a) layer gradients on the device equal the dense reference (fp32 weights; bf16 weights under
      bf16 autocast), through both gradient paths; every optimizer trains what the forward sees
  (b) the gradient-path crossover: dense vs sampled product timed at 4096x4096, 1024x4096 and
      14336x4096 (out x in), densities 0.0005..0.1, 4096 tokens, next to what `grad_path` picks
  (c) scripts/bench_step.py at --size 7b and --size 1b (limit, sparta at 0.1% and 1% of the model on
      v,o, peft-sparta, LoRA r=8 q,v, DoRA, full), ratios to the frozen limit of the same run
  (d) `sparta train configs/sst2.yaml` on a random-weight Gemma-2 2B-shaped model (sparta, LoRA,
      full: samples/s, peak memory), then `sparta merge`, `sparta eval` of the merged checkpoint
      (it must score what the run scored), `sparta export`
  (e) with two GPUs or more: `sparta train` under torchrun with training.sharding=fsdp on 2 GPUs
      (SpaRTA in bf16), its adapter against a one-GPU run of the same global batch; with one GPU it
      says so and skips (--toy: 2 CPU processes over gloo, fp32)

Self-contained: random weights from configs; SST-2 TSVs and MiniLM's tokenizer files from
--carry (filled by scripts/gpu_pack.sh); nothing is downloaded. Writes gpu_check.json to --out
and prints a summary; exits 1 when a correctness check fails.

  bash scripts/gpu_pack.sh                                          # here: fills .gpu_carry/
  python scripts/gpu_check.py --carry .gpu_carry --out "$OUT"       # on the GPU machine
  python scripts/gpu_check.py --toy --data-dir DATA --tokenizer DIR --out /tmp/x   # CPU, toy sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from sparta_cli.tuners.sparta import layer as sparta_layer  # noqa: E402

GIB = 2**30
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Gemma-2 2B's shape (vocabulary included); the toy one keeps the architecture at a few thousand parameters
GEMMA2_2B = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=256, vocab_size=256000)
GEMMA2_TOY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)
# imported by sparta or by bench_step's rows (peft_sparta: the authors' package, its comparison row)
NEEDED = ("datasets", "pydantic", "transformers", "accelerate", "peft", "peft_sparta", "typer", "rich", "safetensors",
          "yaml", "sklearn", "scipy", "matplotlib")
CROSSOVER_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096)]  # (out, in): attention, GQA value, MLP up
CROSSOVER_DENSITIES = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--toy", action="store_true", help="toy sizes on CPU (what tests/test_gpu_check.py runs)")
    p.add_argument("--carry", type=Path, default=REPO / ".gpu_carry", help="folder filled by scripts/gpu_pack.sh")
    p.add_argument("--data-dir", type=Path, help="data root holding glue/SST-2 (default: CARRY/data)")
    p.add_argument("--tokenizer", type=Path, help="folder with MiniLM's tokenizer files (default: CARRY/tokenizer)")
    p.add_argument("--out", type=Path, required=True, help="where gpu_check.json goes")
    p.add_argument("--work", type=Path, help="scratch folder for models and runs (default: OUT/work on CPU, /tmp/gpu_check on CUDA)")
    p.add_argument("--parts", default="a,b,c,d,e", help="which parts to run, comma-separated")
    args = p.parse_args(argv)
    args.device = "cpu" if args.toy else "cuda"
    args.data_dir = args.data_dir or args.carry / "data"
    args.tokenizer = args.tokenizer or args.carry / "tokenizer"
    args.work = args.work or (args.out / "work" if args.toy else Path("/tmp/gpu_check"))
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    return args


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def normwise_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: one number per comparison, comparable across shapes."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------- (a) correctness on the device


def layer_gradients(args: argparse.Namespace) -> list[dict]:
    """SpartaLinear's delta and input gradients against a plain linear's, per dtype and path."""
    from torch import nn

    from sparta_cli.tuners.sparta.layer import SpartaLinear
    from sparta_cli.tuners.sparta.mask import select_indices

    out_f, in_f, tokens = (48, 40, 32) if args.toy else (1024, 4096, 2048)
    # normwise bounds: fp32 sums in another order (measured ~1e-7); bf16 rounds the reference's
    # weight gradient to bf16 where the sampled product keeps fp32 (2^-8 relative)
    bounds = {torch.float32: 1e-5, torch.bfloat16: 2**-7}
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for path in ("dense", "sampled"):
            torch.manual_seed(0)
            base = nn.Linear(in_f, out_f, device=args.device, dtype=dtype)
            ref = nn.Linear(in_f, out_f, device=args.device, dtype=dtype)
            ref.load_state_dict(base.state_dict())
            layer = SpartaLinear(base, select_indices(out_f * in_f, 0.01, 0, "w"))
            x = torch.randn(tokens, in_f, device=args.device, dtype=dtype)
            g = torch.randn(tokens, out_f, device=args.device, dtype=dtype)
            grads = {}
            sparta_layer.FORCED_GRAD_PATH = path
            try:
                for name, module in (("sparta", layer), ("ref", ref)):
                    xi = x.clone().requires_grad_(True)
                    autocast = torch.autocast(args.device, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
                    with autocast:
                        y = module(xi)
                    y.backward(g.to(y.dtype))
                    grads[name] = xi.grad
            finally:
                sparta_layer.FORCED_GRAD_PATH = None
            idx = layer.sparta_indices.long()
            delta_err = normwise_error(layer.sparta_delta.grad, ref.weight.grad.reshape(-1)[idx])
            x_err = normwise_error(grads["sparta"], grads["ref"])
            bound = bounds[dtype]
            results.append({"dtype": str(dtype).removeprefix("torch."), "path": path, "shape": [out_f, in_f], "tokens": tokens,
                            "delta_grad_error": delta_err, "input_grad_error": x_err, "bound": bound,
                            "ok": delta_err <= bound and x_err <= bound})
    return results


def optimizer_writes(args: argparse.Namespace) -> list[dict]:
    """After 3 steps of each optimizer the model's logits equal a dense model holding W0 + delta."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from sparta_cli.optim import OPTIMIZERS, build_optimizer
    from sparta_cli.tuners import apply_adapter
    from sparta_cli.tuners.sparta.config import SpartaConfig

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_labels=3, pad_token_id=0)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(1, 96, (4, 9), generator=gen).to(args.device) for _ in range(4)]
    labels = torch.tensor([0, 2, 1, 1], device=args.device)

    def fresh():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_config(config).to(args.device)

    results = []
    for name in OPTIMIZERS:
        model = fresh()
        adapter = apply_adapter(model, SpartaConfig(targets=["v", "o"], density=0.1), seed=3, head_modules=["score"])
        optimizer = build_optimizer(adapter, name, lr=0.05, head_lr=None, weight_decay=0.01)
        model.train()
        for ids in batches[:3]:
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        ref = fresh()
        params = dict(ref.named_parameters())
        with torch.no_grad():
            for module, layer in adapter.sparta.layers.items():
                weight = params[f"{module}.weight"].view(-1)
                idx = layer.sparta_indices.long()
                weight[idx] = (weight[idx].float() + layer.sparta_delta).to(weight.dtype)
            ref.score.load_state_dict(model.score.state_dict())
            model.eval(), ref.eval()
            error = normwise_error(model(input_ids=batches[3]).logits, ref(input_ids=batches[3]).logits)
        results.append({"optimizer": name, "logits_error": error, "ok": error <= 1e-6})
    return results


# ---------------------------------------------------------------- (b) gradient-path crossover


def crossover(args: argparse.Namespace) -> list[dict]:
    from sparta_cli.tuners.sparta.layer import grad_path, sparse_weight_grad

    shapes, tokens, reps = ([(64, 64), (16, 64), (224, 64)], 64, 1) if args.toy else (CROSSOVER_SHAPES, 4096, 3)
    dtype = torch.float32 if args.toy else torch.bfloat16
    results = []
    for out_f, in_f in shapes:
        g = torch.randn(tokens, out_f, device=args.device, dtype=dtype)
        x = torch.randn(tokens, in_f, device=args.device, dtype=dtype)
        for density in CROSSOVER_DENSITIES:
            k = max(1, round(density * out_f * in_f))
            idx = torch.randperm(out_f * in_f, device=args.device)[:k].sort().values.int()
            times = {}
            for path in ("dense", "sampled"):
                sparse_weight_grad(g, x, idx, in_f, path=path)  # warm-up
                samples = []
                for _ in range(reps):
                    sync(args.device)
                    start = time.perf_counter()
                    sparse_weight_grad(g, x, idx, in_f, path=path)
                    sync(args.device)
                    samples.append(time.perf_counter() - start)
                times[path] = statistics.median(samples)
            faster = min(times, key=times.get)
            chosen = grad_path(tokens, out_f, in_f, k, torch.device(args.device).type)
            results.append({"shape": [out_f, in_f], "tokens": tokens, "density": density, "k": k,
                            "dense_ms": round(1e3 * times["dense"], 3), "sampled_ms": round(1e3 * times["sampled"], 3),
                            "faster": faster, "rule": chosen, "rule_agrees": chosen == faster,
                            "cost_of_rule": round(times[chosen] / times[faster], 3)})
    return results


# ---------------------------------------------------------------- (c) bench_step at 7b and 1b


def model_share_densities(size: str, shares: tuple[float, ...], targets: list[str]) -> list[float]:
    """Per-matrix densities that train `shares` of the whole model on `targets` (bench_step's model)."""
    import bench_step
    from transformers import AutoModelForSequenceClassification, MistralConfig

    from sparta_cli.targets import resolve_targets

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(MistralConfig(**bench_step.SIZES[size], num_labels=2, pad_token_id=0))
    total = sum(p.numel() for p in model.parameters())
    in_targets = sum(model.get_submodule(name).weight.numel() for name in resolve_targets(model, targets))
    return [round(share * total / in_targets, 5) for share in shares]


def bench(args: argparse.Namespace) -> dict:
    import bench_step

    sizes = ["tiny"] if args.toy else ["7b", "1b"]
    results = {}
    for size in sizes:
        densities = model_share_densities(size, (0.001, 0.01), ["v", "o"])
        argv = ["--size", size, "--densities", ",".join(map(str, densities)), "--json"]
        if args.toy:
            argv += ["--methods", "limit,sparta,lora", "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "0", "--no-memory"]
        else:
            argv += ["--batch", "8", "--seq", "512", "--steps", "5", "--warmup", "2"]
        started = time.perf_counter()
        rows = bench_step.measure(bench_step.parse_args(argv), argv)
        results[size] = {"argv": argv, "rows": rows, "seconds": round(time.perf_counter() - started, 1),
                         "targets": issue_targets(rows, densities[-1])}
    return results


def issue_targets(rows: list[dict], density: float) -> dict[str, bool | None]:
    """Issue 12's targets for SpaRTA at 1% of the model (reported, not enforced)."""
    by = {(r["method"], r["density"]): r for r in rows}
    ours, lora, peft = by.get(("sparta", density)), by.get(("lora", None)), by.get(("peft-sparta", density))

    def check(condition):
        try:
            return bool(condition())
        except (TypeError, KeyError):
            return None  # a row or its memory figure is missing

    return {"step <= 1.05x limit": check(lambda: ours["ratio_to_limit"] <= 1.05),
            "step < lora": check(lambda: ours["step_s"] < lora["step_s"]),
            "step <= 0.75x peft-sparta": check(lambda: ours["step_s"] <= 0.75 * peft["step_s"]),
            "peak memory < lora": check(lambda: ours["peak_mem_gib"] < lora["peak_mem_gib"])}


# ---------------------------------------------------------------- (d) sparta train, merge, eval, export


def random_gemma2(args: argparse.Namespace) -> Path:
    """A random-weight Gemma-2 (2B's shape, or toy) with MiniLM's tokenizer, saved as a local checkpoint."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    folder = args.work / "gemma2-random"
    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    shape = dict(GEMMA2_TOY, vocab_size=len(tokenizer)) if args.toy else GEMMA2_2B
    config = Gemma2Config(**shape, pad_token_id=tokenizer.pad_token_id, max_position_embeddings=512)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Gemma2ForCausalLM(config).to(torch.float32 if args.toy else torch.bfloat16)
    model.save_pretrained(folder)
    del model
    for name in TOKENIZER_FILES:
        shutil.copy(args.tokenizer / name, folder / name)
    return folder


CHILD = """
import os, sys, torch
from sparta_cli.cli import main
try:
    main()
finally:
    if torch.cuda.is_available():
        open(os.environ["GPU_CHECK_PEAK"], "w").write(str(torch.cuda.max_memory_allocated()))
"""


def sparta_cli(args: argparse.Namespace, *cli: str) -> dict:
    """Run one `sparta` command: in a fresh process on CUDA (its own peak memory), in this one for --toy."""
    started = time.perf_counter()
    if args.toy:
        from sparta_cli.cli import app

        app([*cli], standalone_mode=False)
        return {"seconds": round(time.perf_counter() - started, 1), "peak_mem_gib": None}
    peak_file = args.work / "peak.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "GPU_CHECK_PEAK": str(peak_file), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, *cli], env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sparta {' '.join(cli)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return {"seconds": round(time.perf_counter() - started, 1), "peak_mem_gib": round(int(peak_file.read_text()) / GIB, 3)}


def last_rate(run: Path) -> float | None:
    """samples/s of the last logged step (training only, no evaluation in it)."""
    rates = [json.loads(line).get("samples_per_s") for line in (run / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    rates = [r for r in rates if r is not None]
    return rates[-1] if rates else None


def end_to_end(args: argparse.Namespace) -> dict:
    base = random_gemma2(args)
    steps, evaluated = ("3", "16") if args.toy else ("40", "256")
    common = [f"model.name_or_path={base}", f"data.dir={args.data_dir}", f"training.max_steps={steps}",
              f"data.max_eval_samples={evaluated}", "training.eval_every=null", "training.log_every=5"]
    if args.toy:
        # fused AdamW as on CUDA (auto picks it there): the weights must follow the deltas through Accelerate
        common += ["data.max_train_samples=24", "training.batch_size=4", "data.max_length=32", "data.cache=false",
                   "training.optimizer=adamw_fused"]
    methods = {"sparta": [], "lora": ["adapter.method=lora", "adapter.targets=[q,v]"], "full": ["adapter.method=full"]}
    results: dict = {"base": str(base), "methods": {}}
    for method, extra in methods.items():
        run = args.work / "runs" / method
        measured = sparta_cli(args, "train", str(REPO / "configs" / "sst2.yaml"), *common, *extra, f"output_dir={run}", "--overwrite")
        train_results = json.loads((run / "train_results.json").read_text())
        eval_results = json.loads((run / "eval_results.json").read_text())
        results["methods"][method] = {**measured, "samples_per_s": last_rate(run), "train_results": train_results,
                                      "eval_accuracy": eval_results.get("eval_accuracy")}
    run = args.work / "runs" / "sparta"
    merged = args.work / "merged"
    shutil.rmtree(merged, ignore_errors=True)
    results["merge"] = sparta_cli(args, "merge", str(run), "--output", str(merged))
    scored = args.work / "merged_eval.json"
    results["eval_merged"] = sparta_cli(args, "eval", str(merged), "--task", "sst2", "--output", str(scored),
                                        f"data.dir={args.data_dir}", f"data.max_eval_samples={evaluated}",
                                        *(["data.max_length=32", "data.cache=false"] if args.toy else []))
    own = json.loads((run / "eval_results.json").read_text())
    metrics = json.loads(scored.read_text())["metrics"]
    results["eval_merged"].update({"accuracy": metrics["eval_accuracy"], "run_accuracy": own["eval_accuracy"],
                                   "loss": metrics["eval_loss"], "run_loss": own["eval_loss"],
                                   "ok": metrics["eval_accuracy"] == own["eval_accuracy"]
                                   and abs(metrics["eval_loss"] - own["eval_loss"]) <= 1e-2 * abs(own["eval_loss"])})
    exported = args.work / "exported"
    shutil.rmtree(exported, ignore_errors=True)
    results["export"] = sparta_cli(args, "export", str(run), "--format", "peft", "--output", str(exported))
    results["export"]["files"] = sorted(p.name for p in exported.iterdir())
    return results


def fsdp_two_ranks(args: argparse.Namespace) -> dict:
    """`sparta train` with training.sharding=fsdp on 2 ranks against 1 rank, same global batch."""
    from safetensors.torch import load_file

    if not args.toy and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU: FSDP needs two ranks", "ok": True}
    base = random_gemma2(args)
    precision = "no" if args.toy else "bf16"
    common = [f"model.name_or_path={base}", f"data.dir={args.data_dir}", "training.max_steps=6", "training.eval_every=null",
              "data.max_eval_samples=16", "data.max_train_samples=64", "data.max_length=32", "data.cache=false",
              f"training.mixed_precision={precision}", "training.optimizer=adamw", "training.log_every=1"]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}
    runs, seconds = {}, {}
    for name, batch, launch in (("one", 8, [sys.executable, "-m", "sparta_cli"]),
                                ("fsdp", 4, [torchrun, "--nproc_per_node", "2", "--master_port", "29571", "-m", "sparta_cli"])):
        run = args.work / "runs" / f"fsdp-{name}"
        cli = ["train", str(REPO / "configs" / "sst2.yaml"), *common, f"training.batch_size={batch}",
               f"training.sharding={'fsdp' if name == 'fsdp' else 'none'}", f"output_dir={run}", "--overwrite"]
        started = time.perf_counter()
        done = subprocess.run([*launch, *cli], env=env, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{name}: sparta train failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
        seconds[name] = round(time.perf_counter() - started, 1)
        runs[name] = load_file(str(run / "adapter_model.safetensors"))
    worst = max(normwise_error(runs["fsdp"][key], runs["one"][key]) for key in runs["one"] if key.endswith(".delta"))
    bound = 1e-5 if args.toy else 2e-2  # fp32: rounding; bf16: FSDP's bf16 weights against autocast (0.0097 on CPU)
    return {"ranks": 2, "precision": "bf16" if precision == "bf16" else "fp32", "seconds": seconds, "max_delta_error": worst, "bound": bound, "ok": worst <= bound}


# ---------------------------------------------------------------- driver


def summary(report: dict) -> list[str]:
    lines = [f"gpu_check on {report['device']} · torch {report['torch']} · {report['seconds']} s"]
    for row in report.get("a_layer_gradients", []):
        lines.append(f"(a) grads {row['dtype']:<8} {row['path']:<7} delta err {row['delta_grad_error']:.2e} "
                     f"input err {row['input_grad_error']:.2e} (bound {row['bound']:.0e}) {'ok' if row['ok'] else 'FAIL'}")
    for row in report.get("a_optimizer_writes", []):
        lines.append(f"(a) optimizer {row['optimizer']:<12} logits err {row['logits_error']:.2e} {'ok' if row['ok'] else 'FAIL'}")
    for row in report.get("b_crossover", []):
        lines.append(f"(b) {row['shape'][0]}x{row['shape'][1]} d={row['density']:<7} dense {row['dense_ms']:>9.3f} ms "
                     f"sampled {row['sampled_ms']:>9.3f} ms  faster {row['faster']:<7} rule {row['rule']:<7} x{row['cost_of_rule']}")
    for size, bench_result in report.get("c_bench_step", {}).items():
        for row in bench_result["rows"]:
            name = row["method"] + (f" {row['density']:g}" if row["density"] else "")
            peak = "-" if row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.2f} GiB"
            lines.append(f"(c) {size:<4} {name:<20} step {row['step_s']:.4f} s  x limit {row['ratio_to_limit']}  peak {peak}")
        lines.append(f"(c) {size} targets: {bench_result['targets']}")
    d = report.get("d_end_to_end")
    if d:
        for method, row in d["methods"].items():
            peak = "-" if row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.2f} GiB"
            lines.append(f"(d) train {method:<6} {row['samples_per_s']} samples/s  peak {peak}  ({row['seconds']} s)")
        e = d["eval_merged"]
        lines.append(f"(d) merged eval accuracy {e['accuracy']} vs run {e['run_accuracy']} {'ok' if e['ok'] else 'FAIL'}; "
                     f"export: {', '.join(d['export']['files'])}")
    f = report.get("e_fsdp")
    if f:
        lines.append(f"(e) FSDP2: {f['skipped']}" if "skipped" in f else
                     f"(e) FSDP2 2 ranks ({f['precision']}) vs 1: delta err {f['max_delta_error']:.2e} (bound {f['bound']:.0e}) "
                     f"{'ok' if f['ok'] else 'FAIL'}; seconds {f['seconds']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.toy and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or pass --toy for the CPU rehearsal")
    import importlib.util

    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"missing on this machine: {', '.join(missing)}: pip install --no-index --find-links "
                         f"{args.carry}/wheels PACKAGES (add what scripts/gpu_pack.sh lacks to its WHEELS)")
    for folder, what in ((args.data_dir / "glue" / "SST-2", "SST-2"), (args.tokenizer, "the tokenizer")):
        if {"d", "e"} & set(args.parts) and not folder.is_dir():
            raise SystemExit(f"{what} not found at {folder}: run scripts/gpu_pack.sh first (or pass --data-dir/--tokenizer)")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    report: dict = {"device": device_name, "torch": torch.__version__, "toy": args.toy, "seconds_by_part": {}}
    parts = {"a": [("a_layer_gradients", layer_gradients), ("a_optimizer_writes", optimizer_writes)],
             "b": [("b_crossover", crossover)], "c": [("c_bench_step", bench)], "d": [("d_end_to_end", end_to_end)],
             "e": [("e_fsdp", fsdp_two_ranks)]}
    for part in args.parts:
        part_start = time.perf_counter()
        for key, run in parts[part]:
            report[key] = run(args)
            print(f"[gpu_check] {key} done at {time.perf_counter() - started:.0f} s", flush=True)
        report["seconds_by_part"][part] = round(time.perf_counter() - part_start, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))  # a timeout keeps the parts done
    report["seconds"] = round(time.perf_counter() - started, 1)
    checks = [row["ok"] for key in ("a_layer_gradients", "a_optimizer_writes") for row in report.get(key, [])]
    if "d_end_to_end" in report:
        checks.append(report["d_end_to_end"]["eval_merged"]["ok"])
    if "e_fsdp" in report:
        checks.append(report["e_fsdp"]["ok"])
    report["ok"] = all(checks)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print("\n".join(summary(report)))
    print(f"{'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'}; results in {args.out / 'gpu_check.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
