#!/usr/bin/env python
"""Training-step time and peak memory of every method on one model and batch, side by side.

Rows (each a fresh copy of the same random- or real-weight model, the same batch):
  limit        every weight of the body frozen, the head trainable, and the input embeddings
               made to require grad, so the backward runs through every layer to the input
               but computes no weight gradient in the body: the cheapest any method that
               adapts the body can be (forward + activation-gradient backward + head step).
  sparta:D     ours (sparta_cli.tuners.apply_adapter) at density D on --targets (default v,o).
  peft-sparta:D  the paper authors' package (peft_sparta.SpaRTA) on the same matrices, with its
               sparsity set so that it trains the same number of parameters (in expectation:
               it draws its entries by Bernoulli sampling) as sparta:D.
  lora, dora   r=8, alpha=16 on q,v through PEFT (apply_adapter), head trained fully.
  full, head   everything; only the head.
One step = forward, loss, backward, optimizer step (--optimizer), zero_grad (as `sparta train` runs it; weights
in --dtype, head in fp32 under autocast when the body is half precision).

--task sft: the same rows on a causal LM trained on an assistant-masked batch (SFT: each row's prompt
tokens labelled -100, its answer supervised, rows of uneven length padded), the loss as `sparta train`
computes it (tasks.kinds.SFT.train_loss: the LM head on the supervised positions only), no head
trained (the limit then trains nothing: forward + input-gradient backward only), and peft-sparta is its own SFT trainer's
step (`peft_sparta.trainer.sft`): its SpaRTA wrapper, its optimizer (`build_optimizer`, AdamW betas
0.9/0.99), its LR schedule, and its loop body (forward with use_cache=False, loss.item(), zero_grad,
backward, step, schedule), fp32 (its `amp: false`).

Timing: all rows in this one process, after --warmup steps; on CPU the rows' steps interleave
(rotating order), so load from other processes spreads over every row alike; step_s is the
median, step_s_min/max show the spread.
Memory: on CUDA, torch.cuda.max_memory_allocated per row; on CPU, the peak RSS of a fresh
subprocess per row (this script re-invoked with --row), so rows cannot inflate each other.
ratio_to_limit = median over steps i of (row's step i) / (limit's step i), paired within a round.
extra_bytes_per_trainable = (peak - limit's peak) / trainable parameters.

  python scripts/bench_step.py --size small                      # CPU table
  python scripts/bench_step.py --size 7b --densities 0.106 --batch 8 --seq 512 --json   # GPU
  python scripts/bench_step.py --task sft --size smollm2 --densities 0.0421 --methods limit,sparta,peft-sparta,lora,full
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from sparta_cli.optim import OPTIMIZERS, build_optimizer, make_optimizer, resolve_optimizer
from sparta_cli.targets import HEAD_NAMES, resolve_targets
from sparta_cli.tasks.kinds import SFT
from sparta_cli.tuners import apply_adapter
from sparta_cli.tuners.full.config import FullConfig
from sparta_cli.tuners.head.config import HeadConfig
from sparta_cli.tuners.lora.config import DoraConfig, LoraConfig
from sparta_cli.tuners.sparta.config import SpartaConfig

GIB = 2**30
NUM_LABELS = 2
# Mistral-shaped configs (GQA, SwiGLU MLP, 32k vocabulary); 7b is Mistral-7B itself.
SIZES = {
    "tiny": {"hidden_size": 128, "intermediate_size": 448, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 16000},
    "small": {"hidden_size": 512, "intermediate_size": 1792, "num_hidden_layers": 12, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
    "7b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000},
    # SmolLM2-135M-Instruct's shape (a Llama: the same blocks as Mistral without a sliding window), tied embeddings
    "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "vocab_size": 49152, "tie_word_embeddings": True},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=["classification", "sft"], default="classification",
                   help="a sequence classifier (head trained), or a causal LM on an assistant-masked batch (no head)")
    p.add_argument("--size", choices=SIZES, default="small", help="random-weight Mistral-shaped model")
    p.add_argument("--model", help="a local model folder instead of --size")
    p.add_argument("--densities", default="0.01", help="comma-separated SpaRTA densities (per target matrix)")
    p.add_argument("--targets", default="v,o", help="SpaRTA (and peft-sparta) targets")
    p.add_argument("--methods", default="limit,sparta,peft-sparta,lora,dora,full", help="rows, comma-separated (also: head)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--optimizer", choices=["auto", *OPTIMIZERS], default="auto", help="as training.optimizer (auto: fused AdamW on CUDA)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 is steadiest on a busy machine")
    p.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    p.add_argument("--no-memory", action="store_true", help="on CPU, skip the per-row peak-RSS subprocesses (timing only)")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row's peak RSS, print it
    args = p.parse_args(argv)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    args.optimizer = resolve_optimizer(args.optimizer, args.device)
    return args


def row_specs(args: argparse.Namespace) -> list[str]:
    """`limit`, `sparta:0.01`, `peft-sparta:0.01`, `lora`, ... in the order asked for."""
    densities = [d.strip() for d in args.densities.split(",") if d.strip()]
    rows: list[str] = []
    for method in (m.strip() for m in args.methods.split(",") if m.strip()):
        rows += [f"{method}:{d}" for d in densities] if method in ("sparta", "peft-sparta") else [method]
    return rows


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The same weights every call (fixed seed), built directly on the device in --dtype."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, MistralConfig

    dtype = DTYPES[args.dtype]
    auto = AutoModelForCausalLM if args.task == "sft" else AutoModelForSequenceClassification
    head = {} if args.task == "sft" else {"num_labels": NUM_LABELS}
    torch.manual_seed(0)
    with torch.device(args.device):
        if args.model:
            model = auto.from_pretrained(args.model, dtype=dtype, device_map=args.device, **head)
        else:
            config = MistralConfig(**SIZES[args.size], **head, pad_token_id=0, max_position_embeddings=max(4096, args.seq))
            model = auto.from_config(config, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0
    for name in head_modules(model):  # the head trains in fp32, as in `sparta train`
        model.get_submodule(name).float()
    return model.train()


def head_modules(model: torch.nn.Module) -> list[str]:
    """The classifier's head; none on a causal LM (SFT keeps the pretrained LM head)."""
    return [name for name in HEAD_NAMES if hasattr(model, name)]


def make_batch(args: argparse.Namespace, vocab_size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab_size, (args.batch, args.seq), generator=g)
    if args.task == "sft":
        return {name: t.to(args.device) for name, t in sft_batch(ids, g).items()}
    labels = torch.randint(0, NUM_LABELS, (args.batch,), generator=g)
    return {"input_ids": ids.to(args.device), "attention_mask": torch.ones_like(ids).to(args.device), "labels": labels.to(args.device)}


def sft_batch(ids: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """An assistant-masked batch as the SFT collator pads it: rows of 3/4 to all of the length
    (right-padded, pad id 0, attention 0, label -100), the first 2/3 of each row a prompt (label
    -100), the rest its answer (supervised)."""
    rows, seq = ids.shape
    lengths = torch.randint(max(2, 3 * seq // 4), seq + 1, (rows,), generator=g)
    lengths[0] = seq  # the longest row sets the padded width
    positions = torch.arange(seq)
    real = positions < lengths[:, None]
    answer = positions >= (2 * lengths // 3)[:, None]
    ids = ids.masked_fill(~real, 0)
    labels = ids.masked_fill(~(real & answer), -100)
    return {"input_ids": ids, "attention_mask": real.long(), "labels": labels}


def peft_sparta_model(model: torch.nn.Module, args: argparse.Namespace, density: float):
    """peft_sparta.SpaRTA adapting only the --targets matrices, with as many trainable
    parameters (in expectation) as our SpaRTA at `density`, head included."""
    from peft_sparta import SpaRTA

    targets = [t.strip() for t in args.targets.split(",")]
    target_weights = {f"{name}.weight" for name in resolve_targets(model, targets)}
    heads = head_modules(model)
    if heads not in (["score"], []):
        raise SystemExit("peft-sparta trains only a head named `score` (decoder classifiers): drop peft-sparta from --methods")
    params = dict(model.named_parameters())
    ours = sum(round(density * params[w].numel()) for w in target_weights) + sum(params[f"{h}.weight"].numel() for h in heads)
    total = sum(p.numel() for p in params.values())
    frozen = [name for name in params if name not in target_weights and not name.startswith("score.")]
    return SpaRTA(model, sparsity=1 - ours / total, frozen_modules=frozen)


def peft_sparta_sft_step(run, args: argparse.Namespace, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One step of peft-sparta's own SFT trainer (peft_sparta/trainer/sft/sft.py, `SFT.train`'s loop
    body), with its optimizer and LR schedule, fp32 (`amp: false`) and no clipping (its default)."""
    from peft_sparta.trainer.sft.optim import build_lr_scheduler
    from peft_sparta.trainer.sft.optim import build_optimizer as sft_optimizer

    config = {"weight_decay": 0.0, "peft_method": "sparse", "lr": 1e-5, "lr_min": 1e-6, "lr_scheduler_type": "cosine",
              "warmup_steps": 1, "num_epochs": 1}
    optimizer = sft_optimizer(run, config, "CAUSAL_LM")
    scheduler = build_lr_scheduler(optimizer, config, steps_per_epoch=10**6)

    def step() -> None:
        loss = run(**batch, use_cache=False).loss
        loss.item()  # its trainer records every step's loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()

    return step


@dataclass
class Row:
    step: Callable[[], None]  # one training step
    trainable: int
    params: int  # of the base model, before adaptation


def prepare_row(spec: str, args: argparse.Namespace) -> Row:
    """A fresh model adapted for the row, and a closure that runs one training step."""
    method, _, density = spec.partition(":")
    model = build_model(args)
    base_params = sum(p.numel() for p in model.parameters())
    batch = make_batch(args, model.config.vocab_size)
    heads = head_modules(model)
    inputs = batch
    if method == "peft-sparta" and args.task == "sft":
        run = peft_sparta_model(model, args, float(density))
        return Row(peft_sparta_sft_step(run, args, batch), sum(p.numel() for p in run.parameters()), base_params)
    optimizer = None
    if method == "peft-sparta":
        run = peft_sparta_model(model, args, float(density))
        params = list(run.parameters())
        optimizer = make_optimizer([{"params": params}], args.optimizer, lr=1e-5)
    else:
        cfg = {
            "limit": HeadConfig(),
            "head": HeadConfig(),
            "full": FullConfig(),
            "sparta": SpartaConfig(density=float(density or 0.01), targets=args.targets.split(",")),
            "lora": LoraConfig(r=8, alpha=16, targets=["q", "v"]),
            "dora": DoraConfig(r=8, alpha=16, targets=["q", "v"]),
        }[method]
        adapter = apply_adapter(model, cfg, seed=0, head_modules=heads)
        run = adapter.model
        params = [p for _, p in adapter.trainable()]
        if params:  # an SFT limit trains nothing
            optimizer = build_optimizer(adapter, args.optimizer, lr=1e-5, head_lr=None, weight_decay=0.0)
    embed = model.get_input_embeddings()
    half = DTYPES[args.dtype] != torch.float32
    device_type = torch.device(args.device).type

    def step() -> None:
        nonlocal inputs
        if method == "limit":  # the backward must reach the input through every frozen layer
            embeds = embed(batch["input_ids"]).detach().requires_grad_(True)
            inputs = {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
        with torch.autocast(device_type, dtype=DTYPES[args.dtype]) if half else nullcontext():
            if args.task == "sft":  # sparta train's SFT loss: the LM head on the supervised positions only
                summed, tokens = SFT().train_loss(run, inputs)
                loss = summed / tokens
            else:
                loss = run(**inputs).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return Row(step, sum(p.numel() for p in params), base_params)


def sync(args: argparse.Namespace) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def free(args: argparse.Namespace) -> None:
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(step: Callable[[], None], args: argparse.Namespace) -> float:
    sync(args)
    start = time.perf_counter()
    step()
    sync(args)
    return time.perf_counter() - start


def time_rows(specs: list[str], args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, Row], dict[str, int]]:
    """Step times of every row, the rows themselves (counts), and CUDA peaks in bytes.

    On CPU every row stays built and the timed steps interleave (row order rotating), so
    the load of other processes falls on every row alike. On CUDA, where the big rows do
    not fit together and nothing else perturbs the timing, rows run one after another
    and each one's peak is its own."""
    times: dict[str, list[float]] = {s: [] for s in specs}
    rows: dict[str, Row] = {}
    peaks: dict[str, int] = {}
    if args.device.startswith("cuda"):
        for spec in specs:
            free(args)
            row = prepare_row(spec, args)
            for _ in range(args.warmup):
                row.step()
            times[spec] = [timed(row.step, args) for _ in range(args.steps)]
            peaks[spec] = torch.cuda.max_memory_allocated()
            rows[spec] = Row(lambda: None, row.trainable, row.params)  # drop the model
            del row
        free(args)
        return times, rows, peaks
    for spec in specs:
        rows[spec] = prepare_row(spec, args)
        for _ in range(args.warmup):
            rows[spec].step()
    for i in range(args.steps):
        shift = i % len(specs)
        for spec in specs[shift:] + specs[:shift]:
            times[spec].append(timed(rows[spec].step, args))
    return times, rows, peaks


def own_peak_rss() -> int:
    """This process's peak RSS in bytes. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    from the parent across fork+exec, so a child would report the parent's peak."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_rss_bytes(specs: list[str], argv: list[str]) -> dict[str, int]:
    """Peak RSS of a fresh process per row that builds it and runs warm-up + one step.
    Run after the timing, a few at a time: RSS does not depend on the CPU share."""
    peaks: dict[str, int] = {}
    jobs = max(1, os.cpu_count() or 1)
    for start in range(0, len(specs), jobs):
        batch = specs[start:start + jobs]
        procs = {spec: subprocess.Popen([sys.executable, __file__, *argv, "--row", spec], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for spec in batch}
        for spec, proc in procs.items():
            out, err = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"measuring {spec} failed:\n{err[-2000:]}")
            peaks[spec] = int(json.loads(out.strip().splitlines()[-1])["peak_rss_bytes"])
    return peaks


def paired_ratio(row: list[float], limit: list[float]) -> float:
    """Median over steps of row[i] / limit[i]: on CPU step i of every row ran in the same
    interleaved round, so each ratio compares times taken under the same outside load."""
    return statistics.median(r / base for r, base in zip(row, limit))


def measure(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    specs = row_specs(args)
    times, built, peaks = time_rows(specs, args)
    trainable = {spec: row.trainable for spec, row in built.items()}
    params = built[specs[0]].params
    del built
    if not args.device.startswith("cuda") and not args.no_memory:
        peaks = peak_rss_bytes(specs, argv)
    limit_times = times.get("limit")
    limit_peak = peaks.get("limit")
    rows = []
    for spec in specs:
        method, _, density = spec.partition(":")
        step_s = statistics.median(times[spec])
        peak = peaks.get(spec)
        extra = (peak - limit_peak) / trainable[spec] if peak is not None and limit_peak is not None and trainable[spec] else None
        rows.append({
            "method": method,
            "density": float(density) if density else None,
            "targets": args.targets if method in ("sparta", "peft-sparta") else ("q,v" if method in ("lora", "dora") else None),
            "trainable_params": trainable[spec],
            "step_s": round(step_s, 4),
            "step_s_min": round(min(times[spec]), 4),
            "step_s_max": round(max(times[spec]), 4),
            "ratio_to_limit": round(paired_ratio(times[spec], limit_times), 3) if limit_times else None,
            "peak_mem_gib": round(peak / GIB, 3) if peak is not None else None,
            "extra_bytes_per_trainable": round(extra, 2) if extra is not None else None,
            "memory": "cuda_max_allocated" if args.device.startswith("cuda") else "peak_rss",
            "model": args.model or args.size, "params": params, "batch": args.batch, "seq": args.seq,
            "dtype": args.dtype, "device": args.device, "samples": len(times[spec]),
        })
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    first = rows[0]
    print(f"model {first['model']} ({first['params'] / 1e6:.1f}M params) · batch {args.batch} x {args.seq} · {args.dtype} · {args.device} · "
          f"{first['samples']} timed steps per row{' (interleaved)' if args.device == 'cpu' else ''} · memory: {first['memory']}")
    header = f"{'row':<20} {'trainable':>12} {'step s':>8} {'min':>8} {'max':>8} {'x limit':>8} {'peak GiB':>9} {'B/trainable':>12}"
    print(header)
    print("-" * len(header))
    for row in rows:
        name = row["method"] + (f" {row['density']:g}" if row["density"] else "")
        extra = _or_dash(row["extra_bytes_per_trainable"], ".1f")
        ratio = _or_dash(row["ratio_to_limit"], ".3f")
        print(f"{name:<20} {row['trainable_params']:>12,} {row['step_s']:>8.4f} {row['step_s_min']:>8.4f} {row['step_s_max']:>8.4f} "
              f"{ratio:>8} {_or_dash(row['peak_mem_gib'], '.3f'):>9} {extra:>12}")


def _or_dash(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.row:  # child: one row, warm-up + one step, report the process's peak RSS
        row = prepare_row(args.row, args)
        for _ in range(args.warmup + 1):
            row.step()
        print(json.dumps({"peak_rss_bytes": own_peak_rss()}))
        return
    rows = measure(args, argv)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print_table(rows, args)


if __name__ == "__main__":
    main()
