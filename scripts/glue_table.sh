#!/usr/bin/env bash
# GLUE dev scores of MiniLM after a short SpaRTA run on CPU, one task after another (BENCHMARKS.md, issue 3).
#   SPARTA_DATA_DIR=/work/shared/data scripts/glue_table.sh [OUT_DIR] [TASK ...]
#   TABLE_ONLY=1 scripts/glue_table.sh OUT_DIR     # just print the table of what OUT_DIR holds
# Each task: `sparta train` on the first 2000 shuffled training examples (all of them when the
# set is smaller), 1 epoch, SpaRTA density 0.05 on v,o, lr 2e-3, batch 32, max_length 128,
# then scored on the full local dev split by the run's final evaluation (the code `sparta eval` runs).
# MNLI and QQP have no local dev split and are skipped. Prints a markdown table; wall time covers
# the whole command (model load, tokenization into a fresh cache, training, evaluation).
set -euo pipefail
source "$(dirname "$0")/find_python.sh"
out=${1:-/tmp/glue_table}
shift || true
tasks=("$@")
[ ${#tasks[@]} -gt 0 ] || tasks=(cola sst2 mrpc stsb qnli rte wnli)
: "${SPARTA_DATA_DIR:?set SPARTA_DATA_DIR to the data root (GLUE layout)}"
export SPARTA_CACHE_DIR="$out/cache" HF_HUB_OFFLINE=1
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
for task in "${tasks[@]}"; do
  [ -z "${TABLE_ONLY:-}" ] || break
  start=$(date +%s.%N)
  "$PYTHON" -m sparta_cli train "$here/configs/quickstart.yaml" --overwrite output_dir="$out/$task" task.name="$task" \
    data.max_length=128 data.max_train_samples=2000 data.max_eval_samples=null training.epochs=1 \
    training.batch_size=32 training.lr=2e-3 training.eval_every=null adapter.density=0.05 "adapter.targets=[v,o]" seed=42 \
    > "$out/$task.log" 2>&1
  echo "$(date +%s.%N) - $start" | bc > "$out/$task.wall"
done
"$PYTHON" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
tasks = ["cola", "sst2", "mrpc", "stsb", "qnli", "rte", "wnli"]
main = {"cola": "matthews_correlation", "stsb": "combined_score", "mrpc": "combined_score"}
print("| task | train examples | steps | dev examples | dev score (main metric) | other dev metrics | train s | total wall s |")
print("|---|---|---|---|---|---|---|---|")
for task in tasks:
    if not (out / f"{task}.wall").is_file():
        print(f"| {task} | not run | | | | | | |")
        continue
    ev = json.loads((out / task / "eval_results.json").read_text())
    tr = json.loads((out / task / "train_results.json").read_text())
    key = main.get(task, "accuracy")
    others = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in ev.items()
                       if k not in (f"eval_{key}", "eval_num_examples", "eval_loss"))
    wall = float((out / f"{task}.wall").read_text())
    print(f"| {task} | {tr['train_samples']} | {tr['train_steps']} | {ev['eval_num_examples']} | "
          f"{key} {ev[f'eval_{key}']:.4f} | {others or '-'} | {tr['train_runtime']:.0f} | {wall:.0f} |")
print("| mnli | no local dev split | | | | | | |")
print("| qqp | no local dev split | | | | | | |")
PY
