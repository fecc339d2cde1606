#!/usr/bin/env bash
# Quality side by side: train every method on RECIPE's task with matched trainable budgets
# and print one markdown table (method, trainable params, dev metrics, time, peak memory).
#
#   scripts/compare_methods.sh RECIPE [key=value ...]     # overrides apply to every run
#
# SpaRTA's density on the recipe's targets is chosen so that its trainable count equals
# LoRA r=8 on q,v (to within per-matrix rounding), times each of $MULTIPLES (default "1 4 16",
# capped at density 1). Learning rates per method: $LR_SPARTA $LR_LORA $LR_DORA $LR_FULL
# $LR_HEAD (defaults below). Runs go to $OUT (default runs/compare/<recipe name>); peak
# memory is the peak RSS of each `sparta train` process (GNU time's %M).
set -euo pipefail
source "$(dirname "$0")/find_python.sh"

if [[ $# -lt 1 || ! -f $1 ]]; then
    echo "usage: scripts/compare_methods.sh RECIPE [key=value ...]" >&2
    exit 2
fi
recipe=$1
shift
out=${OUT:-runs/compare/$(basename "$recipe" .yaml)}
multiples=${MULTIPLES:-"1 4 16"}
declare -A lr=([sparta]=${LR_SPARTA:-2e-3} [lora]=${LR_LORA:-1e-3} [dora]=${LR_DORA:-1e-3} [full]=${LR_FULL:-5e-5} [head]=${LR_HEAD:-2e-3})
mkdir -p "$out"

# the density at which SpaRTA on the recipe's targets trains as many entries as LoRA r=8 on q,v
read -r matched targets < <("$PYTHON" - "$recipe" "$@" <<'EOF'
import sys
from sparta_cli.config import load_recipe
from sparta_cli.console import quiet_libraries
from sparta_cli.models import load_for_classification
from sparta_cli.targets import lora_matched_density
from sparta_cli.tasks import resolve_task

quiet_libraries()
recipe = load_recipe(sys.argv[1], sys.argv[2:])
model = load_for_classification(recipe.model, resolve_task(recipe.task).num_labels, None).model
print(lora_matched_density(model, recipe.adapter.targets), "[" + ",".join(recipe.adapter.targets) + "]")
EOF
)

runs=()
train() {  # name, overrides...
    local name=$1
    shift
    echo "training $name ..." >&2
    if ! /usr/bin/time -f "%e %M" -o "$out/$name.time" "$PYTHON" -m sparta_cli train "$recipe" "output_dir=$out/$name" "$@" --overwrite >"$out/$name.log" 2>&1; then
        echo "$name failed: see $out/$name.log" >&2
        return 1
    fi
    runs+=("$name")
}

train head adapter.method=head "training.lr=${lr[head]}" "$@"
for m in $multiples; do
    density=$("$PYTHON" -c "print(f'{min(1.0, $m * $matched):.6g}')")
    train "sparta-x$m" adapter.method=sparta "adapter.density=$density" "adapter.targets=$targets" "training.lr=${lr[sparta]}" "$@"
done
train lora adapter.method=lora adapter.r=8 "adapter.targets=[q,v]" "training.lr=${lr[lora]}" "$@"
train dora adapter.method=dora adapter.r=8 "adapter.targets=[q,v]" "training.lr=${lr[dora]}" "$@"
train full adapter.method=full "training.lr=${lr[full]}" "$@"

"$PYTHON" - "$out" "${runs[@]}" <<'EOF'
import json, sys
from pathlib import Path

out, names = Path(sys.argv[1]), sys.argv[2:]
print("| method | density | trainable params | dev metrics | train s | wall s | peak RSS GiB |")
print("|---|---|---|---|---|---|---|")
for name in names:
    run = out / name
    adapter = json.loads((run / "adapter_config.json").read_text())
    results = json.loads((run / "all_results.json").read_text())
    wall, peak_kb = (run.parent / f"{name}.time").read_text().split()[-2:]
    metrics = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in results.items()
                        if k.startswith("eval_") and "loss" not in k and "num_examples" not in k)
    label = adapter["method"] + (f" {adapter['targets'] and ','.join(adapter['targets'])}" if adapter["method"] in ("sparta", "lora", "dora") else "")
    density = f"{adapter['density']:.4g}" if adapter.get("density") else "-"
    print(f"| {label} | {density} | {adapter['trainable_params']:,} | {metrics} | {results['train_runtime']:.1f} | {float(wall):.1f} | {int(peak_kb) / 2**20:.2f} |")
EOF
