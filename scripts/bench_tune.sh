#!/usr/bin/env bash
# BENCHMARKS.md "sparta tune vs a grid": TPE with median pruning against a 5 x 4 grid of the same
# 20 trials, both on configs/tune_rte.yaml's held-out validation rows, run side by side (one worker
# each, so they share the machine alike). Resumable: rerun the same command after a kill; finished
# trials are never rerun. Then the table:
#   python scripts/bench_tune_table.py OUT/tpe OUT/grid
#   bash scripts/bench_tune.sh [OUT=tunes/bench] [-- key=value ...]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=${1:-tunes/bench}
shift $(( $# > 0 ? 1 : 0 ))
[[ "${1:-}" == "--" ]] && shift
mkdir -p "$out"
"$PY" -m sparta_cli tune configs/tune_rte.yaml "$@" --study tpe -o "$out/tpe" >"$out/tpe.log" 2>&1 &
tpe=$!
"$PY" -m sparta_cli tune configs/tune_rte.yaml "$@" --study grid -o "$out/grid" --sampler grid --pruner none \
  --space "adapter.density=[0.001, 0.005, 0.02, 0.05, 0.2]" --space "training.lr=[3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2]" \
  >"$out/grid.log" 2>&1 &
grid=$!
status=0
wait $tpe || status=1
wait $grid || status=1
"$PY" scripts/bench_tune_table.py "$out/tpe" "$out/grid"
exit $status
