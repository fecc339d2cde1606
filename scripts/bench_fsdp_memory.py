"""Memory per rank of SpaRTA under FSDP2 (BENCHMARKS.md, issue 16): a ~1.1B-parameter random Llama
(TinyLlama's shape, bf16 weights) with SpaRTA at density 0.01 on every linear of every block,
sharded over 1, 2 and 4 CPU processes (gloo), one AdamW step of one short sequence.

    .venv/bin/python scripts/bench_fsdp_memory.py [--worlds 1 2 4] [--layers 22] [--density 0.01] [--loading rank0|every]

Per rank: the bytes of the local shards of the frozen weights, of SpaRTA's state (owned fp32
deltas, their W0 values and AdamW moments; the global index array, which every rank keeps), the
RSS after the model is built, after `fully_shard` and after the step, and the peak RSS.
`--loading rank0` (what `sparta train` does under FSDP): rank 0 builds the whole model, the
others a skeleton on the meta device that rank 0 fills with their parts while sharding, so only
rank 0's peak holds a whole copy. `--loading every`: every rank builds the whole model first.
The workers run with MALLOC_MMAP_THRESHOLD_=1 MiB, so that glibc returns freed blocks above that
size (FSDP's per-step all-gather buffers) to the system instead of keeping them, and RSS, the peak
included, follows live memory rather than the allocator's reserve. RSS figures are taken after `malloc_trim`, so they count
live memory, not the freed gather buffers glibc keeps for reuse.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

GIB = 1024**3


def rss() -> int:
    """Resident set size now, in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trimmed_rss() -> int:
    """RSS once glibc has handed its free heap pages back (malloc_trim): the live memory, without
    the freed all-gather buffers that malloc keeps for reuse."""
    import ctypes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(rank: int, world: int, port: int, layers: int, density: float, loading: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from sparta_cli.tuners import apply_adapter
    from sparta_cli.tuners.sparta.config import SpartaConfig
    from sparta_cli.tuners.sparta.sharded import shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, num_labels=2, pad_token_id=0)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 copy on the way
    with torch.device("meta" if loading == "rank0" and rank > 0 else "cpu"):
        model = LlamaForSequenceClassification(config)
    torch.set_default_dtype(torch.float32)
    model.score.float()  # the head trains in fp32, as in `sparta train`
    total_params = sum(p.numel() for p in model.parameters())
    adapter = apply_adapter(model, SpartaConfig(density=density, targets=["q", "k", "v", "o", "gate", "up", "down"]),
                            seed=0, head_modules=["score"])
    loaded = trimmed_rss()
    # as `sparta train` with training.mixed_precision=bf16 under FSDP: bf16 compute, fp32 head and gradient sums
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    sharded = shard(model, sparta=adapter.sparta, mp_policy=policy)
    adapter.sparta = sharded.sparta
    after_shard = trimmed_rss()
    frozen = sum(p.to_local().numel() * p.element_size() for p in model.parameters()
                 if hasattr(p, "to_local") and not p.requires_grad)
    layers_ = sharded.sparta.layers.values()
    owned = sum(layer.sparta_delta.numel() for layer in layers_)
    k = sum(layer.sparta_indices.numel() for layer in layers_)
    optimizer = torch.optim.AdamW([p for _, p in adapter.trainable()], lr=1e-3)
    sharded.sparta.write_after_steps_of(optimizer)
    model.train()
    ids = torch.randint(1, 32000, (1, 16), generator=torch.Generator().manual_seed(rank))
    loss = model(input_ids=ids, labels=torch.tensor([rank % 2])).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    after_step = trimmed_rss()
    sparta_state = sum(layer.sparta_delta.numel() * 4 + layer.sparta_origin.numel() * layer.sparta_origin.element_size()
                       + layer.sparta_local.numel() * layer.sparta_local.element_size() for layer in layers_)
    moments = sum(v.numel() * v.element_size() for p in optimizer.state for v in optimizer.state[p].values()
                  if torch.is_tensor(v) and v.dim() and any(p is layer.sparta_delta for layer in layers_))
    indices = sum(layer.sparta_indices.numel() * layer.sparta_indices.element_size() for layer in layers_)
    row = {"world": world, "rank": rank, "loading": loading, "params": total_params, "k": k, "owned": owned, "frozen_local_bytes": frozen,
           "sparta_local_bytes": sparta_state + moments, "global_indices_bytes": indices,
           "rss_loaded": loaded, "rss_after_shard": after_shard, "rss_after_step": after_step, "peak_rss": peak_rss()}
    Path(out, f"w{world}-r{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--loading", choices=["rank0", "every"], default="rank0")
    parser.add_argument("--out", type=Path, default=Path("runs/fsdp_memory"))
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # a worker process (one per rank)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        worker(args.rank, args.world, args.port, args.layers, args.density, args.loading, str(args.out))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    for world in args.worlds:  # one process per rank, so each one's peak RSS is its own
        port = free_port()
        procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", str(world), "--port", str(port),
                                   "--layers", str(args.layers), "--density", str(args.density), "--loading", args.loading,
                                   "--out", str(args.out)], env=env)
                 for r in range(world)]
        if any(p.wait() for p in procs):
            sys.exit(f"world {world} failed")
    rows = [json.loads(p.read_text()) for p in sorted(args.out.glob("w*-r*.json"))]
    print(f"{rows[0]['params'] / 1e9:.2f}B parameters (bf16), SpaRTA k = {rows[0]['k']:,} entries at density {args.density}, "
          f"loading: {args.loading}")
    print("| processes | rank | frozen weights, local shard | SpaRTA state, local (fp32 deltas, W0, AdamW) | "
          "global index array | RSS after building | RSS after fully_shard | RSS after a step | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["world"], r["rank"])):
        print(f"| {r['world']} | {r['rank']} | {r['frozen_local_bytes'] / GIB:.2f} GiB | {r['sparta_local_bytes'] / 2**20:.0f} MiB | "
              f"{r['global_indices_bytes'] / 2**20:.0f} MiB | {r['rss_loaded'] / GIB:.2f} GiB | {r['rss_after_shard'] / GIB:.2f} GiB | "
              f"{r['rss_after_step'] / GIB:.2f} GiB | {r['peak_rss'] / GIB:.2f} GiB |")


if __name__ == "__main__":
    main()
